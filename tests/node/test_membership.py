"""Session epochs (tm_sidecar/node/_membership.py) on a real etcd that goes away and
comes back: a sidecar whose session ended while etcd was gone starts a new one, and
the old one does not linger."""

from __future__ import annotations

import trio

from tests.helpers import poll_until, wait_for
from tm_sidecar import EtcdConfig, Sidecar, SidecarSettings
from tm_sidecar.core import Keyspace, NodeId, NodeInfo
from tm_sidecar.etcd import connect
from tm_sidecar.ops._embedded import EtcdProcess


async def test_a_session_lost_while_etcd_was_away_is_revoked_once_it_answers(
    own_etcd: EtcdProcess, namespace: str
) -> None:
    """etcd renews every lease when it elects a leader, so a lease whose revoke failed
    during an outage lives a whole TTL past it, and with it this node's old candidate
    key, which every campaign then waits behind (the fault test saw the first task start
    3 s after a whole-cluster restart). The new epoch revokes it as soon as etcd answers."""
    etcd = connect(EtcdConfig(endpoints=(own_etcd.endpoint,), timeout_s=1.0))
    ks = Keyspace(namespace=namespace)
    settings = SidecarSettings(node_id=NodeId("n1"), namespace=namespace, lease_ttl_s=2)
    sidecar = Sidecar(etcd, settings)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(sidecar.run)
            await wait_for(lambda: sidecar.is_leader)
            old = sidecar.session
            assert old is not None
            await trio.to_thread.run_sync(own_etcd.kill)
            await wait_for(old.lost.is_set, timeout_s=15)  # past its TTL: lost, not revoked
            await trio.to_thread.run_sync(own_etcd.start)

            async def registered_anew() -> bool:
                kv = await etcd.get(ks.node(NodeId("n1")))
                return kv is not None and NodeInfo.from_json(kv.value).session != old.lease

            await poll_until(registered_anew, timeout_s=20)
            # Registered under the new session: the old lease is already gone, not left
            # to run out its TTL.
            assert await etcd.lease_ttl(old.lease) == -1
            await wait_for(lambda: sidecar.is_leader, timeout_s=10)
            nursery.cancel_scope.cancel()
    finally:
        await etcd.aclose()
