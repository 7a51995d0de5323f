"""Waiting on things without sleeping: collections that wake their waiters."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
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
