"""Fencing: every leader transaction compares the leader's election key create revision."""

from __future__ import annotations

import pytest
import trio

from tests.helpers import running_sidecars, wait_for
from tm_sidecar import EtcdConfig, NotLeader, State, TaskContext
from tm_sidecar.core import (
    Fence,
    Keyspace,
    LeaderPolicy,
    LeaderView,
    NodeId,
    NodeInfo,
    Range,
    Record,
    TaskId,
    TaskOptions,
    initial_record,
)
from tm_sidecar.etcd import connect
from tm_sidecar.etcd._session import RetentionLeases
from tm_sidecar.leader._leading import _commit
from tm_sidecar.ops._embedded import EtcdProcess


async def test_a_deposed_leaders_batch_fails_whole(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    ks = Keyspace(namespace=namespace)
    etcd = connect(EtcdConfig(endpoints=(etcd_server.endpoint,)))
    lease, _ = await etcd.lease_grant(30)
    await etcd.put(ks.candidate(lease), "{}", lease=lease)
    candidate = await etcd.get(ks.candidate(lease))
    assert candidate is not None
    fence = Fence(candidate.key, candidate.create_revision)
    await etcd.put(
        ks.node("n1"), NodeInfo(id=NodeId("n1"), session=lease, capacity={"default": 9}).to_json()
    )
    for i in range(3):
        rec = initial_record(
            Record(state=State.PENDING, options=TaskOptions(), since_at=0), now=0, run_at=None
        )
        await etcd.put(ks.state(State.PENDING, TaskId(f"t{i}")), rec.to_json())
    kvs, revision = await etcd.list_prefix(ks.prefix)
    view = LeaderView.from_listing(ks, kvs, revision)
    (batch,) = view.decide(1.0, LeaderPolicy()).batches
    # Another leader takes over: our election key is gone (our lease expired).
    await etcd.lease_revoke(lease)
    with pytest.raises(NotLeader):
        await _commit(etcd, ks, fence, RetentionLeases(etcd, 0), view, batch)
    processing = await etcd.range(
        Range(ks.state_prefix(State.PROCESSING), prefix=True, count_only=True)
    )
    pending = await etcd.range(Range(ks.state_prefix(State.PENDING), prefix=True, count_only=True))
    assert (processing.count, pending.count) == (0, 3)
    await etcd.aclose()


async def test_a_leader_whose_fence_is_gone_steps_down_and_campaigns_again(
    etcd_server: EtcdProcess, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    ks = Keyspace(namespace=namespace)
    async with running_sidecars(etcd_server.endpoint, namespace, "n1", lease_ttl_s=30) as (sc,):
        ran = trio.Event()

        async def handler(task: TaskContext) -> None:
            ran.set()

        first_fence = await sc.etcd.list_prefix(ks.election())
        (old,) = first_fence[0]
        # Remove the election key behind the leader's back, as an operator or a
        # split-brain would; the leader's next write must fail and make it step down.
        await sc.etcd.delete(old.key)
        sc.register(handler)
        spec = await sc.create({})
        await sc.wait(spec.id, timeout_s=10)
        assert ran.is_set()
        await wait_for(lambda: sc.is_leader)
        (new,) = (await sc.etcd.list_prefix(ks.election()))[0]
        assert new.key == old.key
        assert new.create_revision > old.create_revision  # a new term, a new token
    # The log says why, not which exception group it came in.
    assert any(
        r.getMessage() == "stepped down"
        and getattr(r, "error", "").startswith("the fence no longer holds")
        for r in caplog.records
    )


async def test_an_assignment_to_a_restarted_nodes_old_session_does_not_commit(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    ks = Keyspace(namespace=namespace)
    etcd = connect(EtcdConfig(endpoints=(etcd_server.endpoint,)))
    leader, _ = await etcd.lease_grant(30)
    await etcd.put(ks.candidate(leader), "{}", lease=leader)
    candidate = await etcd.get(ks.candidate(leader))
    assert candidate is not None
    fence = Fence(candidate.key, candidate.create_revision)

    async def register(session: int) -> None:
        info = NodeInfo(id=NodeId("n1"), session=session, capacity={"default": 9})
        await etcd.put(ks.node("n1"), info.to_json(), lease=session)

    old, _ = await etcd.lease_grant(30)
    await register(old)
    for i in range(2):
        rec = initial_record(
            Record(state=State.PENDING, options=TaskOptions(max_attempts=1), since_at=0),
            now=0,
            run_at=None,
        )
        await etcd.put(ks.state(State.PENDING, TaskId(f"t{i}")), rec.to_json())
    kvs, revision = await etcd.list_prefix(ks.prefix)
    view = LeaderView.from_listing(ks, kvs, revision)
    (batch,) = view.decide(1.0, LeaderPolicy()).batches
    assert {record.session for _, record in batch.moves} == {old}
    # The node restarts before the leader's view shows it: the old lease is gone and the
    # node is registered again under a new one.
    await etcd.lease_revoke(old)
    new, _ = await etcd.lease_grant(30)
    await register(new)
    committed, _ = await _commit(etcd, ks, fence, RetentionLeases(etcd, 0), view, batch)
    assert not committed
    processing, _ = await etcd.list_prefix(ks.state_prefix(State.PROCESSING))
    pending, _ = await etcd.list_prefix(ks.state_prefix(State.PENDING))
    assert (len(processing), len(pending)) == (0, 2)  # no attempt spent on the dead session
    # Once the view has caught up, the tasks go to the node's current session.
    kvs, revision = await etcd.list_prefix(ks.prefix)
    view = LeaderView.from_listing(ks, kvs, revision)
    (batch,) = view.decide(2.0, LeaderPolicy()).batches
    committed, _ = await _commit(etcd, ks, fence, RetentionLeases(etcd, 0), view, batch)
    assert committed
    processing, _ = await etcd.list_prefix(ks.state_prefix(State.PROCESSING))
    sessions = {Record.from_json(State.PROCESSING, kv.value).session for kv in processing}
    assert (len(processing), sessions) == (2, {new})
    await etcd.aclose()
