"""Flow control end to end (issue 14), through real tm-sidecar processes and the SDK:
cancel, pause, unique tasks, snooze, limits, schedules."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import statistics
import sys
import time
from collections import Counter
from contextlib import aclosing
from datetime import timedelta
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from taskmanager import Snooze, TaskFailed, TaskManager, WorkerTask

from tests.helpers import Observed, poll_until
from tests.procs import ROOT, sidecars
from tm_sidecar import Etcd, EtcdConfig, connect
from tm_sidecar.core import (
    Keyspace,
    Record,
    State,
    TaskOptions,
    TaskSpec,
    initial_record,
    make_task_id,
    plan_create,
)
from tm_sidecar.etcd._group import merge_txns
from tm_sidecar.ops._embedded import EtcdProcess

# -- cancel -------------------------------------------------------------------------------------


async def test_cancel_a_waiting_task_and_a_finished_one(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    async with (
        sidecars(etcd_server, namespace, tmp_path, "n1") as (sc,),
        TaskManager(str(sc.socket_path)) as manager,
    ):
        failures: list[Any] = []
        delayed = await manager.create({"n": 1})
        await delayed.with_delay(3600).on("failure", failures.append).commit()
        pending = await (await manager.create({"n": 2})).commit()  # no worker: it waits
        assert await delayed.cancel() is True
        assert await manager.cancel(pending.id) is True
        with pytest.raises(TaskFailed) as err:
            await delayed.result(timeout=10)
        with pytest.raises(TaskFailed):
            await pending.result(timeout=10)
        info = await manager.get(pending.id)
        # Cancelling again, or a finished task, is a no-op that says so.
        assert await manager.cancel(pending.id) is False

        async def handler(task: WorkerTask) -> str:
            return "done"

        await manager.process(handler)
        done = await (await manager.create({})).commit()
        assert await done.result(timeout=10) == "done"
        assert await done.cancel() is False
        assert (await manager.get(done.id))["state"] == "completed"
    assert err.value.error["type"] == "Cancelled"
    assert err.value.error["retryable"] is False
    assert failures == [err.value.error]
    assert info["state"] == "failed"
    assert info["attempts"] == 0


async def test_cancel_a_running_task_on_another_node(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    async with (
        sidecars(etcd_server, namespace, tmp_path, "a", "b") as (a, b),
        TaskManager(str(a.socket_path)) as creator,
        TaskManager(str(b.socket_path)) as worker,
    ):
        started: Observed[int] = Observed()
        cancelled = trio.Event()

        async def handler(task: WorkerTask) -> None:
            started.add(task.attempt)
            try:
                await trio.sleep_forever()
            finally:
                cancelled.set()  # the handler saw its cancellation

        await worker.process(handler)
        task = await (await creator.create({})).with_retries(3).commit()
        await started.wait_until(bool)
        assert await task.cancel() is True
        with trio.fail_after(10):
            await cancelled.wait()
        with pytest.raises(TaskFailed) as err:
            await task.result(timeout=10)
        # Never retried: the failed record stays and no second attempt starts.
        info = await creator.get(task.id)
    assert err.value.error["type"] == "Cancelled"
    assert started.items == [1]
    assert info["state"] == "failed"
    assert info["attempts"] == 1
    assert "abandoned" in b.log()


# -- pause and resume ---------------------------------------------------------------------------


async def tmctl(etcd: EtcdProcess, namespace: str, *args: str) -> str:
    """Run tmctl as an operator would; answers what it printed."""
    run = await trio.run_process(
        [
            sys.executable,
            "-c",
            "from tm_sidecar.ops._tmctl import main; main()",
            "--etcd",
            etcd.endpoint,
            "--namespace",
            namespace,
            *args,
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr.decode()
    return run.stdout.decode()


async def test_a_paused_queue_assigns_nothing_until_resumed(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    async with (
        sidecars(etcd_server, namespace, tmp_path, "a", "b") as (a, b),
        TaskManager(str(a.socket_path)) as manager,
        TaskManager(str(b.socket_path)) as worker,
    ):
        release = trio.Event()
        started: Observed[str] = Observed()

        async def handler(task: WorkerTask) -> str:
            started.add(task.id)
            if task.data.get("wait"):
                await release.wait()
            return "done"

        for queue in ("default", "other"):
            await worker.process(handler, concurrency=4, queue=queue)
        running = await (await manager.create({"wait": True})).commit()
        await started.wait_until(lambda ids: running.id in ids)
        config = await manager.pause_queue()
        assert config["paused"] is True
        held = await (await manager.create({})).commit()
        # A task of another queue, created after it, runs: the leader has looked since.
        other = await (await manager.create({})).with_queue("other").commit()
        assert await other.result(timeout=10) == "done"
        release.set()
        assert await running.result(timeout=10) == "done"  # running tasks finish
        assert (await manager.get(held.id))["state"] == "pending"
        assert (await manager.queues())["default"]["paused"] is True
        listed = await tmctl(etcd_server, namespace, "queues")
        assert "default" in listed
        assert "yes" in listed
        await tmctl(etcd_server, namespace, "resume", "default")
        assert await held.result(timeout=10) == "done"
        # A rate with the slack of the delivery (issue 20 item 6), from the SDK.
        limits = await manager.set_limits("other", rate=(5, timedelta(seconds=2), 0.05))
        assert limits["rate"] == {"limit": 5, "period_s": 2.0, "slack_s": 0.05}
    assert started.items == [running.id, other.id, held.id]


# -- unique tasks -------------------------------------------------------------------------------


async def test_unique_key_answers_the_live_task_then_its_window(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    async with (
        sidecars(etcd_server, namespace, tmp_path, "n1") as (sc,),
        TaskManager(str(sc.socket_path)) as manager,
    ):
        first = await (await manager.create({"n": 1}, unique_key="invoice-42")).commit()
        again = await (await manager.create({"n": 2}, unique_key="invoice-42")).commit()
        other = await (await manager.create({"n": 3}, unique_key="invoice-43")).commit()

        async def handler(task: WorkerTask) -> Any:
            return task.data

        await manager.process(handler, concurrency=2)
        assert await again.result(timeout=10) == {"n": 1}  # it follows the first task
        assert await other.result(timeout=10) == {"n": 3}
        # Finished: the key is free again; with a window, it stays taken after.
        after = (await manager.create({"n": 4})).with_unique("invoice-42", for_s=3600)
        await after.commit()
        assert await after.result(timeout=10) == {"n": 4}
        held = await (await manager.create({"n": 5}, unique_key="invoice-42")).commit()
        assert await held.result(timeout=10) == {"n": 4}
    assert (first.existing, again.existing, other.existing) == (False, True, False)
    assert again.id == first.id
    assert (after.existing, held.existing) == (False, True)
    assert held.id == after.id


async def test_unique_creates_from_several_sidecars_make_one_task(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    async with (
        sidecars(etcd_server, namespace, tmp_path, "a", "b", "c") as procs,
        TaskManager(str(procs[0].socket_path)) as ma,
        TaskManager(str(procs[1].socket_path)) as mb,
        TaskManager(str(procs[2].socket_path)) as mc,
    ):
        tasks: list[Any] = []

        async def create(manager: TaskManager, n: int) -> None:
            task = await manager.create({"n": n}, unique_key="customer-7-sync")
            tasks.append(await task.commit())

        async with trio.open_nursery() as nursery:
            for n in range(8):
                for manager in (ma, mb, mc):
                    nursery.start_soon(create, manager, n)
        etcd = connect(EtcdConfig(endpoints=(etcd_server.endpoint,)))
        try:
            kvs, _ = await etcd.list_prefix(Keyspace(namespace=namespace).tasks())
        finally:
            await etcd.aclose()
    assert len({t.id for t in tasks}) == 1
    assert sum(not t.existing for t in tasks) == 1
    assert len(kvs) == 1


# -- snooze -------------------------------------------------------------------------------------


async def test_a_handler_snoozes_its_task_without_spending_attempts(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    async with (
        sidecars(etcd_server, namespace, tmp_path, "n1") as (sc,),
        TaskManager(str(sc.socket_path)) as manager,
    ):
        runs: list[tuple[str, int, float]] = []

        async def handler(task: WorkerTask) -> Any:
            runs.append((task.data["name"], task.attempt, trio.current_time()))
            if task.data["name"] == "forever" or len(runs) < 3:
                raise Snooze(0.2)
            return len(runs)

        await manager.process(handler)
        once = await (await manager.create({"name": "later"})).with_retries(1).commit()
        assert await once.result(timeout=10) == 3
        forever = await manager.submit({"name": "forever"}, max_snoozes=2)
        with pytest.raises(TaskFailed) as err:
            await forever.result(timeout=10)
    # Three runs of a task allowed one attempt: the snoozes did not count.
    assert [(name, attempt) for name, attempt, _ in runs[:3]] == [("later", 1)] * 3
    assert all(b[2] - a[2] >= 0.2 for a, b in itertools.pairwise(runs[:3]))
    assert err.value.error["type"] == "SnoozeLimit"
    assert [name for name, _, _ in runs[3:]] == ["forever"] * 3  # 2 snoozes, then the limit


# -- concurrency limits -------------------------------------------------------------------------


async def _create_keyed(etcd: Etcd, ks: Keyspace, keys: list[str | None], work_s: float) -> None:
    """Tasks with these concurrency keys (None: none), several per transaction."""
    txns = []
    for i, key in enumerate(keys):
        now = time.time()
        spec = TaskSpec(
            id=make_task_id(int(now * 1000), i, 0),
            payload={"i": i, "work_s": work_s},
            options=TaskOptions(max_attempts=5, concurrency_key=key),
            created_at=now,
        )
        rec = initial_record(
            Record(state=State.PENDING, options=spec.options, since_at=now), now=now, run_at=None
        )
        txns.append(plan_create(ks, spec, rec))
    for start in range(0, len(txns), 32):
        assert (await etcd.txn(merge_txns(txns[start : start + 32]))).succeeded


@attrs.define
class Concurrency:
    """The most tasks processing at once, in all and per key, at any revision."""

    ks: Keyspace
    live: dict[str, str | None] = attrs.Factory(dict)  # processing key -> concurrency key
    most: int = 0
    most_per_key: Counter[str] = attrs.Factory(Counter)
    completed: int = 0
    changed: trio.Event = attrs.Factory(trio.Event)

    async def run(self, etcd: Etcd, revision: int) -> None:
        watch = etcd.watch_once(self.ks.prefix, revision, range_end=self.ks.prefix + "task")
        async with aclosing(watch) as changes:
            async for batch in changes:
                for event in batch.events:
                    parsed = self.ks.parse(event.kv.key)
                    if parsed is None or parsed.state is None:
                        continue
                    if parsed.state is State.PROCESSING:
                        if event.kind == "PUT":
                            record = Record.from_json(State.PROCESSING, event.kv.value)
                            self.live[event.kv.key] = record.options.concurrency_key
                        else:
                            self.live.pop(event.kv.key, None)
                    elif parsed.state is State.COMPLETED and event.kind == "PUT":
                        self.completed += 1
                # A watch response holds whole revisions: count after each.
                self.most = max(self.most, len(self.live))
                for key, n in Counter(k for k in self.live.values() if k).items():
                    self.most_per_key[key] = max(self.most_per_key[key], n)
                self.changed.set()
                self.changed = trio.Event()


async def test_limits_hold_across_nodes_and_a_leader_kill(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    ks = Keyspace(namespace=namespace)
    etcd = connect(EtcdConfig(endpoints=(etcd_server.endpoint,)))
    handler = "tests.proc_handlers:work"
    try:
        async with sidecars(
            etcd_server, namespace, tmp_path, "a", "b", "c", handler=handler, concurrency=4
        ) as procs:
            async with TaskManager(str(procs[1].socket_path)) as manager:
                await manager.set_limits(max_running=3, key_max_running=1)
            audit = Concurrency(ks)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(audit.run, etcd, await etcd.revision() + 1)
                keys: list[str | None] = ["customer-7", "customer-8", None, None] * 8
                await _create_keyed(etcd, ks, keys, work_s=0.05)
                with trio.fail_after(30):
                    while audit.completed < 8:
                        await audit.changed.wait()
                procs[0].kill()  # the leader, mid-run
                with trio.fail_after(60):
                    while audit.completed < len(keys):
                        await audit.changed.wait()
                nursery.cancel_scope.cancel()
    finally:
        await etcd.aclose()
    assert audit.most == 3  # reached, never passed, across three nodes and two leaders
    assert audit.most_per_key == {"customer-7": 1, "customer-8": 1}


# -- rate limits --------------------------------------------------------------------------------


async def test_a_rate_limit_holds_across_a_leader_kill(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    ks = Keyspace(namespace=namespace)
    etcd = connect(EtcdConfig(endpoints=(etcd_server.endpoint,)))
    period = 4.0
    starts: Observed[float] = Observed()  # each assignment's time, by the leader's clock

    async def watch(revision: int) -> None:
        prefix = ks.state_prefix(State.PROCESSING)
        async with aclosing(etcd.watch_once(prefix, revision, prev_kv=False)) as changes:
            async for batch in changes:
                for event in batch.events:
                    if event.kind == "PUT" and event.kv.version == 1:
                        starts.add(Record.from_json(State.PROCESSING, event.kv.value).since_at)

    try:
        async with sidecars(
            etcd_server, namespace, tmp_path, "a", "b", handler="tests.proc_handlers:work"
        ) as procs:
            async with TaskManager(str(procs[1].socket_path)) as manager:
                await manager.set_limits(rate=(2, period))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch, await etcd.revision() + 1)
                await _create_keyed(etcd, ks, [None] * 4, work_s=0.01)
                await starts.wait_until(lambda s: len(s) >= 2)
                procs[0].kill()  # the leader, with its window full
                await starts.wait_until(lambda s: len(s) >= 4, timeout_s=30)
                nursery.cancel_scope.cancel()
    finally:
        await etcd.aclose()
    times = sorted(starts.items)
    # The new leader took over within the period, and still waited for the window.
    assert times[2] - times[0] >= period - 0.2  # the persisted window rounds up, never down
    assert all(b - a >= period - 0.2 for a, b in zip(times, times[2:], strict=False))


# -- schedules ----------------------------------------------------------------------------------


def _slot_of(task_id: str) -> int:
    """A schedule's task id is <schedule>.<slot, epoch seconds>.<incarnation>."""
    return int(task_id.split(".")[-2])


async def test_cron_and_interval_schedules_fire_through_the_sdk(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    async with (
        sidecars(etcd_server, namespace, tmp_path, "n1") as (sc,),
        TaskManager(str(sc.socket_path)) as manager,
    ):
        ran: Observed[tuple[str, Any, float]] = Observed()

        async def handler(task: WorkerTask) -> None:
            ran.add((task.id, task.data, time.time()))

        await manager.process(handler, concurrency=4)
        every = await manager.schedule("beat", {"kind": "beat"}, every=timedelta(seconds=1))
        cron = await manager.schedule(
            "sec", {"kind": "cron"}, cron="* * * * * *", timezone="Europe/Berlin"
        )
        await ran.wait_until(lambda r: sum(d["kind"] == "beat" for _, d, _ in r) >= 2)
        await ran.wait_until(lambda r: sum(d["kind"] == "cron" for _, d, _ in r) >= 2)
        listed = {s["name"]: s for s in await manager.schedules()}
        paused = await manager.pause_schedule("beat")
        assert await manager.delete_schedule("sec") is True
        assert await manager.delete_schedule("sec") is False
        out = await tmctl(etcd_server, namespace, "schedules")
    assert every["next_at"] > time.time() - 30
    assert cron["cron"] == "* * * * * *"
    assert listed["beat"]["fired"] >= 1
    assert paused["paused"] is True
    assert "beat" in out
    beats = sorted(_slot_of(t) for t, d, _ in ran.items if d["kind"] == "beat")
    assert len(beats) == len(set(beats))  # each slot once
    # The leader logs each firing's lateness: from the slot to the commit of its task.
    fired = re.findall(r'msg="schedule fired" .*?\blate_s=(\S+)', sc.log())
    late = [float(x) for x in fired]
    print(
        f"\nschedule firing lateness: max {max(late) * 1000:.1f} ms, median "
        f"{statistics.median(late) * 1000:.1f} ms over {len(late)} slots"
    )
    assert len(late) >= 4
    assert min(late) >= 0  # a slot never fires before its time; how late is bench's figure


async def test_a_schedule_slot_fires_once_across_a_leader_kill(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    ks = Keyspace(namespace=namespace)
    etcd = connect(EtcdConfig(endpoints=(etcd_server.endpoint,)))
    try:
        async with sidecars(etcd_server, namespace, tmp_path, "a", "b", "c") as procs:
            async with TaskManager(str(procs[1].socket_path)) as manager:
                sched = await manager.schedule("tick", {}, every=1.0, missed="all")
            await poll_until(lambda: _fired(etcd, ks, 2), timeout_s=10)
            procs[0].kill()  # the leader, between slots; b leads after its lease ends
            await poll_until(lambda: _fired(etcd, ks, 6), timeout_s=20)
            await tmctl(etcd_server, namespace, "pause-schedule", "tick")
            kvs, _ = await etcd.list_prefix(ks.tasks())
            record = await etcd.get(ks.schedule("tick"))
    finally:
        await etcd.aclose()
    slots = sorted(_slot_of(kv.key.rsplit("/", 1)[1]) for kv in kvs)
    first = math.floor(sched["next_at"])
    # Every slot from the first on fired, once each, though no leader existed for ~2 s.
    assert slots == list(range(first, first + len(slots)))
    assert len(slots) >= 6
    assert record is not None
    assert json.loads(record.value)["fired"] == len(slots)  # no firing counted twice


async def _fired(etcd: Etcd, ks: Keyspace, count: int) -> bool:
    kvs, _ = await etcd.list_prefix(ks.tasks())
    return len(kvs) >= count
