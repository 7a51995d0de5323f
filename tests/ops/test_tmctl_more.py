"""tmctl's rough edges against a real etcd (issue 20 item 9): ``--json`` after the verb,
``purge --queue``, ``retry --queue``, ``ls --older-than``, the connected workers, a
closed pipe, and an endpoint that does not answer."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tm_sidecar.core import (
    Keyspace,
    NodeId,
    NodeInfo,
    Put,
    Record,
    State,
    TaskError,
    TaskId,
    TaskOptions,
    TaskSpec,
    Txn,
)
from tm_sidecar.etcd import SyncEtcd
from tm_sidecar.ops._embedded import EtcdProcess
from tm_sidecar.ops._tmctl import main

from .test_tmctl import tmctl


def put_task(
    db: SyncEtcd, ks: Keyspace, tid: str, state: State, queue: str, since_at: float
) -> None:
    """A task with its payload and a record in ``state``."""
    options = TaskOptions(queue=queue)
    spec = TaskSpec(id=TaskId(tid), payload={}, options=options, created_at=since_at)
    error = TaskError(type="Boom", message="x") if state is State.FAILED else None
    rec = Record(state=state, options=options, attempts=1, since_at=since_at, error=error)
    writes = (
        Put(ks.task(TaskId(tid)), spec.to_json()),
        Put(ks.state(state, TaskId(tid)), rec.to_json()),
    )
    assert db.txn(Txn(success=writes)).succeeded


def ids(out: str) -> set[str]:
    return {row["task_id"] for row in json.loads(out)}


def test_json_after_the_verb_and_queue_filters(
    etcd_server: EtcdProcess, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ep, ks = etcd_server.endpoint, Keyspace(namespace=namespace)
    db = SyncEtcd(ep)
    now = time.time()
    for tid, queue, age_s in (("a1", "a", 7200), ("a2", "a", 10), ("b1", "b", 7200)):
        put_task(db, ks, tid, State.FAILED, queue, now - age_s)
    put_task(db, ks, "c1", State.COMPLETED, "a", now)
    put_task(db, ks, "c2", State.COMPLETED, "b", now)

    # --json after the verb, as before it; without it, a table.
    code, out = tmctl(capsys, ep, namespace, "ls", "failed", "--json")
    assert code == 0
    assert ids(out) == {"a1", "a2", "b1"}
    assert ids(tmctl(capsys, ep, namespace, "--json", "ls", "failed")[1]) == {"a1", "a2", "b1"}
    assert tmctl(capsys, ep, namespace, "ls", "failed")[1].startswith("TASK")

    # --older-than: in this state for longer than ten minutes.
    code, out = tmctl(capsys, ep, namespace, "ls", "failed", "--older-than", "10m", "--json")
    assert ids(out) == {"a1", "b1"}
    older = ("ls", "failed", "--older-than", "1h", "--queue", "a", "--json")
    assert ids(tmctl(capsys, ep, namespace, *older)[1]) == {"a1"}
    assert (
        ids(tmctl(capsys, ep, namespace, "ls", "failed", "--older-than", "3h", "--json")[1])
        == set()
    )
    assert tmctl(capsys, ep, namespace, "ls", "failed", "--older-than", "soon")[0] == 2

    # retry --queue: the failed tasks of one queue, and no other.
    code, out = tmctl(capsys, ep, namespace, "retry", "--queue", "a", "--json")
    assert (code, json.loads(out)) == (0, {"retried": 2})
    assert ids(tmctl(capsys, ep, namespace, "ls", "failed", "--json")[1]) == {"b1"}
    assert ids(tmctl(capsys, ep, namespace, "ls", "pending", "--json")[1]) == {"a1", "a2"}

    # purge --queue: the completed records of one queue, and their payloads.
    code, out = tmctl(
        capsys, ep, namespace, "purge", "completed", "--queue", "b", "--yes", "--json"
    )
    assert (code, json.loads(out)) == (0, {"purged": 1})
    assert ids(tmctl(capsys, ep, namespace, "ls", "completed", "--json")[1]) == {"c1"}
    assert not db.list(ks.task(TaskId("c2")))[0]


def test_workers_lists_each_sidecar_and_its_queues(
    etcd_server: EtcdProcess, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ep, ks = etcd_server.endpoint, Keyspace(namespace=namespace)
    db = SyncEtcd(ep)
    for name, capacity in (("web-1", {"default": 4, "emails": 2}), ("web-2", {"emails": 1})):
        node = NodeInfo(
            id=NodeId(name),
            session=1,
            capacity=capacity,
            host=f"{name}.lan",
            pid=7,
            version="0.1.0",
        )
        assert db.txn(Txn(success=(Put(ks.node(name), node.to_json()),))).succeeded
    assert db.txn(Txn(success=(Put(ks.candidate(1), '{"node":"web-1"}'),))).succeeded
    rec = Record(
        state=State.PROCESSING,
        options=TaskOptions(),
        attempts=1,
        node=NodeId("web-2"),
        since_at=1.0,
    )
    key = ks.state(State.PROCESSING, TaskId("t1"), "web-2")
    assert db.txn(Txn(success=(Put(key, rec.to_json()),))).succeeded

    code, out = tmctl(capsys, ep, namespace, "workers", "--json")
    assert code == 0
    rows = {row["node"]: row for row in json.loads(out)}
    assert rows["web-1"]["capacity"] == {"default": 4, "emails": 2}
    assert (rows["web-1"]["leader"], rows["web-2"]["leader"]) == (True, False)
    assert (rows["web-1"]["in_flight"], rows["web-2"]["in_flight"]) == (0, 1)
    assert rows["web-2"]["host"] == "web-2.lan"
    code, out = tmctl(capsys, ep, namespace, "workers")
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["NODE", "HOST", "PID", "QUEUE"]
    assert len(lines) == 4  # a row per node and queue


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(Path.cwd())}


def test_a_closed_pipe_ends_tmctl_quietly(etcd_server: EtcdProcess, namespace: str) -> None:
    ks = Keyspace(namespace=namespace)
    db = SyncEtcd(etcd_server.endpoint)
    for i in range(200):
        put_task(db, ks, f"t{i:03}", State.PENDING, "default", time.time())
    args = ["--etcd", etcd_server.endpoint, "--namespace", namespace, "ls", "pending"]
    read, write = os.pipe()
    os.close(read)  # the reader (``head``) is gone before tmctl writes a line
    try:
        run = subprocess.run(
            [sys.executable, "-c", "from tm_sidecar.ops._tmctl import main; main()", *args],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
            timeout=60,
        )
    finally:
        os.close(write)
    assert "Traceback" not in run.stderr
    assert "BrokenPipeError" not in run.stderr
    assert run.returncode == 141


def test_endpoint_warns_when_it_does_not_answer(
    etcd_server: EtcdProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens once closed
    with pytest.raises(SystemExit) as exit_:
        main(["--etcd", dead, "endpoint"])
    captured = capsys.readouterr()
    assert (exit_.value.code, captured.out.strip()) == (0, dead)
    assert f"warning: {dead} does not answer" in captured.err

    code, out = tmctl(capsys, etcd_server.endpoint, "x", "endpoint")
    assert (code, out.strip()) == (0, etcd_server.endpoint)
    assert capsys.readouterr().err == ""  # it answers: no warning


def test_limit_takes_a_rate_with_the_slack_of_the_delivery(
    etcd_server: EtcdProcess, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ep = etcd_server.endpoint
    code, out = tmctl(capsys, ep, namespace, "limit", "q", "--rate", "5/2s+50ms", "--json")
    assert code == 0
    assert json.loads(out)["q"]["rate"] == {"limit": 5, "period_s": 2.0, "slack_s": 0.05}
    assert "5/2s+0.05s" in tmctl(capsys, ep, namespace, "queues")[1]
    assert tmctl(capsys, ep, namespace, "limit", "q", "--rate", "5/2s+soon")[0] == 2
