"""Outcome flushes as a batch completer makes them: a stale part costs the batch one more
transaction, not one per part, and submitters wait for room when too many wait."""

from __future__ import annotations

from collections.abc import Sequence

import trio
import trio.testing

from tm_sidecar import EtcdConfig
from tm_sidecar.core import Compare, Put, Txn, TxnResult
from tm_sidecar.etcd import connect
from tm_sidecar.etcd._group import GroupCommit, txn_group
from tm_sidecar.ops._embedded import EtcdProcess


def create(key: str, value: str = "v") -> Txn:
    return Txn(compare=(Compare.absent(key),), success=(Put(key, value),))


async def test_a_stale_part_costs_one_more_transaction_not_one_per_part(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    calls: list[str] = []
    etcd = connect(
        EtcdConfig(endpoints=(etcd_server.endpoint,)),
        on_request=lambda path, seconds, outcome: calls.append(path),
    )
    try:
        taken = f"/{namespace}/taken"
        await etcd.put(taken, "first")
        group = txn_group(etcd, ops_per_item=1, name="test")
        txns = [create(f"/{namespace}/free{i}") for i in range(40)]
        txns.insert(20, create(taken, "second"))
        calls.clear()
        answers = await group._commit(txns)
        verdicts = [a.succeeded for a in answers if isinstance(a, TxnResult)]
        assert verdicts == [True] * 20 + [False] + [True] * 20
        # The whole batch, refused; the 40 whose guards held, together: two transactions.
        assert len(calls) == 2, calls
        kv = await etcd.get(taken)
        assert kv is not None
        assert kv.value == "first"
        for i in range(40):
            assert await etcd.get(f"/{namespace}/free{i}") is not None
    finally:
        await etcd.aclose()


async def test_submitters_wait_for_room_when_too_many_wait() -> None:
    release = trio.Event()
    committed: list[int] = []

    async def commit(items: Sequence[int]) -> list[int]:
        await release.wait()
        committed.extend(items)
        return list(items)

    group: GroupCommit[int, int] = GroupCommit(commit, max_items=4, in_flight=1, max_waiting=5)
    answers: list[int] = []

    async def submit(i: int) -> None:
        answers.append(await group.submit(i))

    async with trio.open_nursery() as outer:
        await outer.start(group.run)
        async with trio.open_nursery() as clients:
            for i in range(30):
                clients.start_soon(submit, i)
            await trio.testing.wait_all_tasks_blocked()
            # One batch in flight; at most max_waiting queued; the others wait for room.
            assert len(group._queue) == 5
            release.set()
        outer.cancel_scope.cancel()
    assert sorted(answers) == list(range(30))
    assert sorted(committed) == list(range(30))
