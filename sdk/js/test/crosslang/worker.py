"""The cross-language scenario's worker, with the Python SDK (worker.mjs is its twin)."""

from __future__ import annotations

import sys
from typing import Any

import anyio
from taskmanager import DefaultTaskManager, Permanent, WorkerTask


class Flaky(Exception):
    """A failure worth a retry."""


async def handler(task: WorkerTask) -> Any:
    op = task.data["op"]
    if op == "add":
        await task.update({"done": 0.5})
        return {"sum": task.data["a"] + task.data["b"]}
    if op == "permanent":
        raise Permanent("cannot do this")
    if op == "flaky":
        if task.attempt == 1:
            raise Flaky("the first attempt fails")
        return {"attempt": task.attempt}
    if op == "slow":
        await anyio.sleep(60)  # cancelled by the task's timeout
        return None
    raise Permanent(f"unknown op {op}")


async def main(queue: str) -> None:
    manager = DefaultTaskManager()
    await manager.process(handler, queue=queue, concurrency=4)
    print("ready", flush=True)
    await anyio.to_thread.run_sync(sys.stdin.read)
    await manager.shutdown()


if __name__ == "__main__":
    anyio.run(main, sys.argv[1])
