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
    """The real etcd for the bulk creates, but that transactions after ``gone_after``
    are lost before etcd sees them, and the answer of transaction ``lose_answer_of`` is
    lost after etcd committed it (a connection dropped with the answer in flight)."""

    def __init__(
        self, sidecar: Sidecar, *, gone_after: int | None = None, lose_answer_of: int = 0
    ) -> None:
        self.real = sidecar.etcd
        self.gone_after = gone_after
        self.lose_answer_of = lose_answer_of
        self.txns = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    async def txn(self, txn: Txn) -> TxnResult:
        self.txns += 1
        if self.gone_after is not None and self.txns > self.gone_after:
            raise EtcdUnavailable("etcd is gone")
        result = await self.real.txn(txn)
        if self.txns == self.lose_answer_of:
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
        sc.creator.etcd = EtcdThatGoes(sc, gone_after=1)  # type: ignore[assignment]
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
        going = EtcdThatGoes(sc, lose_answer_of=2)
        sc.creator.etcd = going  # type: ignore[assignment]
        specs = await sc.create_many(items)
        assert [s.id for s in specs] == [item.task_id for item in items]
        # The lost one, the repeat (refused: the ids exist) and the third transaction.
        assert going.txns == 4
        info = await sc.get(TaskId(f"lost-{PER_TXN}"))
        assert info.spec.payload == {"n": PER_TXN}
        assert info.kv is not None
        assert info.kv.version == 1  # written once
