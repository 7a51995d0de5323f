"""What a sidecar tells its observers (metrics), given at construction, as httpx takes
``event_hooks``: nothing is patched onto a running sidecar afterwards."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import attrs


def _ignore(*_args: object) -> None:
    pass


class _Traced(Protocol):
    """What a span needs of a task's options (``core.TaskOptions``)."""

    @property
    def traceparent(self) -> str | None: ...
    @property
    def tracestate(self) -> str | None: ...


@attrs.frozen(kw_only=True)
class Outcome:
    """Where an attempt sent its task: told by the node that reported it, or by the
    leader for an attempt it reaped (a dead node's, or one past its deadline)."""

    queue: str
    #: The state the task went to (``State.value``).
    state: str
    #: Why it went there, for pending and delayed (``retry``, ``snoozed``, ``handed
    #: back``, ``stalled``...); None otherwise.
    reason: str | None = None
    #: The error's type, for a failure or a retry after one.
    error_type: str | None = None
    #: From the attempt's assignment to its outcome; None for a reaped attempt.
    seconds: float | None = None


@attrs.frozen(kw_only=True)
class Span:
    """A span of the sidecar's own, in the trace of a task that carries one (its
    ``traceparent`` option): its parent is the span that created the task."""

    name: str
    traceparent: str
    tracestate: str | None
    #: UTC epoch seconds.
    start_at: float
    end_at: float
    attributes: dict[str, str | int | float] = attrs.Factory(dict)


@attrs.frozen(kw_only=True)
class Hooks:
    """Callbacks, each called on the Trio thread (they must not block); by default none.

    Attributes:
        on_start: with the seconds from a task's due time (its commit, or its run_at)
            to its first attempt's start here.
        on_outcome: with each attempt's :class:`Outcome` (reported here, or reaped by
            the leader here).
        on_fire: with each fired schedule slot's lateness (from the slot to its commit),
            on the leader.
        on_role: with True when this sidecar starts leading, False when it stops.
        on_span: with the sidecar's own spans of traced tasks (``--otel``); None: none
            are made.
    """

    on_start: Callable[[float], None] = _ignore
    on_outcome: Callable[[Outcome], None] = _ignore
    on_fire: Callable[[float], None] = _ignore
    on_role: Callable[[bool], None] = _ignore
    on_span: Callable[[Span], None] | None = None

    def span(
        self,
        name: str,
        options: _Traced,
        start_at: float,
        end_at: float,
        attributes: dict[str, str | int | float],
    ) -> None:
        """Tell ``on_span`` of a span of the task with ``options``, if it is traced and
        spans are wanted (nothing is built otherwise)."""
        if self.on_span is None or options.traceparent is None:
            return
        self.on_span(
            Span(
                name=name,
                traceparent=options.traceparent,
                tracestate=options.tracestate,
                start_at=start_at,
                end_at=max(start_at, end_at),
                attributes=attributes,
            )
        )
