"""The etcd adapter against a real etcd: the same assertions through both transports
(etcd's native gRPC API, and its JSON gateway through etcd3-py). Failover, deadlines and
a full etcd are in test_etcd_grpc.py, TLS and auth in test_security.py, also through both."""

from __future__ import annotations

import threading
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing

import attrs
import pytest
import trio

from tests.helpers import Observed
from tm_sidecar import Compacted, Etcd, EtcdConfig, EtcdError, EtcdUnavailable
from tm_sidecar.core import (
    Compare,
    Delete,
    KeyValue,
    Op,
    Put,
    Range,
    Target,
    Touch,
    Txn,
    WatchEvent,
)
from tm_sidecar.etcd import TRANSPORTS, Changes, Reset, connect
from tm_sidecar.ops._embedded import EtcdProcess, free_port


@pytest.fixture(params=TRANSPORTS)
async def etcd(request: pytest.FixtureRequest, etcd_server: EtcdProcess) -> AsyncIterator[Etcd]:
    client = connect(EtcdConfig(endpoints=(etcd_server.endpoint,), transport=request.param))
    yield client
    await client.aclose()


async def test_put_get_range_and_delete(etcd: Etcd, namespace: str) -> None:
    p = f"/{namespace}/"
    rev = await etcd.put(p + "a", "1")
    await etcd.put(p + "b", '{"x": "é"}')
    await etcd.put(p + "c", "3")
    kv = await etcd.get(p + "b")
    assert kv is not None
    assert (kv.value, kv.version, kv.create_revision) == ('{"x": "é"}', 1, rev + 1)
    page = await etcd.range(Range(p, prefix=True, limit=2))
    assert [k.key for k in page.kvs] == [p + "a", p + "b"]
    assert page.more
    assert page.count == 3
    counted = await etcd.range(Range(p, prefix=True, count_only=True))
    assert (counted.count, counted.kvs) == (3, ())
    old = await etcd.range(Range(p + "a", revision=rev))
    assert old.kvs[0].value == "1"
    assert await etcd.delete(p, prefix=True) == 3
    assert await etcd.get(p + "a") is None


async def test_list_prefix_pages_at_one_revision(etcd: Etcd, namespace: str) -> None:
    p = f"/{namespace}/"
    for i in range(25):
        await etcd.put(f"{p}{i:03d}", str(i))
    kvs, revision = await etcd.list_prefix(p, page=7)
    await etcd.put(p + "zzz", "late")
    assert [kv.value for kv in kvs] == [str(i) for i in range(25)]
    assert revision == max(kv.mod_revision for kv in kvs)


async def test_a_listing_can_go_page_by_page_to_a_worker_thread(etcd: Etcd, namespace: str) -> None:
    p = f"/{namespace}/"
    for i in range(25):
        await etcd.put(f"{p}{i:03d}", str(i))
    pages: list[list[str]] = []
    threads: set[int] = set()

    def consume(kvs: Sequence[KeyValue]) -> None:
        threads.add(threading.get_ident())
        pages.append([kv.value for kv in kvs])

    kvs, revision = await etcd.list_prefix(p, page=7, consume=consume)
    assert kvs == ()
    assert [len(page) for page in pages] == [7, 7, 7, 4]
    assert [v for page in pages for v in page] == [str(i) for i in range(25)]
    assert threading.get_ident() not in threads  # off the event loop
    assert revision == (await etcd.get(f"{p}024") or KeyValue("", "", 0, 0, 0)).mod_revision


async def test_a_failing_page_consumer_raises_its_own_error(etcd: Etcd, namespace: str) -> None:
    p = f"/{namespace}/"
    for i in range(5):
        await etcd.put(f"{p}{i}", str(i))

    def consume(kvs: Sequence[KeyValue]) -> None:
        raise ValueError("a bad record")

    # Not an exception group: the informer's and the leader's handlers must see it.
    with pytest.raises(ValueError, match="a bad record"):
        await etcd.list_prefix(p, page=2, consume=consume)
    gone = connect(attrs.evolve(etcd.cfg, endpoints=("http://127.0.0.1:9",), timeout_s=1.0))
    with pytest.raises(EtcdUnavailable):
        await gone.list_prefix(p, consume=consume)
    await gone.aclose()


async def test_txn_compares_on_version_create_and_mod_revision(etcd: Etcd, namespace: str) -> None:
    key = f"/{namespace}/k"
    create = Txn(compare=(Compare.absent(key),), success=(Put(key, "v1"),), failure=(Range(key),))
    first = await etcd.txn(create)
    assert first.succeeded
    second = await etcd.txn(create)
    assert not second.succeeded
    assert second.ranges[0].kvs[0].value == "v1"
    kv = await etcd.get(key)
    assert kv is not None
    guarded = Txn(compare=(Compare.modified_at(key, kv.mod_revision),), success=(Put(key, "v2"),))
    assert (await etcd.txn(guarded)).succeeded
    assert not (await etcd.txn(guarded)).succeeded  # the mod revision moved on
    same_life = Txn(
        compare=(Compare.created_at(key, kv.create_revision),), success=(Put(key, "v3"),)
    )
    assert (await etcd.txn(same_life)).succeeded
    await etcd.delete(key)
    await etcd.put(key, "reborn")
    assert not (await etcd.txn(same_life)).succeeded  # a new incarnation of the key
    gt = Txn(compare=(Compare(key, Target.VERSION, Op.GREATER, 0),), success=(Delete(key),))
    assert (await etcd.txn(gt)).succeeded
    assert await etcd.get(key) is None


async def test_touch_moves_a_key_to_a_lease_without_rewriting_it(
    etcd: Etcd, namespace: str
) -> None:
    key = f"/{namespace}/payload"
    await etcd.put(key, "written once")
    lease, ttl = await etcd.lease_grant(30)
    assert ttl == 30
    result = await etcd.txn(Txn(success=(Touch(key, lease),)))
    assert result.succeeded
    kv = await etcd.get(key)
    assert kv is not None
    assert (kv.value, kv.lease) == ("written once", lease)
    await etcd.lease_revoke(lease)
    assert await etcd.get(key) is None


async def test_txn_compares_on_a_keys_lease(etcd: Etcd, namespace: str) -> None:
    key = f"/{namespace}/held"
    lease, _ = await etcd.lease_grant(30)
    other, _ = await etcd.lease_grant(30)
    await etcd.put(key, "x", lease=lease)
    assert (await etcd.txn(Txn(compare=(Compare.leased(key, lease),)))).succeeded
    assert not (await etcd.txn(Txn(compare=(Compare.leased(key, other),)))).succeeded
    assert (await etcd.txn(Txn(compare=(Compare.leased(f"{key}/absent", 0),)))).succeeded
    await etcd.lease_revoke(lease)
    await etcd.lease_revoke(other)


async def test_a_watch_on_one_key_or_a_range_and_puts_only(etcd: Etcd, namespace: str) -> None:
    p = f"/{namespace}/"
    start = await etcd.put(p + "a", "0")
    await etcd.put(p + "ab", "1")
    await etcd.delete(p + "a")
    await etcd.put(p + "b", "2")
    await etcd.put(p + "c", "3")

    async def first(watch: AsyncGenerator[Changes, None], count: int) -> list[tuple[str, str]]:
        seen: list[tuple[str, str]] = []
        async with aclosing(watch) as items:
            async for changes in items:
                seen += [(e.kind, e.kv.key) for e in changes.events]
                if len(seen) >= count:
                    return seen
        raise AssertionError("unreachable")

    one = etcd.watch_once(p + "a", start, prefix=False)
    assert await first(one, 2) == [("PUT", p + "a"), ("DELETE", p + "a")]
    puts = etcd.watch_once(p, start, puts_only=True, prev_kv=False)
    assert await first(puts, 4) == [("PUT", p + k) for k in ("a", "ab", "b", "c")]
    ranged = etcd.watch_once(p + "ab", start, range_end=p + "c")
    assert await first(ranged, 2) == [("PUT", p + "ab"), ("PUT", p + "b")]


async def test_lease_keepalive_and_loss(etcd: Etcd, namespace: str) -> None:
    lease, _ = await etcd.lease_grant(5)
    await etcd.put(f"/{namespace}/owned", "x", lease=lease)
    assert await etcd.lease_keepalive(lease) == 5
    assert 0 < await etcd.lease_ttl(lease) <= 5
    await etcd.lease_revoke(lease)
    assert await etcd.lease_keepalive(lease) == 0  # a dead lease answers no TTL
    assert await etcd.lease_ttl(lease) == -1
    assert await etcd.get(f"/{namespace}/owned") is None
    await etcd.lease_revoke(lease)  # revoking twice is harmless


async def test_refusals_are_etcd_errors(etcd: Etcd, namespace: str) -> None:
    key = f"/{namespace}/dup"
    with pytest.raises(EtcdError, match="duplicate key"):
        await etcd.txn(Txn(success=(Put(key, "1"), Put(key, "2"))))
    # Never more than the embedded etcd's --max-txn-ops, whatever an etcd allows.
    with pytest.raises(ValueError, match="1024"):
        Txn(success=tuple(Put(f"{key}{i}", "") for i in range(1025)))
    with pytest.raises(EtcdError, match="too large"):
        await etcd.put(key, "x" * (1600 * 1024))


async def test_informer_lists_then_watches(etcd: Etcd, namespace: str) -> None:
    p = f"/{namespace}/"
    await etcd.put(p + "before", "0")
    observed: Observed[Reset | Changes] = Observed()
    async with trio.open_nursery() as nursery:

        async def consume() -> None:
            async with aclosing(etcd.informer(p)) as items:
                async for item in items:
                    observed.add(item)

        nursery.start_soon(consume)
        await observed.wait_until(bool)
        await etcd.put(p + "after", "1")
        await etcd.delete(p + "before")
        await observed.wait_until(lambda seen: len(_events(seen)) >= 2)
        nursery.cancel_scope.cancel()
    seen = observed.items
    reset = seen[0]
    assert isinstance(reset, Reset)
    assert [kv.key for kv in reset.kvs] == [p + "before"]
    events = _events(seen)
    assert [(e.kind, e.kv.key) for e in events] == [("PUT", p + "after"), ("DELETE", p + "before")]
    assert events[1].prev is not None
    assert events[1].prev.value == "0"


async def test_an_informer_can_hand_its_listing_to_a_loader(etcd: Etcd, namespace: str) -> None:
    p = f"/{namespace}/"
    for i in range(5):
        await etcd.put(f"{p}{i}", str(i))

    class Collect:
        def __init__(self) -> None:
            self.values: list[str] = []

        def load(self, kvs: Sequence[KeyValue]) -> None:
            self.values += [kv.value for kv in kvs]

    async with aclosing(etcd.informer(p, loader=Collect, page=2, prev_kv=False)) as items:
        async for item in items:
            assert isinstance(item, Reset)
            assert item.kvs == ()
            assert item.loaded.values == ["0", "1", "2", "3", "4"]
            break


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_unreachable_etcd_is_unavailable_quickly(transport: str) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    client = connect(EtcdConfig(endpoints=(endpoint,), timeout_s=1.0, transport=transport))  # type: ignore[arg-type]
    with trio.fail_after(5), pytest.raises(EtcdUnavailable):
        await client.get("/x")
    await client.aclose()


# -- etcd going away: a private etcd per test ------------------------------------------


def _events(items: list[Reset | Changes]) -> list[WatchEvent]:
    return [e for item in items if isinstance(item, Changes) for e in item.events]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_watch_resumes_after_etcd_restart(own_etcd: EtcdProcess, transport: str) -> None:
    """No gaps and no repeats across an etcd crash, and no re-list."""
    cfg = EtcdConfig(endpoints=(own_etcd.endpoint,), timeout_s=2.0, transport=transport)  # type: ignore[arg-type]
    client = connect(cfg)
    observed: Observed[Reset | Changes] = Observed()
    async with trio.open_nursery() as nursery:

        async def consume() -> None:
            async with aclosing(client.informer("/w/", backoff=lambda n: 0.05)) as items:
                async for item in items:
                    observed.add(item)

        nursery.start_soon(consume)
        await observed.wait_until(bool)
        for i in range(5):
            await client.put(f"/w/{i}", str(i))
        await observed.wait_until(lambda seen: len(_events(seen)) >= 5)
        await trio.to_thread.run_sync(own_etcd.kill)
        await trio.to_thread.run_sync(own_etcd.start)
        for i in range(5, 10):
            with trio.fail_after(10):
                while True:
                    try:
                        await client.put(f"/w/{i}", str(i))
                        break
                    except EtcdUnavailable:
                        await trio.sleep(0.05)
        await observed.wait_until(lambda seen: len(_events(seen)) >= 10)
        nursery.cancel_scope.cancel()
    await client.aclose()
    assert [e.kv.value for e in _events(observed.items)] == [str(i) for i in range(10)]
    resets = [item for item in observed.items if isinstance(item, Reset)]
    assert len(resets) == 1  # resumed from the last revision, not re-listed


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_compacted_watch_lists_again(own_etcd: EtcdProcess, transport: str) -> None:
    client = connect(EtcdConfig(endpoints=(own_etcd.endpoint,), transport=transport))  # type: ignore[arg-type]
    for i in range(3):
        await client.put(f"/c/{i}", str(i))
    rev = await client.put("/c/x", "x")
    await client.compact(rev)
    async with aclosing(client.watch_once("/c/", 1)) as stream:
        with pytest.raises(Compacted, match="compacted"):
            await anext(stream)
    async with aclosing(client.informer("/c/")) as items:
        reset = await anext(items)
    assert isinstance(reset, Reset)
    assert len(reset.kvs) == 4
    await client.aclose()


async def test_a_watch_catching_up_on_a_long_history_misses_nothing(
    etcd: Etcd, namespace: str
) -> None:
    """etcd splits a catching-up watch into responses of at most 1,000 revisions, each
    stamped with the store's current revision: taking that stamp as "seen up to" drops
    (or, after a reconnect, skips) every event past the first 1,000 revisions."""
    prefix = f"/{namespace}/backlog/"
    await etcd.put(f"{prefix}first", "x")
    listing_taken, written = threading.Event(), threading.Event()

    class HeldLoader:
        """Takes the listing in only once the backlog is written: the watch then starts
        from the listing's revision, 1,500 revisions behind."""

        def load(self, kvs: Sequence[KeyValue]) -> None:
            listing_taken.set()
            assert written.wait(30)

    async def write_backlog() -> None:
        await trio.to_thread.run_sync(listing_taken.wait)  # every put after the listing
        for start_at in range(0, 1500, 50):
            async with trio.open_nursery() as nursery:
                for i in range(start_at, start_at + 50):
                    nursery.start_soon(etcd.put, f"{prefix}{i:04d}", "x")
        written.set()

    seen: set[str] = set()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_backlog)
            stream = etcd.informer(prefix, loader=HeldLoader)
            async with aclosing(stream) as items:
                async for item in items:
                    if isinstance(item, Changes):
                        seen.update(e.kv.key for e in item.events)
                        if len(seen) == 1500:
                            break
    assert len(seen) == 1500
