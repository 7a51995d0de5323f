"""Every process a test run starts dies with the run, even when the run itself is killed.

A pytest plugin (loaded by the root ``conftest.py``). At the start of a run it puts a
token of its own in the environment, which every process the tests start inherits (etcd,
sidecars, SDK workers, Node.js, Chromium), and starts a watchdog in a session of its own
that holds the read end of a pipe. When the run ends, however it ends (a normal exit,
Ctrl-C, SIGKILL, an out-of-memory kill), the pipe closes; the watchdog then kills every
process that still carries the token.

Why not ``PR_SET_PDEATHSIG``: it fires when the *thread* that forked the child exits,
and Trio forks from its worker threads (``trio.run_process``), which end while the child
should live on. Why not process groups alone: a group outlives its creator, and a run
killed with SIGKILL has nobody left to kill it.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

#: The environment variable that marks a process as started by this test run.
TOKEN_VAR = "TM_TEST_RUN"

_WATCHDOG = r"""
import os, signal, sys
var, token = sys.argv[1], sys.argv[2]
mark = f"{var}={token}".encode()
sys.stdin.buffer.read()  # returns at EOF: the test run has ended, one way or another
me = os.getpid()
for _ in range(3):  # a child may fork while its parent is being killed
    killed = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if mark in environ:
            try:
                os.kill(int(entry), signal.SIGKILL)
                killed += 1
            except OSError:
                pass
    if not killed:
        break
"""


def start_watchdog() -> subprocess.Popen[bytes]:
    """Mark this run's children with a fresh token and start the watchdog that kills
    them once this process is gone. The returned process's stdin is the pipe: closing
    it (or dying) sets the watchdog off."""
    token = secrets.token_hex(8)
    os.environ[TOKEN_VAR] = token
    return subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, TOKEN_VAR, token],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C to the run's process group must not end it first
        cwd=Path("/"),
    )


_watchdog: subprocess.Popen[bytes] | None = None


def pytest_configure(config: pytest.Config) -> None:
    """Start the watchdog once per run (not in xdist workers' parent and child twice)."""
    global _watchdog
    if _watchdog is None:
        _watchdog = start_watchdog()


def pytest_unconfigure(config: pytest.Config) -> None:
    """A normal end: let the watchdog sweep what a test left behind."""
    global _watchdog
    if _watchdog is not None and _watchdog.stdin is not None:
        _watchdog.stdin.close()
        _watchdog.wait(timeout=30)
        _watchdog = None
