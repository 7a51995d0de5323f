"""The tm-sidecar command at its edges, as real processes: stopping while etcd cannot be
reached, the embedded etcd's life tied to the sidecar's, and the help text."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.procs import ROOT
from tm_sidecar.ops._cli import build_parser, parse_args
from tm_sidecar.ops._embedded import EmbeddedEtcdError, EtcdProcess

NOT_READY = "signal received before the sidecar was ready: stopping"
#: The embedded etcd's pid, from the sidecar's log line.
ETCD_STARTING = r'msg="embedded etcd starting" .*?\bpid=(\d+)'


def _start(
    args: list[str], tmp_path: Path, name: str = "sidecar"
) -> tuple[subprocess.Popen[bytes], Path]:
    """A tm-sidecar process; every one started in ``tmp_path`` shares its data dir."""
    log = tmp_path / f"{name}.log"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "TM_SOCKET": str(tmp_path / f"{name}.sock"),
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
        # It is retrying: etcd cannot be reached (every retry's line says how long it waits).
        _wait_for_line(proc, log, " retry_in_s=", timeout_s=20)
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
    assert f'msg="{NOT_READY}" signal={signum.name}' in text
    assert "Traceback" not in text
    assert not (tmp_path / "sidecar.sock").exists()


def test_help_prints_the_socket_mode_in_octal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TM_SOCKET_MODE", raising=False)
    text = " ".join(build_parser().format_help().split())
    assert "octal [TM_SOCKET_MODE] (default: 0660)" in text
    assert "432" not in text
    assert parse_args([], {})[1].socket_mode == 0o660
    assert parse_args(["--socket-mode", "600"], {})[1].socket_mode == 0o600


def _etcd_pid(log: Path) -> int:
    found = re.search(ETCD_STARTING, log.read_text())
    assert found, log.read_text()[-3000:]
    return int(found.group(1))


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie no reaper has collected yet counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _kill_etcds(*logs: Path) -> None:
    """Kill any etcd these sidecars launched that is still alive (a failed test's)."""
    for log in logs:
        text = log.read_text() if log.exists() else ""
        for pid in re.findall(ETCD_STARTING, text):
            if _alive(int(pid)):
                os.kill(int(pid), signal.SIGKILL)


def _stop(proc: subprocess.Popen[bytes]) -> int | None:
    if proc.poll() is None:
        proc.terminate()
    return _wait_exit(proc, timeout_s=20)


def test_the_embedded_etcd_dies_with_a_sigkilled_sidecar(tmp_path: Path) -> None:
    proc, log = _start(["--node-id", "a"], tmp_path)
    etcd_pid = None
    try:
        _wait_for_line(proc, log, "sidecar ready", timeout_s=30)
        etcd_pid = _etcd_pid(log)
        assert _alive(etcd_pid)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while _alive(etcd_pid):
            assert time.monotonic() < deadline, "the embedded etcd outlived its sidecar"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _kill_etcds(log)
    # Nothing holds the data directory now: the next sidecar starts on it.
    again, log = _start(["--node-id", "a"], tmp_path, name="again")
    try:
        _wait_for_line(again, log, "sidecar ready", timeout_s=30)
    finally:
        code = _stop(again)
        _kill_etcds(log)
        assert code == 0, log.read_text()[-3000:]


def test_a_data_directory_held_by_a_live_etcd_is_refused_fast(tmp_path: Path) -> None:
    first, first_log = _start(["--node-id", "a"], tmp_path, name="first")
    try:
        _wait_for_line(first, first_log, "sidecar ready", timeout_s=30)
        holder = _etcd_pid(first_log)
        began = time.monotonic()
        second, second_log = _start(["--node-id", "b"], tmp_path, name="second")
        code = _wait_exit(second, timeout_s=15)
        took = time.monotonic() - began
        text = second_log.read_text()
        assert code == 1, text[-3000:]
        assert took < 10, text[-3000:]
        assert f"is in use by a running etcd (pid {holder})" in text
        assert str(tmp_path / "data") in text
        assert "embedded etcd starting" not in text  # no second etcd was launched
        assert first.poll() is None  # the first one is untouched
    finally:
        code = _stop(first)
        _kill_etcds(first_log, tmp_path / "second.log")
        assert code == 0, first_log.read_text()[-3000:]


def test_an_interrupted_embedded_start_stops_its_etcd(tmp_path: Path) -> None:
    etcd = EtcdProcess(data_dir=tmp_path / "data")
    abort = threading.Event()
    abort.set()
    etcd.prepare()
    etcd.launch()
    pid = etcd.pid
    assert pid is not None
    with pytest.raises(EmbeddedEtcdError, match="interrupted"):
        etcd.wait_healthy(abort=abort)
    assert etcd.pid is None
    assert not _alive(pid)


def test_a_signal_while_the_embedded_etcd_starts_stops_both(tmp_path: Path) -> None:
    proc, log = _start(["--node-id", "a"], tmp_path)
    try:
        _wait_for_line(proc, log, "embedded etcd starting", timeout_s=30)
        etcd_pid = _etcd_pid(log)
        proc.send_signal(signal.SIGTERM)
        code = _wait_exit(proc, timeout_s=15)
        etcd_left = _alive(etcd_pid)  # before the clean-up below
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _kill_etcds(log)
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert f'msg="{NOT_READY}" signal=SIGTERM' in text
    assert not etcd_left
