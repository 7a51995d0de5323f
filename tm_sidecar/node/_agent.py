"""The node agent: runs this node's assignments on local handlers and reports outcomes.

Every report is a transaction guarded by the assignment key's create revision, so that
an attempt's report is accepted only while that attempt is the live assignment.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
import traceback
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from contextlib import aclosing, nullcontext
from typing import Any

import attrs
import trio

from .._errors import EtcdError, EtcdFull, EtcdUnavailable, LeaseNotFound, PayloadTooLarge
from .._hooks import Hooks
from ..core import (
    HANDED_BACK,
    JSON,
    MAX_ERROR_CHARS,
    SNOOZED,
    AttemptLedger,
    GivenBack,
    Happened,
    Interrupted,
    Keyspace,
    KeyValue,
    NodeId,
    NoHandler,
    Raised,
    Range,
    Record,
    Records,
    ReportRefused,
    Returned,
    Slot,
    SnoozeAsked,
    State,
    TaskError,
    TaskId,
    TaskMissing,
    TaskSpec,
    TimedOut,
    Txn,
    TxnResult,
    attempt_outcome,
    dumps,
    plan_move,
    plan_update,
)
from ..etcd import Changes, Etcd, Reset, backoff, retrying
from ..etcd._feed import Feed
from ..etcd._group import GroupCommit, GroupStats, txn_group
from ..etcd._session import RetentionLeases, Session

log = logging.getLogger("tm_sidecar.agent")


class Permanent(Exception):
    """Raise (or raise from) this in a handler: the task fails at once, without retries."""


class Snooze(Exception):
    """Raise this in a handler to run the task again ``delay_s`` seconds from now: back
    to delayed, and the attempt does not count (at most ``max_snoozes`` times a task)."""

    def __init__(self, delay_s: float) -> None:
        delay = float(delay_s)
        if not (math.isfinite(delay) and 0 <= delay <= MAX_SNOOZE_S):
            raise ValueError(f"a snooze is 0 to {MAX_SNOOZE_S:g} seconds, not {delay_s!r}")
        super().__init__(f"snooze for {delay:g} s")
        self.delay_s = delay


#: The longest snooze: a year.
MAX_SNOOZE_S = 366 * 86400.0


class HandedBack(Exception):
    """A handler elsewhere (an SDK worker shutting down) gave its task back unfinished:
    the task goes back to pending at once and the attempt does not count."""


class HandlerFailed(Exception):
    """A handler elsewhere (an SDK worker) failed; carries the error it reported."""

    def __init__(self, error: TaskError) -> None:
        super().__init__(error.message)
        self.error = error


@attrs.define(eq=False)
class TaskContext:
    """What a handler receives: the task, and a way to report progress."""

    id: TaskId
    payload: JSON
    attempt: int
    spec: TaskSpec
    _progress: Callable[[JSON], Awaitable[bool]]

    @property
    def data(self) -> JSON:
        """The payload (the seed's name)."""
        return self.payload

    async def update(self, progress: JSON) -> bool:
        """Publish progress (any JSON); False if this attempt is no longer live."""
        return await self._progress(progress)


Handler = Callable[[TaskContext], Awaitable[Any]]


@attrs.define(eq=False)
class Registration:
    """A handler registered for a queue, with its concurrency."""

    queue: str
    handler: Handler
    concurrency: int
    limiter: trio.CapacityLimiter
    registry: Registry
    closed: bool = False

    def close(self) -> None:
        """Take no more tasks with this handler (running ones finish)."""
        if not self.closed:
            self.closed = True
            self.registry._remove(self)


@attrs.define(eq=False)
class Registry:
    """The local handlers; their summed concurrency per queue is the node's capacity."""

    on_change: Callable[[], None] = lambda: None
    _by_queue: dict[str, list[Registration]] = attrs.Factory(dict)
    accepting: bool = True

    def register(self, queue: str, handler: Handler, concurrency: int) -> Registration:
        """Add a handler; the leader sees the new capacity at once."""
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        reg = Registration(queue, handler, concurrency, trio.CapacityLimiter(concurrency), self)
        self._by_queue.setdefault(queue, []).append(reg)
        self.on_change()
        return reg

    def _remove(self, reg: Registration) -> None:
        regs = self._by_queue.get(reg.queue, [])
        if reg in regs:
            regs.remove(reg)
        if not regs:
            self._by_queue.pop(reg.queue, None)
        self.on_change()

    def capacity(self) -> dict[str, int]:
        """Concurrent tasks per queue this node can take now."""
        if not self.accepting:
            return {}
        return {q: sum(r.concurrency for r in regs) for q, regs in self._by_queue.items() if regs}

    def pick(self, queue: str) -> Registration | None:
        """The handler for the next task of ``queue``: the one with the most room."""
        regs = self._by_queue.get(queue)
        if not regs:
            return None
        return max(regs, key=lambda r: r.limiter.available_tokens)


@attrs.define(eq=False)
class Running:
    """One attempt running here."""

    create_revision: int
    scope: trio.CancelScope
    reporting: bool = False


@attrs.define(eq=False)
class RecentTasks:
    """Tasks this sidecar created and that have not finished, so that an attempt of one
    that runs here needs no read: a task record never changes once written.

    Bounded by count and by payload bytes (the oldest go first), and forgotten when the
    task finishes (its id may then be used again). The payload is kept encoded, so that
    each taker gets its own copy.
    """

    max_items: int = 10_000
    max_bytes: int = 16 * 1024 * 1024
    _specs: OrderedDict[TaskId, tuple[TaskSpec, str]] = attrs.Factory(OrderedDict)
    _bytes: int = 0

    def add(self, spec: TaskSpec, encoded_payload: str) -> None:
        """Remember ``spec``, whose payload encodes as ``encoded_payload``."""
        size = len(encoded_payload)
        if size > self.max_bytes // 8:
            return
        self.forget(spec.id)
        self._specs[spec.id] = (attrs.evolve(spec, payload=None), encoded_payload)
        self._bytes += size
        while len(self._specs) > self.max_items or self._bytes > self.max_bytes:
            _, (_, dropped) = self._specs.popitem(last=False)
            self._bytes -= len(dropped)

    def take(self, task_id: TaskId) -> TaskSpec | None:
        """The spec of ``task_id`` if remembered (and forget it: a retry reads it)."""
        found = self._specs.pop(task_id, None)
        if found is None:
            return None
        spec, encoded = found
        self._bytes -= len(encoded)
        return attrs.evolve(spec, payload=json.loads(encoded))

    def forget(self, task_id: TaskId) -> None:
        """Drop ``task_id`` if remembered (it finished)."""
        found = self._specs.pop(task_id, None)
        if found is not None:
            self._bytes -= len(found[1])


@attrs.define(eq=False)
class AgentState:
    """The assignments running here."""

    running: dict[TaskId, Running] = attrs.Factory(dict)
    #: Every attempt started here, so that none starts twice (see core/_attempts.py).
    attempts: AttemptLedger = attrs.Factory(AttemptLedger)
    recent: RecentTasks = attrs.Factory(RecentTasks)
    report_batches: GroupStats = attrs.Factory(GroupStats)
    read_batches: GroupStats = attrs.Factory(GroupStats)
    idle: trio.Event = attrs.Factory(trio.Event)
    completed: int = 0
    failed: int = 0
    snoozed: int = 0
    stale: int = 0
    #: Set by a graceful stop (a drain, ``Sidecar.stop``): attempts cut short by it are
    #: handed back without counting. Without it (a lost session, say), they count.
    handing_back: bool = False
    #: Told each attempt's start and outcome (metrics); given at construction.
    hooks: Hooks = attrs.field(factory=Hooks, kw_only=True)

    def _changed(self) -> None:
        if not self.running:
            self.idle.set()
        elif self.idle.is_set():
            self.idle = trio.Event()


async def run_agent(
    etcd: Etcd,
    ks: Keyspace,
    node_id: NodeId,
    session: Session,
    registry: Registry,
    retention: RetentionLeases,
    state: AgentState,
    *,
    clock: Callable[[], float] = time.time,
    rng: random.Random | None = None,
    max_result_bytes: int = 256 * 1024,
    one_watch: Feed | None = None,
    records: Records | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run this node's assignments until cancelled; they come from ``one_watch``, the
    sidecar's one watch, when given (else from a watch of its own). ``records`` parses
    what it sees (the sidecar's, shared with its leader and hub). Started once it has
    listed the assignments it holds and started their attempts."""
    records = records or Records()
    rng = rng or random.Random()
    state._changed()
    # Under load many attempts read their task and report at once: each kind of request
    # goes to etcd in batches (see _group.py); alone, each goes at once.
    reports = txn_group(etcd, ops_per_item=3, name="report", stats=state.report_batches)

    async def read(keys: Sequence[str]) -> list[KeyValue | None]:
        answer = await etcd.txn(Txn(success=tuple(Range(k) for k in keys)))
        return [r.kvs[0] if r.kvs else None for r in answer.ranges]

    specs: GroupCommit[str, KeyValue | None] = GroupCommit(
        read,
        max_items=SPEC_READ_BATCH,
        keys=lambda key: (key,),
        name="task read",
        stats=state.read_batches,
    )
    io = AgentIO(etcd, reports, specs)

    async with trio.open_nursery() as nursery:
        await nursery.start(reports.run)
        await nursery.start(specs.run)
        nursery.start_soon(io.announcer.run, io)

        def consider(kv: KeyValue) -> None:
            parsed = ks.parse(kv.key)
            if parsed is None or parsed.task_id is None:
                return
            record = records.parse(State.PROCESSING, kv.value)
            if record.session != session.lease:
                return  # an earlier incarnation's: the leader reaps it
            if not state.attempts.begin(parsed.task_id, kv.create_revision):
                return  # started here already: a rewrite of it, a repeat, or a re-list
            slot = Slot(parsed.task_id, kv.key, kv.create_revision, kv.mod_revision, record)
            running = Running(kv.create_revision, trio.CancelScope())
            state.running[parsed.task_id] = running
            state._changed()
            nursery.start_soon(
                _run_one,
                io,
                ks,
                slot,
                running,
                registry,
                retention,
                state,
                clock,
                rng,
                max_result_bytes,
            )

        def vanished(task_id: TaskId, create_revision: int) -> None:
            known = state.running.get(task_id)
            if (
                known is not None
                and known.create_revision == create_revision
                and not known.reporting
            ):
                log.warning("assignment of task=%s withdrawn: cancelling its handler", task_id)
                known.scope.cancel()

        serving = False
        assignments = (
            one_watch.informer(ks.assignments(node_id), track_prev=True)
            if one_watch is not None
            else etcd.informer(ks.assignments(node_id))
        )
        async with aclosing(assignments) as _items:
            async for item in _items:
                if isinstance(item, Reset):
                    live = {kv.key: kv for kv in item.kvs}
                    for task_id, running in list(state.running.items()):
                        key = ks.state(State.PROCESSING, task_id, node_id)
                        if key not in live or live[key].create_revision != running.create_revision:
                            vanished(task_id, running.create_revision)
                    for kv in item.kvs:
                        consider(kv)
                    if not serving:
                        serving = True
                        task_status.started()
                elif isinstance(item, Changes):
                    for event in item.events:
                        if event.kind == "PUT":
                            consider(event.kv)
                        elif event.prev is not None:
                            parsed = ks.parse(event.kv.key)
                            if parsed is not None and parsed.task_id is not None:
                                vanished(parsed.task_id, event.prev.create_revision)
                state.attempts.settle()


#: Task reads per batch: payloads may be large, and so may the answer.
SPEC_READ_BATCH = 32
#: An attempt still running after this long announces its start (``started_at`` in its
#: record, and a ``started`` event); a quicker one tells its start with its outcome.
ANNOUNCE_AFTER_S = 0.05


@attrs.define(eq=False)
class Attempt:
    """An attempt running here, as the announcer sees it."""

    slot: Slot
    record: Record
    announced: bool = False


@attrs.define(eq=False)
class Announcer:
    """Announces the start of each attempt still running ``ANNOUNCE_AFTER_S`` after it
    began: one task for all of them, FIFO, since every attempt waits the same time."""

    _queue: deque[tuple[float, Attempt]] = attrs.Factory(deque)
    _wake: trio.Event = attrs.Factory(trio.Event)

    def add(self, attempt: Attempt) -> None:
        """Announce ``attempt`` in due time unless it is announced (or over) by then."""
        self._queue.append((trio.current_time() + ANNOUNCE_AFTER_S, attempt))
        self._wake.set()

    async def run(self, io: AgentIO) -> None:
        """Announce until cancelled."""
        async with trio.open_nursery() as nursery:
            while True:
                while not self._queue:
                    self._wake = trio.Event()
                    await self._wake.wait()
                due, attempt = self._queue[0]
                now = trio.current_time()
                if due > now:
                    # A little late rather than a wake-up per attempt under load.
                    await trio.sleep(max(due - now, 0.01))
                    continue
                self._queue.popleft()
                if not attempt.announced:
                    attempt.announced = True
                    nursery.start_soon(_announce, io, attempt)


@attrs.define(eq=False)
class AgentIO:
    """The agent's ways to etcd: batched reports and task reads, and the client itself."""

    etcd: Etcd
    reports: GroupCommit[Txn, TxnResult]
    specs: GroupCommit[str, KeyValue | None]
    announcer: Announcer = attrs.Factory(Announcer)


def error_from_exception(exc: BaseException) -> TaskError:
    """The recorded form of a handler's exception, cut to a size etcd takes in batches."""
    if isinstance(exc, HandlerFailed):
        e = exc.error
        return attrs.evolve(
            e,
            type=e.type[:200],
            message=e.message[:MAX_ERROR_CHARS],
            traceback=e.traceback[-MAX_TRACEBACK_CHARS:] if e.traceback else None,
        )
    permanent = isinstance(exc, Permanent) or isinstance(exc.__cause__, Permanent)
    return TaskError(
        type=type(exc).__name__[:200],
        message=str(exc)[:MAX_ERROR_CHARS],
        traceback="".join(traceback.format_exception(exc))[-MAX_TRACEBACK_CHARS:],
        retryable=not permanent,
    )


MAX_TRACEBACK_CHARS = 3000


async def _run_one(
    io: AgentIO,
    ks: Keyspace,
    slot: Slot,
    running: Running,
    registry: Registry,
    retention: RetentionLeases,
    state: AgentState,
    clock: Callable[[], float],
    rng: random.Random,
    max_result_bytes: int,
) -> None:
    tid = slot.task_id
    current = slot.record
    scope = running.scope

    def outcome_of(happened: Happened) -> Record:
        outcome = attempt_outcome(
            current, happened, now=clock(), draw=rng.random, max_result_bytes=max_result_bytes
        )
        assert outcome is not None  # only a refused report may come to nothing
        return outcome

    try:
        with scope:
            spec = state.recent.take(tid)
            if spec is None:
                spec_kv = await retrying(lambda: io.specs.submit(ks.task(tid)), what="read task")
                if spec_kv is None:
                    running.reporting = True
                    await _report(io, ks, slot, outcome_of(TaskMissing()), retention, state)
                    return
                spec = TaskSpec.from_json(spec_kv.value)
            reg = registry.pick(current.options.queue)
            if reg is None:
                running.reporting = True
                await _report(io, ks, slot, outcome_of(NoHandler()), retention, state)
                return
            async with reg.limiter:
                current = attrs.evolve(current, started_at=clock())
                attempt = Attempt(slot, current)
                io.announcer.add(attempt)
                if current.attempts == 1:
                    due = spec.run_at if spec.run_at is not None else spec.created_at
                    state.hooks.on_start(max(0.0, (current.started_at or due) - due))

                async def progress(value: JSON) -> bool:
                    nonlocal current
                    if len(dumps(value).encode()) > MAX_PROGRESS_BYTES:
                        raise PayloadTooLarge(f"progress over {MAX_PROGRESS_BYTES} bytes")
                    current = attempt.record = attrs.evolve(current, progress=value)
                    attempt.announced = True  # this write tells the start
                    return await _update(io, slot, current)

                ctx = TaskContext(tid, spec.payload, current.attempts, spec, progress)
                timeout = current.options.timeout_s
                happened: Happened
                try:
                    with trio.fail_after(timeout) if timeout is not None else nullcontext():
                        result = await reg.handler(ctx)
                    happened = Returned(result, len(dumps(result).encode()))
                except HandedBack:
                    happened = GivenBack()
                except Snooze as snooze:
                    happened = SnoozeAsked(snooze.delay_s)
                except trio.TooSlowError:
                    happened = TimedOut()
                except Exception as exc:
                    happened = Raised(error_from_exception(exc))
                outcome = outcome_of(happened)
                # The outcome tells the start if the announcement has not gone yet.
                attempt.announced = True
            running.reporting = True
            await _report(io, ks, slot, outcome, retention, state)
        if scope.cancelled_caught:
            log.info(
                "task=%s attempt=%d abandoned: its assignment was withdrawn", tid, current.attempts
            )
    except trio.Cancelled:
        # The agent is stopping: hand the attempt back at once rather than after the lease.
        # A graceful stop spends no attempt (the task did not fail); anything else does.
        nxt = outcome_of(Interrupted(graceful=state.handing_back))
        with trio.move_on_after(2.0, shield=True):
            await _report(io, ks, slot, nxt, retention, state, batched=False)
        raise
    except Exception:
        # A bug or an etcd refusal on this one task: the leader reaps it if it stays
        # assigned; the node carries on with the others.
        log.exception("task=%s attempt=%d: the agent failed", tid, current.attempts)
    finally:
        state.attempts.end(tid, running.create_revision)
        if state.running.get(tid) is running:
            del state.running[tid]
            state._changed()


#: Progress updates rewrite the assignment record: keep them small.
MAX_PROGRESS_BYTES = 64 * 1024


async def _announce(io: AgentIO, attempt: Attempt) -> None:
    # Refused or too late (the outcome may overtake it): the outcome tells the start.
    try:
        await _update(io, attempt.slot, attempt.record, quiet=True)
    except Exception as exc:
        log.warning("start of task=%s not announced: %s", attempt.slot.task_id, exc)


async def _update(io: AgentIO, slot: Slot, record: Record, *, quiet: bool = False) -> bool:
    """Rewrite the assignment record (started, progress); False if the attempt is over."""
    txn = plan_update(slot, record)
    result = await retrying(lambda: io.reports.submit(txn), what="report update")
    if not result.succeeded and not quiet:
        log.warning(
            "stale report rejected: task=%s attempt=%d is no longer assigned here",
            slot.task_id,
            record.attempts,
        )
    return result.succeeded


async def _report(
    io: AgentIO,
    ks: Keyspace,
    slot: Slot,
    outcome: Record,
    retention: RetentionLeases,
    state: AgentState,
    *,
    batched: bool = True,
) -> bool:
    """Commit an attempt's outcome; False when the attempt was no longer live.

    Keeps trying while etcd is unavailable or full (the assignment holds its slot
    meanwhile; if this node dies, the leader reaps it). An outcome etcd refuses (too large, say) is
    replaced by a small failure so that the task does not stay assigned for ever.
    """
    failures = 0
    while True:
        try:
            final = outcome.state in (State.COMPLETED, State.FAILED)
            lease = await retention.current() if final else 0
            txn = plan_move(ks, slot, outcome, lease=lease)
            result = await (io.reports.submit(txn) if batched else io.etcd.txn(txn))
            break
        except (EtcdUnavailable, EtcdFull, trio.TooSlowError) as exc:
            # A full etcd takes writes again once space is freed: the outcome waits too.
            failures += 1
            wait = backoff(failures, jitter=False)
            log.warning(
                "report of task=%s waits for etcd (%s); again in %.2f s", slot.task_id, exc, wait
            )
            await trio.sleep(wait)
        except LeaseNotFound:
            retention.forget()
        except EtcdError as exc:
            instead = attempt_outcome(
                outcome,
                ReportRefused(str(exc)),
                now=outcome.since_at,
                draw=lambda: 0.0,  # not retryable: no backoff to draw
                max_result_bytes=0,
            )
            if instead is None:
                log.error("report of task=%s refused by etcd: %s", slot.task_id, exc)
                return False
            log.error(
                "report of task=%s refused (%s): recording a failure instead", slot.task_id, exc
            )
            outcome = instead
    if not result.succeeded:
        state.stale += 1
        log.warning(
            "stale report rejected: task=%s attempt=%d outcome=%s",
            slot.task_id,
            outcome.attempts,
            outcome.state.value,
        )
        return False
    if outcome.state is State.COMPLETED:
        state.completed += 1
    elif outcome.reason == SNOOZED:
        state.snoozed += 1
    elif outcome.reason != HANDED_BACK:
        state.failed += 1
    if slot.record.since_at:
        state.hooks.on_outcome(outcome.state.value, outcome.since_at - slot.record.since_at)
    log.debug(
        "task=%s attempt=%d -> %s%s",
        slot.task_id,
        outcome.attempts,
        outcome.state.value,
        f" error={outcome.error.type}" if outcome.error else "",
    )
    return True
