"""tmctl at its edges, against a real etcd: finding the embedded etcd by itself, queues
without a worker, a table for ``show``, "not found", and a purge that asks first."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.procs import ROOT
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
    initial_record,
    plan_create,
)
from tm_sidecar.etcd import SyncEtcd
from tm_sidecar.ops._cli import default_data_dir
from tm_sidecar.ops._embedded import EtcdProcess
from tm_sidecar.ops._settings import load_settings
from tm_sidecar.ops._tmctl import build_parser, main


def tmctl(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    captured = capsys.readouterr()
    return int(exit_.value.code or 0), captured.out, captured.err


def create(
    db: SyncEtcd, ks: Keyspace, tid: str, queue: str = "default", delay_s: float = 0
) -> None:
    now = time.time()
    spec = TaskSpec(
        id=TaskId(tid),
        payload={"n": tid},
        options=TaskOptions(queue=queue),
        created_at=now,
        run_at=now + delay_s if delay_s else None,
    )
    rec = initial_record(
        Record(state=State.PENDING, options=spec.options, since_at=now),
        now=now,
        run_at=spec.run_at,
    )
    assert db.txn(plan_create(ks, spec, rec)).succeeded


def fail(db: SyncEtcd, ks: Keyspace, tid: str) -> None:
    """A task in the failed queue, with a traceback."""
    now = time.time()
    spec = TaskSpec(id=TaskId(tid), payload={"n": tid}, created_at=now)
    error = TaskError(type="Boom", message="it broke", traceback="Traceback...\nBoom: it broke")
    rec = Record(state=State.FAILED, attempts=3, since_at=now, error=error)
    put = (
        Put(ks.task(spec.id), spec.to_json()),
        Put(ks.state(State.FAILED, spec.id), rec.to_json()),
    )
    assert db.txn(Txn(success=put)).succeeded


def register(db: SyncEtcd, ks: Keyspace, node: str, capacity: dict[str, int]) -> None:
    info = NodeInfo(id=NodeId(node), session=1, capacity=capacity, host="h", pid=42)
    assert db.txn(Txn(success=(Put(ks.node(node), info.to_json()),))).succeeded


# -- finding the embedded etcd (issue 11 item 8) -----------------------------------------


@pytest.fixture
def no_tm_etcd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TM_ETCD", raising=False)
    monkeypatch.delenv("TM_DATA_DIR", raising=False)


@pytest.mark.usefixtures("no_tm_etcd")
def test_tmctl_finds_the_embedded_etcd_by_its_data_dir(
    etcd_server: EtcdProcess,
    namespace: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    ks = Keyspace(namespace=namespace)
    register(SyncEtcd(etcd_server.endpoint), ks, "web-1", {"default": 2})
    data_dir = str(etcd_server.data_dir)  # it holds the etcd's tm-ports.json, as a sidecar's

    code, out, err = tmctl(capsys, "--data-dir", data_dir, "--namespace", namespace, "endpoint")
    assert (code, out.strip()) == (0, etcd_server.endpoint), err

    code, out, err = tmctl(
        capsys, "--data-dir", data_dir, "--namespace", namespace, "--json", "status"
    )
    assert code == 0, err
    assert [n["id"] for n in json.loads(out)["nodes"]] == ["web-1"]

    monkeypatch.setenv("TM_DATA_DIR", data_dir)
    code, out, err = tmctl(capsys, "--namespace", namespace, "--json", "status")
    assert code == 0, err
    assert [n["id"] for n in json.loads(out)["nodes"]] == ["web-1"]

    # With nothing given, the sidecar's own default data directory.
    monkeypatch.delenv("TM_DATA_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert load_settings("tmctl", build_parser(), ["status"])[1].data_dir == default_data_dir()
    Path(default_data_dir()).mkdir(parents=True)
    shutil.copy(etcd_server.data_dir / "tm-ports.json", default_data_dir())
    code, out, err = tmctl(capsys, "--namespace", namespace, "--json", "status")
    assert code == 0, err
    assert [n["id"] for n in json.loads(out)["nodes"]] == ["web-1"]

    # --etcd still wins (here: a dead one).
    code, _, err = tmctl(capsys, "--etcd", "http://127.0.0.1:1", "--namespace", namespace, "leader")
    assert code == 1
    assert "127.0.0.1:1" in err


@pytest.mark.usefixtures("no_tm_etcd")
def test_tmctl_with_no_etcd_to_find_says_where_it_looked(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = tmctl(capsys, "--data-dir", str(tmp_path), "status")
    assert code == 2
    assert str(tmp_path) in err
    assert "tm-ports.json" in err
    assert "--etcd" in err
    # A data directory whose etcd is not running: the error says so.
    (tmp_path / "tm-ports.json").write_text('{"client": 1, "peer": 2}')
    code, _, err = tmctl(capsys, "--data-dir", str(tmp_path), "status")
    assert code == 1
    assert f"the embedded etcd of {tmp_path}: is its sidecar running?" in err


# -- queues (issue 11 item 13) -------------------------------------------------------------


def test_status_and_ls_show_queues_and_the_ones_no_worker_serves(
    etcd_server: EtcdProcess, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ep, ks = etcd_server.endpoint, Keyspace(namespace=namespace)
    db = SyncEtcd(ep)
    register(db, ks, "web-1", {"default": 4})
    for i in range(2):
        create(db, ks, f"d{i}")
    for i in range(3):
        create(db, ks, f"m{i}", queue="mail")
    create(db, ks, "later", queue="mail", delay_s=3600)
    create(db, ks, "r0", queue="reports", delay_s=3600)
    base = ("--etcd", ep, "--namespace", namespace)

    code, out, _ = tmctl(capsys, *base, "--json", "status")
    status = json.loads(out)
    assert code == 0
    assert status["queues"] == {
        "default": {"pending": 2, "delayed": 0, "processing": 0, "capacity": 4},
        "mail": {"pending": 3, "delayed": 1, "processing": 0, "capacity": 0},
        "reports": {"pending": 0, "delayed": 1, "processing": 0, "capacity": 0},
    }
    assert len(status["warnings"]) == 2
    assert (
        "queue 'mail' has 3 pending and 1 delayed tasks and no registered worker"
        in (status["warnings"][0])
    )
    assert "queue 'reports' has 1 delayed tasks" in status["warnings"][1]

    code, out, _ = tmctl(capsys, *base, "status")
    lines = [line.split() for line in out.splitlines()]
    assert ["QUEUE", "PENDING", "DELAYED", "PROCESSING", "CAPACITY"] in lines
    assert ["default", "2", "0", "0", "4"] in lines
    assert ["mail", "3", "1", "0", "0"] in lines
    assert "warning: queue 'mail' has 3 pending and 1 delayed tasks and no registered" in out
    assert "queue 'default'" not in out

    code, out, err = tmctl(capsys, *base, "ls", "pending")
    assert code == 0
    rows = [line.split()[:2] for line in out.splitlines()]
    assert rows[0] == ["TASK", "QUEUE"]
    assert ["m0", "mail"] in rows
    assert ["d0", "default"] in rows
    assert "warning: queue 'mail' has 3 pending tasks and no registered worker" in err
    assert "'default'" not in err

    code, out, err = tmctl(capsys, *base, "--json", "ls", "pending", "--queue", "mail")
    assert sorted(t["task_id"] for t in json.loads(out)) == ["m0", "m1", "m2"]
    assert "queue 'mail'" in err

    # Once a worker registers for the queue, the warning goes.
    register(db, ks, "mailer", {"mail": 1})
    code, out, err = tmctl(capsys, *base, "--json", "status")
    assert [w for w in json.loads(out)["warnings"] if "'mail'" in w] == []
    assert tmctl(capsys, *base, "ls", "pending")[2] == ""


# -- the nits ------------------------------------------------------------------------------


def test_show_prints_a_table_for_people_and_json_for_scripts(
    etcd_server: EtcdProcess, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ep, ks = etcd_server.endpoint, Keyspace(namespace=namespace)
    fail(SyncEtcd(ep), ks, "f1")
    base = ("--etcd", ep, "--namespace", namespace)

    code, out, _ = tmctl(capsys, *base, "show", "f1")
    assert code == 0
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)
    table, _, below = out.partition("\n\n")
    rows = dict(line.split(None, 1) for line in table.splitlines())
    assert rows["task"] == "f1"
    assert rows["state"] == "failed"
    assert rows["queue"] == "default"
    assert rows["attempts"] == "3 of 3"
    assert rows["error"] == "Boom: it broke"
    assert rows["payload"] == '{"n":"f1"}'
    assert below.strip() == "Traceback...\nBoom: it broke"  # the traceback, below the table

    code, out, _ = tmctl(capsys, *base, "--json", "show", "f1")
    shown = json.loads(out)
    assert (shown["state"], shown["payload"], shown["record"]["error"]["type"]) == (
        "failed",
        {"n": "f1"},
        "Boom",
    )


def test_cancel_says_not_found_or_already_finished(
    etcd_server: EtcdProcess, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ep, ks = etcd_server.endpoint, Keyspace(namespace=namespace)
    fail(SyncEtcd(ep), ks, "f1")
    base = ("--etcd", ep, "--namespace", namespace)
    code, _, err = tmctl(capsys, *base, "cancel", "nosuchtask")
    assert (code, err.strip()) == (1, "tmctl: task nosuchtask not found")
    code, _, err = tmctl(capsys, *base, "cancel", "f1")
    assert code == 1
    assert "task f1 is already failed" in err


TMCTL = [sys.executable, "-c", "from tm_sidecar.ops._tmctl import main; main()"]


def _purge(
    ep: str, ns: str, *extra: str, stdin: int | None = subprocess.DEVNULL
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [*TMCTL, "--etcd", ep, "--namespace", ns, "purge", *extra],
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def _failed(db: SyncEtcd, ks: Keyspace) -> int:
    return len(db.list(ks.state_prefix(State.FAILED))[0])


def test_purge_asks_first_and_refuses_without_a_terminal_or_yes(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    ep, ks = etcd_server.endpoint, Keyspace(namespace=namespace)
    db = SyncEtcd(ep)
    fail(db, ks, "f1")
    fail(db, ks, "f2")

    run = _purge(ep, namespace, "failed")
    assert run.returncode == 1
    assert "add --yes" in run.stderr
    assert _failed(db, ks) == 2  # nothing lost

    question = f"Delete 2 failed records, and their payloads, of namespace '{namespace}'? [y/N]"
    assert _answer_on_a_terminal(ep, namespace, "n") == (1, question)
    assert _failed(db, ks) == 2
    assert _answer_on_a_terminal(ep, namespace, "y") == (0, question)
    assert _failed(db, ks) == 0

    fail(db, ks, "f3")
    run = _purge(ep, namespace, "--yes", "failed")
    assert run.returncode == 0, run.stderr
    assert "PURGED" in run.stdout
    assert _failed(db, ks) == 0


def _answer_on_a_terminal(ep: str, ns: str, answer: str) -> tuple[int, str]:
    """Run ``tmctl purge failed`` on a pseudo-terminal, answer its question; (exit code,
    the question)."""
    leader, follower = os.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [*TMCTL, "--etcd", ep, "--namespace", ns, "purge", "failed"],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=env,
    )
    os.close(follower)
    seen = b""
    try:
        deadline = time.monotonic() + 30
        while b"[y/N]" not in seen:
            assert time.monotonic() < deadline, seen
            if select.select([leader], [], [], 0.5)[0]:
                seen += os.read(leader, 4096)
        os.write(leader, answer.encode() + b"\n")
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(leader)
    return code, seen.decode().splitlines()[-1].strip()
