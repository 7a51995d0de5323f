"""What an attempt's end writes: one pure function from what happened to the record to
report. The agent (the shell) only runs the handler, says what happened, and reports."""

from __future__ import annotations

from collections.abc import Callable

import attrs

from ._model import JSON, Record, TaskError
from ._policy import after_failure, handed_back, snoozed, succeeded


@attrs.frozen
class Returned:
    """The handler returned ``result``, which encodes to ``size_bytes`` of JSON."""

    result: JSON
    size_bytes: int


@attrs.frozen
class Raised:
    """The handler failed with ``error`` (its recorded form: retryable or not)."""

    error: TaskError


@attrs.frozen
class TimedOut:
    """The handler ran past the task's ``timeout_s``."""


@attrs.frozen
class SnoozeAsked:
    """The handler asked to run the task again ``delay_s`` from now."""

    delay_s: float


@attrs.frozen
class GivenBack:
    """A worker elsewhere gave the task back unfinished (an SDK worker shutting down)."""


@attrs.frozen
class TaskMissing:
    """The task record (its payload) is gone: the attempt cannot run."""


@attrs.frozen
class NoHandler:
    """No handler for the task's queue is registered on this node."""


@attrs.frozen
class Interrupted:
    """The sidecar stopped during the attempt; ``graceful`` when it was asked to (a
    drain, a stop), which hands the attempt back without counting it."""

    graceful: bool


@attrs.frozen
class ReportRefused:
    """etcd refused the report itself (too large, say), with ``message``."""

    message: str


Happened = (
    Returned
    | Raised
    | TimedOut
    | SnoozeAsked
    | GivenBack
    | TaskMissing
    | NoHandler
    | Interrupted
    | ReportRefused
)

#: The error type of a report that etcd refused and was replaced by a small failure.
REPORT_REFUSED = "ReportRefused"
#: Error records travel in batched transactions (etcd takes 1.5 MiB a request): keep
#: them to a few kilobytes.
MAX_ERROR_CHARS = 1000


def attempt_outcome(
    record: Record,
    happened: Happened,
    *,
    now: float,
    draw: Callable[[], float],
    max_result_bytes: int,
) -> Record | None:
    """The record an attempt's end writes, from the attempt's processing ``record``.

    ``draw`` gives the random fraction of a retry's backoff (called only when a failure
    waits one). For :class:`ReportRefused`, ``record`` is the outcome etcd refused: the
    answer is a small failure to write instead, or None when that failure was refused
    too (then nothing more is tried; the leader reaps the assignment).
    """

    def failed(error: TaskError) -> Record:
        return after_failure(record, error=error, now=now, fraction=draw())

    match happened:
        case Returned(result=result, size_bytes=size):
            if size > max_result_bytes:
                return failed(
                    TaskError(
                        type="ResultTooLarge",
                        message=f"the result is {size} bytes, over {max_result_bytes}",
                        retryable=False,
                    )
                )
            return succeeded(record, result=result, now=now)
        case Raised(error=error):
            return failed(error)
        case TimedOut():
            timeout = record.options.timeout_s
            return failed(
                TaskError(type="Timeout", message=f"the handler ran longer than {timeout} s")
            )
        case SnoozeAsked(delay_s=delay_s):
            return snoozed(record, delay_s=delay_s, now=now)
        case GivenBack():
            return handed_back(record, now=now)
        case TaskMissing():
            return failed(
                TaskError(type="TaskMissing", message="the task record is gone", retryable=False)
            )
        case NoHandler():
            queue = record.options.queue
            return failed(
                TaskError(type="NoHandler", message=f"no handler for queue {queue!r} here")
            )
        case Interrupted(graceful=graceful):
            # A graceful stop spends no attempt (the task did not fail); anything else does,
            # without a backoff draw: the node is going away.
            if graceful:
                return handed_back(record, now=now)
            # Like a lost node, through no fault of the task: it keeps its place.
            error = TaskError(type="Interrupted", message="the sidecar stopped during the attempt")
            return after_failure(record, error=error, now=now, fraction=0.0, keep_order=True)
        case ReportRefused(message=message):
            if record.error is not None and record.error.type == REPORT_REFUSED:
                return None
            refused = TaskError(
                type=REPORT_REFUSED, message=message[:MAX_ERROR_CHARS], retryable=False
            )
            return after_failure(record, error=refused, now=record.since_at, fraction=0.0)
