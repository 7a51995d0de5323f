"""An attempt's start is told once: an announcement the announcer scheduled does not
repeat a progress write that told the start first (issue 20 item 15: ``--demo`` logged
two identical ``updated`` events per task)."""

from __future__ import annotations

import attrs

from tm_sidecar.core import (
    Keyspace,
    NodeId,
    Put,
    Record,
    Slot,
    State,
    TaskId,
    TaskOptions,
    Txn,
)
from tm_sidecar.etcd import EtcdConfig, connect
from tm_sidecar.etcd._group import GroupCommit, txn_group
from tm_sidecar.node._attempt import AgentIO, Attempt, _announce, _update
from tm_sidecar.ops._embedded import EtcdProcess


async def test_a_progress_write_before_the_scheduled_announcement_is_not_repeated(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    ks = Keyspace(namespace=namespace)
    etcd = connect(EtcdConfig(endpoints=(etcd_server.endpoint,)))
    try:
        tid = TaskId("t1")
        key = ks.state(State.PROCESSING, tid, "n1")
        record = Record(
            state=State.PROCESSING,
            options=TaskOptions(),
            attempts=1,
            node=NodeId("n1"),
            since_at=1.0,
        )
        put = await etcd.txn(Txn(success=(Put(key, record.to_json()),)))
        slot = Slot(tid, key, put.revision, put.revision, record)

        async def no_reads(keys: object) -> list[None]:
            raise AssertionError("no task is read")

        io = AgentIO(
            etcd, txn_group(etcd, ops_per_item=3, name="report"), GroupCommit(no_reads, max_items=1)
        )
        attempt = Attempt(slot, attrs.evolve(record, started_at=2.0))
        # The announcer decides first (as Announcer.run does, then start_soon) ...
        attempt.announced = True
        # ... the handler's progress lands before the announcement runs ...
        attempt.progressed(attrs.evolve(attempt.record, progress={"progress": 1.0}))
        assert await _update(io, slot, attempt.record)
        after_progress = await etcd.revision()
        # ... and the announcement, running last, writes nothing more.
        await _announce(io, attempt)
        assert await etcd.revision() == after_progress
        kv = await etcd.get(key)
        assert kv is not None
        told = Record.from_json(State.PROCESSING, kv.value)
        assert told.progress == {"progress": 1.0}
        assert told.started_at == 2.0

        # Alone (no progress yet), the announcement writes the start once.
        other = Attempt(slot, attrs.evolve(record, started_at=3.0), announced=True)
        await _announce(io, other)
        assert await etcd.revision() == after_progress + 1
        await _announce(io, other)
        assert await etcd.revision() == after_progress + 1
    finally:
        await etcd.aclose()
