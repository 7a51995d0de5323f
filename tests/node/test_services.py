"""The sidecar's services: each reports started only once it really serves, and the
sidecar starts them in the order they depend on each other; hooks are given at
construction. Against a real etcd."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from tests.helpers import wait_for
from tm_sidecar import EtcdConfig, Sidecar, SidecarSettings, TaskContext
from tm_sidecar._hooks import Hooks
from tm_sidecar.core import (
    Keyspace,
    NodeId,
    Put,
    Record,
    State,
    TaskId,
    TaskOptions,
    TaskSpec,
    Txn,
    TxnResult,
    initial_record,
    plan_create,
)
from tm_sidecar.etcd import Etcd, connect
from tm_sidecar.etcd._session import RetentionLeases, close_session, open_session, run_keepalive
from tm_sidecar.leader._election import campaign
from tm_sidecar.leader._leading import LeaderSettings, LeaderState, run_leader
from tm_sidecar.node._agent import run_agent
from tm_sidecar.node._agent_state import AgentState
from tm_sidecar.node._registry import Registry
from tm_sidecar.ops._embedded import EtcdProcess


@pytest.fixture
async def etcd(etcd_server: EtcdProcess) -> AsyncIterator[Etcd]:
    client = connect(EtcdConfig(endpoints=(etcd_server.endpoint,), timeout_s=3.0))
    try:
        yield client
    finally:
        await client.aclose()


async def _create(etcd: Etcd, ks: Keyspace, name: str) -> TaskId:
    spec = TaskSpec(id=TaskId(name), payload={"n": name}, created_at=1.0)
    record = initial_record(
        Record(state=State.PENDING, options=TaskOptions(), since_at=1.0), now=1.0, run_at=None
    )
    assert (await etcd.txn(plan_create(ks, spec, record))).succeeded
    return spec.id


async def test_the_agent_has_taken_its_assignments_when_started(etcd: Etcd, namespace: str) -> None:
    ks = Keyspace(namespace=namespace)
    session = await open_session(etcd, 5)
    tid = await _create(etcd, ks, "t1")
    assignment = Record(
        state=State.PROCESSING,
        attempts=1,
        options=TaskOptions(),
        since_at=1.0,
        node=NodeId("n1"),
        session=session.lease,
    )
    await etcd.delete(ks.state(State.PENDING, tid))
    await etcd.put(ks.state(State.PROCESSING, tid, NodeId("n1")), assignment.to_json())
    release = trio.Event()

    async def handler(task: TaskContext) -> None:
        await release.wait()

    state = AgentState()
    try:
        async with trio.open_nursery() as nursery:
            registry = Registry()
            registry.register("default", handler, 1)
            await nursery.start(
                functools.partial(
                    run_agent,
                    etcd,
                    ks,
                    NodeId("n1"),
                    session,
                    registry,
                    RetentionLeases(etcd, 0),
                    state,
                )
            )
            # Started means serving: the attempt it holds is running here already.
            assert tid in state.running
            release.set()
            await wait_for(lambda: state.completed == 1)
            nursery.cancel_scope.cancel()
    finally:
        await close_session(etcd, session)


async def test_the_leader_has_its_view_when_started(etcd: Etcd, namespace: str) -> None:
    ks = Keyspace(namespace=namespace)
    for name in ("a", "b", "c"):
        await _create(etcd, ks, name)
    session = await open_session(etcd, 5)
    state = LeaderState()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(run_keepalive, etcd, session)
            fence = await campaign(etcd, ks, session, "n1")
            await nursery.start(
                functools.partial(
                    run_leader,
                    etcd,
                    ks,
                    fence,
                    session,
                    RetentionLeases(etcd, 0),
                    LeaderSettings(compact_interval_s=0),
                    state,
                )
            )
            assert state.view is not None
            assert sorted(state.view.pending) == ["a", "b", "c"]
            nursery.cancel_scope.cancel()
    finally:
        await close_session(etcd, session)


async def test_a_ready_sidecar_stands_for_election_and_tells_its_hooks(
    etcd: Etcd, namespace: str
) -> None:
    starts: list[float] = []
    outcomes: list[str] = []
    hooks = Hooks(on_start=starts.append, on_outcome=lambda o: outcomes.append(o.state))
    settings = SidecarSettings(
        node_id=NodeId("n1"), namespace=namespace, lease_ttl_s=2, grace_s=1.0
    )
    sidecar = Sidecar(etcd, settings, hooks=hooks)

    async def handler(task: TaskContext) -> str:
        return "done"

    async with trio.open_nursery() as nursery:
        await nursery.start(sidecar.run)
        # Ready means every service serves: registered, and a candidate for leadership.
        assert sidecar.session is not None
        assert await etcd.get(sidecar.ks.candidate(sidecar.session.lease)) is not None
        assert await etcd.get(sidecar.ks.node(NodeId("n1"))) is not None
        await wait_for(lambda: sidecar.is_leader)
        sidecar.register(handler)
        spec = await sidecar.create({"x": 1})
        info = await sidecar.wait(spec.id, timeout_s=10)
        assert info.state is State.COMPLETED
        await wait_for(lambda: bool(outcomes))
        nursery.cancel_scope.cancel()
    assert outcomes == ["completed"]
    assert len(starts) == 1
    assert starts[0] >= 0


async def test_a_sidecar_is_not_ready_before_it_stands_for_election(
    etcd: Etcd, namespace: str
) -> None:
    settings = SidecarSettings(node_id=NodeId("n1"), namespace=namespace, lease_ttl_s=2)
    sidecar = Sidecar(etcd, settings)
    gate = trio.Event()
    held: list[Txn] = []
    real_txn = etcd.txn

    async def txn(t: Txn) -> TxnResult:
        # The campaign's transaction waits for the gate: etcd is slow to answer it.
        if any(
            isinstance(op, Put) and op.key.startswith(sidecar.ks.election()) for op in t.success
        ):
            held.append(t)
            await gate.wait()
        return await real_txn(t)

    etcd.txn = txn  # type: ignore[method-assign,assignment]
    ready = trio.Event()

    async with trio.open_nursery() as nursery:

        async def start() -> None:
            await nursery.start(sidecar.run)
            ready.set()

        nursery.start_soon(start)
        await wait_for(lambda: bool(held))
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        assert not ready.is_set()
        gate.set()
        with trio.fail_after(10):
            await ready.wait()
        nursery.cancel_scope.cancel()
