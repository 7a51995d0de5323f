"""One attempt on this node: run it on a local handler, announce its start, report its
outcome (the outcome itself is the core's ``attempt_outcome``).

Every report is a transaction guarded by the assignment key's create revision, so that
an attempt's report is accepted only while that attempt is the live assignment.

Size: the attempt's life in one place (run, announce, report, the carried outcomes of a
lost session), the path every local attempt and every slow remote report takes.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import attrs
import trio

from .._errors import EtcdError, EtcdFull, EtcdUnavailable, LeaseNotFound, PayloadTooLarge
from .._hooks import Outcome
from .._repeats import Repeats
from .._tracing import TRACE_ID
from ..core import (
    HANDED_BACK,
    JSON,
    SNOOZED,
    GivenBack,
    Happened,
    Interrupted,
    Keyspace,
    KeyValue,
    NoHandler,
    Raised,
    Record,
    ReportRefused,
    Returned,
    Slot,
    SnoozeAsked,
    State,
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
from ..etcd import Etcd, backoff, retrying
from ..etcd._group import GroupCommit
from ..etcd._session import RetentionLeases
from ._agent_state import AgentState, Running
from ._handlers import HandedBack, Snooze, TaskContext, error_from_exception
from ._registry import Registry

log = logging.getLogger("tm_sidecar.agent")
#: Under an etcd stall every running attempt waits: one line a few seconds, counted.
_REPORT_WAITS = Repeats(log, "report waits for etcd")
#: Announcements are best effort (the outcome tells the start): under an etcd stall
#: each would fail, so one line a few seconds, counted.
_NOT_ANNOUNCED = Repeats(log, "start of an attempt not announced")

#: An attempt still running after this long announces its start (``started_at`` in its
#: record, and a ``started`` event); a quicker one tells its start with its outcome.
ANNOUNCE_AFTER_S = 0.05
#: Progress updates rewrite the assignment record: keep them small.
MAX_PROGRESS_BYTES = 64 * 1024


@attrs.define(eq=False)
class Attempt:
    """An attempt running here, as the announcer sees it."""

    slot: Slot
    record: Record
    #: The announcer has decided (or need not): no announcement is to be scheduled.
    announced: bool = False
    #: A write that tells the start (a progress update) has been made: the scheduled
    #: announcement, if it has not run yet, would only repeat it (issue 20 item 15: the
    #: demo's handler updates at the announcement's time, and each task told ``updated``
    #: twice).
    told: bool = False

    def progressed(self, record: Record) -> None:
        """The handler reported progress: ``record`` carries it and tells the start."""
        self.record = record
        self.announced = self.told = True


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
                    # Posted to the report batches, answered by a call: no task each.
                    if not io.reports.post(
                        plan_update(attempt.slot, attempt.record), _Announced(attempt)
                    ):
                        nursery.start_soon(_announce, io, attempt)


@attrs.define(eq=False)
class AgentIO:
    """The agent's ways to etcd: batched reports and task reads, and the client itself."""

    etcd: Etcd
    reports: GroupCommit[Txn, TxnResult]
    specs: GroupCommit[str, KeyValue | None]
    announcer: Announcer = attrs.Factory(Announcer)


@attrs.frozen(kw_only=True)
class AttemptEnv:
    """What every attempt of one agent shares: its ways to etcd, the key layout, the
    handlers, the retention leases, the agent's state, and the clock and randomness
    the outcome is decided with."""

    io: AgentIO
    ks: Keyspace
    registry: Registry
    retention: RetentionLeases
    state: AgentState
    clock: Callable[[], float]
    rng: random.Random
    max_result_bytes: int

    def outcome_of(self, current: Record, happened: Happened) -> Record:
        """The record an attempt at ``current`` ends with after ``happened``."""
        outcome = attempt_outcome(
            current,
            happened,
            now=self.clock(),
            draw=self.rng.random,
            max_result_bytes=self.max_result_bytes,
        )
        assert outcome is not None  # only a refused report may come to nothing
        return outcome


async def run_attempt(env: AttemptEnv, slot: Slot, running: Running) -> None:
    """Run the attempt assigned in ``slot`` and report how it ended; on cancellation,
    hand it back (shielded, bounded)."""
    tid = slot.task_id
    # Every line this attempt logs names its task's trace (this Trio task's own).
    TRACE_ID.set(slot.record.options.trace_id)
    current = slot.record
    scope = running.scope
    assert scope is not None  # a local attempt's
    state = env.state
    # Once the handler has ended, what happened is a fact to report, whatever comes next.
    ended: Record | None = None
    try:
        with scope:
            spec = state.recent.take(tid)
            if spec is None:
                spec_kv = await retrying(
                    lambda: env.io.specs.submit(env.ks.task(tid)), what="read task"
                )
                if spec_kv is None:
                    running.reporting = True
                    ended = env.outcome_of(current, TaskMissing())
                    await _report(env, slot, ended)
                    return
                spec = TaskSpec.from_json(spec_kv.value)
            reg = env.registry.pick(current.options.queue)
            if reg is None:
                running.reporting = True
                ended = env.outcome_of(current, NoHandler())
                await _report(env, slot, ended)
                return
            async with reg.limiter:
                current = attrs.evolve(current, started_at=env.clock())
                attempt = Attempt(slot, current)
                env.io.announcer.add(attempt)
                started_at = current.started_at or env.clock()
                if current.attempts == 1:
                    due = spec.run_at if spec.run_at is not None else spec.created_at
                    state.hooks.on_start(max(0.0, started_at - due))
                    state.hooks.span(
                        "tm.queue.wait",
                        current.options,
                        due,
                        current.since_at,
                        {"tm.task.id": tid},
                    )
                state.hooks.span(
                    "tm.assignment",
                    current.options,
                    current.since_at,
                    started_at,
                    {
                        "tm.task.id": tid,
                        "tm.task.attempt": current.attempts,
                        "tm.node": current.node or "",
                    },
                )

                async def progress(value: JSON) -> bool:
                    nonlocal current
                    if len(dumps(value).encode()) > MAX_PROGRESS_BYTES:
                        raise PayloadTooLarge(f"progress over {MAX_PROGRESS_BYTES} bytes")
                    current = attrs.evolve(current, progress=value)
                    attempt.progressed(current)  # this write tells the start
                    return await _update(env.io, slot, current)

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
                ended = env.outcome_of(current, happened)
                # The outcome tells the start if the announcement has not gone yet.
                attempt.announced = True
            running.reporting = True
            await _report(env, slot, ended)
        if scope.cancelled_caught:
            log.info(
                "attempt abandoned: its assignment was withdrawn",
                extra={"task": tid, "attempt": current.attempts},
            )
    except trio.Cancelled:
        # The agent is stopping. An attempt whose handler has ended reports how it ended;
        # one still running is handed back at once rather than after the lease (a
        # graceful stop spends no attempt, since the task did not fail; anything else
        # does).
        nxt = ended or env.outcome_of(current, Interrupted(graceful=state.handing_back))
        with trio.move_on_after(2.0, shield=True) as cut:
            await _report(env, slot, nxt, batched=False)
        if cut.cancelled_caught and ended is not None:
            # etcd is away (the session was lost to an outage, say): the ended attempt is
            # not run again; the next session reports it.
            state.carry(slot, ended)
            log.warning(
                "outcome kept for the next session: etcd cannot be reached",
                extra={"task": tid, "attempt": current.attempts, "state": ended.state.value},
            )
        raise
    except Exception:
        # A bug or an etcd refusal on this one task: the leader reaps it if it stays
        # assigned; the node carries on with the others.
        log.exception(
            "the agent failed on an attempt", extra={"task": tid, "attempt": current.attempts}
        )
    finally:
        state.attempts.end(tid, running.create_revision)
        if state.running.get(tid) is running:
            del state.running[tid]
            state._changed()


async def report_carried(env: AttemptEnv, slot: Slot, outcome: Record) -> None:
    """Report an outcome carried over from a lost session (``AgentState.carried``); if
    this session is lost too before it lands, the next one carries it on."""
    try:
        reported = await _report(env, slot, outcome)
    except Exception:
        log.exception("a carried outcome could not be reported", extra={"task": slot.task_id})
    else:
        if reported:
            log.info("carried outcome reported", extra={"task": slot.task_id})
    env.state.carried_done(slot.task_id)


@attrs.frozen
class _Announced:
    """Takes the answer to a posted announcement: refused or too late is fine (the
    outcome tells the start), an error is logged."""

    attempt: Attempt

    def __call__(self, result: TxnResult | None, error: BaseException | None) -> None:
        if error is not None:
            _NOT_ANNOUNCED.note(task=self.attempt.slot.task_id, error=str(error))


async def _announce(io: AgentIO, attempt: Attempt) -> None:
    # Scheduled by the announcer, but a progress write has told the start meanwhile.
    if attempt.told:
        return
    attempt.told = True
    # Refused or too late (the outcome may overtake it): the outcome tells the start.
    try:
        await _update(io, attempt.slot, attempt.record, quiet=True)
    except Exception as exc:
        log.warning(
            "start of an attempt not announced",
            extra={"task": attempt.slot.task_id, "error": str(exc)},
        )


async def _update(io: AgentIO, slot: Slot, record: Record, *, quiet: bool = False) -> bool:
    """Rewrite the assignment record (started, progress); False if the attempt is over."""
    txn = plan_update(slot, record)
    result = await retrying(lambda: io.reports.submit(txn), what="report update")
    if not result.succeeded and not quiet:
        log.warning(
            "stale report rejected: the attempt is no longer assigned here",
            extra={"task": slot.task_id, "attempt": record.attempts},
        )
    return result.succeeded


async def _report(env: AttemptEnv, slot: Slot, outcome: Record, *, batched: bool = True) -> bool:
    """Commit an attempt's outcome; False when the attempt was no longer live.

    Keeps trying while etcd is unavailable or full (the assignment holds its slot
    meanwhile; if this node dies, the leader reaps it). An outcome etcd refuses (too
    large, say) is replaced by a small failure so that the task does not stay assigned
    for ever.
    """
    io = env.io
    failures = 0
    while True:
        try:
            final = outcome.state in (State.COMPLETED, State.FAILED)
            lease = await env.retention.current() if final else 0
            txn = plan_move(env.ks, slot, outcome, lease=lease)
            result = await (io.reports.submit(txn) if batched else io.etcd.txn(txn))
            break
        except (EtcdUnavailable, EtcdFull, trio.TooSlowError) as exc:
            # A full etcd takes writes again once space is freed: the outcome waits too.
            failures += 1
            wait = backoff(failures, jitter=False)
            _REPORT_WAITS.note(task=slot.task_id, error=str(exc), delay_s=wait)
            await trio.sleep(wait)
        except LeaseNotFound:
            env.retention.forget()
        except EtcdError as exc:
            instead = attempt_outcome(
                outcome,
                ReportRefused(str(exc)),
                now=outcome.since_at,
                draw=lambda: 0.0,  # not retryable: no backoff to draw
                max_result_bytes=0,
            )
            if instead is None:
                log.error("report refused by etcd", extra={"task": slot.task_id, "error": str(exc)})
                return False
            log.error(
                "report refused: recording a failure instead",
                extra={"task": slot.task_id, "error": str(exc)},
            )
            outcome = instead
    return reported(env, slot, outcome, result)


def reported(env: AttemptEnv, slot: Slot, outcome: Record, result: TxnResult) -> bool:
    """Count an outcome etcd answered; False when the attempt was no longer live."""
    state = env.state
    if not result.succeeded:
        state.stale += 1
        log.warning(
            "stale report rejected: the attempt is no longer assigned here",
            extra={
                "task": slot.task_id,
                "attempt": outcome.attempts,
                "state": outcome.state.value,
            },
        )
        return False
    if outcome.state is State.COMPLETED:
        state.completed += 1
    elif outcome.reason == SNOOZED:
        state.snoozed += 1
    elif outcome.reason != HANDED_BACK:
        state.failed += 1
    if slot.record.since_at:
        state.hooks.on_outcome(
            Outcome(
                queue=slot.record.options.queue,
                state=outcome.state.value,
                reason=outcome.reason,
                error_type=outcome.error.type if outcome.error else None,
                seconds=outcome.since_at - slot.record.since_at,
            )
        )
    if log.isEnabledFor(logging.DEBUG):
        fields: dict[str, Any] = {
            "task": slot.task_id,
            "attempt": outcome.attempts,
            "state": outcome.state.value,
        }
        if outcome.error:
            fields["error_type"] = outcome.error.type
        log.debug("outcome reported", extra=fields)
    return True
