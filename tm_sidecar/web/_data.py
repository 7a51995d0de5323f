"""What the dashboard shows, read from etcd and from the sidecar's event hub.

etcd holds each task's spec and its *latest* state record only. The earlier attempts
of a task, and the completions per minute, are what this sidecar's hub saw since it
started: the :class:`Journal` keeps them, bounded.
"""

from __future__ import annotations

import json
import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import trio

from .._errors import TaskManagerError, Unavailable
from ..admin import Queries
from ..core import (
    JSON,
    Keyspace,
    KeyValue,
    NodeInfo,
    Record,
    State,
    TaskError,
    TaskEvent,
    TaskId,
)
from ..etcd import Etcd
from ..node._sidecar import FINAL_STATES, Sidecar, TaskInfo, is_final

STATES = tuple(State)
#: Characters of a task id, a node id or a queue name (``check_name``), for searches.
_PARTIAL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
# A record's options come before anything a task wrote (Record.to_json puts them third),
# so the first "queue" in its JSON is the task's queue: a count needs no full parse.
_QUEUE_IN_RECORD = re.compile(r'"queue":"([A-Za-z0-9_.:-]{1,128})"')


def valid_partial_name(text: str) -> bool:
    """Whether ``text`` could be (part of) a task id, a node id or a queue name."""
    return bool(_PARTIAL_NAME.match(text))


def prefix_end(prefix: str) -> str:
    """The first key after every key that starts with ``prefix`` (names are ASCII)."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


# -- what the hub saw ----------------------------------------------------------------------


@attrs.define
class AttemptSeen:
    """One attempt of a task as the events told it (times are when this sidecar saw them)."""

    number: int
    node: str | None = None
    assigned_at: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    outcome: str | None = None  # "completed", "failed", "retried"
    progress: JSON = None
    result: JSON = None
    error: TaskError | None = None


#: Tracebacks kept per attempt in the journal, at most (the record in etcd has the whole).
MAX_TRACEBACK = 16_000
#: Events kept per task, for its page.
EVENTS_PER_TASK = 40

#: An event as the journal keeps it: (sequence number, when seen, the event).
Seen = tuple[int, float, TaskEvent]


@attrs.define
class _TaskSeen:
    attempts: list[AttemptSeen] = attrs.Factory(list)
    events: deque[Seen] = attrs.Factory(lambda: deque(maxlen=EVENTS_PER_TASK))


@attrs.define(eq=False)
class Journal:
    """Attempts per task, outcomes per minute and the latest events, as the hub told them."""

    max_tasks: int = 5000
    minutes_kept: int = 60
    recent_kept: int = 50
    clock: Callable[[], float] = time.time
    events_seen: int = 0
    _tasks: OrderedDict[TaskId, _TaskSeen] = attrs.Factory(OrderedDict)
    # minute (epoch // 60) -> [completed, failed for good]
    _minutes: dict[int, list[int]] = attrs.Factory(dict)
    recent: deque[tuple[float, TaskEvent]] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.recent = deque(maxlen=self.recent_kept)

    def see(self, event: TaskEvent) -> None:
        """Take in one event (the hub's callback: quick, never blocks)."""
        now = self.clock()
        self.events_seen += 1
        self.recent.append((now, event))
        if event.kind == "completed" or (event.kind == "failed" and not event.will_retry):
            minute = int(now // 60)
            counts = self._minutes.get(minute)
            if counts is None:
                counts = self._minutes[minute] = [0, 0]
                for old in [m for m in self._minutes if m <= minute - self.minutes_kept]:
                    del self._minutes[old]
            counts[0 if event.kind == "completed" else 1] += 1
        task = self._tasks.get(event.task_id)
        if task is None:
            if len(self._tasks) >= self.max_tasks:
                self._tasks.popitem(last=False)
            task = self._tasks[event.task_id] = _TaskSeen()
        else:
            self._tasks.move_to_end(event.task_id)
        task.events.append((self.events_seen, now, event))
        if event.kind == "queued":
            return
        attempts = task.attempts
        if event.kind == "assigned" or not attempts or attempts[-1].number != event.attempt:
            attempts.append(AttemptSeen(number=event.attempt))
        attempt = attempts[-1]
        if event.node is not None:
            attempt.node = event.node
        if event.kind == "assigned":
            attempt.assigned_at = now
        elif event.kind == "started":
            attempt.started_at = attempt.started_at or now
        elif event.kind == "updated":
            attempt.progress = event.data
        else:
            attempt.ended_at = now
            if event.kind == "completed":
                attempt.outcome, attempt.result = "completed", event.data
            else:
                attempt.outcome = "retried" if event.will_retry else "failed"
                attempt.error = _trimmed(event.error)

    def attempts(self, task_id: TaskId) -> list[AttemptSeen]:
        """The attempts seen of one task, oldest first (copies)."""
        task = self._tasks.get(task_id)
        return [attrs.evolve(a) for a in task.attempts] if task else []

    def events(self, task_id: TaskId, after: int = 0, upto: int | None = None) -> list[Seen]:
        """The events seen of one task with a sequence number in ``(after, upto]``."""
        task = self._tasks.get(task_id)
        if task is None:
            return []
        return [e for e in task.events if after < e[0] and (upto is None or e[0] <= upto)]

    def per_minute(self, minutes: int = 30) -> list[tuple[int, int, int]]:
        """``(minute, completed, failed)`` for the last ``minutes`` minutes, oldest first."""
        now_minute = int(self.clock() // 60)
        return [
            (m, *self._minutes.get(m, [0, 0]))  # type: ignore[misc]
            for m in range(now_minute - minutes + 1, now_minute + 1)
        ]


def _trimmed(error: TaskError | None) -> TaskError | None:
    if error is None or not error.traceback or len(error.traceback) <= MAX_TRACEBACK:
        return error
    return attrs.evolve(error, traceback="...\n" + error.traceback[-MAX_TRACEBACK:])


# -- the queues, by counting ---------------------------------------------------------------


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
    counts: dict[str, dict[str, int]] = attrs.Factory(dict)
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

    def age_s(self) -> float | None:
        """Seconds since the last count, or None before the first."""
        return None if self.taken_at is None else self.clock() - self.taken_at

    def _due_in_s(self) -> float:
        age = self.age_s()
        if age is None:
            return 0.0
        return max(self.min_interval_s, self.factor * self.took_s) - age

    async def run(self) -> None:
        """Count when wanted and due, until cancelled."""
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
        parse = self.ks.parse

        def consume(kvs: tuple[KeyValue, ...]) -> None:
            for kv in kvs:
                parsed = parse(kv.key)
                if parsed is None or parsed.state is None:
                    continue
                found = _QUEUE_IN_RECORD.search(kv.value)
                queue = found.group(1) if found else "default"
                per_state = counts.setdefault(queue, {})
                per_state[parsed.state.value] = per_state.get(parsed.state.value, 0) + 1

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
        self.error = None
        self.took_s = self.clock() - started
        self.taken_at = self.clock()
        self._taken.set()
        self._taken = trio.Event()


# -- the overview --------------------------------------------------------------------------


@attrs.frozen
class NodeRow:
    """A live sidecar with its capacity and the attempts it runs."""

    info: NodeInfo
    running: int
    leader: bool


@attrs.frozen
class EtcdHealth:
    """What etcd says of itself, and how long it took to say it."""

    endpoint: str
    ok: bool
    latency_ms: float = 0.0
    version: str = ""
    db_size: int = 0
    db_in_use: int = 0
    revision: int = 0
    raft_term: int = 0
    alarms: tuple[str, ...] = ()
    error: str | None = None


@attrs.frozen
class Overview:
    """Everything the overview page shows."""

    namespace: str
    this_node: str
    is_leader: bool
    leader: str | None
    nodes: tuple[NodeRow, ...]
    depths: dict[str, int]
    queues: dict[str, dict[str, int]]
    census_age_s: float | None
    census_error: str | None
    per_minute: list[tuple[int, int, int]]
    etcd: EtcdHealth
    quota_bytes: int
    events_seen: int

    @property
    def peak_per_minute(self) -> int:
        """The chart's scale: the busiest minute (at least 1)."""
        return max([1, *(c + f for _, c, f in self.per_minute)])


async def etcd_health(etcd: Etcd) -> EtcdHealth:
    """etcd's status and alarms (a failure is a finding, not an error)."""
    started = trio.current_time()
    try:
        status = await etcd.status()
        latency_ms = (trio.current_time() - started) * 1000
        raised = await etcd.alarms()
    except (Unavailable, TaskManagerError) as exc:
        return EtcdHealth(endpoint=etcd.endpoint, ok=False, error=str(exc))
    header = status.get("header", {})
    alarms = tuple(f"{alarm} on member {member}" for member, alarm in raised)
    return EtcdHealth(
        endpoint=etcd.endpoint,
        ok=not alarms,
        latency_ms=latency_ms,
        version=str(status.get("version", "")),
        db_size=int(status.get("dbSize", 0)),
        db_in_use=int(status.get("dbSizeInUse", 0)),
        revision=int(header.get("revision", 0)),
        raft_term=int(status.get("raftTerm", 0)),
        alarms=alarms,
    )


async def read_overview(sidecar: Sidecar, journal: Journal, census: Census) -> Overview:
    """Read what the overview shows (a handful of small reads; the census is cached)."""
    etcd, ks = sidecar.etcd, sidecar.ks
    ctl = Queries(etcd, ks)
    leader = await ctl.leader()
    nodes_kv, _ = await etcd.list_prefix(ks.nodes())
    procs, _ = await etcd.list_prefix(ks.state_prefix(State.PROCESSING))
    running: dict[str, int] = {}
    for kv in procs:
        parsed = ks.parse(kv.key)
        if parsed and parsed.node:
            running[parsed.node] = running.get(parsed.node, 0) + 1
    nodes = []
    for kv in nodes_kv:
        info = NodeInfo.from_json(kv.value)
        nodes.append(NodeRow(info, running.get(info.id, 0), info.id == leader))
    queues = {q: dict(c) for q, c in census.counts.items()}
    for row in nodes:  # a queue that has workers and no tasks is a queue too
        for queue in row.info.capacity:
            queues.setdefault(queue, {})
    return Overview(
        namespace=sidecar.settings.namespace,
        this_node=sidecar.node_id,
        is_leader=sidecar.is_leader,
        leader=leader,
        nodes=tuple(sorted(nodes, key=lambda n: n.info.id)),
        depths={s.value: sidecar.depths.get(s.value, 0) for s in STATES},
        queues=dict(sorted(queues.items())),
        census_age_s=census.age_s(),
        census_error=census.error,
        per_minute=journal.per_minute(),
        etcd=await etcd_health(etcd),
        quota_bytes=sidecar.settings.quota_bytes,
        events_seen=journal.events_seen,
    )


# -- a queue's tasks -----------------------------------------------------------------------


@attrs.frozen
class TaskRow:
    """One task in a listing."""

    task_id: TaskId
    record: Record
    cursor: str  # the key after the state prefix: where the next page starts


@attrs.frozen
class TaskPage:
    """One page of a queue's tasks in one state."""

    queue: str
    state: State
    rows: tuple[TaskRow, ...]
    next_after: str | None
    scanned: int
    query: str


#: Records read per etcd request, and at most per page shown (tasks of other queues
#: are skipped over: a page says where it stopped when it read this many).
SCAN_PAGE = 500
SCAN_LIMIT = 5000


async def queue_tasks(
    etcd: Etcd,
    ks: Keyspace,
    queue: str,
    state: State,
    *,
    after: str = "",
    query: str = "",
    limit: int = 50,
) -> TaskPage:
    """Up to ``limit`` tasks of ``queue`` in ``state``, in key order after ``after``;
    with ``query``, only those whose id starts with it."""
    prefix = ks.state_prefix(state)
    by_id = state is not State.PROCESSING  # processing keys start with the node
    start, end = prefix, prefix_end(prefix)
    if query and by_id:
        start, end = prefix + query, prefix_end(prefix + query)
    if after:
        start = max(start, prefix + after + "\0")
    rows: list[TaskRow] = []
    scanned = 0
    next_after: str | None = None
    while True:
        page = await etcd.page(start, end, SCAN_PAGE)
        last = ""
        full = False
        for index, kv in enumerate(page.kvs):
            scanned += 1
            last = kv.key[len(prefix) :]
            parsed = ks.parse(kv.key)
            if parsed is None or parsed.task_id is None:
                continue
            if query and not parsed.task_id.startswith(query):
                continue
            record = Record.from_json(state, kv.value)
            if record.options.queue != queue:
                continue
            rows.append(TaskRow(parsed.task_id, record, last))
            if len(rows) >= limit:
                full = True
                if page.more or index < len(page.kvs) - 1:
                    next_after = last
                break
        if full or not page.more or not page.kvs:
            break
        if scanned >= SCAN_LIMIT:
            next_after = last
            break
        start = page.kvs[-1].key + "\0"
    return TaskPage(queue, state, tuple(rows), next_after, scanned, query)


# -- one task ------------------------------------------------------------------------------


@attrs.frozen
class TaskDetail:
    """A task, its current record, and its attempts."""

    info: TaskInfo
    attempts: tuple[AttemptSeen, ...]

    @property
    def final(self) -> bool:
        """Whether it has finished."""
        return self.info.state in FINAL_STATES


def merge_attempts(
    record: Record | None, state: State | None, seen: list[AttemptSeen]
) -> list[AttemptSeen]:
    """The attempts seen, with the latest one completed from the record etcd holds (which
    has the whole error, and times written by the worker rather than seen here)."""
    attempts = list(seen)
    if record is None or record.attempts == 0:
        return attempts
    latest = next((a for a in reversed(attempts) if a.number == record.attempts), None)
    if latest is None:
        latest = AttemptSeen(number=record.attempts)
        attempts.append(latest)
    if record.node is not None:
        latest.node = record.node
    if record.started_at is not None:
        latest.started_at = record.started_at
    if state is State.PROCESSING:
        latest.assigned_at = latest.assigned_at or record.since_at
        latest.progress = record.progress if record.progress is not None else latest.progress
        return attempts
    if record.error is not None and state is not State.COMPLETED:
        latest.error = record.error
        latest.outcome = "failed" if state is State.FAILED else "retried"
        latest.ended_at = latest.ended_at or record.since_at
    if state is State.COMPLETED:
        latest.outcome, latest.result = "completed", record.result
        latest.ended_at = latest.ended_at or record.since_at
    return attempts


async def read_task(sidecar: Sidecar, journal: Journal, task_id: TaskId) -> TaskDetail:
    """A task and its attempts; raises ``TaskNotFound`` for an id etcd does not hold."""
    info = await sidecar.get(task_id)
    attempts = merge_attempts(info.record, info.state, journal.attempts(task_id))
    return TaskDetail(info, tuple(attempts))


def event_json(event: TaskEvent, seen_at: float, *, tracebacks: bool) -> dict[str, Any]:
    """An event for the page: the protocol's JSON, when it was seen, whether it is final."""
    obj = event.to_json()
    obj["seen_at"] = seen_at
    obj["final"] = is_final(event)
    if not tracebacks and isinstance(obj.get("error"), dict):
        obj["error"].pop("traceback", None)
    return obj


def pretty(value: JSON) -> str:
    """JSON for people."""
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)


def filter_queue(kvs: Iterable[KeyValue], state: State, queue: str | None) -> list[KeyValue]:
    """The records of one queue (all of them with no queue)."""
    if queue is None:
        return list(kvs)
    return [kv for kv in kvs if Record.from_json(state, kv.value).options.queue == queue]
