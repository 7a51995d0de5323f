"""Tasks per queue and state, counted for the overview: keys do not name their queue, so
the :class:`Census` reads every state record, and only while someone looks.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import attrs
import trio

from .._errors import TaskManagerError, Unavailable
from ..core import Keyspace, KeyValue, State
from ..etcd import Etcd

# A record's options come before anything a task wrote (Record.to_json puts them third),
# so the first "queue" in its JSON is the task's queue: a count needs no full parse.
_QUEUE_IN_RECORD = re.compile(r'"queue":"([A-Za-z0-9_.:-]{1,128})"')
_KEY_IN_RECORD = re.compile(r'"concurrency_key":"([^"\\]{1,256})"')
_STARTED_IN_RECORD = re.compile(r'"started_at":([-0-9.eE+]+)')
# ``since_at`` comes second in a record's JSON (before anything a task wrote).
_SINCE_IN_RECORD = re.compile(r'"since_at":([-0-9.eE+]+)')
#: How far back the finished tasks are bucketed (per minute), and the tasks per queue
#: kept for the waits (a sample: keys are in id order).
FINISHED_KEPT_S = 24 * 3600.0
#: How far back starts are counted per second (for a rate's window, which is shorter).
STARTS_KEPT_S = 600
WAIT_SAMPLE = 2000


@attrs.define(eq=False)
class Census:
    """Tasks per queue and state, counted from a listing of the state keys.

    Keys do not name their queue, so counting per queue reads every state record: the
    count is taken only while someone looks, and again no sooner than ``factor`` times
    its own duration (at least ``min_interval_s``), which keeps its cost to a small
    share of the sidecar whatever the backlog.
    """

    etcd: Etcd
    ks: Keyspace
    min_interval_s: float = 5.0
    factor: float = 20.0
    clock: Callable[[], float] = trio.current_time
    wall: Callable[[], float] = time.time
    counts: dict[str, dict[str, int]] = attrs.Factory(dict)
    #: Per queue: minute (epoch // 60) -> [completed, failed], of the records etcd holds
    #: that finished in the last ``FINISHED_KEPT_S`` (a purged record is counted no more).
    finished: dict[str, dict[int, list[int]]] = attrs.Factory(dict)
    #: Per queue: (minute finished, task id) of some of those tasks, for their waits.
    finished_ids: dict[str, list[tuple[int, str]]] = attrs.Factory(dict)
    #: Per queue: its concurrency key with the most tasks running, and how many.
    busiest_key: dict[str, tuple[str, int]] = attrs.Factory(dict)
    #: Per queue: second (epoch) -> attempts assigned or started then, in the
    #: ``STARTS_KEPT_S`` before the count (a task's latest attempt only: its record
    #: keeps no other).
    starts: dict[str, dict[int, int]] = attrs.Factory(dict)
    #: When the last count was taken (epoch seconds).
    taken_wall: float = 0.0
    taken_at: float | None = None  # trio time
    took_s: float = 0.0
    error: str | None = None
    _wanted: trio.Event = attrs.Factory(trio.Event)
    _taken: trio.Event = attrs.Factory(trio.Event)

    def want(self) -> None:
        """Someone is looking: count again if the last count is old enough."""
        self._wanted.set()

    async def want_fresh(self, within_s: float) -> None:
        """Want a count, and wait up to ``within_s`` for it if one is due now (a first
        look at the page then shows counts, not "counting")."""
        due = self._due_in_s() <= 0
        self.want()
        if due:
            with trio.move_on_after(within_s):
                await self._taken.wait()

    def starts_within(self, queue: str, period_s: float) -> int:
        """Attempts of ``queue`` started in the ``period_s`` before the last count (as
        far as the records tell: each keeps its latest attempt's start)."""
        since = self.taken_wall - period_s
        return sum(n for s, n in self.starts.get(queue, {}).items() if s >= since)

    def age_s(self) -> float | None:
        """Seconds since the last count, or None before the first."""
        return None if self.taken_at is None else self.clock() - self.taken_at

    def _due_in_s(self) -> float:
        age = self.age_s()
        if age is None:
            return 0.0
        return max(self.min_interval_s, self.factor * self.took_s) - age

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Count when wanted and due, until cancelled; started at once (the first count
        is taken when a page first asks for one)."""
        task_status.started()
        while True:
            await self._wanted.wait()
            wait = self._due_in_s()
            if wait > 0:
                await trio.sleep(wait)
            self._wanted = trio.Event()
            await self.take()

    async def take(self) -> None:
        """Count now."""
        started = self.clock()
        counts: dict[str, dict[str, int]] = {}
        finished: dict[str, dict[int, list[int]]] = {}
        finished_ids: dict[str, list[tuple[int, str]]] = {}
        oldest = self.wall() - FINISHED_KEPT_S
        parse = self.ks.parse
        final = {State.COMPLETED: 0, State.FAILED: 1}
        running_keys: dict[str, dict[str, int]] = {}
        starts: dict[str, dict[int, int]] = {}
        wall = self.wall()
        recent = wall - STARTS_KEPT_S

        def consume(kvs: tuple[KeyValue, ...]) -> None:
            for kv in kvs:
                parsed = parse(kv.key)
                if parsed is None or parsed.state is None:
                    continue
                found = _QUEUE_IN_RECORD.search(kv.value)
                queue = found.group(1) if found else "default"
                per_state = counts.setdefault(queue, {})
                per_state[parsed.state.value] = per_state.get(parsed.state.value, 0) + 1
                if parsed.state in (State.PROCESSING, State.COMPLETED, State.FAILED):
                    # A rate counts assignments: a processing record's since_at is its
                    # assignment (its start may not be written yet); a finished one
                    # keeps its latest attempt's start.
                    pattern = _SINCE_IN_RECORD
                    if parsed.state is not State.PROCESSING:
                        pattern = _STARTED_IN_RECORD
                    start = pattern.search(kv.value)
                    if start is not None and float(start.group(1)) >= recent:
                        second = int(float(start.group(1)))
                        per_second = starts.setdefault(queue, {})
                        per_second[second] = per_second.get(second, 0) + 1
                if parsed.state is State.PROCESSING:
                    key = _KEY_IN_RECORD.search(kv.value)
                    if key is not None:
                        per_key = running_keys.setdefault(queue, {})
                        per_key[key.group(1)] = per_key.get(key.group(1), 0) + 1
                column = final.get(parsed.state)
                since = _SINCE_IN_RECORD.search(kv.value) if column is not None else None
                if column is None or since is None or float(since.group(1)) < oldest:
                    continue
                minute = int(float(since.group(1)) // 60)
                row = finished.setdefault(queue, {}).setdefault(minute, [0, 0])
                row[column] += 1
                ids = finished_ids.setdefault(queue, [])
                if len(ids) < WAIT_SAMPLE and parsed.task_id is not None:
                    ids.append((minute, parsed.task_id))

        try:
            await self.etcd.list_prefix(
                self.ks.state_prefix(State.COMPLETED),
                range_end=self.ks.prefix + "task",
                consume=consume,
            )
        except (Unavailable, TaskManagerError) as exc:
            self.error = str(exc)
            return
        self.counts = {q: counts[q] for q in sorted(counts)}
        self.finished, self.finished_ids = finished, finished_ids
        self.starts, self.taken_wall = starts, wall
        self.busiest_key = {
            q: max(keys.items(), key=lambda item: item[1]) for q, keys in running_keys.items()
        }
        self.error = None
        self.took_s = self.clock() - started
        self.taken_at = self.clock()
        self._taken.set()
        self._taken = trio.Event()
