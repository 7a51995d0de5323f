"""The sidecar's one watch (tm_sidecar/etcd/_feed.py) on a real etcd: its taps see exactly
their range, a slow one lists again without holding up the others, a compacted feed
makes every tap list again, and a sidecar opens one watch where it opened three.

Its own module: it compacts its etcd.
"""

from __future__ import annotations

import urllib.request
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any

import attrs
import trio

from tests.cluster import Proxy
from tests.helpers import wait_for
from tm_sidecar import EtcdConfig, Sidecar, SidecarSettings, TaskContext
from tm_sidecar.core import Keyspace, NodeId
from tm_sidecar.etcd import Changes, Etcd, Reset, connect
from tm_sidecar.etcd._feed import Feed
from tm_sidecar.ops._embedded import EtcdProcess


@attrs.define(eq=False)
class Mirror:
    """What a consumer of a tap rebuilds of its range, and how it got there."""

    kvs: dict[str, str] = attrs.Factory(dict)
    resets: int = 0
    revision: int = 0

    def take(self, item: Reset | Changes) -> None:
        if isinstance(item, Reset):
            self.resets += 1
            self.kvs = {kv.key: kv.value for kv in item.kvs}
        else:
            assert item.revision >= self.revision
            for e in item.events:
                if e.kind == "PUT":
                    self.kvs[e.kv.key] = e.kv.value
                else:
                    self.kvs.pop(e.kv.key, None)
        self.revision = item.revision


@asynccontextmanager
async def running(etcd: Etcd, ks: Keyspace, limit: int = 50_000) -> AsyncIterator[Feed]:
    feed = Feed(etcd, ks, limit=limit)
    async with trio.open_nursery() as nursery:
        await nursery.start(feed.run)
        yield feed
        nursery.cancel_scope.cancel()


async def follow(feed: Feed, mirror: Mirror, prefix: str, gate: trio.Event | None = None) -> None:
    async with aclosing(feed.informer(prefix)) as items:
        async for item in items:
            mirror.take(item)
            if gate is not None:
                await gate.wait()


async def listing(etcd: Etcd, prefix: str) -> dict[str, str]:
    kvs, _ = await etcd.list_prefix(prefix)
    return {kv.key: kv.value for kv in kvs}


async def test_taps_see_their_own_range_and_a_slow_one_lists_again_alone(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    etcd = connect(EtcdConfig(endpoints=(etcd_server.endpoint,)))
    ks = Keyspace(namespace=namespace)
    a, b = ks.prefix + "nodes/", ks.prefix + "pending/"
    await etcd.put(a + "early", "0")  # listed, not watched
    fast, slow = Mirror(), Mirror()
    gate = trio.Event()
    try:
        async with running(etcd, ks, limit=20) as feed, trio.open_nursery() as nursery:
            nursery.start_soon(follow, feed, fast, a)
            nursery.start_soon(follow, feed, slow, b, gate)
            await wait_for(lambda: fast.resets == 1 and slow.resets == 1)
            for i in range(50):  # the slow tap takes its first item, then stops
                await etcd.put(a + f"k{i % 7}", str(i))
                await etcd.put(b + f"k{i}", str(i))
                if i % 5 == 0:
                    await etcd.delete(a + f"k{(i + 3) % 7}")
            # The fast one keeps up meanwhile, exactly: none lost, none repeated.
            assert fast.resets == 1
            want_a = await listing(etcd, a)
            await wait_for(lambda: fast.kvs == want_a)
            assert slow.kvs.keys() <= {b + f"k{i}" for i in range(50)}
            gate.set()
            want_b = await listing(etcd, b)
            await wait_for(lambda: slow.kvs == want_b)
            # Its 50 events did not fit in 20: it dropped them and listed again, alone.
            assert slow.resets >= 2
            assert fast.resets == 1
            nursery.cancel_scope.cancel()
    finally:
        await etcd.aclose()


async def test_a_compacted_feed_makes_every_tap_list_again(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    etcd = connect(EtcdConfig(endpoints=(etcd_server.endpoint,)))
    proxy = Proxy(etcd_server.client_port)
    through = connect(EtcdConfig(endpoints=(proxy.endpoint,), timeout_s=2.0))
    ks = Keyspace(namespace=namespace)
    a, b = ks.prefix + "queues/", ks.prefix + "rates/"
    mirrors = Mirror(), Mirror()
    try:
        async with trio.open_nursery() as outer:
            await outer.start(proxy.run)
            async with running(through, ks) as feed, trio.open_nursery() as nursery:
                nursery.start_soon(follow, feed, mirrors[0], a)
                nursery.start_soon(follow, feed, mirrors[1], b)
                await wait_for(lambda: all(m.resets == 1 for m in mirrors))
                # The feed loses etcd; the history it would resume from is compacted.
                proxy.drop()
                for i in range(5):
                    await etcd.put(a + f"q{i}", str(i))
                    await etcd.put(b + f"r{i}", str(i))
                await etcd.compact(await etcd.revision())
                proxy.heal()
                want = await listing(etcd, a), await listing(etcd, b)
                await wait_for(lambda: (mirrors[0].kvs, mirrors[1].kvs) == want)
                assert feed.compactions == 1
                assert [m.resets for m in mirrors] == [2, 2]
                # And on from there.
                await etcd.put(a + "after", "x")
                await wait_for(lambda: mirrors[0].kvs.get(a + "after") == "x")
                nursery.cancel_scope.cancel()
            outer.cancel_scope.cancel()
    finally:
        await through.aclose()
        await etcd.aclose()


def _watchers(etcd_server: EtcdProcess) -> int:
    text = urllib.request.urlopen(etcd_server.endpoint + "/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith("etcd_debugging_mvcc_watcher_total "):
            return int(float(line.split()[1]))
    raise AssertionError("etcd reports no watcher count")


async def test_a_leading_sidecar_opens_one_watch(own_etcd: EtcdProcess, namespace: str) -> None:
    # An etcd of its own: the shared one may still hold the watchers of earlier tests'
    # sidecars (etcd drops them a little after their streams close).
    etcd = connect(EtcdConfig(endpoints=(own_etcd.endpoint,)))
    assert await trio.to_thread.run_sync(_watchers, own_etcd) == 0
    sidecar = Sidecar(etcd, SidecarSettings(node_id=NodeId("n1"), namespace=namespace))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(sidecar.run)
            await wait_for(lambda: sidecar.is_leader and sidecar.leader.view is not None)
            task = await sidecar.create({"n": 1})

            async def handler(t: TaskContext) -> Any:
                return t.payload

            sidecar.register(handler)
            info = await sidecar.wait(task.id, timeout_s=20)
            assert info.final
            # The hub, the agent, the leader's view, admission's result sizes and the
            # node's own registration: one watch among them.
            assert sidecar.feed.taps == 5
            assert await trio.to_thread.run_sync(_watchers, own_etcd) == 1
            nursery.cancel_scope.cancel()
    finally:
        await etcd.aclose()
