"""What a sidecar tells its observers (metrics), given at construction, as httpx takes
``event_hooks``: nothing is patched onto a running sidecar afterwards."""

from __future__ import annotations

from collections.abc import Callable

import attrs


def _ignore(*_args: object) -> None:
    pass


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
    """

    on_start: Callable[[float], None] = _ignore
    on_outcome: Callable[[Outcome], None] = _ignore
    on_fire: Callable[[float], None] = _ignore
    on_role: Callable[[bool], None] = _ignore
