"""The SDK at its edges (issue 11), against real tm-sidecar processes on a real etcd."""

from __future__ import annotations

import math
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from taskmanager import (
    EVENTS,
    BlockingTaskManager,
    InvalidRequest,
    PayloadTooLarge,
    Permanent,
    Task,
    TaskFailed,
    TaskManager,
    TaskNotFound,
    Unavailable,
    WorkerTask,
)

from tests.helpers import Observed
from tests.procs import ROOT, SidecarProcess, sidecars
from tests.sdk.test_sdk import _env
from tm_sidecar.ops._embedded import EtcdProcess

BIG = "x" * 1_100_000  # over the sidecar's max_frame (1 MiB)


async def test_a_frame_over_max_frame_is_refused_before_sending(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    async with sidecars(etcd_server, namespace, tmp_path, "n1") as (sc,):
        async with TaskManager(str(sc.socket_path)) as manager:
            big = await manager.create({"blob": BIG})
            with trio.fail_after(10), pytest.raises(PayloadTooLarge, match="max_frame"):
                await big.commit()
            # The same manager goes on working, on the same connection.
            small = await (await manager.create({"n": 1})).commit()
            assert (await manager.get(small.id))["state"] == "pending"
            assert manager._connections == 1

        def blocking() -> str:
            with BlockingTaskManager(str(sc.socket_path)) as tm:
                started = time.monotonic()
                with pytest.raises(PayloadTooLarge):
                    tm.create({"blob": BIG}).commit()
                assert time.monotonic() - started < 5
                return tm.create({"n": 2}).commit().id

        task_id = await trio.to_thread.run_sync(blocking)
        async with TaskManager(str(sc.socket_path)) as manager:
            assert (await manager.get(task_id))["state"] == "pending"
        # The frame never reached the sidecar: it refused nothing, closed nothing.
        assert "frame over" not in sc.log()


async def test_a_result_over_max_frame_fails_that_attempt_and_the_worker_goes_on(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    async with sidecars(etcd_server, namespace, tmp_path, "n1") as (sc,):
        async with TaskManager(str(sc.socket_path)) as manager:

            async def handler(task: WorkerTask) -> Any:
                return BIG if task.data == "big" else task.data

            await manager.process(handler)
            big = await (await manager.create("big")).with_retries(3, base_s=0).commit()
            with pytest.raises(TaskFailed) as failed:
                await big.result(timeout=20)
            after = await (await manager.create("small")).commit()
            assert await after.result(timeout=20) == "small"
            info = await manager.get(big.id)
        assert failed.value.error["type"] == "ResultTooLarge"
        assert failed.value.error["retryable"] is False
        assert info["attempts"] == 1  # not retried: it would fail the same way
        assert "frame over" not in sc.log()


async def test_calls_while_the_sidecar_is_down_raise_unavailable_after_the_connect_timeout(
    tmp_path: Path,
) -> None:
    nowhere = str(tmp_path / "no-sidecar.sock")
    async with TaskManager(nowhere, connect_timeout_s=0.5) as manager:
        started = trio.current_time()
        unreachable = pytest.raises(Unavailable, match=r"no-sidecar\.sock within 0\.5 s")
        with trio.fail_after(5), unreachable:
            await (await manager.create({})).commit()
        assert trio.current_time() - started >= 0.5
        with trio.fail_after(5), pytest.raises(Unavailable):
            await manager.status()

    def blocking() -> None:
        with BlockingTaskManager(nowhere, connect_timeout_s=0.5) as tm:
            with pytest.raises(Unavailable, match="is tm-sidecar running"):
                tm.create({}).commit()
            with pytest.raises(Unavailable):
                tm.get("some-task")

    with trio.fail_after(10):
        await trio.to_thread.run_sync(blocking)


async def test_a_sidecar_gone_while_connected_gives_unavailable_then_recovers(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    async with (
        sidecars(etcd_server, namespace, tmp_path, "n1") as (sc,),
        TaskManager(str(sc.socket_path), connect_timeout_s=0.5) as manager,
    ):
        assert (await manager.status())["node"] == "n1"
        sc.kill()
        with trio.fail_after(5), pytest.raises(Unavailable, match=r"within 0\.5 s"):
            await manager.status()
        sc.start()
        await sc.wait_serving()
        with trio.fail_after(20):
            while True:
                try:
                    assert (await manager.status())["node"] == "n1"
                    break
                except Unavailable:
                    continue


async def test_every_event_name_is_taken_by_manager_on(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    async with sidecars(etcd_server, namespace, tmp_path, "n1") as (sc,):
        async with TaskManager(str(sc.socket_path)) as manager:
            heard: Observed[tuple[str, str]] = Observed()
            for name in EVENTS:
                manager.on(name, lambda event, name=name: heard.add((name, event["task_id"])))
            await manager.wait_subscribed()

            async def handler(task: WorkerTask) -> str:
                if task.data == "bad":
                    raise Permanent("no")
                await task.update({"half": True})
                return "ok"

            await manager.process(handler)
            good = await (await manager.create("good")).commit()
            bad = await (await manager.create("bad")).commit()
            await good.result(timeout=10)
            with pytest.raises(TaskFailed):
                await bad.result(timeout=10)
            await heard.wait_until(lambda h: ("success", good.id) in h and ("failure", bad.id) in h)
        names_good = {name for name, tid in heard.items if tid == good.id}
        names_bad = {name for name, tid in heard.items if tid == bad.id}
        assert {"queued", "assigned", "started", "updated", "completed", "success"} <= names_good
        assert "failure" not in names_good
        assert {"failed", "failure"} <= names_bad
        assert "success" not in names_bad


async def test_result_and_wait_by_task_id_from_another_process_and_blocking_parity(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    async with sidecars(etcd_server, namespace, tmp_path, "n1") as (sc,):
        sock = str(sc.socket_path)
        release = trio.Event()
        async with TaskManager(sock) as worker, TaskManager(sock) as waiter:

            async def handler(task: WorkerTask) -> Any:
                await release.wait()
                if task.data == "bad":
                    raise Permanent("refused")
                return {"done": task.data}

            await worker.process(handler, concurrency=4)

            def produce() -> tuple[str, str, str, dict[str, Any]]:
                with BlockingTaskManager(sock) as tm:
                    queued: list[str] = []
                    heard = threading.Event()

                    def on_queued(event: dict[str, Any]) -> None:
                        queued.append(event["task_id"])
                        if len(queued) == 4:  # three from the manager, one from the task
                            heard.set()

                    tm.on("queued", on_queued)
                    good = tm.create("good", task_id="parity-good").with_delay(0.2)
                    good.with_priority(2).with_retries(2).on("queued", on_queued).commit()
                    bad = tm.create("bad").commit()
                    later = tm.submit("later", max_attempts=1)
                    assert heard.wait(10), queued
                    assert sorted(queued) == sorted([good.id, good.id, bad.id, later.id])
                    return good.id, bad.id, later.id, tm.status()

            good_id, bad_id, later_id, status = await trio.to_thread.run_sync(produce)
            assert good_id == "parity-good"
            assert status["node"] == "n1"
            # A process that did not make the tasks waits for them by id.
            async with trio.open_nursery() as nursery:
                results: dict[str, Any] = {}

                async def wait_result() -> None:
                    results["good"] = await waiter.result(good_id, timeout=20)

                async def wait_bad() -> None:
                    with pytest.raises(TaskFailed) as err:
                        await waiter.result(bad_id, timeout=20)
                    results["bad"] = err.value.error["message"]

                nursery.start_soon(wait_result)
                nursery.start_soon(wait_bad)
                release.set()
            assert results == {"good": {"done": "good"}, "bad": "refused"}
            # Already finished: answered at once; wait() returns the record.
            assert await waiter.result(good_id, timeout=5) == {"done": "good"}
            final = await waiter.wait(later_id, timeout=20)
            assert final["state"] == "completed"
            assert (await waiter.wait(bad_id, timeout=5))["state"] == "failed"
            with pytest.raises(TaskNotFound):
                await waiter.result("no-such-task", timeout=5)
            info = await waiter.get(good_id)
            assert info["options"]["priority"] == 2
            assert info["options"]["max_attempts"] == 2

            def blocking_waits() -> tuple[Any, dict[str, Any]]:
                with BlockingTaskManager(sock) as tm:
                    return tm.result(good_id, timeout=10), tm.wait(bad_id, timeout=10)

            value, bad_info = await trio.to_thread.run_sync(blocking_waits)
        assert value == {"done": "good"}
        assert bad_info["error"]["message"] == "refused"


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"a": {1: "x"}}, "data['a'] has the key 1 (int)"),
        ({"a": [1, math.nan]}, "data['a'][1] is nan"),
        ({"when": time}, "data['when'] is a module"),
        ([{"s": {1, 2}}], "data[0]['s'] is a set"),
        (math.inf, "data is inf"),
    ],
)
async def test_data_that_is_not_json_is_refused_at_create_naming_the_field(
    data: Any, path: str, tmp_path: Path
) -> None:
    # Refused before any connection is tried: no sidecar is needed to say so.
    manager = TaskManager(str(tmp_path / "none.sock"))
    with pytest.raises(InvalidRequest, match=re.escape(path)):
        await manager.create(data)
    in_options = path.replace("data", "the options['queue']", 1)
    with pytest.raises(InvalidRequest, match=re.escape(in_options)):
        await manager.submit({}, queue=data)


async def test_options_of_the_wrong_type_are_invalid_requests(tmp_path: Path) -> None:
    manager = TaskManager(str(tmp_path / "none.sock"))
    task = Task(manager, {"ok": True})
    with pytest.raises(InvalidRequest, match="priority"):
        task.with_priority("high")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="timeout"):
        task.with_timeout(math.nan)
    with pytest.raises(InvalidRequest, match="timeout"):
        task.with_timeout(-1)
    with pytest.raises(InvalidRequest, match="max_attempts"):
        task.with_retries(0)
    with pytest.raises(InvalidRequest, match="base_s"):
        task.with_retries(2, base_s="1")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="queue"):
        task.with_queue(3)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="delay"):
        task.with_delay_until(math.inf)
    with pytest.raises(InvalidRequest, match="unknown event"):
        manager.on("finished", print)
    assert task.options == {}


@pytest.mark.parametrize("before", ["used", "fresh"])
async def test_the_blocking_facade_reconnects_in_a_forked_child(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path, before: str
) -> None:
    sc = SidecarProcess("n1", etcd_server.endpoint, namespace, tmp_path / "n1.log")
    sc.start()
    try:
        await sc.wait_serving()
        with trio.fail_after(60):
            run = await trio.run_process(
                [sys.executable, str(ROOT / "tests" / "sdk_fork.py"), before],
                env=_env(sc.socket_path),
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    finally:
        sc.stop()
    out = run.stdout.decode().split("\n")
    assert run.returncode == 0, (out, run.stderr.decode()[-3000:])
    assert "child n1" in out
    assert "parent-after n1" in out
    assert ("parent-before n1" in out) == (before == "used")


@pytest.mark.parametrize(
    ("signum", "hang", "backend"),
    [
        (signal.SIGTERM, False, "asyncio"),
        (signal.SIGINT, True, "asyncio"),
        (signal.SIGINT, False, "trio"),
        (signal.SIGTERM, True, "trio"),
    ],
)
async def test_run_worker_shuts_down_gracefully_on_sigterm_and_ctrl_c(
    etcd_server: EtcdProcess,
    namespace: str,
    tmp_path: Path,
    signum: signal.Signals,
    hang: bool,
    backend: str,
) -> None:
    async with sidecars(etcd_server, namespace, tmp_path, "n1", lease_ttl_s=30) as (sc,):
        proc = await trio.lowlevel.open_process(
            [
                sys.executable,
                str(ROOT / "tests" / "sdk_signal_worker.py"),
                backend,
                "0.3" if hang else "10",
            ],
            env=_env(sc.socket_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None
        assert proc.stderr is not None
        out: list[bytes] = []
        err: list[bytes] = []
        started = trio.Event()

        async def drain(stream: trio.abc.ReceiveStream, into: list[bytes]) -> None:
            while chunk := await stream.receive_some(65536):
                into.append(bytes(chunk))
                if b"started" in b"".join(out):
                    started.set()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain, proc.stdout, out)
                nursery.start_soon(drain, proc.stderr, err)
                async with TaskManager(str(sc.socket_path)) as producer:
                    task = (
                        await (await producer.create({"hang": hang}))
                        .with_retries(3, base_s=0)
                        .commit()
                    )
                    with trio.fail_after(20):
                        await started.wait()  # the task runs in the worker process
                    proc.send_signal(signum)
                    with trio.fail_after(20):
                        code = await proc.wait()
                    if hang:  # handed back: another worker finishes it at once

                        async def rescuer(t: WorkerTask) -> int:
                            return t.attempt

                        await producer.process(rescuer)
                    result = await task.result(timeout=20)
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
    stdout, stderr = b"".join(out).decode(), b"".join(err).decode()
    assert code == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    assert f"received {signum.name}: shutting down" in stderr
    assert "exited by itself" in stdout
    # A hand-back spends no attempt: the task runs again as attempt 1.
    assert result == (1 if hang else "finished")
