"""Group commit against a real etcd: batches form under load, and each item still gets
its own answer when a batch cannot go through whole."""

from __future__ import annotations

from collections.abc import Sequence

import trio
import trio.lowlevel
import trio.testing

from tm_sidecar import Etcd, EtcdConfig, EtcdUnavailable
from tm_sidecar.core import Compare, Put, Touch, Txn, TxnResult
from tm_sidecar.etcd import connect
from tm_sidecar.etcd._group import GroupCommit, merge_txns, txn_group
from tm_sidecar.ops._embedded import EtcdProcess


def create(key: str, value: str = "v") -> Txn:
    return Txn(compare=(Compare.absent(key),), success=(Put(key, value),))


async def submit_all(group: GroupCommit[Txn, TxnResult], txns: Sequence[Txn]) -> list[object]:
    answers: list[object] = [None] * len(txns)

    async def one(i: int) -> None:
        try:
            answers[i] = await group.submit(txns[i])
        except Exception as exc:
            answers[i] = exc

    async with trio.open_nursery() as nursery:
        await nursery.start(group.run)
        async with trio.open_nursery() as clients:
            for i in range(len(txns)):
                clients.start_soon(one, i)
        nursery.cancel_scope.cancel()
    return answers


async def test_concurrent_items_share_transactions(etcd: Etcd, namespace: str) -> None:
    group = txn_group(etcd, ops_per_item=1, name="test")
    keys = [f"/{namespace}/k{i:03}" for i in range(200)]
    answers = await submit_all(group, [create(k) for k in keys])
    assert all(isinstance(a, TxnResult) and a.succeeded for a in answers)
    assert group.stats.items == 200
    # The first goes alone; the rest queue behind it and go together, 128 at most.
    assert group.stats.batches < 20
    for key in keys:
        assert await etcd.get(key) is not None


async def test_a_failed_compare_fails_only_its_own_item(etcd: Etcd, namespace: str) -> None:
    taken = f"/{namespace}/taken"
    await etcd.put(taken, "first")
    group = txn_group(etcd, ops_per_item=1, name="test")
    txns = [create(f"/{namespace}/free{i}") for i in range(30)]
    txns.insert(15, create(taken, "second"))
    answers = await submit_all(group, txns)
    verdicts = [a.succeeded for a in answers if isinstance(a, TxnResult)]
    assert verdicts == [True] * 15 + [False] + [True] * 15
    kv = await etcd.get(taken)
    assert kv is not None
    assert kv.value == "first"


async def test_a_refused_item_does_not_take_the_batch_with_it(etcd: Etcd, namespace: str) -> None:
    # Touching a key that does not exist makes etcd refuse the whole transaction.
    lease, _ = await etcd.lease_grant(60)
    bad = Txn(success=(Touch(f"/{namespace}/missing", lease),))
    txns = [create(f"/{namespace}/ok{i}") for i in range(20)]
    txns.insert(7, bad)
    answers = await submit_all(group := txn_group(etcd, ops_per_item=1, name="t"), txns)
    assert isinstance(answers[7], Exception)
    assert "key not found" in str(answers[7])
    rest = answers[:7] + answers[8:]
    assert all(isinstance(a, TxnResult) and a.succeeded for a in rest)
    assert group.stats.items == 21


async def test_items_naming_the_same_key_go_in_different_batches(
    etcd: Etcd, namespace: str
) -> None:
    key = f"/{namespace}/same"
    seen: list[list[str]] = []

    async def commit(txns: Sequence[Txn]) -> list[TxnResult]:
        seen.append([op.key for t in txns for op in t.success])
        result = await etcd.txn(merge_txns(txns))
        return [result] * len(txns)

    group = GroupCommit(commit, max_items=10, keys=lambda t: [op.key for op in t.success])
    txns = [Txn(success=(Put(key, str(i)),)) for i in range(5)]
    txns += [Txn(success=(Put(f"/{namespace}/other{i}", "x"),)) for i in range(5)]
    answers = await submit_all(group, txns)
    assert all(isinstance(a, TxnResult) and a.succeeded for a in answers)
    assert all(batch.count(key) <= 1 for batch in seen)
    assert sum(batch.count(key) for batch in seen) == 5


async def test_batches_hold_to_the_byte_budget(etcd: Etcd, namespace: str) -> None:
    sizes: list[int] = []

    async def commit(items: Sequence[int]) -> list[int]:
        sizes.append(sum(items))
        await trio.lowlevel.checkpoint()
        return list(items)

    group: GroupCommit[int, int] = GroupCommit(commit, max_items=100, max_bytes=100, size=int)
    answers = await submit_all(group, [30] * 20 + [250])  # type: ignore[arg-type]
    assert answers == [30] * 20 + [250]
    assert max(s for s in sizes if s != 250) <= 100


async def test_unavailability_is_every_items_answer(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    gone = connect(EtcdConfig(endpoints=("http://127.0.0.1:9",), timeout_s=1.0))
    group = txn_group(gone, ops_per_item=1, name="test")
    answers = await submit_all(group, [create(f"/{namespace}/u{i}") for i in range(5)])
    assert all(isinstance(a, EtcdUnavailable) for a in answers)
    await gone.aclose()


async def test_without_its_loop_a_group_commits_each_item_alone(etcd: Etcd, namespace: str) -> None:
    group = txn_group(etcd, ops_per_item=1, name="test")
    result = await group.submit(create(f"/{namespace}/alone"))
    assert result.succeeded
    assert group.stats.batches == 0  # not through the loop


async def test_stopping_with_a_batch_in_flight_answers_unavailable_not_nothing() -> None:
    async def commit(items: Sequence[int]) -> list[int]:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    group: GroupCommit[int, int] = GroupCommit(commit, max_items=10)
    errors: list[BaseException] = []

    async def submit() -> None:
        try:
            await group.submit(1)
        except EtcdUnavailable as exc:
            errors.append(exc)

    async with trio.open_nursery() as outer, trio.open_nursery() as loop:
        await loop.start(group.run)
        outer.start_soon(submit)
        await trio.testing.wait_all_tasks_blocked()
        loop.cancel_scope.cancel()
    assert len(errors) == 1
