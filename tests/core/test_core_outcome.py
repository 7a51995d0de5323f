"""An attempt's end, decided directly: from what happened to the record to report."""

from __future__ import annotations

from collections.abc import Callable

import attrs
import pytest

from tm_sidecar.core import (
    MAX_HISTORY,
    REPORT_REFUSED,
    AttemptEnd,
    Backoff,
    GivenBack,
    Happened,
    Interrupted,
    NodeId,
    NoHandler,
    Raised,
    Record,
    ReportRefused,
    Returned,
    SnoozeAsked,
    State,
    TaskError,
    TaskMissing,
    TaskOptions,
    TimedOut,
    attempt_outcome,
)

OPTIONS = TaskOptions(
    queue="q", max_attempts=3, timeout_s=2.0, backoff=Backoff(base_s=10.0, jitter=0.5)
)
NOW = 1000.0


def running(attempts: int = 1, **extra: object) -> Record:
    return Record(
        state=State.PROCESSING,
        attempts=attempts,
        options=OPTIONS,
        since_at=900.0,
        node=NodeId("n1"),
        session=7,
        started_at=950.0,
        **extra,  # type: ignore[arg-type]
    )


def outcome(
    happened: Happened, record: Record | None = None, draw: Callable[[], float] = lambda: 0.0
) -> Record | None:
    return attempt_outcome(record or running(), happened, now=NOW, draw=draw, max_result_bytes=100)


def failed(error: TaskError, attempts: int = 1) -> Record:
    return Record(
        state=State.FAILED,
        attempts=attempts,
        options=OPTIONS,
        since_at=NOW,
        started_at=950.0,
        error=error,
    )


def retry(error: TaskError, delay_s: float = 10.0, attempts: int = 1) -> Record:
    return Record(
        state=State.DELAYED,
        attempts=attempts,
        options=OPTIONS,
        since_at=NOW,
        due_at=NOW + delay_s,
        started_at=950.0,
        error=error,
        reason="retry",
    )


@pytest.mark.parametrize(
    ("happened", "expected"),
    [
        (
            Returned({"ok": 1}, 8),
            Record(
                state=State.COMPLETED,
                attempts=1,
                options=OPTIONS,
                since_at=NOW,
                started_at=950.0,
                result={"ok": 1},
            ),
        ),
        (
            Returned("x" * 200, 202),
            failed(
                TaskError(
                    type="ResultTooLarge",
                    message="the result is 202 bytes, over 100",
                    retryable=False,
                )
            ),
        ),
        (Raised(TaskError(type="E", message="boom")), retry(TaskError(type="E", message="boom"))),
        (
            Raised(TaskError(type="E", message="boom", retryable=False)),
            failed(TaskError(type="E", message="boom", retryable=False)),
        ),
        (
            TimedOut(),
            retry(TaskError(type="Timeout", message="the handler ran longer than 2.0 s")),
        ),
        (
            TaskMissing(),
            failed(
                TaskError(type="TaskMissing", message="the task record is gone", retryable=False)
            ),
        ),
        (NoHandler(), retry(TaskError(type="NoHandler", message="no handler for queue 'q' here"))),
        (
            SnoozeAsked(30.0),
            Record(
                state=State.DELAYED,
                attempts=0,
                options=OPTIONS,
                since_at=NOW,
                due_at=NOW + 30.0,
                reason="snoozed",
                snoozes=1,
            ),
        ),
        (
            GivenBack(),
            Record(
                state=State.PENDING,
                attempts=0,
                options=OPTIONS,
                since_at=NOW,
                reason="handed back",
                handbacks=1,
            ),
        ),
        (
            Interrupted(graceful=True),
            Record(
                state=State.PENDING,
                attempts=0,
                options=OPTIONS,
                since_at=NOW,
                reason="handed back",
                handbacks=1,
            ),
        ),
        # Interrupted otherwise: the attempt counts, and the retry waits the full backoff.
        (
            Interrupted(graceful=False),
            retry(TaskError(type="Interrupted", message="the sidecar stopped during the attempt")),
        ),
    ],
)
def test_what_an_attempts_end_writes(happened: Happened, expected: Record) -> None:
    # (the history and the node of a final record: see the tests below)
    got = outcome(happened)
    assert got is not None
    assert attrs.evolve(got, history=(), node=None) == expected


@pytest.mark.parametrize(
    ("happened", "kind", "error_type"),
    [
        (Returned({"ok": 1}, 8), "completed", None),
        (Raised(TaskError(type="E", message="boom")), "failed", "E"),
        (Raised(TaskError(type="E", message="boom", retryable=False)), "failed", "E"),
        (TimedOut(), "failed", "Timeout"),
        (SnoozeAsked(30.0), "snoozed", None),
        (GivenBack(), "handed back", None),
        (Interrupted(graceful=False), "failed", "Interrupted"),
    ],
)
def test_every_attempts_end_joins_the_history(
    happened: Happened, kind: str, error_type: str | None
) -> None:
    earlier = AttemptEnd(attempt=1, node=NodeId("n0"), ended_at=800.0, outcome="failed")
    got = outcome(happened, running(attempts=2, history=(earlier,)))
    assert got is not None
    assert got.history[0] == earlier
    (last,) = got.history[1:]
    assert (last.attempt, last.node, last.started_at, last.ended_at) == (2, "n1", 950.0, NOW)
    assert last.outcome == kind
    assert (last.error.type if last.error else None) == error_type
    # It survives the record's JSON.
    assert Record.from_json(got.state, got.to_json()).history == got.history
    if got.state in (State.COMPLETED, State.FAILED):
        assert got.node == "n1", "a final record names the node of its last attempt"


def test_the_history_keeps_the_latest_attempts_with_short_messages() -> None:
    old = tuple(
        AttemptEnd(attempt=n, ended_at=float(n), outcome="failed") for n in range(MAX_HISTORY)
    )
    got = outcome(
        Raised(TaskError(type="E", message="x" * 5000, traceback="tb")),
        running(attempts=2, history=old),
    )
    assert got is not None
    assert len(got.history) == MAX_HISTORY
    assert got.history[0].attempt == 1  # the oldest went
    assert got.history[-1].error is not None
    assert len(got.history[-1].error.message) == 200
    assert got.history[-1].error.traceback is None
    assert got.error is not None
    assert got.error.traceback == "tb"


def test_a_requeue_through_no_fault_keeps_the_place_a_failure_does_not() -> None:
    placed = running(order=42)
    given = outcome(GivenBack(), placed)
    lost = outcome(Interrupted(graceful=False), placed, draw=lambda: 0.0)
    failed_once = outcome(Raised(TaskError(type="E", message="boom")), placed)
    snoozed = outcome(SnoozeAsked(0.0), placed)
    assert given is not None
    assert given.order == 42
    assert lost is not None
    assert lost.order == 42
    assert failed_once is not None
    assert failed_once.order is None
    assert snoozed is not None
    assert snoozed.order is None


def test_a_failure_draws_its_backoff_and_nothing_else_draws() -> None:
    draws: list[float] = []

    def draw() -> float:
        draws.append(0.5)
        return 0.5

    error = TaskError(type="E", message="boom")
    got = outcome(Raised(error), draw=draw)
    assert got is not None
    assert attrs.evolve(got, history=()) == retry(error, delay_s=7.5)
    assert outcome(Returned(1, 1), draw=draw) is not None
    assert outcome(Interrupted(graceful=False), draw=draw) is not None
    assert draws == [0.5]


def test_the_last_attempts_failure_is_final() -> None:
    error = TaskError(type="E", message="boom")
    got = outcome(Raised(error), running(attempts=3))
    assert got is not None
    assert attrs.evolve(got, history=(), node=None) == failed(error, attempts=3)
    assert got.node == "n1"


def test_a_refused_report_becomes_a_small_final_failure_once() -> None:
    big = attempt_outcome(
        running(), Returned("x" * 50, 52), now=NOW, draw=lambda: 0.0, max_result_bytes=100
    )
    assert big is not None
    instead = outcome(ReportRefused("request too large " + "!" * 2000), big)
    assert instead is not None
    assert instead.state is State.FAILED
    assert instead.since_at == big.since_at  # when the attempt ended, not when refused
    assert instead.error is not None
    assert (instead.error.type, instead.error.retryable) == (REPORT_REFUSED, False)
    assert instead.error.message.startswith("request too large")
    assert len(instead.error.message) == 1000
    assert instead.result is None
    # That one refused too: nothing more to try.
    assert outcome(ReportRefused("again"), instead) is None
