"""The core decides, the shell performs: nothing under tm_sidecar.core may do I/O."""

from __future__ import annotations

import ast
from pathlib import Path

import tm_sidecar.core

FORBIDDEN = {
    "trio",
    "socket",
    "time",
    "random",
    "os",
    "etcd3",
    "h11",
    "subprocess",
    "threading",
    "asyncio",
}


def test_core_imports_nothing_that_does_io() -> None:
    core_dir = Path(tm_sidecar.core.__file__).parent
    offenders = []
    for path in sorted(core_dir.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert offenders == []
    assert len(list(core_dir.glob("*.py"))) >= 7  # the check saw the core
