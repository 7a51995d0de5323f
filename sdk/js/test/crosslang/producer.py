"""The cross-language scenario's producer, with the Python SDK (producer.mjs is its twin)."""

from __future__ import annotations

import json
import sys
from typing import Any

import anyio
from taskmanager import DefaultTaskManager, Task, TaskFailed


async def outcome(task: Task) -> dict[str, Any]:
    try:
        return {"result": await task.result(timeout=30)}
    except TaskFailed as exc:
        err = exc.error
        return {
            "error": {"type": err["type"], "message": err["message"], "retryable": err["retryable"]}
        }


async def main(queue: str) -> None:
    manager = DefaultTaskManager()
    add = (await manager.create({"op": "add", "a": 2, "b": 3})).with_queue(queue)
    progress: list[Any] = []
    add.on("updated", progress.append)
    permanent = (await manager.create({"op": "permanent"})).with_queue(queue).with_retries(3)
    flaky = (
        (await manager.create({"op": "flaky"}))
        .with_queue(queue)
        .with_retries(3, base_s=0.05, jitter=0)
    )
    failed: list[list[Any]] = []
    flaky.on(
        "failed",
        lambda error, will_retry: failed.append([error["type"], error["message"], will_retry]),
    )
    slow = (
        (await manager.create({"op": "slow"})).with_queue(queue).with_timeout(0.3).with_retries(1)
    )
    for task in (add, permanent, flaky, slow):
        await task.commit()
    out = {
        "add": {**(await outcome(add)), "progress": progress},
        "permanent": {
            **(await outcome(permanent)),
            "attempts": (await manager.get(permanent.id))["attempts"],
        },
        "flaky": {**(await outcome(flaky)), "failed": failed},
        "slow": {"error": (await outcome(slow))["error"]["type"]},
    }
    print(json.dumps(out), flush=True)
    await manager.shutdown()


if __name__ == "__main__":
    anyio.run(main, sys.argv[1])
