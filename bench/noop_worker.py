"""A drain worker process: runs no-op tasks over the SDK until terminated."""

from __future__ import annotations

from typing import Any

from taskmanager import WorkerTask, run_worker


async def noop(task: WorkerTask) -> Any:
    """Nothing: the benchmark measures the queue."""
    return None


if __name__ == "__main__":
    run_worker(noop, concurrency=32)
