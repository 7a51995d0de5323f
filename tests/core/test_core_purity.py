"""The core decides, the shell performs: nothing under tm_sidecar.core may do I/O."""

from __future__ import annotations

import ast
import enum
import functools
import importlib
import json
import re
import types
import typing
from pathlib import Path

import attrs
import pytest

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


def _immutable(value: object) -> bool:
    """Whether ``value`` can hold no state: constants, types, plain functions, and
    tuples or frozen attrs instances of those."""
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes, enum.Enum)):
        return True
    if isinstance(value, (type, types.UnionType, types.GenericAlias, typing.NewType)):
        return True
    if isinstance(value, re.Pattern):
        return True
    if isinstance(value, types.FunctionType):
        return True  # a plain function: an lru_cache (or any wrapper) is not one
    if isinstance(value, (tuple, frozenset)):
        return all(_immutable(item) for item in value)
    if attrs.has(type(value)):
        fields = attrs.fields(typing.cast("type[attrs.AttrsInstance]", type(value)))
        name = fields[0].name if fields else "_probe"
        try:  # a frozen class refuses this (a slotted one without fields too)
            setattr(value, name, getattr(value, name, None))  # the same value: no change
        except (attrs.exceptions.FrozenInstanceError, AttributeError):
            return all(_immutable(getattr(value, f.name)) for f in fields)
        if not fields:
            delattr(value, name)
        return False
    return False


def _top_level_names(tree: ast.Module) -> list[str]:
    names: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Assign):
            names += [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.append(node.target.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.append(node.name)
    return names


def test_core_keeps_no_module_level_state() -> None:
    """No caches or counters hidden in the core's modules: the shell owns such things
    (``Records``) and passes them in, so that a test, a thread or a second sidecar in
    one process shares nothing it did not ask for. Nor private interpreter internals."""
    core_dir = Path(tm_sidecar.core.__file__).parent
    offenders = []
    for path in sorted(core_dir.glob("*.py")):
        tree = ast.parse(path.read_text())
        module = importlib.import_module(f"tm_sidecar.core.{path.stem}")
        for name in _top_level_names(tree):
            if name != "__all__" and not _immutable(getattr(module, name)):
                offenders.append(f"{path.name}: {name} = {getattr(module, name)!r:.60}")
        offenders += [
            f"{path.name}: .{node.attr}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr in PRIVATE_INTERNALS
        ]
    assert offenders == []


#: CPython internals the core must not lean on (``json.JSONDecoder.raw_decode`` is the
#: public way to what ``scan_once`` does).
PRIVATE_INTERNALS = {"scan_once", "c_make_scanner"}


@pytest.mark.parametrize(
    ("value", "immutable"),
    [
        ((1, "a", (2.0, None)), True),
        (attrs.make_class("F", ["x"], frozen=True)(1), True),
        (frozenset({1}), True),
        ({}, False),
        ([], False),
        ((1, []), False),
        (attrs.make_class("D", ["x"])(1), False),
        (attrs.make_class("FD", ["x"], frozen=True)([]), False),
        (functools.lru_cache(maxsize=8)(lambda x: x), False),
        (json.JSONDecoder(), False),
    ],
)
def test_the_state_check_tells_state_from_constants(value: object, immutable: bool) -> None:
    assert _immutable(value) is immutable
