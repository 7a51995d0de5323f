"""Handlers that tm-sidecar processes load with --handler in the multi-process tests."""

from __future__ import annotations

import os
from typing import Any

import trio

from tm_sidecar import TaskContext


async def work(task: TaskContext) -> Any:
    """Sleep as long as the payload says, then answer who did it."""
    await trio.sleep(float(task.payload.get("work_s", 0.01)))
    return {
        "i": task.payload.get("i"),
        "node": os.environ.get("TM_NODE_ID"),
        "attempt": task.attempt,
    }


async def hang(task: TaskContext) -> Any:
    """Never finish (until cancelled): a task a drain has to hand back."""
    await trio.sleep_forever()


async def fail_unless_flag(task: TaskContext) -> Any:
    """Fail (with a traceback) until the file the payload names exists, then work."""
    flag = task.payload.get("fail_unless")
    if flag and not await trio.Path(flag).exists():
        raise RuntimeError(f"the flag file {flag} is not there yet")
    return await work(task)
