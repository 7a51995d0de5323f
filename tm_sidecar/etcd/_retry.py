"""One backoff, :class:`Retries` and :func:`retrying`: what every caller of etcd waits
between failures, and the one line it logs for each."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import attrs
import trio
from taskmanager.protocol import backoff_s

from .._errors import EtcdFull, EtcdUnavailable
from .._repeats import Repeats

log = logging.getLogger("tm_sidecar.etcd")
#: Under an etcd stall every loop retries at once: one line per loop a few seconds.
_RETRYING = Repeats(log, "etcd call failed: retrying")
_FULL = Repeats(log, "etcd is full: free space with `tmctl recover`; retrying", logging.ERROR)

T = TypeVar("T")

#: The first wait and the longest one, in seconds.
FIRST_S = 0.05
CAP_S = 1.0


def backoff(failures: int, *, jitter: bool = True) -> float:
    """Seconds to wait after ``failures`` failures in a row: 50 ms doubling to 1 s.

    With ``jitter`` (the default), a random part of up to half is taken off, so that
    many clients that lost etcd together do not all come back at the same instant.
    """
    return backoff_s(
        failures, first_s=FIRST_S, cap_s=CAP_S, draw=random.random() if jitter else 1.0
    )


@attrs.define(eq=False)
class Retries:
    """Failures in a row of one loop against etcd, and the pause after each.

    Every loop that waits out an unavailable etcd (:func:`retrying`, the informer, the
    feed's watch and its taps' listings) counts and pauses here: the one backoff, and
    one log line for the first failure, then one with a count every few seconds while
    they go on (:class:`~tm_sidecar._repeats.Repeats`), ``op`` saying what failed.
    """

    op: str
    backoff: Callable[[int], float] = backoff
    failures: int = 0

    def reset(self) -> None:
        """A call worked: the next failure is a first one again."""
        self.failures = 0

    async def pause(self, exc: Exception, **fields: Any) -> None:
        """Count ``exc``, log it (with ``fields``), and sleep the backoff."""
        self.failures += 1
        wait = self.backoff(self.failures)
        extra = {"op": self.op, "error": str(exc), "retry_in_s": round(wait, 3), **fields}
        (_FULL if isinstance(exc, EtcdFull) else _RETRYING).note(self.op, **extra)
        await trio.sleep(wait)


async def retrying(
    op: Callable[[], Awaitable[T]],
    *,
    what: str,
    deadline_s: float = math.inf,
    on_retry: Callable[[Exception], None] | None = None,
) -> T:
    """Run a safe-to-repeat operation until it stops failing with EtcdUnavailable (or
    EtcdFull: a full etcd takes writes again once an operator has freed space)."""
    retries = Retries(what)
    with trio.fail_after(deadline_s) if math.isfinite(deadline_s) else trio.CancelScope():
        while True:
            try:
                return await op()
            except (EtcdUnavailable, EtcdFull) as exc:
                if on_retry is not None:
                    on_retry(exc)
                await retries.pause(exc)
