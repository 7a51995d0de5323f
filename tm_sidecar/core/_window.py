"""A worker's prefetch window: the deliveries pushed to it at once are at most its free
concurrency. Pure: the socket server offers each delivery it makes and pushes what
:meth:`PrefetchWindow.take` gives; an outcome (or a cancel) frees its room."""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable

import attrs


@attrs.define(eq=False)
class PrefetchWindow:
    """The deliveries of one worker, by id: waiting to be pushed, and pushed
    (outstanding)."""

    concurrency: int
    _waiting: deque[Hashable] = attrs.Factory(deque)
    _outstanding: set[Hashable] = attrs.Factory(set)

    def offer(self, delivery: Hashable) -> None:
        """A delivery for this worker, pushed when :meth:`take` finds room for it."""
        self._waiting.append(delivery)

    def take(self) -> list[Hashable]:
        """The waiting deliveries to push now, in order: as many as there is room for."""
        free = self.concurrency - len(self._outstanding)
        out: list[Hashable] = []
        while self._waiting and len(out) < free:
            delivery = self._waiting.popleft()
            out.append(delivery)
            self._outstanding.add(delivery)
        return out

    def finish(self, delivery: Hashable) -> bool:
        """``delivery`` is over (its outcome, a cancel); False if it was never pushed
        (it is taken out of the waiting ones instead)."""
        if delivery in self._outstanding:
            self._outstanding.discard(delivery)
            return True
        if delivery in self._waiting:
            self._waiting.remove(delivery)
        return False

    @property
    def outstanding(self) -> int:
        """Deliveries pushed and not over."""
        return len(self._outstanding)

    @property
    def waiting(self) -> int:
        """Deliveries not pushed yet."""
        return len(self._waiting)
