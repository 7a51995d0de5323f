"""Handlers that tm-sidecar processes load with --handler in the multi-process tests."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import trio

from tm_sidecar import Permanent, TaskContext


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
    """Fail (with a traceback) until the file the payload names exists, then work; fail
    for good (``Permanent``) with ``permanent``."""
    if task.payload.get("permanent"):
        raise Permanent("this task fails for good on purpose")
    flag = task.payload.get("fail_unless")
    if flag and not await trio.Path(flag).exists():
        raise RuntimeError(f"the flag file {flag} is not there yet")
    return await work(task)


async def chaos(task: TaskContext) -> Any:
    """The fault tests' handler: records each start (one JSON line appended to the file
    $TM_TEST_STARTS), then does what the payload says: work for ``work_s``, fail its
    first ``fail_first`` attempts, fail for good (``permanent``), or hang (``hang``, for
    a timeout)."""
    start = {"task": task.id, "attempt": task.attempt, "node": os.environ.get("TM_NODE_ID")}
    line = json.dumps({**start, "at": time.time(), "pid": os.getpid()}) + "\n"
    await trio.to_thread.run_sync(_append, os.environ["TM_TEST_STARTS"], line)
    payload = task.payload
    await trio.sleep(float(payload.get("work_s", 0.01)))
    if task.attempt <= int(payload.get("fail_first", 0)):
        raise RuntimeError(f"attempt {task.attempt} fails on purpose")
    if payload.get("permanent"):
        raise Permanent("this task fails for good on purpose")
    if payload.get("hang"):
        await trio.sleep_forever()
    return {"i": payload.get("i"), "attempt": task.attempt}


def _append(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line.encode())  # one write with O_APPEND: lines never interleave
    finally:
        os.close(fd)
