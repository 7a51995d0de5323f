"""Celery on Redis for the drain benchmark (``bench.peer_enqueue`` fills its queue);
``celery -A bench.peer_celery worker`` runs it."""

from __future__ import annotations

import os

import redis
from celery import Celery

PORT = int(os.environ.get("BENCH_REDIS_PORT", "6379"))
app = Celery("tm-bench", broker=f"redis://127.0.0.1:{PORT}/0")
app.conf.task_ignore_result = True
app.conf.worker_prefetch_multiplier = 64
_counter = redis.Redis(port=PORT)


@app.task
def noop() -> None:
    """Count the run, so the benchmark knows when the backlog is gone."""
    _counter.incr("done")
