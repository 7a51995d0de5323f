"""No module over ~400 lines without a reason: a module longer than :data:`LIMIT` lines
says why in its docstring, on a line starting ``Size: `` (issue 13: one job per module).

It holds every part of ``tm_sidecar`` and the SDK's package (``sdk/taskmanager``); the
generated protobuf modules are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import taskmanager

import tm_sidecar

ROOT = Path(tm_sidecar.__file__).parent
SDK = Path(taskmanager.__file__).parent
LIMIT = 400


def oversized(paths: list[Path]) -> list[str]:
    """The modules among ``paths`` over the limit whose docstring gives no ``Size:`` line."""
    out = []
    for path in paths:
        text = path.read_text()
        lines = len(text.splitlines())
        if lines <= LIMIT:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        if not any(line.startswith("Size: ") for line in doc.splitlines()):
            out.append(f"{path.name}: {lines} lines and no 'Size:' line in its docstring")
    return out


def test_long_modules_say_why() -> None:
    modules = [p for p in [*ROOT.rglob("*.py"), *SDK.rglob("*.py")] if "_proto" not in p.parts]
    assert len(modules) > 80  # it saw the whole package and the SDK
    assert oversized(sorted(modules)) == []


def test_a_long_module_without_a_reason_is_found(tmp_path: Path) -> None:
    body = "x = 1\n" * LIMIT
    bare = tmp_path / "bare.py"
    bare.write_text('"""A module."""\n' + body)
    explained = tmp_path / "explained.py"
    explained.write_text('"""A module.\n\nSize: one table, one entry per line.\n"""\n' + body)
    short = tmp_path / "short.py"
    short.write_text('"""A module."""\nx = 1\n')
    assert oversized([bare, explained, short]) == [
        f"bare.py: {LIMIT + 1} lines and no 'Size:' line in its docstring"
    ]
