"""The pictures of a queue: its tasks finished (completed, failed) over a time window,
and the wait from commit to start (percentiles), from what the dashboard already counts.

The finished tasks per minute are the :class:`~._census.Census`'s (it reads every state
record anyway); the waits are the :class:`~._journal.Journal`'s (the commit and the first
start of a task as this sidecar's hub saw them), for the census's sample of the queue's
finished tasks. Pure: the page renders what :func:`queue_stats` answers.
"""

from __future__ import annotations

import math

import attrs

from ._census import Census
from ._journal import Journal

#: The windows a page may ask for (``?window=``), in minutes, and the bars each has.
WINDOWS = {"30m": 30, "2h": 120, "6h": 360, "24h": 1440}
BARS = 30


@attrs.frozen
class Bucket:
    """One bar: its first minute, tasks completed and failed, waits' p50 and p90."""

    minute: int
    completed: int
    failed: int
    wait_p50: float | None
    wait_p90: float | None


@attrs.frozen
class QueueStats:
    """A queue's pictures over one window."""

    queue: str
    window: str
    minutes_per_bar: int
    buckets: tuple[Bucket, ...]
    completed: int
    failed: int
    waits: int  # tasks whose wait is known
    wait_p50: float | None
    wait_p90: float | None
    wait_p99: float | None

    @property
    def peak(self) -> int:
        """The busiest bar (at least 1): the chart's scale."""
        return max([1, *(b.completed + b.failed for b in self.buckets)])

    @property
    def peak_wait(self) -> float:
        """The longest p90 wait of a bar (a small positive number at least)."""
        return max([1e-3, *(b.wait_p90 or 0.0 for b in self.buckets)])


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) of sorted ``values``, nearest rank; None for none."""
    if not values:
        return None
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


def queue_stats(
    census: Census, journal: Journal, queue: str, window: str, now: float
) -> QueueStats:
    """The pictures of ``queue`` over the last ``window`` (a key of ``WINDOWS``)."""
    minutes = WINDOWS[window]
    per_bar = max(1, minutes // BARS)
    first = int(now // 60) - BARS * per_bar + 1
    counts = [[0, 0] for _ in range(BARS)]
    for minute, (completed, failed) in census.finished.get(queue, {}).items():
        index = (minute - first) // per_bar
        if 0 <= index < BARS:
            counts[index][0] += completed
            counts[index][1] += failed
    waits: list[list[float]] = [[] for _ in range(BARS)]
    for minute, task_id in census.finished_ids.get(queue, []):
        index = (minute - first) // per_bar
        wait = journal.wait_s(task_id) if 0 <= index < BARS else None
        if wait is not None:
            waits[index].append(wait)
    buckets = []
    for index in range(BARS):
        mine = sorted(waits[index])
        buckets.append(
            Bucket(
                minute=first + index * per_bar,
                completed=counts[index][0],
                failed=counts[index][1],
                wait_p50=percentile(mine, 0.5),
                wait_p90=percentile(mine, 0.9),
            )
        )
    every = sorted(w for bar in waits for w in bar)
    return QueueStats(
        queue=queue,
        window=window,
        minutes_per_bar=per_bar,
        buckets=tuple(buckets),
        completed=sum(c for c, _ in counts),
        failed=sum(f for _, f in counts),
        waits=len(every),
        wait_p50=percentile(every, 0.5),
        wait_p90=percentile(every, 0.9),
        wait_p99=percentile(every, 0.99),
    )
