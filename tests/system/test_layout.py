"""The parts of tm_sidecar and what each may import.

Each sub-package says in its docstring what it owns and, on a line of its own,
``May import: a, b`` (the other parts it may use; ``nothing`` for none). This test holds
the code to those lines, so that the docstrings, docs/design.md's table of parts and
the imports cannot drift apart.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import tm_sidecar

ROOT = Path(tm_sidecar.__file__).parent
#: What of the top level any part may import: the package's shared vocabulary.
SHARED = {"_errors", "_hooks", "_repeats", "_tracing", "__version__"}
#: Top-level modules that wire the parts together and may import any of them.
WIRING = {"__init__", "__main__"}


def _parts() -> dict[str, Path]:
    return {p.name: p for p in sorted(ROOT.iterdir()) if (p / "__init__.py").is_file()}


def _allowed(package: Path) -> set[str]:
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
    found = re.search(r"^May import: (.+?)\.?$", doc, re.MULTILINE)
    assert found, f"{package.name}/__init__.py: its docstring has no 'May import:' line"
    names = {n.strip() for n in found.group(1).split(",")}
    return set() if names == {"nothing"} else names


def _imported_parts(path: Path) -> set[str]:
    """The top-level names under tm_sidecar that ``path`` imports."""
    package = path.relative_to(ROOT.parent).with_suffix("").parts[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - (node.level - 1)])
                names = [".".join([*base, node.module]) if node.module else ".".join(base)]
                if not node.module:
                    names = [f"{names[0]}.{a.name}" for a in node.names]
            elif node.module == "tm_sidecar":
                names = [f"tm_sidecar.{a.name}" for a in node.names]
            elif node.module:
                names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "tm_sidecar" and len(parts) > 1:
                out.add(parts[1])
    return out


def test_each_part_imports_only_what_its_docstring_allows() -> None:
    parts = _parts()
    assert {"core", "etcd", "leader", "node", "server", "ops", "web"} <= set(parts)
    offenders = []
    for name, package in parts.items():
        allowed = _allowed(package) | SHARED | {name}
        unknown = allowed - set(parts) - SHARED
        assert not unknown, f"{name}: 'May import' names no part: {sorted(unknown)}"
        for path in sorted(package.rglob("*.py")):
            if "_proto" in path.parts:
                continue
            for used in _imported_parts(path) - allowed:
                offenders.append(f"{path.relative_to(ROOT)} imports tm_sidecar.{used}")
    assert offenders == []


def test_top_level_holds_only_the_wiring_and_the_shared_vocabulary() -> None:
    loose = {p.stem for p in ROOT.glob("*.py")} - WIRING - SHARED
    assert loose == set(), f"modules outside any part: {sorted(loose)}"


def test_the_core_imports_no_other_part() -> None:
    assert _allowed(_parts()["core"]) == set()


def test_the_design_doc_lists_every_part() -> None:
    design = (ROOT.parent / "docs" / "design.md").read_text()
    missing = [name for name in _parts() if f"`{name}/`" not in design]
    assert missing == []


def test_the_tests_mirror_the_parts() -> None:
    """tests/ has a folder per part (and for the SDK and the whole system), each holding
    that part's tests; no test file is left at the top."""
    tests = ROOT.parent / "tests"
    assert sorted(tests.glob("test_*.py")) == []
    for name in [*_parts(), "sdk", "system"]:
        assert list((tests / name).glob("test_*.py")), f"tests/{name}/ has no tests"
