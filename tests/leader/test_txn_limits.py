"""etcd's ``--max-txn-ops`` (issue 19 item 2): the leader learns an etcd's limit from its
answers and fills its batches up to it, on an etcd with a small limit, with the embedded
etcd's 1024, and when the limit changes under a running leader."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.helpers import poll_until, running_sidecars, wait_for
from tm_sidecar import EtcdConfig, TaskContext
from tm_sidecar.core import MAX_TXN_OPS, TXN_OPS_CEILING, Keyspace, State
from tm_sidecar.etcd import Etcd, connect, learn_max_txn_ops
from tm_sidecar.etcd._config import check_transport
from tm_sidecar.leader._sweeps import sweep_payloads
from tm_sidecar.ops._embedded import EtcdProcess


@pytest.fixture
def small_etcd(tmp_path: Path) -> Iterator[EtcdProcess]:
    """An etcd that takes at most 16 operations per transaction branch."""
    proc = EtcdProcess(data_dir=tmp_path / "etcd", auto_compaction="0", max_txn_ops=16)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.mark.parametrize("transport", ["grpc", "gateway"])
async def test_the_limit_is_learned_from_etcds_answers(
    small_etcd: EtcdProcess, etcd_server: EtcdProcess, transport: str
) -> None:
    for server, limit in ((small_etcd, 16), (etcd_server, TXN_OPS_CEILING)):
        etcd = connect(
            EtcdConfig(endpoints=(server.endpoint,), transport=check_transport(transport))
        )
        try:
            before = await etcd.revision()
            assert await learn_max_txn_ops(etcd, "/tm/x/layout") == limit
            # Never more than asked for, even where etcd would take more.
            assert await learn_max_txn_ops(etcd, "/tm/x/layout", ceiling=100) == min(limit, 100)
            # Nothing was written: the probes are reads that never even run.
            assert await etcd.revision() == before
        finally:
            await etcd.aclose()


async def _assignment_sizes(etcd: Etcd, ks: Keyspace) -> Counter[int]:
    """How many tasks each assignment transaction carried (one create revision each)."""
    kvs, _ = await etcd.list_prefix(ks.state_prefix(State.PROCESSING))
    return Counter(kv.create_revision for kv in kvs)


async def _held_backlog(
    endpoint: str, namespace: str, count: int, **settings: Any
) -> tuple[Counter[int], int, int]:
    """``count`` tasks waiting, then a node with room for all: how the leader batched
    their assignments, its learned limit, and how many batches etcd refused."""
    ks = Keyspace(namespace=namespace)
    async with running_sidecars(endpoint, namespace, "n1", **settings) as (sc,):
        release = trio.Event()
        started: list[str] = []

        async def hold(task: TaskContext) -> None:
            started.append(task.id)
            await release.wait()

        ids = [(await sc.create({"n": i})).id for i in range(count)]
        sc.register(hold, concurrency=count)
        await wait_for(lambda: len(started) == count, timeout_s=30)
        sizes = await _assignment_sizes(sc.etcd, ks)
        limit, refused = sc.leader.max_txn_ops, sc.leader.refused
        release.set()
        for task_id in ids:
            await sc.wait(task_id, timeout_s=30)
    return sizes, limit, refused


async def test_batches_stay_within_a_small_limit(small_etcd: EtcdProcess, namespace: str) -> None:
    sizes, limit, refused = await _held_backlog(small_etcd.endpoint, namespace, 40)
    assert limit == 16
    assert refused == 0  # never one over the limit, so never one refused
    assert sum(sizes.values()) == 40
    assert max(sizes.values()) <= (16 - 1) // 2


async def test_batches_grow_to_what_the_embedded_etcd_allows(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    sizes, limit, refused = await _held_backlog(etcd_server.endpoint, namespace, 300)
    assert limit == TXN_OPS_CEILING
    assert refused == 0
    # etcd's default would have cut them into batches of at most 63.
    assert max(sizes.values()) > (MAX_TXN_OPS - 1) // 2


async def test_a_limit_lowered_under_a_running_leader_is_learned_again(
    tmp_path: Path, namespace: str
) -> None:
    """etcd restarted with a smaller limit (or a member with another): the first batch
    over it is refused whole and committed move by move, losing nothing, and the leader
    learns the new limit before it decides again."""
    proc = EtcdProcess(data_dir=tmp_path / "etcd", auto_compaction="0")
    proc.start()
    try:
        ks = Keyspace(namespace=namespace)
        async with running_sidecars(proc.endpoint, namespace, "n1", lease_ttl_s=10) as (sc,):
            await wait_for(lambda: sc.leader.max_txn_ops == TXN_OPS_CEILING)
            await trio.to_thread.run_sync(proc.stop)
            proc.max_txn_ops = 16
            await trio.to_thread.run_sync(proc.start)
            done: list[str] = []

            async def handler(task: TaskContext) -> None:
                done.append(task.id)

            ids = [(await sc.create({"n": i})).id for i in range(60)]
            sc.register(handler, concurrency=60)
            await wait_for(lambda: len(done) == 60, timeout_s=30)
            assert sorted(done) == sorted(ids)
            assert sc.leader.refused >= 1
            await wait_for(lambda: sc.leader.max_txn_ops == 16, timeout_s=10)

            async def all_completed() -> bool:
                kvs, _ = await sc.etcd.list_prefix(ks.state_prefix(State.COMPLETED))
                return len(kvs) == 60

            await poll_until(all_completed, timeout_s=10)
    finally:
        proc.stop()


async def test_the_payload_sweep_deletes_as_many_at_once_as_etcd_takes(
    etcd: Etcd, namespace: str
) -> None:
    ks = Keyspace(namespace=namespace)
    for i in range(300):
        await etcd.put(ks.task(f"t{i}"), "{}")  # payloads whose records have expired
    before = await etcd.revision()
    assert await sweep_payloads(etcd, ks, TXN_OPS_CEILING) == 300
    assert await etcd.revision() == before + 1  # one transaction, not three
