"""A bulk create when etcd goes away midway, or loses an answer: which tasks exist is
told, and repeating the call finishes it without making any task twice."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import running_sidecars
from tm_sidecar import EtcdUnavailable, TaskNotFound
from tm_sidecar.core import MAX_TXN_OPS, TaskId, Txn, TxnResult
from tm_sidecar.node import NewTask, Sidecar
from tm_sidecar.ops._embedded import EtcdProcess

#: Tasks in one transaction today (two writes each); the calls below take three.
PER_TXN = MAX_TXN_OPS // 2
COUNT = 2 * PER_TXN + 7


class EtcdThatGoes:
    """The real etcd for the bulk creates, but that it is gone for every transaction
    that does not write ``alive_for`` (when given: lost before etcd sees it), and that the
    answer of the first one that writes ``lose_answer_of`` is lost after etcd committed
    it (a connection dropped with the answer in flight). By key, not by count: the
    transactions in flight may reach it in any order."""

    def __init__(
        self, sidecar: Sidecar, *, alive_for: str | None = None, lose_answer_of: str = ""
    ) -> None:
        self.real = sidecar.etcd
        self.alive_for = alive_for
        self.lose_answer_of = lose_answer_of
        self.txns = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    async def txn(self, txn: Txn) -> TxnResult:
        self.txns += 1
        writes = {op.key for op in txn.success}
        if self.alive_for is not None and self.alive_for not in writes:
            raise EtcdUnavailable("etcd is gone")
        result = await self.real.txn(txn)
        if self.lose_answer_of in writes and result.succeeded:
            self.lose_answer_of = ""
            raise EtcdUnavailable("the connection dropped with the answer in flight")
        return result


def _items(tag: str) -> list[NewTask]:
    return [
        NewTask(payload={"n": i}, task_id=TaskId(f"{tag}-{i}"), run_at=4e9) for i in range(COUNT)
    ]


async def _exists(sc: Sidecar, task_id: str) -> bool:
    try:
        await sc.get(TaskId(task_id))
    except TaskNotFound:
        return False
    return True


async def test_etcd_gone_after_the_first_transaction_is_told_and_a_repeat_finishes(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    async with running_sidecars(etcd_server.endpoint, namespace, "n1", create_deadline_s=0.3) as (
        sc,
    ):
        items = _items("gone")
        first = sc.ks.task(TaskId("gone-0"))  # the first transaction's
        sc.creator.etcd = EtcdThatGoes(sc, alive_for=first)  # type: ignore[assignment]
        with pytest.raises(EtcdUnavailable, match="may exist or not") as caught:
            await sc.create_many(items)
        assert caught.value.details == {
            "task_ids": [item.task_id for item in items],
            "committed": PER_TXN,
        }
        assert await _exists(sc, f"gone-{PER_TXN - 1}")
        assert not await _exists(sc, f"gone-{PER_TXN}")
        assert not await _exists(sc, f"gone-{COUNT - 1}")
        sc.creator.etcd = sc.etcd
        specs = await sc.create_many(items)
        assert [s.id for s in specs] == [item.task_id for item in items]
        assert (await sc.get(TaskId(f"gone-{COUNT - 1}"))).spec.payload == {"n": COUNT - 1}


async def test_a_lost_answer_is_told_apart_from_a_taken_id(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    """The second transaction commits but its answer is lost: tried again, every id is
    found with the same payload, so the call goes on and answers every task once."""
    async with running_sidecars(etcd_server.endpoint, namespace, "n1") as (sc,):
        items = _items("lost")
        going = EtcdThatGoes(sc, lose_answer_of=sc.ks.task(TaskId(f"lost-{PER_TXN}")))
        sc.creator.etcd = going  # type: ignore[assignment]
        specs = await sc.create_many(items)
        assert [s.id for s in specs] == [item.task_id for item in items]
        # Every transaction's tasks, each written once: the lost answer's were found
        # by the repeat (refused: the ids exist, with this call's payloads).
        assert going.txns >= 4
        for n in (0, PER_TXN, 2 * PER_TXN, COUNT - 1):
            info = await sc.get(TaskId(f"lost-{n}"))
            assert info.spec.payload == {"n": n}
            assert info.kv is not None
            assert info.kv.version == 1
