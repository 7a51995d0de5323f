"""What a handler raises to choose its task's outcome (the errors are in ``protocol``)."""

from __future__ import annotations

from datetime import timedelta


class Permanent(Exception):
    """Raise (or raise from) this in a handler: the task fails without further retries."""


class Snooze(Exception):
    """Raise this in a handler to run the task again later: ``raise Snooze(30)`` puts it
    back to delayed for 30 seconds (a number, or a ``timedelta``), and this attempt does
    not count. A task may snooze ``max_snoozes`` times (100 unless its options say),
    then it fails (``SnoozeLimit``)."""

    def __init__(self, delay: float | timedelta) -> None:
        seconds = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
        super().__init__(f"snooze for {seconds:g} s")
        self.delay_s = seconds
