"""What the dashboard's pages show, read from etcd and from what the hub told: the
overview, a page of a queue's tasks, one task with its attempts.

What the hub told is ``_journal.py``'s (the :class:`~._journal.Journal`); the counts per
queue are ``_census.py``'s (the :class:`~._census.Census`). This module reads and
assembles; the pages render.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
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
    QueueConfig,
    Range,
    Record,
    Schedule,
    State,
    TaskEvent,
    TaskId,
    etcd_version_warning,
)
from ..etcd import Etcd, prefix_end
from ..node._sidecar import FINAL_STATES, Sidecar, TaskInfo, is_final
from ._census import Census
from ._journal import AttemptSeen, Journal

STATES = tuple(State)
#: Characters of a task id, a node id or a queue name (``check_name``), for searches.
_PARTIAL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


def valid_partial_name(text: str) -> bool:
    """Whether ``text`` could be (part of) a task id, a node id or a queue name."""
    return bool(_PARTIAL_NAME.match(text))


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
    #: The version's known data-loss bugs and the version to run, if it has some.
    version_warning: str | None = None


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
    #: The queues that have settings (paused, limits), by name.
    flow: dict[str, QueueConfig] = attrs.Factory(dict)
    #: Per queue: the concurrency key with the most tasks running, and how many.
    busiest_key: dict[str, tuple[str, int]] = attrs.Factory(dict)
    schedules: int = 0

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
        version_warning=etcd_version_warning(str(status.get("version", ""))),
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
    flow = await ctl.queue_configs()
    for queue in flow:  # and so is a queue with settings (paused, say)
        queues.setdefault(queue, {})
    schedules = await etcd.range(Range(ks.schedules(), prefix=True, count_only=True))
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
        flow=flow,
        busiest_key=dict(census.busiest_key),
        schedules=schedules.count,
    )


async def read_schedules(etcd: Etcd, ks: Keyspace) -> list[Schedule]:
    """Every schedule of the namespace, by name."""
    kvs, _ = await etcd.list_prefix(ks.schedules())
    return sorted((Schedule.from_json(kv.value) for kv in kvs), key=lambda s: s.name)


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
    #: The attempts that ended, as the record in etcd keeps them (once records have a
    #: ``history``; empty before).
    history: tuple[Any, ...] = ()
    #: The trace the task belongs to (once tasks carry a trace context; None before).
    trace_id: str | None = None

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
    if record is None:
        return attempts
    # The record's history (etcd's, across sidecars and restarts) fills in what this
    # sidecar did not see: each ended attempt's node, times, outcome and error.
    for entry in record.history:
        known = next((a for a in attempts if a.number == entry.attempt), None)
        if known is None:
            known = AttemptSeen(number=entry.attempt)
            attempts.append(known)
        known.node = entry.node or known.node
        known.started_at = entry.started_at or known.started_at
        known.ended_at = entry.ended_at
        known.outcome = known.outcome or entry.outcome
        known.error = known.error or entry.error
    attempts.sort(key=lambda a: a.number)
    if record.attempts == 0:
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
    history = tuple(getattr(info.record, "history", ()) or ())
    return TaskDetail(info, tuple(attempts), history, trace_of(info))


#: Where a task's trace id may be found, first match wins: (object, attribute).
_TRACE_FIELDS = ("trace_id", "traceparent", "trace")


def trace_of(info: TaskInfo) -> str | None:
    """The id of the trace a task belongs to, wherever the task keeps it (its spec, its
    options, its record), as text; None when it has none."""
    spec = info.spec
    for holder in (spec, getattr(spec, "options", None), info.record):
        for name in _TRACE_FIELDS:
            value = getattr(holder, name, None)
            if isinstance(value, dict):
                value = value.get("traceparent") or value.get("trace_id")
            if value:
                return str(value)
    return None


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
