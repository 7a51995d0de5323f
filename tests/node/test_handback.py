"""A graceful hand-back spends no attempt: a worker's shutdown or a sidecar's SIGTERM
drain that runs out of time puts the task straight back to pending, so that a
single-attempt task survives a deploy. Real sidecar processes on a real etcd."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import trio
from taskmanager import TaskManager, WorkerTask

from tests.helpers import poll_until
from tests.procs import SidecarProcess
from tm_sidecar import EtcdConfig
from tm_sidecar.core import Keyspace, Record, State, TaskId
from tm_sidecar.etcd import connect
from tm_sidecar.ops._embedded import EtcdProcess


async def test_a_worker_shutdown_hands_back_without_spending_the_attempt(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    sc = SidecarProcess("n1", etcd_server.endpoint, namespace, tmp_path / "n1.log", handler=None)
    sc.start()
    try:
        await sc.wait_serving()
        sock = str(sc.socket_path)
        async with TaskManager(sock) as producer:
            stubborn = TaskManager(sock)
            hung = trio.Event()

            async def forever(task: WorkerTask) -> None:
                hung.set()
                await trio.sleep_forever()

            await stubborn.process(forever)
            # One attempt and the default backoff: a hand-back that counted would fail it.
            task = await (await producer.create({})).with_retries(1).commit()
            await hung.wait()
            handed_back_at = trio.current_time()
            await stubborn.shutdown(timeout=0.2)

            async def second(t: WorkerTask) -> int:
                return t.attempt

            await producer.process(second)
            assert await task.result(timeout=10) == 1
            assert trio.current_time() - handed_back_at < 5
    finally:
        sc.stop()


@pytest.mark.parametrize("worker", ["sdk", "in-process"])
async def test_a_sigterm_drain_that_runs_out_hands_back_without_spending_the_attempt(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path, worker: str
) -> None:
    ks = Keyspace(namespace=namespace)
    sc = SidecarProcess(
        "n1",
        etcd_server.endpoint,
        namespace,
        tmp_path / "n1.log",
        handler="tests.proc_handlers:hang" if worker == "in-process" else None,
        extra=("--drain-timeout", "0.3"),
    )
    etcd = connect(EtcdConfig(endpoints=(etcd_server.endpoint,)))
    sc.start()
    try:
        await sc.wait_serving()
        async with TaskManager(str(sc.socket_path)) as manager:
            hung = trio.Event()

            async def forever(task: WorkerTask) -> None:
                hung.set()
                await trio.sleep_forever()

            if worker == "sdk":
                await manager.process(forever)
            task = await (await manager.create({})).with_retries(1).commit()
            tid = TaskId(task.id)

            async def processing() -> bool:
                # Running, not only assigned: the attempt announces its start after 50 ms.
                kvs, _ = await etcd.list_prefix(ks.state_prefix(State.PROCESSING))
                return any(
                    kv.key.endswith("/" + tid)
                    and Record.from_json(State.PROCESSING, kv.value).started_at is not None
                    for kv in kvs
                )

            await poll_until(processing, timeout_s=20)
            if worker == "sdk":
                await hung.wait()
            sc.signal(signal.SIGTERM)
            assert sc.proc is not None
            code = await trio.to_thread.run_sync(sc.proc.wait)
        assert code == 0, sc.log()[-3000:]
        assert "handing them back" in sc.log()
        kv = await etcd.get(ks.state(State.PENDING, tid))
        assert kv is not None, "the task is not pending after the drain"
        record = Record.from_json(State.PENDING, kv.value)
        assert (record.attempts, record.reason, record.error) == (0, "handed back", None)
        assert await etcd.get(ks.state(State.FAILED, tid)) is None
    finally:
        sc.stop()
        await etcd.aclose()


async def test_a_task_handed_back_starts_before_the_tasks_committed_after_it(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    """Property 9 for hand-backs (issue 20 item 4): it keeps its place in the queue."""
    sc = SidecarProcess("n1", etcd_server.endpoint, namespace, tmp_path / "n1.log", handler=None)
    sc.start()
    try:
        await sc.wait_serving()
        sock = str(sc.socket_path)
        async with TaskManager(sock) as producer:
            stubborn = TaskManager(sock)
            hung = trio.Event()

            async def forever(task: WorkerTask) -> None:
                hung.set()
                await trio.sleep_forever()

            await stubborn.process(forever)
            first = await (await producer.create({"n": 0})).commit()
            await hung.wait()
            later = [await (await producer.create({"n": n})).commit() for n in (1, 2)]
            await stubborn.shutdown(timeout=0.2)
            started: list[int] = []

            async def record(t: WorkerTask) -> int:
                started.append(t.payload["n"])
                return int(t.payload["n"])

            await producer.process(record, concurrency=1)
            for task in (first, *later):
                await task.result(timeout=10)
            assert started == [0, 1, 2]
    finally:
        sc.stop()
