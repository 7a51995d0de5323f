"""The event hub (tm_sidecar/node/_hub.py) on a real etcd, through an in-process sidecar:
who hears which task's events, in order, and what a subscriber that stops reading costs
the others."""

from __future__ import annotations

from typing import Any

import trio

from tests.helpers import Observed, running_sidecars
from tm_sidecar import TaskContext, TaskEvent
from tm_sidecar.ops._embedded import EtcdProcess


async def test_a_task_subscriber_hears_only_its_task_and_in_order(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    async with running_sidecars(etcd_server.endpoint, namespace, "n1") as (sc,):
        one: Observed[TaskEvent] = Observed()
        every: Observed[TaskEvent] = Observed()
        first = sc.new_task_id()
        sc.hub.subscribe(first, deliver=one.add)
        sc.hub.subscribe(None, deliver=every.add)

        async def handler(task: TaskContext) -> Any:
            return task.payload

        sc.register(handler, concurrency=2)
        a = await sc.create({"n": 1}, task_id=first)
        b = await sc.create({"n": 2})
        await every.wait_until(
            lambda evs: {e.task_id for e in evs if e.kind == "completed"} >= {a.id, b.id}
        )
        await one.wait_until(lambda evs: any(e.kind == "completed" for e in evs))
    assert {e.task_id for e in one.items} == {a.id}
    heard = [e.kind for e in one.items]
    assert heard[:2] == ["queued", "assigned"]
    assert heard[-1] == "completed"
    assert set(heard) <= {"queued", "assigned", "started", "completed"}
    revisions = [e.revision for e in every.items]
    assert revisions == sorted(revisions)  # one order for every subscriber: etcd's


async def test_a_subscriber_that_stops_reading_is_closed_and_the_others_go_on(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    async with running_sidecars(etcd_server.endpoint, namespace, "n1") as (sc,):
        sc.hub.buffer = 4  # a small buffer, so that a few tasks overflow it
        stalled = sc.hub.subscribe(None)  # a stream nobody reads
        heard: Observed[TaskEvent] = Observed()
        sc.hub.subscribe(None, deliver=heard.add)

        async def handler(task: TaskContext) -> Any:
            return None

        sc.register(handler, concurrency=4)
        ids = [(await sc.create({"i": i})).id for i in range(10)]
        await heard.wait_until(
            lambda evs: {e.task_id for e in evs if e.kind == "completed"} >= set(ids)
        )
        assert stalled.overflowed
        assert stalled.closed
        # What it had buffered is still readable; then the stream ends rather than lying.
        got = []
        with trio.fail_after(5):
            async for event in stalled:
                got.append(event)
        assert 0 < len(got) <= 4
