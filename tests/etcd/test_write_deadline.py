"""A key-value write over gRPC waits at most WRITE_TIMEOUT_S for etcd, whatever the
client's timeout: a write that reached a member as etcd's raft leader died is lost, and
only its deadline ends the wait (issue 12, the raft-leader-kill target)."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import trio

from tests.cluster import Proxy
from tm_sidecar import EtcdConfig, EtcdUnavailable
from tm_sidecar.core import Range
from tm_sidecar.etcd import connect
from tm_sidecar.etcd._transport import WRITE_TIMEOUT_S
from tm_sidecar.ops._embedded import EtcdProcess

#: The client's deadline, well apart from the write deadline (1 s), so that which one
#: ended a call shows on a loaded machine too.
TIMEOUT_S = 5.0


async def _took(call: Awaitable[Any]) -> float:
    started = trio.current_time()
    try:
        await call
    except EtcdUnavailable:
        return trio.current_time() - started
    raise AssertionError("the call answered through a silent network")


async def test_a_write_to_a_silent_etcd_gives_up_at_the_write_deadline(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    proxy = Proxy(etcd_server.client_port)
    etcd = connect(EtcdConfig(endpoints=(proxy.endpoint,), timeout_s=TIMEOUT_S))
    key = f"/tm/{namespace}/queues/q"
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.run)
            await etcd.put(key, "1")  # connected
            proxy.cut()
            write_took = await _took(etcd.put(key, "2"))
            # A read keeps the client's timeout: etcd itself waits out a leader change.
            read_took = await _took(etcd.range(Range(key)))
            # The write gave up at its own deadline: not before it, and before the client's.
            assert WRITE_TIMEOUT_S * 0.9 <= write_took < TIMEOUT_S * 0.9 <= read_took, (
                write_took,
                read_took,
            )
            proxy.heal()
            assert (await etcd.get(key)) is not None
            nursery.cancel_scope.cancel()
    finally:
        await etcd.aclose()
