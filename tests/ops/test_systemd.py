"""The sidecar speaks systemd's notify protocol: READY, STATUS, WATCHDOG, STOPPING."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.tools import require
from tm_sidecar.ops._embedded import EtcdProcess
from tm_sidecar.ops._notify import Notifier


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier({})
    notifier.send("READY=1")  # no socket: a no-op, not an error
    assert notifier.address is None
    assert notifier.watchdog_s is None


def test_notify_messages_over_a_real_datagram_socket(
    etcd_server: EtcdProcess, tmp_path: Path
) -> None:
    path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.settimeout(20)
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(path),
        "WATCHDOG_USEC": "400000",
        "PYTHONPATH": str(Path.cwd()),
    }
    args = [
        "--etcd",
        etcd_server.endpoint,
        "--socket",
        str(tmp_path / "tm.sock"),
        "--namespace",
        "sd",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tm_sidecar", *args], env=env, stderr=subprocess.PIPE
    )
    received: list[str] = []

    def until(word: str) -> None:
        deadline = time.monotonic() + 20
        while not any(word in m for m in received):
            assert time.monotonic() < deadline, received
            received.extend(listener.recv(4096).decode().splitlines())

    try:
        until("READY=1")
        until("WATCHDOG=1")
        watchdogs = sum(m == "WATCHDOG=1" for m in received)
        until("STATUS=")
        proc.send_signal(signal.SIGTERM)
        until("STOPPING=1")
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
        listener.close()
    assert watchdogs >= 1
    # The drain asks systemd for its time (issue 21): --drain-timeout 10 s and a margin, so
    # a drain longer than the unit's TimeoutStopSec is not cut short without a word.
    extend = [m for m in received if m.startswith("EXTEND_TIMEOUT_USEC=")]
    assert extend == ["EXTEND_TIMEOUT_USEC=20000000"], received
    statuses = [m for m in received if m.startswith("STATUS=")]
    # The first says it connects to etcd (issue 21); once ready, the role.
    assert statuses[0].startswith("STATUS=connecting to etcd at ")
    assert any("leader" in m or "follower" in m for m in statuses), statuses


def test_the_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    [analyze] = require("systemd-analyze", package="systemd")
    unit = (Path(__file__).resolve().parents[2] / "systemd" / "tm-sidecar.service").read_text()
    # Point ExecStart at this environment's tm-sidecar, which verify checks exists.
    binary = Path(sys.executable).parent / "tm-sidecar"
    unit = unit.replace("/opt/tm-sidecar/bin/tm-sidecar", str(binary))
    path = tmp_path / "tm-sidecar.service"
    path.write_text(unit)
    run = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "tm-sidecar.service" not in run.stderr, run.stderr  # no warning about our unit
