"""A worker process that relies on run_worker for its signals (the README's way).

``python tests/sdk_signal_worker.py BACKEND SHUTDOWN_TIMEOUT``: a task with ``hang``
never finishes by itself; any other takes half a second.
"""

from __future__ import annotations

import logging
import sys

import anyio
from taskmanager import WorkerTask, run_worker


async def handler(task: WorkerTask) -> str:
    print(f"started {task.id}", flush=True)
    if task.data.get("hang"):
        await anyio.sleep_forever()
    await anyio.sleep(0.5)
    return "finished"


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    run_worker(handler, backend=sys.argv[1], shutdown_timeout=float(sys.argv[2]))
    print("exited by itself", flush=True)
