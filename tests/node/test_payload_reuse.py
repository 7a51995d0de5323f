"""A payload outlives its expired record until the leader sweeps it; a create of the same
id may take it back meanwhile. Neither may lose the new task nor give it two states."""

from __future__ import annotations

from typing import Any

import trio

from tests.helpers import running_sidecars
from tm_sidecar import InvalidRequest, State, TaskContext
from tm_sidecar.core import TaskId
from tm_sidecar.leader._sweeps import sweep_payloads
from tm_sidecar.ops._embedded import EtcdProcess


async def test_a_sweep_keeps_the_payload_of_a_task_created_again_meanwhile(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    async with running_sidecars(etcd_server.endpoint, namespace, "n1", compact_interval_s=0) as (
        sc,
    ):
        tid = TaskId("daily-job")
        seen: list[Any] = []

        async def handler(ctx: TaskContext) -> str:
            seen.append(ctx.payload)
            return "ok"

        await sc.create({"run": 1}, task_id=tid)
        # Its record expires (the retention lease): the payload stays, for the sweep.
        await sc.etcd.delete(sc.ks.state(State.PENDING, tid))

        class RacingEtcd:
            """Between the sweep's listing and its deletes, a client uses the id again."""

            def __getattr__(self, name: str) -> Any:
                return getattr(sc.etcd, name)

            async def list_prefix(self, *args: Any, **kwargs: Any) -> Any:
                listing = await sc.etcd.list_prefix(*args, **kwargs)
                spec = await sc.create({"run": 2}, task_id=tid)
                assert spec.payload == {"run": 2}
                return listing

        assert await sweep_payloads(RacingEtcd(), sc.ks) == 0  # type: ignore[arg-type]
        sc.register(handler)
        info = await sc.wait(tid, timeout_s=10)
        assert info.state is State.COMPLETED
        assert seen == [{"run": 2}]
        # With nothing racing it, the sweep deletes an expired task's payload.
        await sc.etcd.delete(sc.ks.state(State.COMPLETED, tid))
        assert await sweep_payloads(sc.etcd, sc.ks) == 1
        assert await sc.etcd.get(sc.ks.task(tid)) is None


async def test_concurrent_creates_of_an_expired_id_make_one_task(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    async with running_sidecars(
        etcd_server.endpoint, namespace, "n1", "n2", compact_interval_s=0
    ) as (s1, s2):
        tid = TaskId("dedupe-key")
        await s1.create({"who": "old"}, task_id=tid)
        await s1.etcd.delete(s1.ks.state(State.PENDING, tid))  # expired, payload left
        outcomes: dict[str, Any] = {}

        async def create(name: str, sidecar: Any) -> None:
            try:
                outcomes[name] = (await sidecar.create({"who": name}, task_id=tid)).payload
            except InvalidRequest as exc:
                outcomes[name] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(create, "A", s1)
            nursery.start_soon(create, "B", s2)
        won = [name for name, got in outcomes.items() if got == {"who": name}]
        assert len(won) == 1, outcomes  # one took the id; the other was told it is taken
        loser = ({"A", "B"} - set(won)).pop()
        assert isinstance(outcomes[loser], InvalidRequest)
        kvs, _ = await s1.etcd.list_prefix(s1.ks.prefix)
        states = [kv.key for kv in kvs if kv.key.endswith("/" + tid) and "/task/" not in kv.key]
        assert len(states) == 1, states
        info = await s1.get(tid)
        assert info.spec.payload == {"who": won[0]}


async def test_a_drain_runs_the_tasks_it_created_without_reading_them_back(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    """A backlog created through this sidecar, larger than what it remembers: the tasks
    that run first (the oldest) come from memory, and only those it could not remember
    are read back. It used to drop the oldest to remember the newest, so a drain read
    back exactly the tasks it needed first (issue 19 item 3)."""
    async with running_sidecars(etcd_server.endpoint, namespace, "n1") as (sc,):
        sc.agent.recent.max_items = 50
        ids = [(await sc.create({"n": i})).id for i in range(80)]
        reads_at_start: list[int] = []
        payloads: list[Any] = []

        async def handler(ctx: TaskContext) -> None:
            reads_at_start.append(sc.agent.read_batches.items)
            payloads.append(ctx.payload)

        sc.register(handler, concurrency=1)  # one at a time, oldest first
        for tid in ids:
            assert (await sc.wait(tid, timeout_s=30)).state is State.COMPLETED
        assert payloads == [{"n": i} for i in range(80)]
        assert reads_at_start[:50] == [0] * 50
        assert sc.agent.read_batches.items == 30
