"""A worker process for the SDK tests: runs one blocking handler and says when it starts."""

from __future__ import annotations

import sys

import anyio
from taskmanager import TaskManager, WorkerTask


async def main() -> None:
    manager = TaskManager()

    async def handler(task: WorkerTask) -> None:
        print(f"started {task.id} attempt {task.attempt}", flush=True)
        await anyio.sleep_forever()

    await manager.process(handler)
    print("ready", flush=True)
    await anyio.sleep_forever()


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
