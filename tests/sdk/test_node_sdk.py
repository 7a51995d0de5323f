"""The Node.js SDK's suite (``sdk/js``: ``npm test``, that is ``node --test`` and the type
check) as part of the one test command, against this venv's ``tm-sidecar``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.tools import require

ROOT = Path(__file__).resolve().parents[2]
JS = ROOT / "sdk" / "js"
BIN = Path(sys.executable).parent


def _tools() -> tuple[str, str]:
    node, npm = require("node", "npm", package="nodejs npm")
    return node, npm


def _install(npm: str, env: dict[str, str]) -> None:
    """``npm ci`` (the committed lock, dev dependencies only) unless already done for it."""
    installed = JS / "node_modules" / ".package-lock.json"
    lock = JS / "package-lock.json"
    if installed.exists() and installed.stat().st_mtime >= lock.stat().st_mtime:
        return
    run = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=JS,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_node_sdk_suite() -> None:
    _, npm = _tools()
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "TM_SIDECAR": str(BIN / "tm-sidecar"),
        "TM_PYTHON": sys.executable,
    }
    _install(npm, env)
    run = subprocess.run(
        [npm, "test"], cwd=JS, env=env, capture_output=True, text=True, timeout=600
    )
    output = f"{run.stdout[-30000:]}\n{run.stderr[-5000:]}"
    assert run.returncode == 0, f"npm test in sdk/js failed ({run.returncode}):\n{output}"
    # Not a vacuous pass: tests ran, and none failed, was cancelled (timed out) or skipped.
    counts = dict(
        re.findall(r"^(?:#|\u2139) (pass|fail|cancelled|skipped) (\d+)$", run.stdout, re.M)
    )
    assert int(counts.get("pass", 0)) > 0, output
    assert (counts.get("fail"), counts.get("cancelled"), counts.get("skipped")) == (
        "0",
        "0",
        "0",
    ), output
