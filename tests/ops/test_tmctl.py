"""tmctl against a real etcd: status, ls, show, retry, cancel, purge, leader, --json."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tm_sidecar.core import (
    Delete,
    Keyspace,
    NodeId,
    NodeInfo,
    Put,
    Range,
    Record,
    State,
    TaskError,
    TaskId,
    TaskOptions,
    TaskSpec,
    Txn,
    initial_record,
    plan_create,
)
from tm_sidecar.etcd import SyncEtcd
from tm_sidecar.ops._embedded import EtcdProcess
from tm_sidecar.ops._tmctl import main


def tmctl(
    capsys: pytest.CaptureFixture[str], endpoint: str, ns: str, *args: str
) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        main(["--etcd", endpoint, "--namespace", ns, *args])
    return int(exit_.value.code or 0), capsys.readouterr().out


def seed(db: SyncEtcd, ks: Keyspace) -> None:
    now = time.time()
    for i in range(3):
        spec = TaskSpec(id=TaskId(f"t{i}"), payload={"i": i}, options=TaskOptions(), created_at=now)
        rec = initial_record(
            Record(state=State.PENDING, options=spec.options, since_at=now), now=now, run_at=None
        )
        assert db.txn(plan_create(ks, spec, rec)).succeeded
    # t2 has failed for good
    failed = Record(
        state=State.FAILED, attempts=3, since_at=now, error=TaskError(type="Boom", message="x")
    )
    db.txn(Txn(success=(Delete(ks.state(State.PENDING, TaskId("t2"))),)))
    db.txn(Txn(success=(Put(ks.state(State.FAILED, TaskId("t2")), failed.to_json()),)))
    node = NodeInfo(id=NodeId("web-1"), session=1, capacity={"default": 4}, host="h", pid=42)
    db.txn(
        Txn(
            success=(
                Put(ks.node("web-1"), node.to_json()),
                Put(ks.candidate(1), '{"node":"web-1"}'),
            )
        )
    )


def test_tmctl_reads_and_repairs(
    etcd_server: EtcdProcess, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ep, ks = etcd_server.endpoint, Keyspace(namespace=namespace)
    seed(SyncEtcd(ep), ks)

    code, out = tmctl(capsys, ep, namespace, "--json", "status")
    status = json.loads(out)
    assert code == 0
    assert status["depths"]["pending"] == 2
    assert status["depths"]["failed"] == 1
    assert status["leader"] == "web-1"
    assert status["nodes"][0]["capacity"] == {"default": 4}

    code, out = tmctl(capsys, ep, namespace, "status")
    assert "pending=2" in out
    assert "web-1" in out

    code, out = tmctl(capsys, ep, namespace, "ls", "pending")
    assert "t0" in out
    assert "t1" in out

    code, out = tmctl(capsys, ep, namespace, "--json", "show", "t2")
    shown = json.loads(out)
    assert (shown["state"], shown["payload"], shown["record"]["error"]["type"]) == (
        "failed",
        {"i": 2},
        "Boom",
    )

    assert tmctl(capsys, ep, namespace, "retry", "t2")[0] == 0
    code, out = tmctl(capsys, ep, namespace, "--json", "show", "t2")
    assert json.loads(out)["state"] == "pending"
    assert json.loads(out)["record"]["attempts"] == 0

    assert tmctl(capsys, ep, namespace, "cancel", "t0")[0] == 0
    code, out = tmctl(capsys, ep, namespace, "--json", "show", "t0")
    assert json.loads(out)["record"]["error"]["type"] == "Cancelled"
    assert tmctl(capsys, ep, namespace, "cancel", "t0")[0] == 1  # already failed

    code, out = tmctl(capsys, ep, namespace, "--json", "purge", "--yes", "failed")
    assert json.loads(out) == {"purged": 1}
    assert tmctl(capsys, ep, namespace, "show", "t0")[0] == 1  # gone, payload too

    code, out = tmctl(capsys, ep, namespace, "leader")
    assert "web-1" in out


def test_tmctl_needs_an_endpoint(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("TM_ETCD", raising=False)
    monkeypatch.setenv("TM_DATA_DIR", str(tmp_path))  # no embedded etcd to find there
    with pytest.raises(SystemExit) as exit_:
        main(["status"])
    assert exit_.value.code == 2
    assert "--etcd" in capsys.readouterr().err


def test_tmctl_events_tails_live_changes(etcd_server: EtcdProcess, namespace: str) -> None:
    import os
    import subprocess
    import sys

    ks = Keyspace(namespace=namespace)
    db = SyncEtcd(etcd_server.endpoint)
    env = {**os.environ, "TM_ETCD": etcd_server.endpoint, "TM_NAMESPACE": namespace}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from tm_sidecar.ops._tmctl import main; main(['--json', 'events'])",
        ],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 20
        line = ""
        n = 0
        while not line:
            assert time.monotonic() < deadline
            # Keep creating tasks until the tail has started and shows one.
            now = time.time()
            spec = TaskSpec(
                id=TaskId(f"ev{n}"), payload=None, options=TaskOptions(), created_at=now
            )
            rec = initial_record(
                Record(state=State.PENDING, options=spec.options, since_at=now),
                now=now,
                run_at=None,
            )
            db.txn(plan_create(ks, spec, rec))
            n += 1
            import select

            if select.select([proc.stdout], [], [], 0.2)[0]:
                line = proc.stdout.readline()
        event = json.loads(line)
        assert event["event"] == "queued"
        assert event["task_id"].startswith("ev")
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_tmctl_retry_all_failed(
    etcd_server: EtcdProcess, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ep, ks = etcd_server.endpoint, Keyspace(namespace=namespace)
    db = SyncEtcd(ep)
    seed(db, ks)
    assert tmctl(capsys, ep, namespace, "cancel", "t0")[0] == 0  # now two failed: t0, t2
    code, out = tmctl(capsys, ep, namespace, "--json", "retry", "--all-failed")
    assert (code, json.loads(out)) == (0, {"retried": 2})
    code, out = tmctl(capsys, ep, namespace, "--json", "status")
    assert json.loads(out)["depths"]["pending"] == 3
    assert json.loads(out)["depths"]["failed"] == 0


def test_tmctl_refuses_to_write_to_a_namespace_of_a_newer_layout(
    etcd_server: EtcdProcess, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ep, ks = etcd_server.endpoint, Keyspace(namespace=namespace)
    db = SyncEtcd(ep)
    seed(db, ks)
    failed = ks.state(State.FAILED, TaskId("t2"))
    db.txn(Txn(success=(Put(ks.layout(), '{"layout":99}'),)))
    with pytest.raises(SystemExit) as exit_:
        main(["--etcd", ep, "--namespace", namespace, "retry", "t2"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "layout is 99" in err
    assert "tmctl will not write to it" in err
    assert db.range(Range(failed)).kvs  # nothing moved
    # Reads still work.
    code, out = tmctl(capsys, ep, namespace, "ls", "pending")
    assert code == 0
    assert "t0" in out
    # Today's layout (or none: a previous release's namespace): writes go through.
    db.txn(Txn(success=(Put(ks.layout(), '{"layout":1}'),)))
    assert tmctl(capsys, ep, namespace, "retry", "t2")[0] == 0
    assert not db.range(Range(failed)).kvs
