"""The local handlers: ``Registry`` keeps them by queue (their summed concurrency is the
node's capacity) and picks one for each task; a ``Registration`` is one of them."""

from __future__ import annotations

from collections.abc import Callable

import attrs
import trio

from ._handlers import Handler


@attrs.define(eq=False)
class Registration:
    """A handler registered for a queue, with its concurrency."""

    queue: str
    handler: Handler
    concurrency: int
    limiter: trio.CapacityLimiter
    registry: Registry
    closed: bool = False

    def close(self) -> None:
        """Take no more tasks with this handler (running ones finish)."""
        if not self.closed:
            self.closed = True
            self.registry._remove(self)


@attrs.define(eq=False)
class Registry:
    """The local handlers; their summed concurrency per queue is the node's capacity."""

    on_change: Callable[[], None] = lambda: None
    _by_queue: dict[str, list[Registration]] = attrs.Factory(dict)
    accepting: bool = True

    def register(self, queue: str, handler: Handler, concurrency: int) -> Registration:
        """Add a handler; the leader sees the new capacity at once."""
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        reg = Registration(queue, handler, concurrency, trio.CapacityLimiter(concurrency), self)
        self._by_queue.setdefault(queue, []).append(reg)
        self.on_change()
        return reg

    def _remove(self, reg: Registration) -> None:
        regs = self._by_queue.get(reg.queue, [])
        if reg in regs:
            regs.remove(reg)
        if not regs:
            self._by_queue.pop(reg.queue, None)
        self.on_change()

    def capacity(self) -> dict[str, int]:
        """Concurrent tasks per queue this node can take now."""
        if not self.accepting:
            return {}
        return {q: sum(r.concurrency for r in regs) for q, regs in self._by_queue.items() if regs}

    def pick(self, queue: str) -> Registration | None:
        """The handler for the next task of ``queue``: the one with the most room."""
        regs = self._by_queue.get(queue)
        if not regs:
            return None
        return max(regs, key=lambda r: r.limiter.available_tokens)
