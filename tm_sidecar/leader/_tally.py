"""What the leader tells its observers: how long each queue was held back by its own
settings, and the outcomes of the attempts it reaped."""

from __future__ import annotations

import attrs

from .._hooks import Outcome
from ..core import Record


def reaped(record: Record) -> Outcome:
    """The outcome of an attempt the leader reaped, from the record it moved it to."""
    return Outcome(
        queue=record.options.queue,
        state=record.state.value,
        reason=record.reason,
        error_type=record.error.type if record.error else None,
    )


@attrs.define(eq=False)
class HeldTime:
    """How long each queue's pending tasks were held back by the queue itself (paused,
    or its rate window full), as the leader saw it at each decision."""

    #: Closed intervals' seconds, by (queue, reason).
    totals: dict[tuple[str, str], float] = attrs.Factory(dict)
    #: Open intervals: since when, by (queue, reason).
    since: dict[tuple[str, str], float] = attrs.Factory(dict)

    def update(self, held: dict[str, str], now: float) -> None:
        """Note the queues held back now (``LeaderView.held_back``)."""
        current = {(queue, reason) for queue, reason in held.items()}
        for key in list(self.since):
            if key not in current:
                spent = max(0.0, now - self.since.pop(key))
                self.totals[key] = self.totals.get(key, 0.0) + spent
        for key in current:
            self.since.setdefault(key, now)

    def seconds(self, now: float) -> dict[tuple[str, str], float]:
        """The seconds so far, open intervals included up to ``now``."""
        out = dict(self.totals)
        for key, at in self.since.items():
            out[key] = out.get(key, 0.0) + max(0.0, now - at)
        return out
