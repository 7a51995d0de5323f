"""One backoff, and :func:`retrying`: what every caller of etcd waits between failures."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from .._errors import EtcdFull, EtcdUnavailable

log = logging.getLogger("tm_sidecar.etcd")

T = TypeVar("T")

#: The first wait and the longest one, in seconds.
FIRST_S = 0.05
CAP_S = 2.0


def backoff(failures: int, *, jitter: bool = True) -> float:
    """Seconds to wait after ``failures`` failures in a row: 50 ms doubling to 2 s.

    With ``jitter`` (the default), a random part of up to half is taken off, so that
    many clients that lost etcd together do not all come back at the same instant.
    """
    full = min(CAP_S, FIRST_S * 2.0 ** min(max(failures, 0), 10))
    return float(full * (0.5 + random.random() / 2) if jitter else full)


async def retrying(
    op: Callable[[], Awaitable[T]],
    *,
    what: str,
    deadline_s: float = math.inf,
    on_retry: Callable[[Exception], None] | None = None,
) -> T:
    """Run a safe-to-repeat operation until it stops failing with EtcdUnavailable (or
    EtcdFull: a full etcd takes writes again once an operator has freed space)."""
    failures = 0
    with trio.fail_after(deadline_s) if math.isfinite(deadline_s) else trio.CancelScope():
        while True:
            try:
                return await op()
            except (EtcdUnavailable, EtcdFull) as exc:
                failures += 1
                if on_retry is not None:
                    on_retry(exc)
                wait = backoff(failures)
                if isinstance(exc, EtcdFull):
                    log.error(
                        "etcd is full: free space with `tmctl recover`; retrying",
                        extra={"op": what, "error": str(exc), "retry_in_s": round(wait, 3)},
                    )
                else:
                    log.warning(
                        "etcd call failed: retrying",
                        extra={"op": what, "error": str(exc), "retry_in_s": round(wait, 3)},
                    )
                await trio.sleep(wait)
