"""What a handler sees and may raise: ``TaskContext``, the ``Handler`` type, the
exceptions that steer an attempt (``Permanent``, ``Snooze``, ``HandedBack``,
``HandlerFailed``), and the recorded form of a handler's exception."""

from __future__ import annotations

import math
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import attrs

from ..core import JSON, MAX_ERROR_CHARS, TaskError, TaskId, TaskSpec

#: The longest snooze: a year.
MAX_SNOOZE_S = 366 * 86400.0
#: The end of a traceback that is kept with a failure.
MAX_TRACEBACK_CHARS = 3000


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
