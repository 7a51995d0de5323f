"""The local handlers: ``Registry`` keeps them by queue (their summed concurrency is the
node's capacity) and picks one for each task; a ``Registration`` is one of them."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
import trio

from ._handlers import Handler

if TYPE_CHECKING:
    from ._remote import RemoteHandler


def _is_async(handler: Callable[..., object]) -> bool:
    """Whether calling ``handler`` makes a coroutine (an async function, method or
    callable object, or a partial of one)."""
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        getattr(handler, "__call__", None)  # noqa: B004 - an object with async __call__
    )


@attrs.define(eq=False)
class Registration:
    """A handler registered for a queue, with its concurrency."""

    queue: str
    handler: Handler
    concurrency: int
    limiter: trio.CapacityLimiter
    registry: Registry
    closed: bool = False
    #: A handler elsewhere (an SDK worker taking batches), driven without a task per
    #: attempt (``_remote.py``); ``handler`` then serves only as its fallback.
    remote: RemoteHandler | None = None

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

    def register(
        self,
        queue: str,
        handler: Handler,
        concurrency: int,
        remote: RemoteHandler | None = None,
    ) -> Registration:
        """Add a handler (with ``remote``, one whose attempts run elsewhere); the leader
        sees the new capacity at once."""
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if not _is_async(handler):
            # Awaited on the sidecar's one event loop: a plain function would block every
            # task and the node's lease with it, and a timeout could not stop it.
            raise TypeError(
                f"in-process handler {getattr(handler, '__qualname__', handler)!r} must be an "
                "async function (async def); run blocking code through the SDK "
                "(run_worker, pool='process' for a hard timeout)"
            )
        reg = Registration(
            queue, handler, concurrency, trio.CapacityLimiter(concurrency), self, remote=remote
        )
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
