"""Both distributions build quietly: no setuptools warning (the ``project.license``
table that stops working on 2027-02-18, or any other), and the sidecar's wheel names
the SDK's, which carries the protocol module."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: What each distribution's build reads: a copy keeps build/ and *.egg-info out of the tree.
SOURCES = {
    "sdk": ("pyproject.toml", "LICENSE", "taskmanager"),
    ".": ("pyproject.toml", "README.md", "LICENSE", "tm_sidecar"),
}


def _wheel(project: str, tmp_path: Path) -> tuple[Path, str]:
    src = tmp_path / "src" / project
    src.mkdir(parents=True)
    for name in SOURCES[project]:
        path = ROOT / project / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, src)
    out = tmp_path / "wheels"
    # Without build isolation and without dependencies: the setuptools the test extra
    # installs, no index, a few seconds. -v shows what setuptools prints.
    run = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation"),
            *("--no-cache-dir", "-w", str(out), str(src)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-4000:]
    (wheel,) = out.glob("*.whl")
    return wheel, output


@pytest.mark.parametrize("project", sorted(SOURCES))
def test_a_build_prints_no_setuptools_warning(project: str, tmp_path: Path) -> None:
    wheel, output = _wheel(project, tmp_path)
    warnings = [line for line in output.splitlines() if "Warning:" in line or "2027" in line]
    assert warnings == [], "\n".join(warnings)
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
        metadata = next(whl.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    assert "License-Expression: Apache-2.0" in metadata
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    if project == ".":
        assert "Requires-Dist: taskmanager-sdk==0.1.0" in metadata
    else:
        assert "taskmanager/protocol.py" in names
