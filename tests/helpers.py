"""Waiting on things without sleeping: collections that wake their waiters."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Generic, TypeVar

import attrs
import trio

from tests.procs import TRANSPORT
from tm_sidecar import EtcdConfig, Sidecar, SidecarSettings
from tm_sidecar.core import NodeId
from tm_sidecar.etcd import connect
from tm_sidecar.etcd._config import check_transport

T = TypeVar("T")


class Observed(Generic[T]):
    """A list that tasks can wait on until a condition over it holds."""

    def __init__(self) -> None:
        self.items: list[T] = []
        self._changed = trio.Event()

    def add(self, item: T) -> None:
        """Append and wake every waiter."""
        self.items.append(item)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(
        self, condition: Callable[[list[T]], bool], timeout_s: float = 10.0
    ) -> None:
        """Return once ``condition(items)`` holds; fail after ``timeout_s``."""
        with trio.fail_after(timeout_s):
            while not condition(self.items):
                await self._changed.wait()


@asynccontextmanager
async def running_sidecars(
    endpoint: str, namespace: str, *nodes: str, **settings: Any
) -> AsyncIterator[list[Sidecar]]:
    """Sidecars on one etcd and namespace, started in order (the first one leads)."""
    settings.setdefault("lease_ttl_s", 2)
    settings.setdefault("grace_s", 1.0)
    cfg = EtcdConfig(endpoints=(endpoint,), timeout_s=3.0)
    if TRANSPORT is not None:
        cfg = attrs.evolve(cfg, transport=check_transport(TRANSPORT))
    etcd = connect(cfg)
    try:
        async with trio.open_nursery() as nursery:
            sidecars = []
            for node in nodes:
                sidecar = Sidecar(
                    etcd, SidecarSettings(node_id=NodeId(node), namespace=namespace, **settings)
                )
                await nursery.start(sidecar.run)
                sidecars.append(sidecar)
            await wait_for(lambda: sidecars[0].is_leader)
            yield sidecars
            nursery.cancel_scope.cancel()
    finally:
        await etcd.aclose()


async def wait_for(
    condition: Callable[[], bool], timeout_s: float = 10.0, poll_s: float = 0.01
) -> None:
    """Poll a condition with a deadline (for state that has no event to wait on)."""
    with trio.fail_after(timeout_s):
        while not condition():  # noqa: ASYNC110 - a polled condition, bounded by the deadline
            await trio.sleep(poll_s)


async def poll_until(
    condition: Callable[[], Awaitable[bool]], timeout_s: float = 10.0, poll_s: float = 0.05
) -> None:
    """Poll an async condition (an etcd read, say) with a deadline."""
    with trio.fail_after(timeout_s):
        while not await condition():  # noqa: ASYNC110 - bounded poll of a remote state
            await trio.sleep(poll_s)


def _all_threads_stopped(pid: int) -> bool:
    states = []
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that just ended
    return bool(states) and all(state in ("T", "t") for state in states)


async def stop_process(pid: int, timeout_s: float = 5.0) -> None:
    """SIGSTOP ``pid`` and return once every one of its threads is stopped: ``kill``
    returns when the signal is queued, and on a loaded machine a thread can still answer
    a request in between."""
    os.kill(pid, signal.SIGSTOP)
    await wait_for(lambda: _all_threads_stopped(pid), timeout_s, poll_s=0.001)


class StepMeter(trio.abc.Instrument):
    """A Trio instrument: the CPU time of the loop's thread in each task step.

    Thread CPU time, not wall time: a loaded machine stretches the wall time of a step,
    never the work done in it without yielding, which is what blocks the loop."""

    def __init__(self, ignore: trio.lowlevel.Task | None = None) -> None:
        #: A task left out (the test's own, whose asserts may do heavy reads).
        self.ignore = ignore
        self.longest_s = 0.0
        self.steps = 0
        self.longest = ""
        self._started = 0.0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        """Start timing a step."""
        self._started = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        """Keep the longest step."""
        if task is self.ignore:
            return
        self.steps += 1
        took = time.thread_time() - self._started
        if took > self.longest_s:
            self.longest_s, self.longest = took, task.name
