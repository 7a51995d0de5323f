"""What a sidecar tells its observers (metrics), given at construction, as httpx takes
``event_hooks``: nothing is patched onto a running sidecar afterwards."""

from __future__ import annotations

from collections.abc import Callable

import attrs


def _ignore(*_args: object) -> None:
    pass


@attrs.frozen(kw_only=True)
class Hooks:
    """Callbacks, each called on the Trio thread (they must not block); by default none.

    Attributes:
        on_start: with the seconds from a task's due time (its commit, or its run_at)
            to its first attempt's start here.
        on_outcome: with the state an attempt's reported outcome reached and the
            seconds since its assignment.
        on_fire: with each fired schedule slot's lateness (from the slot to its commit),
            on the leader.
    """

    on_start: Callable[[float], None] = _ignore
    on_outcome: Callable[[str, float], None] = _ignore
    on_fire: Callable[[float], None] = _ignore
