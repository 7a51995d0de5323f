"""What a sidecar checks of its etcd (issue 20 items 17 and 18): the embedded etcd runs
with etcd's corruption checks; a known-bad version is logged with the version to run;
a sidecar whose etcd is another sidecar's embedded one says so in its log; tmctl status
and the dashboard's health card show the version's warning."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tm_sidecar.core import Keyspace, Put, Txn
from tm_sidecar.etcd import EtcdConfig, SyncEtcd, connect
from tm_sidecar.ops._embedded import CORRUPT_CHECKS, EtcdProcess
from tm_sidecar.ops._etcd_check import BORROWED, check_etcd, check_members, mark_embedded
from tm_sidecar.web._data import etcd_health

from .test_tmctl import tmctl


def test_the_embedded_etcd_runs_with_its_corruption_checks(etcd_server: EtcdProcess) -> None:
    assert etcd_server.pid is not None
    argv = Path(f"/proc/{etcd_server.pid}/cmdline").read_bytes().decode().split("\0")
    for flag in CORRUPT_CHECKS:
        assert flag in argv
    assert "--experimental-initial-corrupt-check=true" in argv
    assert etcd_server.healthy()  # etcd 3.5.1 takes them


async def test_a_sidecar_on_another_sidecars_embedded_etcd_says_so(
    etcd_server: EtcdProcess, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    ks = Keyspace(namespace=namespace)
    etcd = connect(EtcdConfig(endpoints=(etcd_server.endpoint,)))
    try:
        caplog.set_level(logging.INFO, logger="tm_sidecar")
        # Unmarked (an etcd of its own): no such line; its version is logged.
        facts = await check_etcd(etcd, ks, embedded_here=False)
        assert facts.borrowed_from is None
        assert BORROWED not in caplog.messages
        assert facts.version == etcd_server.version == "3.5.1"
        assert facts.warning is not None
        bad = [r for r in caplog.records if r.getMessage().startswith("etcd's version has")]
        assert len(bad) == 1
        assert bad[0].levelno == logging.WARNING
        assert "run etcd 3.5.6 or later" in bad[0].__dict__["advice"]

        # The sidecar that started it marks it; it does not warn of itself.
        await mark_embedded(etcd, ks, "/var/lib/tm-sidecar")
        caplog.clear()
        assert (await check_etcd(etcd, ks, embedded_here=True)).borrowed_from is None
        assert BORROWED not in caplog.messages

        # Another sidecar pointed at it does, naming the sidecar that owns it.
        caplog.clear()
        facts = await check_etcd(etcd, ks, embedded_here=False)
        assert facts.borrowed_from is not None
        assert facts.borrowed_from["data_dir"] == "/var/lib/tm-sidecar"
        (line,) = [r for r in caplog.records if r.getMessage() == BORROWED]
        assert line.levelno == logging.WARNING
        assert line.__dict__["embedded_data_dir"] == "/var/lib/tm-sidecar"
        assert "single node" in BORROWED
    finally:
        await etcd.aclose()


def test_tmctl_status_shows_the_version_warning(
    etcd_server: EtcdProcess, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = tmctl(capsys, etcd_server.endpoint, namespace, "--json", "status")
    status = json.loads(out)
    assert (code, status["etcd_version"]) == (0, "3.5.1")
    assert "run etcd 3.5.6 or later" in status["etcd_version_warning"]
    code, out = tmctl(capsys, etcd_server.endpoint, namespace, "status")
    assert "etcd: 3.5.1" in out
    assert "warning: etcd 3.5.1 can lose committed writes" in out


async def test_the_dashboards_etcd_card_shows_the_version_warning(
    etcd_server: EtcdProcess,
) -> None:
    etcd = connect(EtcdConfig(endpoints=(etcd_server.endpoint,)))
    try:
        health = await etcd_health(etcd)
    finally:
        await etcd.aclose()
    assert health.version == "3.5.1"
    assert health.version_warning is not None
    assert "3.5.6" in health.version_warning


def test_the_sidecar_process_logs_whose_etcd_it_uses(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    """End to end: a tm-sidecar pointed at an etcd marked as another sidecar's embedded
    one logs the warning (and the version's) before its demo finishes."""
    db = SyncEtcd(etcd_server.endpoint)
    mark = json.dumps({"host": "web-9", "pid": 4242, "data_dir": "/var/lib/tm-sidecar"})
    assert db.txn(Txn(success=(Put(Keyspace().embedded_mark(), mark),))).succeeded
    env = {**os.environ, "PYTHONPATH": str(Path.cwd()), "TM_SOCKET": str(tmp_path / "s.sock")}
    args = ["--etcd", etcd_server.endpoint, "--namespace", namespace, "--node-id", "n1"]
    run = subprocess.run(
        [sys.executable, "-m", "tm_sidecar", *args, "--demo", "--demo-tasks", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    (line,) = [ln for ln in run.stderr.splitlines() if "another sidecar's embedded etcd" in ln]
    assert "level=warning" in line
    assert "embedded_of_host=web-9" in line
    assert "embedded_of_pid=4242" in line
    assert "etcd's version has known data-loss bugs" in run.stderr


async def test_every_members_version_is_checked(
    etcd_server: EtcdProcess, caplog: pytest.LogCaptureFixture
) -> None:
    """The client talks to one member at a time; a rolling upgrade mixes versions: each
    member's is read and each bad one logged with its URL."""
    cfg = EtcdConfig(endpoints=(etcd_server.endpoint,))
    etcd = connect(cfg)
    try:
        caplog.set_level(logging.INFO, logger="tm_sidecar")
        versions = await check_members(cfg, etcd)
    finally:
        await etcd.aclose()
    assert versions == {etcd_server.endpoint: "3.5.1"}
    (line,) = [r for r in caplog.records if r.getMessage().startswith("an etcd member's")]
    assert line.__dict__["member"] == etcd_server.endpoint
    assert "run etcd 3.5.6 or later" in line.__dict__["advice"]
