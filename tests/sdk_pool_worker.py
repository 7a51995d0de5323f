"""A worker process with ``run_worker(..., pool="process")``, as the README shows it: its
handler is this script's own function, so the guard below is what lets each child
process import the script without running a worker of its own."""

from __future__ import annotations

import os
from typing import Any

from taskmanager import run_worker


def double(task: Any) -> dict[str, int]:
    return {"double": task.data * 2, "pid": os.getpid()}


if __name__ == "__main__":
    run_worker(double, concurrency=2, pool="process", shutdown_timeout=5)
