"""A test run that dies takes its processes with it (tests/reaper.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.procs import ROOT

INNER = """
import subprocess, time
from pathlib import Path

def test_leaves_a_daemon_behind():
    # A child in a session of its own, as etcd or a daemonised sidecar would be: no
    # process group or terminal hang-up reaches it when the run dies.
    child = subprocess.Popen(["sleep", "600"], start_new_session=True)
    (Path(__file__).parent / "child.pid").write_text(str(child.pid))
    time.sleep(600)  # the run is killed here, as a hung test run would be
"""


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead


def _poll(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_a_killed_run_takes_its_processes_with_it(tmp_path: Path) -> None:
    (tmp_path / "test_inner.py").write_text(INNER)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "tests.reaper",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            "-c",
            str(tmp_path / "pytest.ini"),
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pid_file = tmp_path / "child.pid"
    child = None
    try:
        assert _poll(pid_file.exists, 60), "the inner run never started its child"
        child = int(pid_file.read_text())
        assert _alive(child)
        run.send_signal(signal.SIGKILL)  # the run dies without any cleanup of its own
        run.wait()
        assert _poll(lambda: not _alive(child), 30), "the killed run's child outlived it"
    finally:
        run.kill()
        run.wait()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)
