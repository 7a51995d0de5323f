"""The one backoff and :class:`Retries`: every loop that waits out etcd counts, pauses and
logs the same way (``tm_sidecar/etcd/_retry.py``)."""

from __future__ import annotations

import inspect
import logging

import pytest
import trio
import trio.testing

from tm_sidecar._errors import EtcdFull, EtcdUnavailable
from tm_sidecar.etcd import Feed, retrying
from tm_sidecar.etcd._informer import informer
from tm_sidecar.etcd._retry import CAP_S, Retries, backoff


def test_retries_pause_the_backoff_of_the_failures_in_a_row(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="tm_sidecar.etcd")
    clock = trio.testing.MockClock(autojump_threshold=0)
    asked: list[int] = []

    def doubling(failures: int) -> float:
        asked.append(failures)
        return float(2**failures)

    async def main() -> None:
        retries = Retries("watch", doubling)
        for _ in range(3):
            await retries.pause(EtcdUnavailable("gone"), prefix="/ns/")
        retries.reset()
        await retries.pause(EtcdFull("NOSPACE"))

    start = clock.current_time()
    trio.run(main, clock=clock)
    assert asked == [1, 2, 3, 1]  # counted in a row, and again from one after reset()
    assert clock.current_time() - start == 2 + 4 + 8 + 2
    lines = [(r.levelname, r.getMessage(), vars(r)) for r in caplog.records]
    # The first failure at once; the next ones (at 2 s, at 6 s) counted, a line every 5 s.
    assert [(level, msg, fields.get("repeats")) for level, msg, fields in lines] == [
        ("WARNING", "etcd call failed: retrying", None),
        ("WARNING", "etcd call failed: retrying", 1),
        ("WARNING", "etcd call failed: retrying", 1),
        ("ERROR", "etcd is full: free space with `tmctl recover`; retrying", None),
    ]
    first, full = lines[0][2], lines[-1][2]
    assert (first["op"], first["error"], first["retry_in_s"], first["prefix"]) == (
        "watch",
        "gone",
        2.0,
        "/ns/",
    )
    assert (full["op"], full["error"], full["retry_in_s"]) == ("watch", "NOSPACE", 2.0)


def test_a_stall_is_one_line_then_a_count_not_a_line_per_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="tm_sidecar.etcd")

    async def main() -> None:
        watch, lease = Retries("watch", lambda _: 0.02), Retries("lease", lambda _: 0.02)
        for _ in range(50):  # 50 failures of each loop in one second
            await watch.pause(EtcdUnavailable("gone"))
            await lease.pause(EtcdUnavailable("gone"))

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    lines = [(vars(r)["op"], vars(r).get("repeats")) for r in caplog.records]
    # Each loop its line at once, then its count (here at the end of the run).
    assert sorted(lines, key=str) == [
        ("lease", 49),
        ("lease", None),
        ("watch", 49),
        ("watch", None),
    ]


def test_retrying_tells_each_failure_then_answers(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tm_sidecar.etcd")
    failures: list[Exception] = []

    async def flaky() -> str:
        if len(failures) < 2:
            raise EtcdUnavailable(f"down {len(failures)}")
        return "up"

    async def main() -> str:
        return await retrying(flaky, what="lease grant", on_retry=failures.append)

    assert trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0)) == "up"
    assert [str(e) for e in failures] == ["down 0", "down 1"]
    assert [(vars(r)["op"], vars(r)["error"]) for r in caplog.records] == [
        ("lease grant", "down 0"),
        ("lease grant", "down 1"),
    ]


def test_every_loop_waits_the_one_backoff() -> None:
    assert backoff(1, jitter=False) == 0.1
    assert backoff(99, jitter=False) == CAP_S == 1.0
    fields = {f.name: f for f in Feed.__attrs_attrs__}
    assert fields["backoff"].default is backoff
    assert inspect.signature(informer).parameters["backoff"].default is None  # the one
    assert Retries("x").backoff is backoff
