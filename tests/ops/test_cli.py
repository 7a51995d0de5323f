"""The tm-sidecar command: help, configuration from the environment, the demo."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.helpers import poll_until
from tm_sidecar import EtcdConfig
from tm_sidecar.core import Keyspace
from tm_sidecar.etcd import connect
from tm_sidecar.ops._cli import build_parser, load_handler, parse_args
from tm_sidecar.ops._embedded import EtcdProcess


def test_help_names_every_option_and_its_variable() -> None:
    text = build_parser().format_help()
    for option, env in [
        ("--etcd", "TM_ETCD"),
        ("--socket", "TM_SOCKET"),
        ("--node-id", "TM_NODE_ID"),
        ("--namespace", "TM_NAMESPACE"),
        ("--data-dir", "TM_DATA_DIR"),
    ]:
        assert option in text
        assert env in text


def test_options_fall_back_to_the_environment() -> None:
    environ = {
        "TM_ETCD": "http://10.0.0.1:2379",
        "TM_NODE_ID": "web-7",
        "TM_NAMESPACE": "billing",
        "TM_SOCKET": "/run/tm/s.sock",
        "TM_DATA_DIR": "/var/lib/tm",
    }
    _, s = parse_args([], environ)
    assert (s.etcd, s.node_id, s.namespace, s.socket, s.data_dir) == (
        "http://10.0.0.1:2379",
        "web-7",
        "billing",
        "/run/tm/s.sock",
        "/var/lib/tm",
    )
    assert parse_args(["--namespace", "x"], environ)[1].namespace == "x"  # flags win


def test_handler_specs() -> None:
    queue, func = load_handler("tests.proc_handlers:work@mail")
    assert queue == "mail"
    assert func.__name__ == "work"
    with pytest.raises(SystemExit, match="MODULE:FUNCTION"):
        load_handler("nonsense")


def _run(args: list[str], tmp_path: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "TM_DATA_DIR": str(tmp_path / "data"),
        "TM_SOCKET": str(tmp_path / "tm.sock"),
        "PYTHONPATH": str(Path.cwd()),
    }
    return subprocess.run(
        [sys.executable, "-m", "tm_sidecar", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_bad_settings_are_refused_by_name(tmp_path: Path) -> None:
    run = _run(["--lease-ttl", "1"], tmp_path)
    assert run.returncode != 0
    assert "--lease-ttl" in run.stderr
    run = _run(["--namespace", "a/b", "--etcd", "http://127.0.0.1:1"], tmp_path)
    assert run.returncode != 0
    assert "invalid namespace" in run.stderr


def test_demo_with_embedded_etcd_shows_tasks_flowing(tmp_path: Path) -> None:
    run = _run(["--demo", "--demo-tasks", "6"], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    log = run.stderr
    assert "embedded etcd" in log
    assert "became leader" in log
    for kind in ("queued", "started", "completed"):
        assert f"event={kind}" in log
    assert 'msg="demo finished" tasks=6' in log
    # One update per task (its handler reports progress once), told once (issue 20 item 15).
    updated = re.findall(r"event=updated (task=\S+)", log)
    assert updated
    assert len(updated) == len(set(updated)), updated
    # The data directory survives for the next start; the socket of etcd is gone.
    assert (tmp_path / "data" / "etcd").is_dir()


async def test_sidecar_against_an_external_etcd_exits_0_on_sigterm(
    etcd_server: EtcdProcess, tmp_path: Path
) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path.cwd()), "TM_SOCKET": str(tmp_path / "s.sock")}
    # A long lease: only a revocation, not an expiry, can end it within the test.
    args = ["--etcd", etcd_server.endpoint, "--node-id", "solo", "--namespace", "clitest"]
    args += ["--lease-ttl", "60"]
    proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once; waits go through a thread
        [sys.executable, "-m", "tm_sidecar", *args], stderr=subprocess.PIPE, text=True, env=env
    )
    etcd = connect(EtcdConfig(endpoints=(etcd_server.endpoint,)))
    try:

        async def registered() -> bool:
            return await etcd.get(Keyspace(namespace="clitest").node("solo")) is not None

        await poll_until(registered, timeout_s=20)
        node = await etcd.get(Keyspace(namespace="clitest").node("solo"))
        assert node is not None
        assert node.lease
        proc.send_signal(signal.SIGTERM)
        _, err = await trio.to_thread.run_sync(lambda: proc.communicate(timeout=20))
        assert proc.returncode == 0, err[-3000:]
        # Its session was revoked on the way out, not left to expire: the lease is gone
        # and no trace of the node stays registered, before any TTL could have passed.
        assert await etcd.lease_ttl(node.lease) <= 0
        assert await etcd.get(Keyspace(namespace="clitest").node("solo")) is None
    finally:
        if proc.poll() is None:
            proc.kill()
        await etcd.aclose()
    assert "signal=SIGTERM" in err
    assert "msg=stopped" in err


def test_config_file_environment_and_flags_in_that_order(tmp_path: Path) -> None:
    config = tmp_path / "tm.toml"
    config.write_text(
        'namespace = "from-file"\nnode_id = "file-node"\nlease_ttl = 7\netcd_password = "hunter2"\n'
    )
    _, s = parse_args(["--config", str(config), "--lease-ttl", "9"], {"TM_NODE_ID": "env-node"})
    assert s.namespace == "from-file"  # only the file sets it
    assert s.node_id == "env-node"  # the environment wins over the file
    assert s.lease_ttl == 9  # the flag wins over both
    shown = s.shown()
    assert shown["etcd_password"] == "***"
    assert "hunter2" not in json.dumps(shown)


def test_unknown_settings_in_the_file_are_refused_by_name(tmp_path: Path) -> None:
    config = tmp_path / "tm.toml"
    config.write_text("lease_tll = 3\n")
    run = _run(["--config", str(config), "--print-config"], tmp_path)
    assert run.returncode != 0
    assert "unknown setting 'lease_tll'" in run.stderr


def test_print_config_masks_secrets(tmp_path: Path) -> None:
    run = _run(["--print-config", "--etcd-password", "s3cret"], tmp_path)
    assert run.returncode == 0, run.stderr
    shown = json.loads(run.stdout)
    assert shown["etcd_password"] == "***"
    assert "s3cret" not in run.stdout
