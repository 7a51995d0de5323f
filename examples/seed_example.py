"""The seed's usage example (shared/seed/TaskManager-README.md), in Python.

Run a sidecar (``tm-sidecar``), then ``python examples/seed_example.py [asyncio|trio]``.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime

import anyio
from taskmanager import DefaultTaskManager


async def main() -> None:
    manager = DefaultTaskManager()

    async def handler(task):  # type: ignore[no-untyped-def]
        master = manager.is_master()
        print(f"Worker with ID {worker.id} (Master: {master}) received Task with ID {task.id}")
        return True

    worker = await manager.process(handler)
    task = await manager.create({"TaskSpecificKey": "TaskSpecificValue"})

    # Tell the Worker to wait 10 seconds before failing the Job
    task.with_timeout(10)

    # Optionally delay this job until the specific Date
    task.with_delay_until(datetime(2020, 1, 1, tzinfo=UTC))

    # Optionally handle a successfully resolved Task ( receives result )
    task.on("success", lambda result: print(f"success: {result}"))

    # Optionally handle a failed Task ( receives error )
    task.on("failure", lambda error: print(f"failure: {error}"))

    # Commit this task ( Queues it )
    await task.commit()
    print(f"result: {await task.result(timeout=30)}")

    # Gracefully shut down the TaskManager and its workers (also what to do on SIGTERM)
    await manager.shutdown()


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
