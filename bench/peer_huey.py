"""Huey on Redis for the drain benchmark (``bench.peer_enqueue`` fills its queue);
``huey_consumer bench.peer_huey.huey`` runs it."""

from __future__ import annotations

import os

import redis
from huey import RedisHuey

PORT = int(os.environ.get("BENCH_REDIS_PORT", "6379"))
huey = RedisHuey("tm-bench", host="127.0.0.1", port=PORT, results=False)
_counter = redis.Redis(port=PORT)


@huey.task()
def noop() -> None:
    """Count the run, so the benchmark knows when the backlog is gone."""
    _counter.incr("done")
