"""What a timeout does to a plain (sync) handler (issue 20 item 2): in a thread it runs
on, but keeps its concurrency slot until it returns, so that its retry never runs beside
it; in a process pool (``pool="process"``) it is killed at once. Against a real sidecar.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
from taskmanager import InvalidRequest, TaskFailed, TaskManager, WorkerTask

from tests.helpers import wait_for
from tests.procs import ROOT, sidecars
from tests.sdk_pool_handlers import hangs_first, steers
from tm_sidecar.ops._embedded import EtcdProcess


def _notes(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


async def test_a_timed_out_thread_keeps_its_slot_and_its_retry_waits_for_it(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    events: list[tuple[str, int]] = []
    release = threading.Event()

    def handler(task: WorkerTask) -> int:
        events.append(("start", task.attempt))
        if task.attempt == 1:
            release.wait(60)  # runs on well past its timeout
        events.append(("end", task.attempt))
        return task.attempt

    async with (
        sidecars(etcd_server, namespace, tmp_path, "n1") as (sc,),
        TaskManager(str(sc.socket_path)) as manager,
    ):
        worker = await manager.process(handler, concurrency=1)
        task = await (await manager.create({})).with_timeout(1).with_retries(6, base_s=0).commit()
        # Attempt 1 times out; the sidecar pushes its retry to this worker, whose one
        # slot the thread still holds.
        await wait_for(lambda: ("start", 2) in events or worker.runner.waiting == 1, 30)
        assert ("start", 2) not in events, f"a retry ran beside its timed-out thread: {events}"
        assert worker.runner.overdue == 1
        release.set()
        last = await task.result(timeout=60)
    assert last >= 2
    # One at a time, in order: attempt 1 ended before any other started.
    assert events[:2] == [("start", 1), ("end", 1)], events
    assert events[-2:] == [("start", last), ("end", last)], events
    assert worker.runner.overdue == 0


async def test_the_process_pool_kills_a_handler_at_its_timeout(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    log = tmp_path / "hangs.log"
    async with (
        sidecars(etcd_server, namespace, tmp_path, "n1") as (sc,),
        TaskManager(str(sc.socket_path)) as manager,
    ):
        worker = await manager.process(hangs_first, pool="process")
        task = await manager.create({"log": str(log)})
        progress: list[Any] = []
        task.on("updated", lambda data, *_: progress.append(data))
        await task.with_timeout(2).with_retries(2, base_s=0).commit()
        result = await task.result(timeout=60)
        info = await manager.get(task.id)
        await manager.shutdown()  # the idle child exits with its pipe
    first, second = _notes(log)
    assert (first["attempt"], second["attempt"]) == (1, 2)
    assert result == {"attempt": 2, "pid": second["pid"]}
    assert second["pid"] != os.getpid()  # in a child, not here
    assert second["pid"] != first["pid"]  # the hung child was not reused: it was killed
    with pytest.raises(ProcessLookupError):
        os.kill(first["pid"], 0)  # and reaped
    assert progress == [{"attempt": 2}]  # update() from a child reaches the task
    assert info["attempts"] == 2
    assert worker.runner.overdue == 0
    await wait_for(lambda: _gone(second["pid"]))


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_a_handler_in_a_child_snoozes_and_fails_for_good_as_in_a_thread(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    log = tmp_path / "steers.log"
    async with (
        sidecars(etcd_server, namespace, tmp_path, "n1") as (sc,),
        TaskManager(str(sc.socket_path)) as manager,
    ):
        await manager.process(steers, pool="process", concurrency=2)
        task = await (await manager.create({"log": str(log), "snooze": True})).commit()
        with pytest.raises(TaskFailed) as failed:
            await task.result(timeout=60)
        info = await manager.get(task.id)
    assert failed.value.error["type"] == "Permanent"
    assert "asked to fail" in failed.value.error["message"]
    assert "Traceback" in failed.value.error["traceback"]
    assert info["attempts"] == 1  # the snooze did not count, the failure was not retried
    assert [n["attempt"] for n in _notes(log)] == [1, 1]


async def test_a_pool_that_cannot_run_the_handler_is_refused_before_connecting() -> None:
    async def asynchronous(task: WorkerTask) -> None:
        return None

    manager = TaskManager("/nonexistent/tm.sock", connect_timeout_s=0.1)
    with pytest.raises(InvalidRequest, match="plain functions"):
        await manager.process(asynchronous, pool="process")
    with pytest.raises(InvalidRequest, match="module-level"):
        await manager.process(lambda task: None, pool="process")
    with pytest.raises(InvalidRequest, match="'thread' or 'process'"):
        await manager.process(hangs_first, pool="fork")


async def test_run_worker_with_a_process_pool_from_a_script(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    async with (
        sidecars(etcd_server, namespace, tmp_path, "n1") as (sc,),
        TaskManager(str(sc.socket_path)) as manager,
    ):
        proc = await trio.lowlevel.open_process(
            [sys.executable, str(ROOT / "tests" / "sdk_pool_worker.py")],
            env={**os.environ, "TM_SOCKET": str(sc.socket_path), "PYTHONPATH": str(ROOT)},
        )
        try:
            task = await (await manager.create(21)).commit()
            result = await task.result(timeout=60)
            assert result["double"] == 42
            assert result["pid"] not in (os.getpid(), proc.pid)  # a child of the worker
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(30):
                assert await proc.wait() == 0
            await wait_for(lambda: _gone(result["pid"]), 30)  # its child went with it
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
