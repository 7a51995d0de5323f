"""The sidecar in-process, against a real etcd: lifecycle, delays, retries, order, limits."""

from __future__ import annotations

import itertools
import json
import time
from contextlib import aclosing
from typing import Any

import pytest
import trio

from tests.helpers import Observed, StepMeter, poll_until, running_sidecars, wait_for
from tm_sidecar import (
    Backoff,
    Compacted,
    EtcdConfig,
    InvalidRequest,
    PayloadTooLarge,
    Permanent,
    QueueFull,
    Sidecar,
    State,
    TaskContext,
    TaskEvent,
    TaskNotFound,
    TaskOptions,
)
from tm_sidecar.core import Keyspace, NodeId, Range, Slot, TaskId, plan_move, succeeded
from tm_sidecar.core import Record as CoreRecord
from tm_sidecar.etcd import connect
from tm_sidecar.ops._embedded import EtcdProcess


async def _collect(sidecar: Sidecar, observed: Observed[TaskEvent]) -> None:
    with sidecar.subscribe() as events:
        async for event in events:
            observed.add(event)


def kinds(events: list[TaskEvent], task_id: str) -> list[str]:
    return [e.kind for e in events if e.task_id == task_id]


async def test_full_lifecycle_with_every_event_in_order(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    async with running_sidecars(etcd_server.endpoint, namespace, "n1") as (sc,):
        observed: Observed[TaskEvent] = Observed()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_collect, sc, observed)

            async def handler(task: TaskContext) -> Any:
                assert await task.update({"step": 1})
                return {"echo": task.payload, "attempt": task.attempt}

            sc.register(handler, concurrency=2)
            spec = await sc.create({"TaskSpecificKey": "TaskSpecificValue"})
            info = await sc.wait(spec.id, timeout_s=10)
            await observed.wait_until(lambda ev: "completed" in kinds(ev, spec.id))
            nursery.cancel_scope.cancel()
        assert info.state is State.COMPLETED
        assert info.record is not None
        assert info.record.result == {
            "echo": {"TaskSpecificKey": "TaskSpecificValue"},
            "attempt": 1,
        }
        assert kinds(observed.items, spec.id) == [
            "queued",
            "assigned",
            "started",
            "updated",
            "completed",
        ]
        updated = next(e for e in observed.items if e.kind == "updated")
        assert updated.data == {"step": 1}
        # In etcd: exactly one state key, readable JSON, and the payload kept once.
        ks = Keyspace(namespace=namespace)
        keys, _ = await sc.etcd.list_prefix(ks.prefix)
        mine = sorted(kv.key.removeprefix(ks.prefix) for kv in keys if spec.id in kv.key)
        assert mine == [f"completed/{spec.id}", f"task/{spec.id}"]
        for kv in keys:
            json.loads(kv.value)
        task_kv = await sc.etcd.get(ks.task(spec.id))
        assert task_kv is not None
        # The payload was written once (the leader deletes it once the record expires).
        assert json.loads(task_kv.value)["payload"] == {"TaskSpecificKey": "TaskSpecificValue"}
        assert task_kv.version == 1
        completed = await sc.etcd.get(ks.state(State.COMPLETED, spec.id))
        assert completed is not None
        assert completed.lease != 0  # the record expires after the retention


async def test_a_running_attempt_announces_its_start_and_a_quick_one_with_its_outcome(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    async with running_sidecars(etcd_server.endpoint, namespace, "n1") as (sc,):
        ks = Keyspace(namespace=namespace)
        observed: Observed[TaskEvent] = Observed()
        release = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_collect, sc, observed)

            async def handler(task: TaskContext) -> str:
                if task.payload == "slow":
                    await release.wait()
                return str(task.payload)

            sc.register(handler, concurrency=2)
            slow = await sc.create("slow")
            await observed.wait_until(lambda ev: "started" in kinds(ev, slow.id))
            # Told while the handler still runs, and recorded in the assignment.
            assert "completed" not in kinds(observed.items, slow.id)
            procs, _ = await sc.etcd.list_prefix(ks.state_prefix(State.PROCESSING))
            (record,) = [json.loads(kv.value) for kv in procs if kv.key.endswith(slow.id)]
            assert record["started_at"] > 0
            release.set()
            before = await sc.etcd.revision()
            quick = await sc.create("quick")
            info = await sc.wait(quick.id, timeout_s=10)
            await sc.wait(slow.id, timeout_s=10)
            await observed.wait_until(lambda ev: "completed" in kinds(ev, slow.id))
            nursery.cancel_scope.cancel()
        for tid in (slow.id, quick.id):
            assert kinds(observed.items, tid) == ["queued", "assigned", "started", "completed"]
        # The quick attempt wrote no announcement: its outcome carries the start.
        assert info.record is not None
        assert info.record.started_at is not None
        assert info.record.started_at <= info.record.since_at
        puts = 0
        watch = sc.etcd.watch_once(ks.state_prefix(State.PROCESSING), before + 1)
        async with aclosing(watch) as changes:
            async for batch in changes:
                mine = [e for e in batch.events if e.kv.key.endswith(quick.id)]
                puts += sum(e.kind == "PUT" for e in mine)
                if any(e.kind == "DELETE" for e in mine):
                    break
        assert puts == 1


async def test_delayed_task_never_starts_early(etcd_server: EtcdProcess, namespace: str) -> None:
    async with running_sidecars(etcd_server.endpoint, namespace, "n1") as (sc,):
        started_at: list[float] = []

        async def handler(task: TaskContext) -> None:
            started_at.append(time.time())

        sc.register(handler)
        run_at = time.time() + 1.0
        spec = await sc.create({"x": 1}, run_at=run_at)
        assert (await sc.get(spec.id)).state is State.DELAYED
        await sc.wait(spec.id, timeout_s=10)
        # Never early. How soon after it starts is a figure (python -m bench --only delays);
        # that the leader wakes at the earliest due time, a timer and not a poll, is the
        # core's test_delayed_task_is_promoted_at_its_due_time_not_before.
        assert started_at[0] >= run_at


async def test_timeout_cancels_the_handler_and_fails_the_attempt(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    async with running_sidecars(etcd_server.endpoint, namespace, "n1") as (sc,):
        cancelled = trio.Event()

        async def handler(task: TaskContext) -> None:
            try:
                await trio.sleep_forever()
            finally:
                cancelled.set()

        sc.register(handler)
        spec = await sc.create({}, options=TaskOptions(timeout_s=0.3, max_attempts=1))
        info = await sc.wait(spec.id, timeout_s=10)
        assert cancelled.is_set()
        assert info.state is State.FAILED
        assert info.record is not None
        assert info.record.error is not None
        assert info.record.error.type == "Timeout"


async def test_retries_with_backoff_then_the_failed_queue(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    async with running_sidecars(etcd_server.endpoint, namespace, "n1") as (sc,):
        observed: Observed[TaskEvent] = Observed()
        starts: list[float] = []

        async def handler(task: TaskContext) -> None:
            starts.append(time.time())
            raise RuntimeError(f"boom {task.attempt}")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(_collect, sc, observed)
            sc.register(handler)
            opts = TaskOptions(max_attempts=3, backoff=Backoff(base_s=0.2, factor=2, jitter=0))
            spec = await sc.create({}, options=opts)
            info = await sc.wait(spec.id, timeout_s=15)
            await observed.wait_until(lambda ev: kinds(ev, spec.id).count("failed") == 3)
            nursery.cancel_scope.cancel()
        assert info.state is State.FAILED
        assert info.record is not None
        assert info.record.attempts == 3
        assert info.record.error is not None
        assert info.record.error.message == "boom 3"
        assert "RuntimeError" in (info.record.error.traceback or "")
        fails = [e for e in observed.items if e.task_id == spec.id and e.kind == "failed"]
        assert [(e.attempt, e.will_retry) for e in fails] == [(1, True), (2, True), (3, False)]
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        assert gaps[0] >= 0.2
        assert gaps[1] >= 0.4


async def test_a_permanent_error_is_not_retried(etcd_server: EtcdProcess, namespace: str) -> None:
    async with running_sidecars(etcd_server.endpoint, namespace, "n1") as (sc,):

        async def handler(task: TaskContext) -> None:
            raise Permanent("bad input")

        sc.register(handler)
        spec = await sc.create({}, options=TaskOptions(max_attempts=5))
        info = await sc.wait(spec.id, timeout_s=10)
        assert info.state is State.FAILED
        assert info.record is not None
        assert info.record.attempts == 1
        assert info.record.error is not None
        assert not info.record.error.retryable


async def test_priority_first_then_commit_order(etcd_server: EtcdProcess, namespace: str) -> None:
    async with running_sidecars(etcd_server.endpoint, namespace, "n1") as (sc,):
        ran: list[str] = []

        async def handler(task: TaskContext) -> None:
            ran.append(task.payload["name"])

        specs = []
        for i, prio in enumerate([0, 5, 0, 9, 5, 0]):
            specs.append(
                await sc.create({"name": f"p{prio}-{i}"}, options=TaskOptions(priority=prio))
            )
        sc.register(handler, concurrency=1)
        for spec in specs:
            await sc.wait(spec.id, timeout_s=10)
        assert ran == ["p9-3", "p5-1", "p5-4", "p0-0", "p0-2", "p0-5"]


async def test_capacity_is_never_exceeded(etcd_server: EtcdProcess, namespace: str) -> None:
    ks = Keyspace(namespace=namespace)
    async with running_sidecars(etcd_server.endpoint, namespace, "n1") as (sc,):
        now_running = 0
        most_running = 0
        most_assigned = 0
        gate = trio.Event()

        async def handler(task: TaskContext) -> None:
            nonlocal now_running, most_running
            now_running += 1
            most_running = max(most_running, now_running)
            await gate.wait()
            await trio.sleep(0.01)
            now_running -= 1

        async def watch_assignments() -> None:
            nonlocal most_assigned
            while True:
                r = await sc.etcd.range(Range(ks.assignments("n1"), prefix=True, count_only=True))
                most_assigned = max(most_assigned, r.count)
                await trio.sleep(0.005)

        sc.register(handler, concurrency=3)
        specs = [await sc.create({"i": i}) for i in range(20)]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_assignments)
            await wait_for(lambda: now_running == 3)
            gate.set()
            for spec in specs:
                await sc.wait(spec.id, timeout_s=20)
            nursery.cancel_scope.cancel()
        assert most_running == 3
        assert most_assigned <= 3


async def test_bad_creates_are_refused_and_write_nothing(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    ks = Keyspace(namespace=namespace)
    async with running_sidecars(
        etcd_server.endpoint, namespace, "n1", max_payload_bytes=1000, max_live_tasks=2
    ) as (sc,):
        with pytest.raises(PayloadTooLarge, match="1000 bytes"):
            await sc.create({"blob": "x" * 2000})
        with pytest.raises(InvalidRequest, match="not JSON"):
            await sc.create({"f": float("nan")})
        with pytest.raises(InvalidRequest, match="not JSON"):
            await sc.create({"obj": object()})
        await sc.create({"n": 1})
        await sc.create({"n": 2})
        with pytest.raises(QueueFull, match="max_live_tasks"):
            await sc.create({"n": 3})
        tasks = await sc.etcd.range(Range(ks.tasks(), prefix=True, count_only=True))
        assert tasks.count == 2


async def test_create_with_the_same_id_is_idempotent(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    async with running_sidecars(etcd_server.endpoint, namespace, "n1") as (sc,):
        tid = sc.new_task_id()
        first = await sc.create({"a": 1}, task_id=tid)
        again = await sc.create({"a": 1}, task_id=tid)
        assert again == first
        with pytest.raises(InvalidRequest, match="taken"):
            await sc.create({"a": 2}, task_id=tid)


async def test_a_stale_report_is_rejected(etcd_server: EtcdProcess, namespace: str) -> None:
    """An outcome for attempt k fails once attempt k is no longer the live assignment."""
    ks = Keyspace(namespace=namespace)
    etcd = connect(EtcdConfig(endpoints=(etcd_server.endpoint,)))
    # A task assigned to a node, as the leader would leave it.
    key = ks.state(State.PROCESSING, TaskId("t1"), NodeId("n1"))
    record = CoreRecord(
        state=State.PROCESSING, attempts=1, since_at=0.0, node=NodeId("n1"), session=1
    )
    await etcd.put(ks.task("t1"), '{"id":"t1","payload":null,"created_at":0}')
    await etcd.put(key, record.to_json())
    kv = await etcd.get(key)
    assert kv is not None
    attempt1 = Slot(TaskId("t1"), key, kv.create_revision, kv.mod_revision, record)
    # The attempt is requeued and assigned again (a new incarnation of the key).
    await etcd.delete(key)
    await etcd.put(key, record.to_json())
    stale = await etcd.txn(plan_move(ks, attempt1, succeeded(record, result="late", now=1.0)))
    assert not stale.succeeded
    assert await etcd.get(ks.state(State.COMPLETED, TaskId("t1"))) is None
    await etcd.aclose()


async def test_graceful_stop_hands_leadership_over_at_once(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    async with running_sidecars(etcd_server.endpoint, namespace, "a", "b", lease_ttl_s=30) as (
        a,
        b,
    ):
        done: list[str] = []

        async def handler(task: TaskContext) -> None:
            done.append(task.id)

        b.register(handler)
        first = await a.create({"n": 1})
        await b.wait(first.id, timeout_s=10)
        assert a.is_leader
        assert not b.is_leader
        stopped_at = trio.current_time()
        a.stop()
        await wait_for(lambda: b.is_leader, timeout_s=5)
        # With a 30 s lease, only the resignation explains a prompt takeover.
        assert trio.current_time() - stopped_at < 2.0
        second = await b.create({"n": 2})
        await b.wait(second.id, timeout_s=10)
        assert done == [first.id, second.id]


async def test_tasks_of_a_dead_node_run_elsewhere(etcd_server: EtcdProcess, namespace: str) -> None:
    async with running_sidecars(etcd_server.endpoint, namespace, "leader", "worker") as (
        lead,
        worker,
    ):
        stuck = trio.Event()

        async def stuck_handler(task: TaskContext) -> None:
            stuck.set()
            await trio.sleep_forever()

        async def good_handler(task: TaskContext) -> str:
            return "rescued"

        reg = worker.register(stuck_handler)
        spec = await lead.create({})
        with trio.fail_after(10):
            await stuck.wait()
        lead.register(good_handler)
        reg.close()
        # The worker's lease dies as if its host had died.
        assert worker.session is not None
        await lead.etcd.lease_revoke(worker.session.lease)
        info = await lead.wait(spec.id, timeout_s=10)
        assert info.state is State.COMPLETED
        assert info.record is not None
        assert info.record.result == "rescued"
        assert info.record.attempts == 2


async def test_finished_records_expire_after_the_retention(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    ks = Keyspace(namespace=namespace)
    async with running_sidecars(
        etcd_server.endpoint, namespace, "n1", retention_s=2.0, compact_interval_s=0.5
    ) as (sc,):

        async def handler(task: TaskContext) -> str:
            return "done"

        sc.register(handler)
        spec = await sc.create({})
        await sc.wait(spec.id, timeout_s=10)
        finished_at = trio.current_time()

        async def gone() -> bool:
            return await sc.etcd.get(ks.state(State.COMPLETED, spec.id)) is None

        await poll_until(gone, timeout_s=10)
        assert trio.current_time() - finished_at >= 1.5  # not before the retention
        with pytest.raises(TaskNotFound, match="expired"):
            await sc.get(spec.id)

        async def payload_gone() -> bool:
            return await sc.etcd.get(ks.task(spec.id)) is None

        await poll_until(payload_gone, timeout_s=10)  # the leader's sweep deletes it
        # The id is free again, as it was when the payload expired with the record.
        again = await sc.create({"n": 2}, task_id=spec.id)
        info = await sc.wait(again.id, timeout_s=10)
        assert info.record is not None
        assert info.record.result == "done"


async def test_the_leader_compacts_etcd_history(etcd_server: EtcdProcess, namespace: str) -> None:
    async with running_sidecars(etcd_server.endpoint, namespace, "n1", compact_interval_s=0.2) as (
        sc,
    ):
        first = await sc.etcd.put(f"/scratch/{namespace}", "1")
        await sc.etcd.put(f"/scratch/{namespace}", "2")

        async def compacted() -> bool:
            try:
                await sc.etcd.range(Range(f"/scratch/{namespace}", revision=first))
            except Compacted:
                return True
            return False

        await poll_until(compacted, timeout_s=10)


async def test_creates_are_refused_near_the_etcd_quota(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    async with running_sidecars(etcd_server.endpoint, namespace, "n1", quota_bytes=1000) as (sc,):
        await wait_for(lambda: sc.admission.db_size > 0)
        with pytest.raises(QueueFull, match="quota"):
            await sc.create({})


async def test_a_result_too_large_fails_the_task_and_the_node_carries_on(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    async with running_sidecars(etcd_server.endpoint, namespace, "n1") as (sc,):

        async def handler(task: TaskContext) -> str:
            return "x" * (2 * 1024 * 1024) if task.payload["big"] else "small"

        sc.register(handler)
        big = await sc.create({"big": True})
        info = await sc.wait(big.id, timeout_s=10)
        assert info.state is State.FAILED
        assert info.record is not None
        assert info.record.error is not None
        assert info.record.error.type == "ResultTooLarge"
        small = await sc.create({"big": False})
        assert (await sc.wait(small.id, timeout_s=10)).state is State.COMPLETED


async def test_a_payload_deleted_by_hand_fails_its_task_cleanly(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    ks = Keyspace(namespace=namespace)
    async with running_sidecars(etcd_server.endpoint, namespace, "n1") as (sc,):
        doomed = await sc.create({"n": 1})
        await sc.etcd.delete(ks.task(doomed.id))
        # As if another sidecar had created it: this one has no copy of the task to run.
        assert sc.agent.recent.take(doomed.id) is not None

        async def handler(task: TaskContext) -> str:
            return "ok"

        sc.register(handler)
        await poll_until(lambda: _exists(sc, ks.state(State.FAILED, doomed.id)), timeout_s=10)
        record = await sc.etcd.get(ks.state(State.FAILED, doomed.id))
        assert record is not None
        assert json.loads(record.value)["error"]["type"] == "TaskMissing"
        fine = await sc.create({"n": 2})
        assert (await sc.wait(fine.id, timeout_s=10)).state is State.COMPLETED


async def _exists(sc: Sidecar, key: str) -> bool:
    return await sc.etcd.get(key) is not None


async def test_listing_a_large_backlog_does_not_block_the_event_loop(
    etcd_server: EtcdProcess, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Parsing tens of thousands of pending tasks takes seconds of CPU: it must not hold
    the event loop (it once did, and with a backlog the leader lost its lease in a loop)."""
    from tests.procs import create_tasks

    ks = Keyspace(namespace=namespace)
    etcd = connect(EtcdConfig(endpoints=(etcd_server.endpoint,)))
    await create_tasks(etcd, ks, 30_000, work_s=0.0)
    await etcd.aclose()
    steps = StepMeter(ignore=trio.lowlevel.current_task())
    trio.lowlevel.add_instrument(steps)
    try:
        async with running_sidecars(etcd_server.endpoint, namespace, "n1", lease_ttl_s=2) as (sc,):
            await wait_for(lambda: sc.leader.view is not None, timeout_s=60)
            assert sc.leader.view is not None
            assert len(sc.leader.view.pending) == 30_000
            assert sc.is_leader
    finally:
        trio.lowlevel.remove_instrument(steps)
    # The loop's own CPU time in its longest step, which the machine's load does not
    # stretch: parsing the whole backlog in one step would take seconds of it.
    assert steps.longest_s < 0.25, (
        f"{steps.longest} used {steps.longest_s:.2f} s of CPU in one step"
    )
    assert steps.steps > 100
    assert "session lost" not in caplog.text
