"""What callbacks an application can ask for, and how they are run.

The event names :meth:`Task.on` and :meth:`TaskManager.on` take, and :class:`CallQueue`:
callbacks run one after another in event order, in a task of their own (off the
connection's reader, which they must not stall), with their errors logged. Both a task's
callbacks and the namespace's run through it.
"""

from __future__ import annotations

import collections
import inspect
import logging
from collections.abc import Callable
from typing import Any

from .protocol import EVENT_KINDS

log = logging.getLogger("taskmanager")

#: What :meth:`Task.on` takes: the protocol's event kinds, and ``success`` (a
#: ``completed`` event) and ``failure`` (a ``failed`` one that will not be retried).
EVENTS = (*EVENT_KINDS, "success", "failure")
#: What :meth:`TaskManager.on` takes besides :data:`EVENTS`: ``gap``, told when events
#: were missed and cannot be replayed (docs/protocol.md, "Resuming a subscription").
MANAGER_EVENTS = (*EVENTS, "gap")

Callback = Callable[..., Any]
#: Starts a background task; False if there is nowhere to run it yet.
Spawn = Callable[..., bool]


async def call_safely(callback: Callback, *args: Any) -> None:
    """Call ``callback(*args)``, awaiting what it returns; an error is logged, not raised."""
    try:
        result = callback(*args)
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception("a task manager callback failed")


class CallQueue:
    """Callbacks waiting to run, in order, in one background task at a time."""

    def __init__(self, spawn: Spawn) -> None:
        self._spawn = spawn
        self._calls: collections.deque[tuple[Callback, tuple[Any, ...]]] = collections.deque()
        self._calling = False

    def extend(self, calls: list[tuple[Callback, tuple[Any, ...]]]) -> None:
        """Queue ``calls`` and start the task that runs them, unless it runs already."""
        if calls:
            self._calls.extend(calls)
            if not self._calling:
                self._calling = self._spawn(self._run)

    async def _run(self) -> None:
        try:
            while self._calls:
                callback, args = self._calls.popleft()
                await call_safely(callback, *args)
        finally:
            self._calling = False
