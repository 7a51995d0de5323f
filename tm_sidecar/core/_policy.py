"""What happens to a task after each outcome: pure functions of the record and the time."""

from __future__ import annotations

import attrs

from ._keys import NodeId, State
from ._model import HISTORY_MESSAGE_CHARS, MAX_HISTORY, AttemptEnd, Backoff, Record, TaskError


def backoff_delay_s(backoff: Backoff, attempts: int, fraction: float) -> float:
    """The wait before the next attempt, after ``attempts`` attempts have failed.

    ``fraction`` in [0, 1) is the caller's random draw; the delay falls in
    ``[(1 - jitter) * d, d]`` where ``d = min(max_s, base_s * factor ** (attempts - 1))``.
    """
    exponent = max(attempts - 1, 0)
    try:
        full = backoff.base_s * backoff.factor**exponent
    except OverflowError:
        full = backoff.max_s
    full = min(backoff.max_s, full)
    return full * (1.0 - backoff.jitter * fraction)


def ended(
    record: Record, *, now: float, outcome: str, error: TaskError | None = None
) -> tuple[AttemptEnd, ...]:
    """The history of ``record`` (a processing record) with its attempt's end added,
    bounded to the latest ``MAX_HISTORY``. Only a processing record names an attempt
    that ran: any other record's history is answered unchanged."""
    if record.state is not State.PROCESSING:
        return record.history
    if error is not None:
        error = TaskError(
            type=error.type,
            message=error.message[:HISTORY_MESSAGE_CHARS],
            retryable=error.retryable,
        )
    entry = AttemptEnd(
        attempt=record.attempts,
        node=record.node,
        started_at=record.started_at,
        ended_at=now,
        outcome=outcome,
        error=error,
    )
    return (*record.history, entry)[-MAX_HISTORY:]


def place(slot_order: int | None, create_revision: int) -> int:
    """A pending task's place in its queue: the order its record keeps, else the create
    revision of its pending key (when it was committed there)."""
    return create_revision if slot_order is None else slot_order


def initial_record(options_record: Record, *, now: float, run_at: float | None) -> Record:
    """The first state of a new task: delayed until ``run_at`` if that is in the future."""
    if run_at is not None and run_at > now:
        return attrs.evolve(
            options_record, state=State.DELAYED, due_at=run_at, since_at=now, reason="created"
        )
    return attrs.evolve(options_record, state=State.PENDING, since_at=now, reason="created")


def assigned(
    record: Record,
    *,
    node: NodeId,
    session: int,
    now: float,
    grace_s: float,
    order: int | None = None,
) -> Record:
    """The processing record of a new attempt on ``node``; ``order`` is the task's place
    in its queue, kept in case the attempt is requeued (see :func:`place`)."""
    timeout = record.options.timeout_s
    return Record(
        state=State.PROCESSING,
        attempts=record.attempts + 1,
        options=record.options,
        since_at=now,
        node=node,
        session=session,
        deadline_at=None if timeout is None else now + timeout + grace_s,
        handbacks=record.handbacks,
        snoozes=record.snoozes,
        order=order,
        history=record.history,
        extra=record.extra,
    )


def retried(record: Record, *, now: float) -> Record:
    """A failed task an operator sends back (``tmctl retry``): pending with fresh
    attempts, as if just created; its options stay, and the attempts it had stay in
    its ``history``."""
    return Record(
        state=State.PENDING,
        attempts=0,
        options=record.options,
        since_at=now,
        reason="created",
        history=record.history,
        extra=record.extra,
    )


def promoted(record: Record, *, now: float) -> Record:
    """A delayed task that has come due."""
    # The last error was told with the retry; pending records stay small.
    return attrs.evolve(
        record, state=State.PENDING, since_at=now, due_at=None, reason="promoted", error=None
    )


def succeeded(record: Record, *, result: object, now: float) -> Record:
    """The completed record of an attempt that returned ``result``."""
    return Record(
        state=State.COMPLETED,
        attempts=record.attempts,
        options=record.options,
        since_at=now,
        started_at=record.started_at,
        result=result,
        snoozes=record.snoozes,
        node=record.node,
        history=ended(record, now=now, outcome="completed"),
        extra=record.extra,
    )


def after_failure(
    record: Record,
    *,
    error: TaskError,
    now: float,
    fraction: float,
    reason: str = "retry",
    backoff: bool = True,
    keep_order: bool = False,
) -> Record:
    """Where a failed attempt sends the task: back to wait for a retry, or to failed.

    The task goes to failed exactly when the error is not retryable or the attempts are
    exhausted; otherwise it waits the backoff in delayed (or goes straight to pending
    when the backoff is zero, or ``backoff`` is off: the attempt failed through no fault
    of the task, its node died). With ``keep_order`` (its node died), the task keeps
    its place in its queue when it comes back to pending.

    The attempt's end joins the record's ``history``; a failed record names the node
    that ran the last attempt.
    """
    history = ended(record, now=now, outcome="failed", error=error)
    if not error.retryable or record.attempts >= record.options.max_attempts:
        return Record(
            state=State.FAILED,
            attempts=record.attempts,
            options=record.options,
            since_at=now,
            started_at=record.started_at,
            error=error,
            snoozes=record.snoozes,
            node=record.node,
            history=history,
            extra=record.extra,
        )
    order = record.order if keep_order else None
    delay = backoff_delay_s(record.options.backoff, record.attempts, fraction) if backoff else 0.0
    if delay <= 0:
        return Record(
            state=State.PENDING,
            attempts=record.attempts,
            options=record.options,
            since_at=now,
            started_at=record.started_at,
            error=error,
            reason=reason,
            snoozes=record.snoozes,
            order=order,
            history=history,
            extra=record.extra,
        )
    return Record(
        state=State.DELAYED,
        attempts=record.attempts,
        options=record.options,
        since_at=now,
        due_at=now + delay,
        started_at=record.started_at,
        error=error,
        reason=reason,
        snoozes=record.snoozes,
        order=order,
        history=history,
        extra=record.extra,
    )


def handed_back(record: Record, *, now: float) -> Record:
    """A task whose attempt was given back unfinished by a graceful stop (a worker's
    ``shutdown`` or a sidecar's drain running out of time): pending at once, and the
    attempt does not count, since the task did not fail. So a single-attempt task
    survives a deploy.

    Only ``MAX_FREE_HANDBACKS`` times in a row, though: a task handed back that often
    may be what keeps its workers from stopping, and must not come back for ever. The
    next hand-back then counts as a failed attempt (``HandedBack``, retryable), which
    ends in failed once the attempts are spent.

    A task handed back keeps its place in its queue (``order``).
    """
    if record.handbacks >= MAX_FREE_HANDBACKS:
        error = TaskError(
            type="HandedBack",
            message=f"handed back unfinished {record.handbacks + 1} times in a row",
        )
        return after_failure(record, error=error, now=now, fraction=0.5)
    return Record(
        state=State.PENDING,
        attempts=max(record.attempts - 1, 0),
        options=record.options,
        since_at=now,
        reason=HANDED_BACK,
        handbacks=record.handbacks + 1,
        snoozes=record.snoozes,
        order=record.order,
        history=ended(record, now=now, outcome=HANDED_BACK),
        extra=record.extra,
    )


#: Hand-backs in a row that spend no attempt.
MAX_FREE_HANDBACKS = 3
#: The ``reason`` of a pending record that a graceful stop gave back.
HANDED_BACK = "handed back"

#: The ``reason`` of a delayed record that a handler snoozed.
SNOOZED = "snoozed"
#: The error type of a task that snoozed more often than its ``max_snoozes``.
SNOOZE_LIMIT = "SnoozeLimit"


def snoozed(record: Record, *, delay_s: float, now: float) -> Record:
    """A handler asked to run its task again ``delay_s`` from now: back to delayed (or
    pending at once), and this attempt does not count. Bounded: past its
    ``max_snoozes``, the task fails for good (``SnoozeLimit``), so that a task cannot
    snooze for ever unnoticed."""
    if record.snoozes >= record.options.max_snoozes:
        return Record(
            state=State.FAILED,
            attempts=record.attempts,
            options=record.options,
            since_at=now,
            started_at=record.started_at,
            error=TaskError(
                type=SNOOZE_LIMIT,
                message=f"snoozed {record.snoozes} times, the limit (max_snoozes)",
                retryable=False,
            ),
            snoozes=record.snoozes,
            node=record.node,
            history=ended(record, now=now, outcome="failed"),
            extra=record.extra,
        )
    spent = max(record.attempts - 1, 0)  # this attempt does not count
    return Record(
        state=State.DELAYED if delay_s > 0 else State.PENDING,
        attempts=spent,
        options=record.options,
        since_at=now,
        due_at=now + delay_s if delay_s > 0 else None,
        reason=SNOOZED,
        snoozes=record.snoozes + 1,
        history=ended(record, now=now, outcome=SNOOZED),
        extra=record.extra,
    )


#: The error type of a cancelled task.
CANCELLED = "Cancelled"


def cancelled(record: Record, *, now: float, message: str = "cancelled") -> Record:
    """A live task (pending, delayed or running) that was cancelled: failed at once, for
    good. The attempts it had are kept; a running attempt's handler is cancelled by its
    node when the assignment key goes."""
    error = TaskError(type=CANCELLED, message=message, retryable=False)
    return Record(
        state=State.FAILED,
        attempts=record.attempts,
        options=record.options,
        since_at=now,
        started_at=record.started_at,
        error=error,
        snoozes=record.snoozes,
        node=record.node,
        history=ended(record, now=now, outcome="failed", error=error),
        extra=record.extra,
    )
