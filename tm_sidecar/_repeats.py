"""Warnings that repeat: the first one logged at once, the rest counted, one line each
interval with how many there were (``repeats``), until an interval passes without one.

Under a fault the same warning comes from many places at once (one etcd stall: every
attempt's report waits, the leader reaps a dead node's tasks one by one); one line per
occurrence buries the rest of the log. Each noisy call site keeps a :class:`Repeats`
and calls :meth:`Repeats.note` where it logged; every occurrence is still logged at
debug level. Time is Trio's clock, so a test drives it with ``trio.testing.MockClock``.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from typing import Any

import attrs
import trio

#: How long repeats of one warning are counted before their line is written.
INTERVAL_S = 5.0


@attrs.define(eq=False)
class _Window:
    """The repeats of one key since its last line."""

    until: float
    count: int = 0
    fields: dict[str, Any] = attrs.Factory(dict)


@attrs.define(eq=False)
class Repeats:
    """One warning (``message``, a constant sentence, at ``level`` on the logger
    ``sink``), aggregated per key."""

    sink: logging.Logger
    message: str
    level: int = logging.WARNING
    interval_s: float = INTERVAL_S
    _windows: dict[Hashable, _Window] = attrs.Factory(dict)
    _run: object = None

    def note(self, key: Hashable = None, **fields: Any) -> None:
        """One occurrence, with its log fields. The first of ``key`` is logged now; the
        ones within the interval after it are counted, and logged as one line at its
        end (the last one's fields, and ``repeats``: how many), and so on each interval
        while they go on."""
        try:
            run = trio.lowlevel.current_root_task()
        except RuntimeError:  # not in Trio: nothing to count with
            self.sink.log(self.level, self.message, extra=fields)
            return
        if run is not self._run:
            # A new trio.run (tests start many): the last one's windows ended with it.
            self._run, self._windows = run, {}
        window = self._windows.get(key)
        if window is not None:
            window.count += 1
            window.fields = fields
            self.sink.debug(self.message, extra=fields)
            return
        self.sink.log(self.level, self.message, extra=fields)
        window = _Window(until=trio.current_time() + self.interval_s)
        self._windows[key] = window
        # A system task, so that any call site can count without a nursery of its own;
        # it ends with its window (or with the run).
        trio.lowlevel.spawn_system_task(self._flush, key, window, name=f"repeats:{self.message}")

    async def _flush(self, key: Hashable, window: _Window) -> None:
        try:
            while True:
                await trio.sleep_until(window.until)
                if not window.count:
                    return
                self._line(window)
                window.until += self.interval_s
        finally:
            if self._windows.get(key) is window:
                del self._windows[key]
            if window.count:  # the run ends (cancelled): the count still counts
                self._line(window)

    def _line(self, window: _Window) -> None:
        extra = {**window.fields, "repeats": window.count, "over_s": self.interval_s}
        self.sink.log(self.level, self.message, extra=extra)
        window.count = 0
