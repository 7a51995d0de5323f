"""The SDK end to end, through the socket of real tm-sidecar processes on a real etcd."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from taskmanager import BlockingTaskManager, Permanent, TaskFailed, TaskManager, WorkerTask

from tests.helpers import Observed
from tests.procs import ROOT, sidecars
from tm_sidecar.ops._embedded import EtcdProcess


def _env(sock: Path) -> dict[str, str]:
    return {**os.environ, "TM_SOCKET": str(sock), "PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
async def test_the_seed_example_runs(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path, backend: str
) -> None:
    async with sidecars(etcd_server, namespace, tmp_path, "n1") as (sc,):
        run = await trio.run_process(
            [sys.executable, str(ROOT / "examples" / "seed_example.py"), backend],
            env=_env(sc.socket_path),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    out = run.stdout.decode()
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    assert "(Master: True) received Task with ID" in out
    assert "success: True" in out
    assert "result: True" in out


async def test_events_callbacks_and_progress_in_order(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    async with sidecars(etcd_server, namespace, tmp_path, "n1") as (sc,):
        async with TaskManager(str(sc.socket_path)) as manager:

            async def handler(task: WorkerTask) -> dict[str, Any]:
                assert await task.update({"done": 0.5})
                return {"echo": task.data, "attempt": task.attempt}

            worker = await manager.process(handler, concurrency=2)
            seen: list[str] = []
            outcome: list[Any] = []
            all_events: Observed[dict[str, Any]] = Observed()
            manager.on("completed", all_events.add)
            await manager.wait_subscribed()
            task = await manager.create({"k": "v"})
            for kind in ("queued", "assigned", "started", "updated", "completed"):
                task.on(kind, lambda *a, kind=kind: seen.append(kind))
            task.on("success", outcome.append)
            task.on("updated", lambda progress: outcome.append(("progress", progress)))
            await task.commit()
            result = await task.result(timeout=10)
            await all_events.wait_until(lambda ev: any(e["task_id"] == task.id for e in ev))
        assert worker.id is not None
        assert result == {"echo": {"k": "v"}, "attempt": 1}
        assert seen == ["queued", "assigned", "started", "updated", "completed"]
        assert outcome == [("progress", {"done": 0.5}), result]


async def test_a_callback_added_after_commit_still_hears_its_event(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    async with sidecars(etcd_server, namespace, tmp_path, "n1") as (sc,):
        async with TaskManager(str(sc.socket_path)) as manager:
            release = trio.Event()

            async def handler(task: WorkerTask) -> str:
                await release.wait()
                return "done"

            await manager.process(handler)
            task = await (await manager.create({})).commit()  # pushes: the outcome only
            started: Observed[Any] = Observed()
            completed: list[Any] = []
            task.on("started", started.add)
            task.on("completed", completed.append)
            await started.wait_until(bool)  # announced while the handler runs
            release.set()
            assert await task.result(timeout=10) == "done"
        assert started.items[0]["event"] == "started"
        # Both subscriptions pushed the outcome; the callback ran once.
        assert completed == ["done"]


async def test_failures_retries_timeouts_and_permanent_errors(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    async with sidecars(etcd_server, namespace, tmp_path, "n1") as (sc):
        async with TaskManager(str(sc[0].socket_path)) as manager:
            cancelled = trio.Event()

            async def handler(task: WorkerTask) -> None:
                kind = task.data["kind"]
                if kind == "slow":
                    try:
                        await trio.sleep(30)
                    finally:
                        cancelled.set()
                if kind == "permanent":
                    raise Permanent("bad input")
                raise ValueError(f"boom {task.attempt}")

            await manager.process(handler, concurrency=3)
            flaky = await manager.create({"kind": "flaky"})
            retries: list[tuple[Any, bool]] = []
            failures: list[Any] = []
            flaky.with_retries(3, base_s=0.05, jitter=0).on(
                "failed", lambda e, r: retries.append((e["type"], r))
            )
            flaky.on("failure", failures.append)
            await flaky.commit()
            slow = (
                await (await manager.create({"kind": "slow"}))
                .with_timeout(0.3)
                .with_retries(1)
                .commit()
            )
            perm = await (await manager.create({"kind": "permanent"})).with_retries(5).commit()
            with pytest.raises(TaskFailed) as flaky_err:
                await flaky.result(timeout=20)
            with pytest.raises(TaskFailed) as slow_err:
                await slow.result(timeout=20)
            with pytest.raises(TaskFailed) as perm_err:
                await perm.result(timeout=20)
            info = await manager.get(perm.id)
        assert retries == [("ValueError", True), ("ValueError", True), ("ValueError", False)]
        assert failures[0]["message"] == "boom 3"
        assert "ValueError" in failures[0]["traceback"]
        assert flaky_err.value.error["type"] == "ValueError"
        assert slow_err.value.error["type"] == "Timeout"
        assert cancelled.is_set()  # the timeout reached the handler in this process
        assert perm_err.value.error["retryable"] is False
        assert info["attempts"] == 1


async def test_delayed_start(etcd_server: EtcdProcess, namespace: str, tmp_path: Path) -> None:
    async with sidecars(etcd_server, namespace, tmp_path, "n1") as (sc,):
        async with TaskManager(str(sc.socket_path)) as manager:
            started: list[float] = []

            def handler(task: WorkerTask) -> str:  # a plain function works too
                started.append(time.time())
                return "later"

            await manager.process(handler)
            task = await manager.create({})
            task.with_delay(1.0)
            assert task.run_at is not None
            await task.commit()
            assert await task.result(timeout=10) == "later"
        assert started[0] >= task.run_at  # never early; how soon after is bench's figure


async def test_many_producers_and_workers_on_two_sidecars(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    async with sidecars(etcd_server, namespace, tmp_path, "a", "b") as (a, b):
        ran_on: dict[str, int] = {}

        def make_handler(node: str) -> Callable[[WorkerTask], Any]:
            async def handler(task: WorkerTask) -> int:
                ran_on[node] = ran_on.get(node, 0) + 1
                await trio.sleep(0.01)
                return int(task.data["n"]) * 2

            return handler

        results: dict[int, Any] = {}
        async with TaskManager(str(a.socket_path)) as wa, TaskManager(str(b.socket_path)) as wb:
            await wa.process(make_handler("a"), concurrency=4)
            await wb.process(make_handler("b"), concurrency=4)

            async def producer(sock: Path, start: int) -> None:
                async with TaskManager(str(sock)) as m:
                    tasks = [
                        await (await m.create({"n": n})).commit() for n in range(start, start + 40)
                    ]
                    for n, t in zip(range(start, start + 40), tasks, strict=True):
                        results[n] = await t.result(timeout=60)

            async with trio.open_nursery() as nursery:
                for i, sock in enumerate(
                    [a.socket_path, b.socket_path, a.socket_path, b.socket_path]
                ):
                    nursery.start_soon(producer, sock, i * 1000)
        assert len(results) == 160
        assert all(v == n * 2 for n, v in results.items())
        assert set(ran_on) == {"a", "b"}


async def test_a_worker_that_dies_mid_task_is_retried_at_once(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    # A long lease: only the connection's loss can explain a prompt retry.
    async with sidecars(etcd_server, namespace, tmp_path, "n1", lease_ttl_s=30) as (sc,):
        proc = await trio.lowlevel.open_process(
            [sys.executable, str(ROOT / "tests" / "sdk_worker.py")],
            env=_env(sc.socket_path),
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None
        lines: list[str] = []

        async def read_until(word: str) -> None:
            buffer = b""
            with trio.fail_after(20):
                while word not in "".join(lines):
                    buffer += await proc.stdout.receive_some(4096)  # type: ignore[union-attr]
                    *done, rest = buffer.split(b"\n")
                    lines.extend(d.decode() for d in done)
                    buffer = rest

        try:
            await read_until("ready")
            async with TaskManager(str(sc.socket_path)) as manager:
                task = await (await manager.create({})).with_retries(3, base_s=0).commit()
                await read_until("started")
                rescued = trio.Event()

                async def rescuer(t: WorkerTask) -> int:
                    rescued.set()
                    return t.attempt

                await manager.process(rescuer)
                proc.kill()
                killed_at = trio.current_time()
                result = await task.result(timeout=20)
                elapsed = trio.current_time() - killed_at
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        assert result == 2
        assert elapsed < 5.0


async def test_graceful_shutdown_finishes_or_hands_back(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    async with sidecars(etcd_server, namespace, tmp_path, "n1") as (sc,):
        sock = str(sc.socket_path)
        async with TaskManager(sock) as producer:
            quitter = TaskManager(sock)
            started = trio.Event()

            async def short(task: WorkerTask) -> str:
                started.set()
                await trio.sleep(0.3)
                return "finished in time"

            await quitter.process(short)
            quick = await (await producer.create({})).commit()
            await started.wait()
            await quitter.shutdown(timeout=5)
            assert await quick.result(timeout=10) == "finished in time"

            stubborn = TaskManager(sock)
            hung = trio.Event()

            async def forever(task: WorkerTask) -> None:
                hung.set()
                await trio.sleep_forever()

            await stubborn.process(forever)
            stuck = await (await producer.create({})).with_retries(2, base_s=0).commit()
            await hung.wait()
            handed_back = trio.current_time()
            await stubborn.shutdown(timeout=0.2)

            async def second(task: WorkerTask) -> int:
                return task.attempt

            await producer.process(second)
            assert await stuck.result(timeout=10) == 1  # the hand-back spent no attempt
            assert trio.current_time() - handed_back < 5


async def test_results_survive_a_sidecar_restart(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    async with (
        sidecars(etcd_server, namespace, tmp_path, "n1") as (sc,),
        TaskManager(str(sc.socket_path)) as producer,
    ):
        task = await (await producer.create({"x": 1})).commit()
        sc.signal(signal.SIGTERM)
        assert sc.proc is not None
        await trio.to_thread.run_sync(sc.proc.wait)
        assert sc.proc.returncode == 0
        sc.start()
        await sc.wait_serving()
        async with TaskManager(str(sc.socket_path)) as worker:

            async def handler(t: WorkerTask) -> str:
                return "after restart"

            await worker.process(handler)
            # The producer reconnected on its own; its pending result still resolves.
            assert await task.result(timeout=20) == "after restart"


async def test_sigterm_drains_the_task_in_flight(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    async with sidecars(etcd_server, namespace, tmp_path, "n1") as (sc,):
        async with TaskManager(str(sc.socket_path)) as manager:
            started = trio.Event()

            async def handler(task: WorkerTask) -> str:
                started.set()
                await trio.sleep(0.5)
                return "drained"

            await manager.process(handler)
            task = await (await manager.create({})).commit()
            await started.wait()
            sc.signal(signal.SIGTERM)
            assert sc.proc is not None
            code = await trio.to_thread.run_sync(sc.proc.wait)
        assert code == 0
        assert 'msg="signal received: draining" signal=SIGTERM' in sc.log()
        # The task finished before the sidecar left; read it through a new sidecar.
        sc.start()
        await sc.wait_serving()
        async with TaskManager(str(sc.socket_path)) as reader:
            info = await reader.get(task.id)
        assert info["state"] == "completed"
        assert info["result"] == "drained"


async def test_blocking_facade_and_socket_permissions(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    async with sidecars(etcd_server, namespace, tmp_path, "n1") as (sc,):
        mode = stat.S_IMODE(os.stat(sc.socket_path).st_mode)
        assert mode == 0o660
        async with TaskManager(str(sc.socket_path)) as worker:

            async def handler(task: WorkerTask) -> int:
                return int(task.data) + 1

            await worker.process(handler)

            def blocking_producer() -> Any:
                with BlockingTaskManager(str(sc.socket_path)) as tm:
                    return tm.create(41).with_timeout(5).commit().result(timeout=20)

            assert await trio.to_thread.run_sync(blocking_producer) == 42
        assert 'msg="client connected" pid=' in sc.log()
        assert f"uid={os.getuid()}" in sc.log()


async def test_callbacks_may_call_the_manager_and_sync_handlers_do_not_block(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    async with (
        sidecars(etcd_server, namespace, tmp_path, "n1") as (sc,),
        TaskManager(str(sc.socket_path)) as manager,
    ):

        def blocking_handler(task: WorkerTask) -> str:
            time.sleep(0.2)  # a plain function may block: it runs in a thread
            return "slept"

        await manager.process(blocking_handler, concurrency=2)
        statuses: list[dict[str, Any]] = []
        done = trio.Event()

        async def on_success(result: Any) -> None:
            statuses.append(await manager.status())  # a request from inside a callback
            done.set()

        task = await (await manager.create({})).on("success", on_success).commit()
        with trio.fail_after(10):
            assert await task.result() == "slept"
            await done.wait()
        assert statuses[0]["node"] == "n1"


async def test_a_handler_may_shut_its_manager_down(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    async with sidecars(etcd_server, namespace, tmp_path, "n1") as (sc,):
        worker = TaskManager(str(sc.socket_path))
        stopped = trio.Event()

        async def last_task(task: WorkerTask) -> None:
            await worker.shutdown(timeout=30)  # it does not wait for this very handler
            stopped.set()

        await worker.process(last_task)
        async with TaskManager(str(sc.socket_path)) as producer:
            await (await producer.create({})).commit()
            with trio.fail_after(10):  # far less than the 30 s timeout
                await stopped.wait()
        assert worker._closing
