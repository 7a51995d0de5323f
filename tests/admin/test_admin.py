"""Reads and repairs straight from etcd (tm_sidecar/admin/), on a real etcd with a real
sidecar: what tmctl and the dashboard do to a namespace, without either."""

from __future__ import annotations

from tests.helpers import running_sidecars
from tm_sidecar import Permanent, State, TaskContext, TaskOptions
from tm_sidecar.admin import Queries, cancel_record, purge_records, retry_failed
from tm_sidecar.core import Keyspace
from tm_sidecar.ops._embedded import EtcdProcess


async def test_a_failed_task_is_found_retried_and_its_retry_runs(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    async with running_sidecars(etcd_server.endpoint, namespace, "n1") as (sc,):
        ks = Keyspace(namespace=namespace)
        fail = True

        async def handler(task: TaskContext) -> str:
            if fail:
                raise Permanent("not yet")
            return "done"

        sc.register(handler)
        spec = await sc.create({"x": 1}, options=TaskOptions(max_attempts=1))
        assert (await sc.wait(spec.id, timeout_s=10)).state is State.FAILED
        queries = Queries(sc.etcd, ks)
        found, state, kv = await queries.find(spec.id)
        assert found is not None
        assert found.id == spec.id
        assert state is State.FAILED
        assert kv is not None
        assert await queries.count(State.FAILED) == 1
        fail = False
        assert await retry_failed(sc.etcd, ks, [kv]) == 1
        # The same record a second time is left alone: it moved meanwhile.
        assert await retry_failed(sc.etcd, ks, [kv]) == 0
        assert (await sc.wait(spec.id, timeout_s=10)).state is State.COMPLETED
        assert await queries.count(State.FAILED) == 0


async def test_cancel_and_purge_leave_nothing_of_the_task(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    async with running_sidecars(etcd_server.endpoint, namespace, "n1") as (sc,):
        ks = Keyspace(namespace=namespace)
        queries = Queries(sc.etcd, ks)
        spec = await sc.create({"x": 2}, run_at=2e9)  # delayed far ahead: nobody runs it
        _, state, kv = await queries.find(spec.id)
        assert state is State.DELAYED
        assert kv is not None
        assert await cancel_record(sc.etcd, ks, kv, state, by="a test")
        assert not await cancel_record(sc.etcd, ks, kv, state)  # already moved
        _, state, failed = await queries.find(spec.id)
        assert state is State.FAILED
        assert failed is not None
        assert "a test" in failed.value
        assert await purge_records(sc.etcd, ks, [failed]) == 1
        assert await queries.find(spec.id) == (None, None, None)
