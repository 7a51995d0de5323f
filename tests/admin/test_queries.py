"""Reads of a namespace straight from etcd, on a real etcd: one task wherever it is
(tm_sidecar/etcd/_lookup.py: its payload and state key at one revision, in every state,
with its payload gone, and not at all), which tmctl's and the dashboard's
``Queries.find`` answer from; the queues' settings, read in one place (admin/_queries.py)."""

from __future__ import annotations

import time

import pytest

from tm_sidecar.admin import Queries
from tm_sidecar.core import (
    Delete,
    Keyspace,
    NodeId,
    Put,
    QueueConfig,
    Record,
    State,
    TaskId,
    TaskOptions,
    TaskSpec,
    Txn,
    initial_record,
    plan_create,
)
from tm_sidecar.etcd import Etcd, read_task_keys


async def _create(etcd: Etcd, ks: Keyspace, task_id: str) -> TaskSpec:
    now = time.time()
    spec = TaskSpec(id=TaskId(task_id), payload={"n": 1}, options=TaskOptions(), created_at=now)
    rec = initial_record(
        Record(state=State.PENDING, options=spec.options, since_at=now), now=now, run_at=None
    )
    assert (await etcd.txn(plan_create(ks, spec, rec))).succeeded
    return spec


async def _move(etcd: Etcd, ks: Keyspace, task_id: str, to: State, node: str = "n1") -> str:
    """Move the task's state key from pending to ``to`` (under ``node`` when processing)."""
    tid = TaskId(task_id)
    at = NodeId(node) if to is State.PROCESSING else None
    key = ks.state(to, tid, at)
    record = Record(state=to, since_at=time.time(), node=at)
    moved = Txn(success=(Delete(ks.state(State.PENDING, tid)), Put(key, record.to_json())))
    assert (await etcd.txn(moved)).succeeded
    return key


@pytest.mark.parametrize("state", list(State))
async def test_a_task_is_found_in_each_state_at_one_revision(
    etcd: Etcd, namespace: str, state: State
) -> None:
    ks = Keyspace(namespace=namespace)
    spec = await _create(etcd, ks, "t1")
    await _create(etcd, ks, "t10")  # a neighbour whose id starts the same
    key = ks.state(State.PENDING, TaskId("t1"))
    if state is not State.PENDING:
        key = await _move(etcd, ks, "t1", state)
        await _move(etcd, ks, "t10", state, node="n2")
    keys = await read_task_keys(etcd, ks, TaskId("t1"))
    assert keys.payload is not None
    assert TaskSpec.from_json(keys.payload.value) == spec
    assert [kv.key for kv in keys.states] == [key]
    assert keys.revision == await etcd.revision()
    found, at, kv = await Queries(etcd, ks).find("t1")
    assert (found, at) == (spec, state)
    assert kv is not None
    assert kv.key == key


async def test_a_record_without_its_payload_and_no_task_at_all(etcd: Etcd, namespace: str) -> None:
    ks = Keyspace(namespace=namespace)
    await _create(etcd, ks, "t1")
    key = await _move(etcd, ks, "t1", State.FAILED)
    await etcd.delete(ks.task(TaskId("t1")))
    keys = await read_task_keys(etcd, ks, TaskId("t1"))
    assert keys.payload is None
    assert [kv.key for kv in keys.states] == [key]
    spec, state, kv = await Queries(etcd, ks).find("t1")
    assert (spec, state) == (None, State.FAILED)
    assert kv is not None
    assert kv.key == key
    missing = await read_task_keys(etcd, ks, TaskId("t2"))
    assert (missing.payload, missing.states) == (None, ())
    assert await Queries(etcd, ks).find("t2") == (None, None, None)


async def test_queue_settings_are_read_in_one_place(etcd: Etcd, namespace: str) -> None:
    ks = Keyspace(namespace=namespace)
    await etcd.put(ks.queue("mail"), QueueConfig(paused=True).to_json())
    await etcd.put(ks.queue("video"), QueueConfig(max_running=2).to_json())
    queries = Queries(etcd, ks)
    configs = await queries.queue_configs()
    assert configs == {"mail": QueueConfig(paused=True), "video": QueueConfig(max_running=2)}
    assert await queries.paused_queues() == {"mail"}
