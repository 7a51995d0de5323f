"""Remote attempts (issue 19 items 1 and 4): an SDK worker's attempts are driven by the
agent's one ``RemoteAttempts`` task, with no Trio task, cancel scope or event each; task
reads go in batches, timeouts come from one heap of deadlines, withdrawn assignments
and a stop still tell the worker and hand the task back. An in-process sidecar on a
real etcd; the remote handler is a stand-in for the socket server's batched worker."""

from __future__ import annotations

import attrs
import trio

from tests.helpers import poll_until, running_sidecars, wait_for
from tests.procs import create_tasks
from tm_sidecar import State, TaskContext
from tm_sidecar.core import Record, TaskError, TaskId, TaskOptions
from tm_sidecar.node._agent import RemoteAttempt
from tm_sidecar.ops._embedded import EtcdProcess


@attrs.define(eq=False)
class FakeWorker:
    """A remote handler that keeps what it is given; the test answers for the worker."""

    delivered: list[RemoteAttempt] = attrs.Factory(list)
    withdrawn: list[TaskId] = attrs.Factory(list)
    over: list[TaskId] = attrs.Factory(list)

    def deliver(self, attempt: RemoteAttempt) -> None:
        attempt.token = object()
        self.delivered.append(attempt)

    def withdraw(self, attempt: RemoteAttempt) -> None:
        self.withdrawn.append(attempt.slot.task_id)

    def settled(self, attempt: RemoteAttempt) -> None:
        self.over.append(attempt.slot.task_id)


def tasks_under(task: trio.lowlevel.Task) -> int:
    """Trio tasks in the tree below ``task`` (itself included)."""
    return 1 + sum(tasks_under(t) for n in task.child_nurseries for t in n.child_tasks)


def all_tasks() -> int:
    """Every Trio task of this run."""
    root = trio.lowlevel.current_root_task()
    assert root is not None
    return tasks_under(root)


async def never(ctx: TaskContext) -> None:
    raise AssertionError("a remote registration's attempts do not run its handler")


async def test_remote_attempts_take_no_task_each_and_read_payloads_in_batches(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    n = 200
    async with running_sidecars(etcd_server.endpoint, namespace, "n1") as (sc,):
        # Created past this sidecar: every payload is read back from etcd.
        ids = await create_tasks(sc.etcd, sc.ks, n, work_s=0.0)
        idle = all_tasks()
        worker = FakeWorker()
        sc.register(never, queue="default", concurrency=n, remote=worker)
        await wait_for(lambda: len(worker.delivered) == n, timeout_s=30)
        # Every attempt is live and waiting for its worker: no task each.
        assert all_tasks() < idle + 20
        assert len(sc.agent.running) == n
        assert {a.slot.task_id for a in worker.delivered} == set(ids)
        reads = sc.agent.read_batches
        assert reads.items == n
        assert reads.batches <= n // 8, reads
        for i, attempt in enumerate(worker.delivered):
            if i % 2:
                attempt.returned({"n": i})
                attempt.failed(TaskError(type="Late", message="the first outcome stands"))
            else:
                attempt.failed(TaskError(type="Boom", message="no", retryable=False))
        await wait_for(lambda: not sc.agent.running, timeout_s=30)
        for i, attempt in enumerate(worker.delivered):
            info = await sc.get(attempt.slot.task_id)
            assert info.record is not None
            if i % 2:
                assert (info.state, info.record.result) == (State.COMPLETED, {"n": i})
            else:
                assert info.state is State.FAILED
                assert info.record.error is not None
                assert info.record.error.type == "Boom"
        assert sorted(worker.over) == sorted(ids)
        assert worker.withdrawn == []
        assert (sc.agent.completed, sc.agent.failed) == (n // 2, n // 2)


async def test_a_remote_attempt_times_out_from_the_deadline_heap(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    async with running_sidecars(etcd_server.endpoint, namespace, "n1") as (sc,):
        worker = FakeWorker()
        sc.register(never, concurrency=4, remote=worker)
        quick = await sc.create({}, options=TaskOptions(timeout_s=0.2, max_attempts=1))
        slow = await sc.create({}, options=TaskOptions(timeout_s=60, max_attempts=1))
        await wait_for(lambda: len(worker.delivered) == 2)
        info = await sc.wait(quick.id, timeout_s=10)
        assert info.state is State.FAILED
        assert info.record is not None
        assert info.record.error is not None, info.record
        assert "time" in info.record.error.type.lower(), info.record.error
        # The worker is told to stop it; the other one still runs.
        assert worker.withdrawn == [quick.id]
        assert (await sc.get(slow.id)).state is State.PROCESSING
        (late,) = [a for a in worker.delivered if a.slot.task_id == quick.id]
        late.returned("too late")  # ignored: the timeout is its outcome
        (other,) = [a for a in worker.delivered if a.slot.task_id == slow.id]
        other.returned("in time")
        done = await sc.wait(slow.id, timeout_s=10)
        assert done.record is not None
        assert done.record.result == "in time"
        assert (await sc.get(quick.id)).state is State.FAILED


async def test_a_withdrawn_remote_attempt_tells_its_worker_and_reports_nothing(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    async with running_sidecars(etcd_server.endpoint, namespace, "n1") as (sc,):
        worker = FakeWorker()
        sc.register(never, concurrency=2, remote=worker)
        spec = await sc.create({})
        await wait_for(lambda: len(worker.delivered) == 1)
        cancelled, _ = await sc.cancel(spec.id)
        assert cancelled
        await wait_for(lambda: not sc.agent.running)
        assert worker.withdrawn == [spec.id]
        assert worker.over == [spec.id]
        worker.delivered[0].returned("after the cancel")  # ignored
        assert (await sc.get(spec.id)).state is State.FAILED
        assert sc.agent.completed == 0


async def test_a_stop_hands_live_remote_attempts_back_without_spending_them(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    async with running_sidecars(etcd_server.endpoint, namespace, "n1") as (sc,):
        worker = FakeWorker()
        sc.register(never, concurrency=3, remote=worker)
        specs = [await sc.create({"i": i}, options=TaskOptions(max_attempts=1)) for i in range(3)]
        await wait_for(lambda: len(worker.delivered) == 3)
        sc.stop()  # graceful: attempts handed back without counting
        await wait_for(lambda: sorted(worker.withdrawn) == sorted(s.id for s in specs))

        async def all_pending() -> bool:
            for s in specs:
                kv = await sc.etcd.get(sc.ks.state(State.PENDING, s.id))
                if kv is None:
                    return False
                record = Record.from_json(State.PENDING, kv.value)
                assert (record.attempts, record.reason) == (0, "handed back")
            return True

        await poll_until(all_pending)


async def test_a_remote_report_etcd_refuses_takes_the_slow_path_and_lands(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    """A posted report answered with an error (here its retention lease revoked behind
    the sidecar's back) goes through the local attempts' report loop: it lands."""
    async with running_sidecars(etcd_server.endpoint, namespace, "n1", retention_s=3600) as (sc,):
        worker = FakeWorker()
        sc.register(never, concurrency=2, remote=worker)
        first = await sc.create({})
        await wait_for(lambda: len(worker.delivered) == 1)
        worker.delivered[0].returned(1)
        assert (await sc.wait(first.id, timeout_s=10)).state is State.COMPLETED
        lease = sc.retention.ready()
        assert lease  # granted for the first, kept for the next
        await sc.etcd.lease_revoke(lease)
        second = await sc.create({})
        await wait_for(lambda: len(worker.delivered) == 2)
        worker.delivered[1].returned(2)
        done = await sc.wait(second.id, timeout_s=10)
        assert done.state is State.COMPLETED
        assert done.record is not None
        assert done.record.result == 2
        assert sc.retention.ready() not in (None, lease)  # a new lease was granted
