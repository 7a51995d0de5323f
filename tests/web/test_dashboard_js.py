"""The dashboard's script (``static/dashboard.js``) on a ``gap`` message of its live
stream (issue 20 item 16): it draws the gap as a row and reads again what the page
shows. Run by Node.js against a small stand-in for the browser's DOM (no browser here).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "tm_sidecar" / "web" / "static" / "dashboard.js"

HARNESS = Path(__file__).with_name("dashboard_harness.cjs")


def _run(page: dict[str, Any]) -> dict[str, Any]:
    node = shutil.which("node")
    if node is None:
        if os.environ.get("CI"):
            pytest.fail("node is not installed, and CI is set: .ci/run installs nodejs")
        pytest.skip("node is not installed (apt-get install nodejs)")
    run = subprocess.run(
        [node, str(HARNESS), str(SCRIPT), json.dumps(page)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    result: dict[str, Any] = json.loads(run.stdout)
    return result


def test_a_gap_is_drawn_and_the_task_page_reads_its_task_again() -> None:
    seen = _run(
        {
            "table": {"refreshTarget": "task"},
            "refreshers": [{"id": "task", "url": "/tasks/t-1?fragment=1"}],
            "plain": [],
        }
    )
    (row,) = seen["rows"]
    assert row["className"] == "ev-gap"
    assert row["cells"][1] == "gap"
    assert "revisions 311 to 342" in row["cells"][2]
    assert "watch_reset" in row["cells"][2]
    assert "1 task(s) changed" in row["cells"][2]
    assert seen["fetched"] == ["/tasks/t-1?fragment=1"]
    assert seen["reloads"] == 0
    assert "missed" in seen["status"]


def test_a_final_task_page_without_a_refresher_is_reloaded() -> None:
    seen = _run({"table": {"refreshTarget": "task"}, "refreshers": [], "plain": ["task"]})
    assert seen["reloads"] == 1
    assert [r["className"] for r in seen["rows"]] == ["ev-gap"]


def test_the_overview_reads_its_counts_again() -> None:
    seen = _run(
        {"table": {}, "refreshers": [{"id": "overview", "url": "/fragments/overview"}], "plain": []}
    )
    assert seen["fetched"] == ["/fragments/overview"]
    assert seen["reloads"] == 0
