"""Batched deliveries and outcomes against a real sidecar (docs/protocol.md, "Batches"):
``tasks`` pushes to a worker registered with ``batch``, many outcomes in one ``report``
answered per item, bad items refused one by one with nothing lost, and a delivery's
first outcome standing against any later report."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.procs import SidecarProcess
from tests.server.test_protocol import Raw, hello
from tm_sidecar.ops._embedded import EtcdProcess
from tm_sidecar.server._workers import MAX_REPORT_ITEMS

queues = (f"rb{i}" for i in itertools.count())


@pytest.fixture(scope="module")
def sidecar(
    etcd_server: EtcdProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarProcess]:
    d = tmp_path_factory.mktemp("batched")
    proc = SidecarProcess("batched", etcd_server.endpoint, "batched", d / "s.log", lease_ttl_s=5)
    proc.start()
    deadline = time.monotonic() + 20
    while True:
        try:
            Raw(proc.socket_path).close()
            break
        except OSError:
            assert time.monotonic() < deadline, proc.log()[-2000:]
            time.sleep(0.05)
    yield proc
    proc.stop()


def create(raw: Raw, queue: str, n: int, payload: Any = None) -> list[str]:
    ids = []
    for i in range(n):
        answer = raw.call(
            "create", payload={"i": i} if payload is None else payload, options={"queue": queue}
        )
        assert answer["ok"], answer
        ids.append(answer["result"]["task_id"])
    return ids


def take_pushes(raw: Raw, kind: str, count: int) -> list[dict[str, Any]]:
    """Pushes of ``kind`` until they carry ``count`` deliveries (others are kept)."""
    found: list[dict[str, Any]] = []
    carried = 0
    deadline = time.monotonic() + 30
    while carried < count:
        assert time.monotonic() < deadline, f"{carried} of {count} deliveries came"
        frame = raw.pushed.pop(0) if raw.pushed else raw.frame()
        assert frame is not None, "the sidecar closed the connection"
        if frame.get("push") == kind:
            found.append(frame)
            carried += len(frame["tasks"]) if kind == "tasks" else 1
    return found


def deliveries(pushes: list[dict[str, Any]]) -> dict[str, int]:
    """Task id to delivery, from ``tasks`` pushes."""
    return {item["task"]["id"]: item["delivery"] for p in pushes for item in p["tasks"]}


def state_of(raw: Raw, task_id: str) -> dict[str, Any]:
    answer = raw.call("wait", task_id=task_id, timeout_s=30)
    assert answer["ok"], answer
    return dict(answer["result"])


def test_a_batched_worker_takes_a_burst_in_few_pushes_and_reports_it_in_one_frame(
    sidecar: SidecarProcess,
) -> None:
    queue = next(queues)
    raw = hello(sidecar.socket_path)
    ids = create(raw, queue, 30)
    assert raw.call("register", queue=queue, concurrency=30, batch=True)["ok"]
    pushes = take_pushes(raw, "tasks", 30)
    by_task = deliveries(pushes)
    assert set(by_task) == set(ids)
    # Each task whole, its payload as created (sent on as its creator encoded it).
    tasks = [item["task"] for p in pushes for item in p["tasks"]]
    assert {t["id"]: t["payload"] for t in tasks} == {t: {"i": i} for i, t in enumerate(ids)}
    assert all(set(t) == {"id", "payload", "attempt", "options", "created_at"} for t in tasks)
    assert all(t["attempt"] == 1 and t["options"]["queue"] == queue for t in tasks)
    # The burst came in fewer frames than tasks, at least one of them carrying many.
    assert len(pushes) < len(ids)
    assert max(len(p["tasks"]) for p in pushes) > 1
    assert all(p["worker"] == pushes[0]["worker"] for p in pushes)
    # One report for all of them: each outcome answered in order.
    outcomes: list[dict[str, Any]] = [
        {"delivery": by_task[t], "complete": {"n": n}} for n, t in enumerate(ids[:-2])
    ]
    outcomes.append({"delivery": by_task[ids[-2]], "progress": {"half": True}})
    outcomes.append({"delivery": by_task[ids[-2]], "fail": {"type": "Boom", "retryable": False}})
    outcomes.append({"delivery": by_task[ids[-1]], "snooze": 3600})
    answer = raw.call("report", outcomes=outcomes)
    assert answer["ok"], answer
    assert answer["result"]["results"] == [{"ok": True, "result": True}] * len(outcomes)
    for n, task_id in enumerate(ids[:-2]):
        done = state_of(raw, task_id)
        assert (done["state"], done["result"], done["attempts"]) == ("completed", {"n": n}, 1)
    failed = state_of(raw, ids[-2])
    assert (failed["state"], failed["error"]["type"]) == ("failed", "Boom")
    snoozed = raw.call("get", task_id=ids[-1])["result"]
    assert snoozed["state"] == "delayed"
    raw.close()


def test_a_report_with_bad_items_answers_each_and_loses_nothing(sidecar: SidecarProcess) -> None:
    queue = next(queues)
    raw = hello(sidecar.socket_path)
    ids = create(raw, queue, 3)
    assert raw.call("register", queue=queue, concurrency=3, batch=True)["ok"]
    by_task = deliveries(take_pushes(raw, "tasks", 3))
    d0, d1, d2 = (by_task[t] for t in ids)
    unknown = max(d0, d1, d2) + 10_000
    outcomes: list[Any] = [
        {"delivery": d0, "complete": "zero"},
        "not an object",
        {"delivery": unknown, "complete": 1},  # an unknown delivery among known ones
        {"delivery": d1},  # no kind
        {"delivery": d1, "complete": 1, "fail": {}},  # two kinds
        {"delivery": d1, "fail": "not an error object"},
        {"delivery": d1, "snooze": "soon"},
        {"delivery": d1, "release": False},
        {"delivery": "d1", "complete": 1},
        {"delivery": d1, "complete": "one"},
        {"delivery": d0, "release": True},  # after its complete: the complete stands
    ]
    answer = raw.call("report", outcomes=outcomes)
    assert answer["ok"], answer
    results = answer["result"]["results"]
    assert len(results) == len(outcomes)
    ok = [r["ok"] for r in results]
    assert ok == [True, False, False, False, False, False, False, False, False, True, False]
    for r in results:
        if not r["ok"]:
            assert r["error"]["code"] == "invalid_request", r
    assert "no such delivery" in results[2]["error"]["message"]
    assert "reported already" in results[10]["error"]["message"]
    assert state_of(raw, ids[0])["result"] == "zero"
    assert state_of(raw, ids[1])["result"] == "one"
    # The third, not reported, is still this worker's to finish.
    assert raw.call("get", task_id=ids[2])["result"]["state"] == "processing"
    done = raw.call("report", outcomes=[{"delivery": d2, "complete": 2}])
    assert done["result"]["results"] == [{"ok": True, "result": True}]
    assert state_of(raw, ids[2])["result"] == 2
    raw.close()


def test_an_oversized_or_malformed_report_is_refused_whole(sidecar: SidecarProcess) -> None:
    queue = next(queues)
    raw = hello(sidecar.socket_path)
    (task_id,) = create(raw, queue, 1)
    assert raw.call("register", queue=queue, concurrency=1, batch=True)["ok"]
    (delivery,) = deliveries(take_pushes(raw, "tasks", 1)).values()
    too_many = [{"delivery": delivery, "complete": "taken?"}] + [
        {"delivery": delivery + 1 + i, "complete": i} for i in range(MAX_REPORT_ITEMS)
    ]
    refused = raw.call("report", outcomes=too_many)
    assert refused["error"]["code"] == "invalid_request"
    assert "nothing was taken" in refused["error"]["message"]
    malformed: list[Any] = [[], {"delivery": delivery, "complete": 1}, None]
    for bad in malformed:
        assert raw.call("report", outcomes=bad)["error"]["code"] == "invalid_request"
    assert raw.call("register", queue=queue, batch="yes")["error"]["code"] == "invalid_request"
    # Nothing of the refused reports was taken: the delivery is still open.
    assert raw.call("get", task_id=task_id)["result"]["state"] == "processing"
    answer = raw.call("report", outcomes=[{"delivery": delivery, "complete": "now"}])
    assert answer["result"]["results"][0]["ok"]
    assert state_of(raw, task_id)["result"] == "now"
    raw.close()


def test_a_release_after_a_complete_does_not_hand_the_task_back(sidecar: SidecarProcess) -> None:
    """Issue 20 item 12: a second report of a delivery, before the agent has committed
    the first, is refused; the first outcome stands."""
    queue = next(queues)
    raw = hello(sidecar.socket_path)
    first, second = create(raw, queue, 2)
    assert raw.call("register", queue=queue, concurrency=2)["ok"]
    by_task = {p["task"]["id"]: p["delivery"] for p in take_pushes(raw, "task", 2)}
    # In one report, in order: the complete is taken, the release refused.
    answer = raw.call(
        "report",
        outcomes=[
            {"delivery": by_task[first], "complete": 7},
            {"delivery": by_task[first], "release": True},
        ],
    )
    taken, refused = answer["result"]["results"]
    assert taken == {"ok": True, "result": True}
    assert refused["ok"] is False
    assert refused["error"]["code"] == "invalid_request"
    done = state_of(raw, first)
    assert (done["state"], done["result"], done["attempts"]) == ("completed", 7, 1)
    # As single ops in one write: served concurrently, so either may come first, but
    # only that one is taken.
    delivery = by_task[second]
    raw.send(
        json.dumps({"id": "c", "op": "complete", "delivery": delivery, "result": 8}).encode()
        + b"\n"
        + json.dumps({"id": "r", "op": "release", "delivery": delivery}).encode()
        + b"\n"
    )
    answers: dict[str, dict[str, Any]] = {}
    while len(answers) < 2:
        frame = raw.frame()
        assert frame is not None
        if frame.get("id") in ("c", "r"):
            answers[frame["id"]] = frame
        else:
            raw.pushed.append(frame)
    assert [answers["c"]["ok"], answers["r"]["ok"]].count(True) == 1, answers
    if answers["c"]["ok"]:
        done = state_of(raw, second)
        assert (done["state"], done["result"], done["attempts"]) == ("completed", 8, 1)
        assert not [p for p in raw.pushed if p.get("push") == "task"], "handed back"
    else:
        # The release came first: the task is handed back and comes again, same attempt.
        (again,) = take_pushes(raw, "task", 1)
        assert (again["task"]["id"], again["task"]["attempt"]) == (second, 1)
    raw.close()


def test_tasks_pushes_stay_within_max_frame(sidecar: SidecarProcess) -> None:
    queue = next(queues)
    raw = hello(sidecar.socket_path)
    big = "x" * (200 * 1024)
    ids = create(raw, queue, 7, payload=big)
    assert raw.call("register", queue=queue, concurrency=7, batch=True)["ok"]
    lines: list[int] = []
    found: dict[str, int] = {}
    deadline = time.monotonic() + 30
    while len(found) < len(ids):
        assert time.monotonic() < deadline
        while b"\n" not in raw.buffer:
            chunk = raw.sock.recv(1 << 20)
            assert chunk, "the sidecar closed the connection"
            raw.buffer += chunk
        line, raw.buffer = raw.buffer.split(b"\n", 1)
        frame = json.loads(line)
        if frame.get("push") == "tasks":
            lines.append(len(line))
            found.update(deliveries([frame]))
    assert set(found) == set(ids)
    # 7 tasks of 200 KiB do not fit one frame: cut into several, each within max_frame.
    assert len(lines) > 1
    assert max(lines) <= 1024 * 1024
    outcomes = [{"delivery": d, "complete": None} for d in found.values()]
    assert all(r["ok"] for r in raw.call("report", outcomes=outcomes)["result"]["results"])
    raw.close()


def test_the_hello_announces_report(sidecar: SidecarProcess) -> None:
    raw = Raw(Path(sidecar.socket_path))
    assert "report" in raw.call("hello", version=1)["result"]["ops"]
    raw.close()


def test_a_worker_registered_again_on_one_connection_gets_each_task_once(
    sidecar: SidecarProcess,
) -> None:
    queue = next(queues)
    raw = hello(sidecar.socket_path)
    first = raw.call("register", queue=queue, concurrency=2, batch=True)["result"]["worker"]
    assert raw.call("unregister", worker=first)["result"] is True
    second = raw.call("register", queue=queue, concurrency=2, batch=True)["result"]["worker"]
    ids = create(raw, queue, 4)
    pushes = take_pushes(raw, "tasks", 2)
    assert {p["worker"] for p in pushes} == {second}
    by_task = deliveries(pushes)
    assert len(by_task) == 2  # the window: two at a time
    outcomes = [{"delivery": d, "complete": t} for t, d in by_task.items()]
    assert all(r["ok"] for r in raw.call("report", outcomes=outcomes)["result"]["results"])
    rest = deliveries(take_pushes(raw, "tasks", 2))
    assert set(rest) | set(by_task) == set(ids)
    outcomes = [{"delivery": d, "complete": t} for t, d in rest.items()]
    assert all(r["ok"] for r in raw.call("report", outcomes=outcomes)["result"]["results"])
    for task_id in ids:
        assert state_of(raw, task_id)["result"] == task_id
    raw.close()
