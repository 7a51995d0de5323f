"""The tm-sidecar command at its edges, as real processes: stopping while etcd cannot be
reached, the embedded etcd's life tied to the sidecar's, and the help text."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.procs import ROOT
from tm_sidecar._cli import build_parser


def _start(args: list[str], tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / "sidecar.log"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "TM_SOCKET": str(tmp_path / "tm.sock"),
        "TM_DATA_DIR": str(tmp_path / "data"),
    }
    env.pop("TM_ETCD", None)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tm_sidecar", *args], env=env, stdout=out, stderr=out
        )
    return proc, log


def _wait_for_line(proc: subprocess.Popen[bytes], log: Path, text: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in log.read_text(errors="replace"):
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, f"no {text!r} in:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def _wait_exit(proc: subprocess.Popen[bytes], timeout_s: float) -> int | None:
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_sidecar_that_cannot_reach_etcd_stops_on_a_signal(tmp_path: Path, name: str) -> None:
    signum = signal.Signals[name]
    proc, log = _start(["--etcd", "http://127.0.0.1:1", "--node-id", "lonely"], tmp_path)
    try:
        # It is retrying: etcd cannot be reached.
        _wait_for_line(proc, log, "retrying in", timeout_s=20)
        sent = time.monotonic()
        proc.send_signal(signum)
        code = _wait_exit(proc, timeout_s=5)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text(errors="replace")
    assert code == 0, f"did not stop within 5 s of {signum.name}:\n{text[-3000:]}"
    assert took < 5
    assert f"received {signum.name} before the sidecar was ready: stopping" in text
    assert "Traceback" not in text
    assert not (tmp_path / "tm.sock").exists()


def test_help_prints_the_socket_mode_in_octal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TM_SOCKET_MODE", raising=False)
    text = " ".join(build_parser().format_help().split())
    assert "octal [TM_SOCKET_MODE] (default: 0660)" in text
    assert "432" not in text
    assert build_parser().parse_args([]).socket_mode == 0o660
    assert build_parser().parse_args(["--socket-mode", "600"]).socket_mode == 0o600
