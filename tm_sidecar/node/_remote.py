"""Remote attempts: the attempts of handlers on the other end of a connection (SDK
workers registered with ``batch``), driven without a Trio task, a cancel scope or an
event each.

A local handler runs in the sidecar's loop, so its attempt is a task (``_attempt.py``).
A remote one only waits: for its payload, for the worker's outcome, for its timeout,
for its report to commit. :class:`RemoteAttempts` (one per agent) does that waiting
for all of them: task payloads are read in batches, one task per burst; timeouts come
from one heap of deadlines woken by one task; an outcome arrives as a call from the
connection that carries it; reports are posted to the agent's report batches and
answered by a call. Only the rare slow path (etcd unavailable, a refused report, a
retention lease to grant) takes a task, the local attempts' own report loop.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import math
from typing import Protocol

import attrs
import trio

from .._errors import PayloadTooLarge
from .._tracing import TRACE_ID, in_trace
from ..core import (
    JSON,
    GivenBack,
    Happened,
    Interrupted,
    Raised,
    Range,
    Record,
    Records,
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
    dumps,
    plan_move,
)
from ..etcd import retrying
from ._agent_state import Running
from ._attempt import MAX_PROGRESS_BYTES, Attempt, AttemptEnv, _report, _update, reported
from ._handlers import HandlerFailed, TaskContext, error_from_exception
from ._registry import Registration

log = logging.getLogger("tm_sidecar.agent")

#: Task reads per etcd request: payloads may be large, and so may the answer.
SPEC_READ_BATCH = 32
#: The hand-back of the attempts still running when the agent stops: bounded.
HAND_BACK_S = 2.0


class RemoteHandler(Protocol):
    """A handler whose attempts run elsewhere (an SDK worker), told by calls: none of
    them blocks; the worker's outcome comes back as a call on the attempt
    (:meth:`RemoteAttempt.returned` and its siblings)."""

    def deliver(self, attempt: RemoteAttempt) -> None:
        """Hand ``attempt`` (its ``ctx``) to the worker."""

    def withdraw(self, attempt: RemoteAttempt) -> None:
        """Tell the worker to stop ``attempt`` (a timeout, a withdrawn assignment, a stop)."""

    def settled(self, attempt: RemoteAttempt) -> None:
        """``attempt`` is over here: drop what is kept for it."""


@attrs.define(eq=False)
class RemoteAttempt:
    """One remote attempt, from its assignment to its committed report."""

    owner: RemoteAttempts
    slot: Slot
    running: Running
    reg: Registration
    current: Record
    ctx: TaskContext | None = None
    announce: Attempt | None = None
    #: When the attempt times out (``trio.current_time``), if it has a timeout.
    deadline: float | None = None
    borrowed: bool = False
    #: What the remote handler keeps for this attempt (the server's delivery).
    token: object = None
    #: The payload as JSON text when this sidecar created the task: sent on as it is,
    #: never decoded here (``ctx.payload`` is then None).
    encoded_payload: str | None = None
    over: bool = False

    # -- the worker's outcomes: first one stands ---------------------------------------

    def returned(self, result: JSON) -> None:
        """The handler returned ``result``."""
        self.owner.conclude(self, Returned(result, len(dumps(result).encode())))

    def failed(self, error: TaskError) -> None:
        """The handler failed with ``error``."""
        self.owner.conclude(self, Raised(error_from_exception(HandlerFailed(error))))

    def snoozed(self, delay_s: float) -> None:
        """The handler asked to run the task again ``delay_s`` from now."""
        self.owner.conclude(self, SnoozeAsked(delay_s))

    def handed_back(self) -> None:
        """The handler gave the task back unfinished."""
        self.owner.conclude(self, GivenBack())

    async def progress(self, value: JSON) -> bool:
        """Publish progress; False if the attempt is no longer live."""
        if len(dumps(value).encode()) > MAX_PROGRESS_BYTES:
            raise PayloadTooLarge(f"progress over {MAX_PROGRESS_BYTES} bytes")
        self.current = attrs.evolve(self.current, progress=value)
        if self.announce is not None:
            self.announce.record = self.current
            self.announce.announced = True  # this write tells the start
        return await _update(self.owner.env.io, self.slot, self.current)


@attrs.define(eq=False)
class RemoteAttempts:
    """Every remote attempt of one agent, driven from one task (see the module)."""

    env: AttemptEnv
    #: The sidecar's parse cache: a task's options, shared by most tasks, built once.
    records: Records = attrs.Factory(Records)
    _live: set[RemoteAttempt] = attrs.Factory(set)
    _deadlines: list[tuple[float, int, RemoteAttempt]] = attrs.Factory(list)
    _order: itertools.count[int] = attrs.Factory(itertools.count)
    _to_read: list[RemoteAttempt] = attrs.Factory(list)
    _reading: bool = False
    _wake: trio.Event = attrs.Factory(trio.Event)
    _nursery: trio.Nursery | None = None
    _stopping: bool = False

    def start(self, slot: Slot, running: Running, reg: Registration) -> None:
        """Start the attempt assigned in ``slot`` on the remote handler of ``reg``."""
        attempt = RemoteAttempt(self, slot, running, reg, slot.record)
        running.withdraw = lambda: self.withdraw(attempt)
        self._live.add(attempt)
        found = self.env.state.recent.take_encoded(slot.task_id)
        if found is not None:
            spec, attempt.encoded_payload = found
            self._deliver(attempt, spec)
        else:
            self._to_read.append(attempt)
            self._wake.set()

    def _deliver(self, attempt: RemoteAttempt, spec: TaskSpec) -> None:
        env = self.env
        reg = attempt.reg
        try:
            reg.limiter.acquire_on_behalf_of_nowait(attempt)
            attempt.borrowed = True
        except trio.WouldBlock:
            pass  # the worker's prefetch window holds it until there is room
        current = attempt.current = attrs.evolve(attempt.current, started_at=env.clock())
        attempt.announce = Attempt(attempt.slot, current)
        env.io.announcer.add(attempt.announce)
        if current.attempts == 1:
            due = spec.run_at if spec.run_at is not None else spec.created_at
            env.state.hooks.on_start(max(0.0, (current.started_at or due) - due))
        attempt.ctx = TaskContext(
            attempt.slot.task_id, spec.payload, current.attempts, spec, attempt.progress
        )
        timeout = current.options.timeout_s
        if timeout is not None:
            attempt.deadline = trio.current_time() + timeout
            heapq.heappush(self._deadlines, (attempt.deadline, next(self._order), attempt))
            if self._deadlines[0][2] is attempt:
                self._wake.set()
        assert reg.remote is not None
        reg.remote.deliver(attempt)

    def conclude(self, attempt: RemoteAttempt, happened: Happened) -> None:
        """``attempt`` ended with ``happened``: report it (the first outcome stands)."""
        if attempt.over or attempt.running.reporting:
            return
        attempt.running.reporting = True
        attempt.deadline = None
        outcome = self.env.outcome_of(attempt.current, happened)
        if attempt.announce is not None:
            attempt.announce.announced = True  # the outcome tells the start
        self._post(attempt, outcome)

    def _post(self, attempt: RemoteAttempt, outcome: Record) -> None:
        env = self.env
        final = outcome.state in (State.COMPLETED, State.FAILED)
        lease = env.retention.ready() if final else 0
        if lease is not None and not self._stopping:
            txn = plan_move(env.ks, attempt.slot, outcome, lease=lease)

            def answered(result: TxnResult | None, error: BaseException | None) -> None:
                if error is None and result is not None:
                    # Its log lines name its trace: no attempt's task carries it here.
                    with in_trace(attempt.slot.record.options.trace_id):
                        reported(env, attempt.slot, outcome, result)
                    self._end(attempt)
                else:
                    self._slow_report(attempt, outcome)

            if env.io.reports.post(txn, answered):
                return
        self._slow_report(attempt, outcome)

    def _slow_report(self, attempt: RemoteAttempt, outcome: Record) -> None:
        # etcd unavailable or refusing, a lease to grant, the batches stopped: the
        # local attempts' report loop, in a task of its own (rare).
        if self._stopping or self._nursery is None:
            return  # the stop hands it back
        self._nursery.start_soon(self._report_slowly, attempt, outcome)

    async def _report_slowly(self, attempt: RemoteAttempt, outcome: Record) -> None:
        # A task of its own: its log lines name the attempt's trace.
        TRACE_ID.set(attempt.slot.record.options.trace_id)
        try:
            await _report(self.env, attempt.slot, outcome)
        except Exception:
            log.exception(
                "the agent failed on an attempt",
                extra={
                    "task": attempt.slot.task_id,
                    "attempt": attempt.current.attempts,
                },
            )
        self._end(attempt)

    def withdraw(self, attempt: RemoteAttempt) -> None:
        """The assignment was withdrawn: stop the attempt, report nothing."""
        if attempt.over or attempt.running.reporting:
            return
        if attempt.token is not None:
            assert attempt.reg.remote is not None
            attempt.reg.remote.withdraw(attempt)
        with in_trace(attempt.slot.record.options.trace_id):
            log.info(
                "attempt abandoned: its assignment was withdrawn",
                extra={
                    "task": attempt.slot.task_id,
                    "attempt": attempt.current.attempts,
                },
            )
        self._end(attempt)

    def _timed_out(self, attempt: RemoteAttempt) -> None:
        if attempt.token is not None:
            assert attempt.reg.remote is not None
            attempt.reg.remote.withdraw(attempt)
        self.conclude(attempt, TimedOut())

    def _end(self, attempt: RemoteAttempt) -> None:
        if attempt.over:
            return
        attempt.over = True
        attempt.deadline = None
        self._live.discard(attempt)
        if attempt.borrowed:
            attempt.borrowed = False
            attempt.reg.limiter.release_on_behalf_of(attempt)
        if attempt.token is not None:
            assert attempt.reg.remote is not None
            attempt.reg.remote.settled(attempt)
        state = self.env.state
        tid = attempt.slot.task_id
        state.attempts.end(tid, attempt.running.create_revision)
        if state.running.get(tid) is attempt.running:
            del state.running[tid]
            state._changed()
        # Deadlines of attempts over wait in the heap until due: keep it small.
        if len(self._deadlines) > 2 * len(self._live) + 1024:
            self._deadlines = [d for d in self._deadlines if d[2].deadline == d[0]]
            heapq.heapify(self._deadlines)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Drive the remote attempts until cancelled; then hand back those still live."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                try:
                    await self._drive(nursery)
                finally:
                    # The nursery takes no new task from here on: what ends now (a
                    # worker's outcome as its connection closes, say) waits for the
                    # hand-back below instead of a slow report.
                    self._stopping = True
                    self._nursery = None
        finally:
            await self._hand_back()

    async def _drive(self, nursery: trio.Nursery) -> None:
        while True:
            now = trio.current_time()
            while self._deadlines and self._deadlines[0][0] <= now:
                due, _, attempt = heapq.heappop(self._deadlines)
                if attempt.deadline == due and not attempt.over:
                    self._timed_out(attempt)
            if self._to_read and not self._reading:
                self._reading = True
                nursery.start_soon(self._read_specs)
            self._wake = trio.Event()
            with trio.move_on_at(self._deadlines[0][0] if self._deadlines else math.inf):
                await self._wake.wait()

    async def _read_specs(self) -> None:
        """Read the payloads of the attempts waiting for one, a batch per request."""
        env = self.env
        try:
            while self._to_read:
                batch = [a for a in self._to_read[:SPEC_READ_BATCH] if not a.over]
                del self._to_read[:SPEC_READ_BATCH]
                if not batch:
                    continue
                txn = Txn(success=tuple(Range(env.ks.task(a.slot.task_id)) for a in batch))
                try:
                    answer = await retrying(
                        lambda txn=txn: env.io.etcd.txn(txn),  # type: ignore[misc]
                        what="read task",
                    )
                except Exception:
                    # The leader reaps them if they stay assigned; the node carries on.
                    log.exception("task reads failed", extra={"count": len(batch)})
                    for attempt in batch:
                        self._end(attempt)
                    continue
                env.state.read_batches.batches += 1
                env.state.read_batches.items += len(batch)
                for attempt, got in zip(batch, answer.ranges, strict=True):
                    if attempt.over:
                        continue
                    try:
                        if not got.kvs:
                            self.conclude(attempt, TaskMissing())
                        else:
                            self._deliver(attempt, self._spec(got.kvs[0].value))
                    except Exception:
                        log.exception(
                            "the agent failed on an attempt", extra={"task": attempt.slot.task_id}
                        )
                        self._end(attempt)
        finally:
            self._reading = False

    def _spec(self, text: str) -> TaskSpec:
        """``TaskSpec.from_json``, its options from the parse cache."""
        obj = json.loads(text)
        options = obj.get("options")
        return TaskSpec(
            id=TaskId(obj["id"]),
            payload=obj.get("payload"),
            options=self.records.options(options if isinstance(options, dict) else {}),
            created_at=float(obj["created_at"]),
            run_at=None if obj.get("run_at") is None else float(obj["run_at"]),
        )

    async def _hand_back(self) -> None:
        # The agent is stopping: hand every live attempt back at once rather than after
        # the lease (shielded, bounded), as a local attempt does on its cancellation.
        live = list(self._live)
        if not live:
            return
        env = self.env
        with trio.move_on_after(HAND_BACK_S, shield=True):
            async with trio.open_nursery() as nursery:
                for attempt in live:
                    if attempt.token is not None and not attempt.running.reporting:
                        assert attempt.reg.remote is not None
                        attempt.reg.remote.withdraw(attempt)
                    nxt = env.outcome_of(
                        attempt.current, Interrupted(graceful=env.state.handing_back)
                    )
                    nursery.start_soon(self._hand_back_one, attempt, nxt)
        for attempt in live:
            self._end(attempt)

    async def _hand_back_one(self, attempt: RemoteAttempt, outcome: Record) -> None:
        try:
            await _report(self.env, attempt.slot, outcome, batched=False)
        except Exception as exc:
            log.warning(
                "attempt not handed back", extra={"task": attempt.slot.task_id, "error": str(exc)}
            )
