"""A bulk create's transactions: in order, within etcd's limits, each all or nothing."""

from __future__ import annotations

import pytest

from tm_sidecar.core import (
    MAX_TXN_OPS,
    Keyspace,
    Record,
    State,
    TaskId,
    TaskOptions,
    TaskSpec,
    initial_record,
    plan_create_many,
)

KS = Keyspace(namespace="t")


def items(n: int, payload: object = 0) -> list[tuple[TaskSpec, Record]]:
    out = []
    for i in range(n):
        spec = TaskSpec(id=TaskId(f"t{i:05d}"), payload=payload, created_at=1.0)
        record = initial_record(Record(state=State.PENDING, since_at=1.0), now=1.0, run_at=None)
        out.append((spec, record))
    return out


def test_consecutive_tasks_fill_each_transaction_to_etcds_limit() -> None:
    chunks = plan_create_many(KS, items(300))
    per_txn = MAX_TXN_OPS // 2
    assert [len(c.specs) for c in chunks] == [per_txn] * 4 + [300 - 4 * per_txn]
    assert [c.start for c in chunks] == [i * per_txn for i in range(5)]
    ids = [spec.id for c in chunks for spec in c.specs]
    assert ids == [spec.id for spec, _ in items(300)]
    for chunk in chunks:
        txn = chunk.txn
        assert max(len(txn.compare), len(txn.success), len(txn.failure)) <= MAX_TXN_OPS
        # Every id is compared absent (one taken id refuses all), and read on failure.
        assert {c.key for c in txn.compare} == {KS.task(t) for t in chunk.task_ids}
        assert [r.key for r in txn.failure] == [KS.task(t) for t in chunk.task_ids]
        assert len(chunk.records) == len(chunk.specs)


def test_large_payloads_cut_transactions_by_size() -> None:
    chunks = plan_create_many(KS, items(40, payload="x" * 100_000), max_bytes=512 * 1024)
    assert all(len(c.specs) <= 5 for c in chunks)
    assert sum(len(c.specs) for c in chunks) == 40


def test_a_unique_task_is_not_planned_in_bulk() -> None:
    spec, record = items(1)[0]
    unique = TaskSpec(id=spec.id, payload=0, options=TaskOptions(unique_key="k"), created_at=1.0)
    with pytest.raises(ValueError, match="unique key"):
        plan_create_many(KS, [(unique, record)])
