"""Live task events for a page, as server-sent events, batched and sampled.

A busy queue makes thousands of events a second; a page can draw a few hundred. Each
stream keeps the latest ``keep`` events in a ring and sends them at most every
``interval_s`` as one message, with how many it saw and how many it left out, so
that neither the sidecar nor the browser falls behind whatever the rate.

When the hub itself missed events (its watch had to start again), the stream says so in
a ``gap`` message of its own (the protocol's gap: the revisions missed and the tasks to
read again), never sampled away, so that the page can show it and reload what it shows.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import trio

from ..core import TaskEvent
from ._data import event_json


@attrs.define(eq=False)
class EventBatcher:
    """Collects events from the hub's callback; :meth:`stream` sends them in batches."""

    keep: int = 200
    tracebacks: bool = False
    clock: Callable[[], float] = time.time
    seen: int = 0
    _taken: int = 0
    _ring: deque[tuple[float, TaskEvent]] = attrs.field(init=False)
    #: Gaps not yet sent (the latest few: each says to read everything named again).
    _gaps: deque[dict[str, Any]] = attrs.Factory(lambda: deque(maxlen=10))
    _wake: trio.Event = attrs.Factory(trio.Event)

    def __attrs_post_init__(self) -> None:
        self._ring = deque(maxlen=self.keep)

    def deliver(self, event: TaskEvent) -> None:
        """The hub's callback: remember the event and wake the stream (never blocks)."""
        self.seen += 1
        self._ring.append((self.clock(), event))
        self._wake.set()

    def gap(self, gap: dict[str, Any]) -> None:
        """The hub's ``on_gap``: events were missed; tell the page (never blocks)."""
        self._gaps.append(gap)
        self._wake.set()

    def take_gaps(self) -> list[dict[str, Any]]:
        """The gaps since the last take."""
        gaps = list(self._gaps)
        self._gaps.clear()
        return gaps

    def replay(self, events: list[tuple[float, TaskEvent]]) -> None:
        """Events that came before the stream did, to send first."""
        for seen_at, event in events:
            self.seen += 1
            self._ring.append((seen_at, event))
        if events:
            self._wake.set()

    def take(self) -> dict[str, object]:
        """The events since the last take (the latest ``keep``), and the counts."""
        events = [event_json(e, t, tracebacks=self.tracebacks) for t, e in self._ring]
        self._ring.clear()
        new = self.seen - self._taken
        self._taken = self.seen
        return {"events": events, "seen": self.seen, "dropped": new - len(events)}

    async def wait(self) -> None:
        """Return once an event (or a gap) is waiting."""
        if not self._ring and not self._gaps:
            await self._wake.wait()
        self._wake = trio.Event()

    async def stream(
        self, interval_s: float = 0.25, keepalive_s: float = 15.0
    ) -> AsyncIterator[str]:
        """Server-sent events: a batch at most every ``interval_s``, a comment line when
        idle for ``keepalive_s`` (proxies close silent connections)."""
        yield "retry: 2000\n\n"
        while True:
            with trio.move_on_after(keepalive_s) as idle:
                await self.wait()
            if idle.cancelled_caught:
                yield ": idle\n\n"
                continue
            # Let a burst gather into one message rather than one message per event.
            await trio.sleep(interval_s)
            for gap in self.take_gaps():
                yield f"event: gap\ndata: {json.dumps(gap, separators=(',', ':'))}\n\n"
            if self._ring:
                batch = json.dumps(self.take(), separators=(",", ":"), default=str)
                yield f"event: batch\ndata: {batch}\n\n"
