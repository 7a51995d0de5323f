"""taskmanager.protocol, the one protocol module both ends use: its framer and codec
without any socket, and its error table checked against the sidecar, the docs and the
Node.js SDK, so that a wire code cannot be added on one end only."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import taskmanager
from hypothesis import given
from hypothesis import strategies as st
from taskmanager import protocol
from taskmanager.protocol import (
    CLIENT_ERRORS,
    EVENT_KINDS,
    WIRE_ERRORS,
    FrameTooLarge,
    LineFramer,
    MalformedFrame,
    TaskManagerError,
    decode_frame,
    encode_frame,
    error_from_wire,
    error_to_wire,
)

import tm_sidecar
import tm_sidecar._errors
from tests.tools import require
from tm_sidecar.server._server import ServerSettings, SocketServer

ROOT = Path(__file__).resolve().parents[2]
PROTOCOL_DOC = (ROOT / "docs" / "protocol.md").read_text()
#: Codes only the Node.js SDK has (none now: both SDKs' waits raise WaitTimeout).
NODE_ONLY: set[str] = set()


# -- the framer ---------------------------------------------------------------------------


def test_the_framer_gives_whole_lines_across_chunks() -> None:
    framer = LineFramer(16)
    assert list(framer.feed(b'{"a":1}\n{"b"')) == [b'{"a":1}']
    assert list(framer.feed(b":2}")) == []
    assert list(framer.feed(b"\n\n{}\n")) == [b'{"b":2}', b"", b"{}"]
    assert framer.buffered == 0


def test_a_line_over_the_limit_is_an_error_after_the_lines_before_it() -> None:
    framer = LineFramer(8)
    lines = framer.feed(b"12345678\n" + b"x" * 9 + b"\nnever")
    assert next(lines) == b"12345678"  # exactly the limit is allowed
    with pytest.raises(FrameTooLarge, match="over max_frame") as caught:
        next(lines)
    assert (caught.value.size, caught.value.limit) == (9, 8)


def test_an_endless_line_is_refused_as_soon_as_it_is_over_the_limit() -> None:
    framer = LineFramer(1000)
    assert list(framer.feed(b"y" * 1000)) == []
    with pytest.raises(FrameTooLarge, match="without ending the frame"):
        list(framer.feed(b"y"))
    # What it held stayed bounded: the limit plus the last chunk.
    assert framer.buffered <= 1000 + 1


def test_lines_not_iterated_are_kept_for_the_next_feed() -> None:
    framer = LineFramer(100)
    lines = framer.feed(b"a\nb\nc")
    assert next(lines) == b"a"
    del lines  # abandoned half way
    assert list(framer.feed(b"\n")) == [b"b", b"c"]


@given(
    st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=20),
    st.lists(st.integers(1, 50), min_size=1, max_size=20),
)
def test_any_chunking_gives_the_same_lines(lines: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(line + b"\n" for line in lines)
    framer = LineFramer(64)
    out: list[bytes] = []
    at, i = 0, 0
    while at < len(stream):
        size = cuts[i % len(cuts)]
        out += framer.feed(stream[at : at + size])
        at, i = at + size, i + 1
    assert out == lines
    assert framer.buffered == 0


# -- the codec ----------------------------------------------------------------------------


def test_frames_encode_to_one_compact_line_and_back() -> None:
    frame = {"id": 1, "op": "create", "payload": {"name": "Zoë", "n": [1, 2.5, None]}}
    line = encode_frame(frame)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert b" " not in line  # compact
    assert decode_frame(line[:-1]) == frame
    assert decode_frame(b"  \t") is None  # blank lines are ignored


def test_what_json_cannot_carry_is_refused_before_sending() -> None:
    with pytest.raises(ValueError, match="not JSON compliant"):
        encode_frame({"x": float("nan")})
    with pytest.raises(ValueError, match="not JSON serializable"):
        encode_frame({"x": object()})
    with pytest.raises(FrameTooLarge):
        encode_frame({"x": "y" * 100}, max_frame=50)
    assert len(encode_frame({"x": "y" * 40}, max_frame=50)) <= 51


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"{nope", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'"text"', "not a JSON object"),
        (b"[" * 100_000, "not JSON"),  # deeper than the parser goes
    ],
)
def test_a_line_that_is_not_a_json_object_is_malformed(line: bytes, message: str) -> None:
    with pytest.raises(MalformedFrame, match=message):
        decode_frame(line)


# -- one error table, the same on every end -----------------------------------------------


def _hierarchy() -> list[type[TaskManagerError]]:
    found = [TaskManagerError]
    for cls in found:
        found += cls.__subclasses__()
    return [cls for cls in found if cls.__module__ == protocol.__name__]


def test_every_code_names_exactly_one_class() -> None:
    classes = _hierarchy()
    codes = [cls.code for cls in classes]
    assert len(codes) == len(set(codes)), sorted(codes)  # no subclass borrows its base's
    table = {**WIRE_ERRORS, **CLIENT_ERRORS}
    assert len(table) == len(WIRE_ERRORS) + len(CLIENT_ERRORS)  # the two are apart
    assert sorted(table.values(), key=id) == sorted(classes, key=id)
    for code, cls in table.items():
        assert cls.code == code
        assert cls.__doc__, cls
    assert "internal" in WIRE_ERRORS  # what the sidecar answers for its own bugs


def test_the_sidecar_and_the_sdk_raise_the_same_classes() -> None:
    for cls in WIRE_ERRORS.values():
        assert getattr(tm_sidecar._errors, cls.__name__) is cls
        assert getattr(taskmanager, cls.__name__) is cls
        assert getattr(tm_sidecar, cls.__name__, cls) is cls
    for cls in CLIENT_ERRORS.values():
        assert getattr(taskmanager, cls.__name__) is cls
    # The sidecar keeps no second table: only the classes themselves.
    for name in tm_sidecar._errors.__all__:
        assert getattr(tm_sidecar._errors, name) in WIRE_ERRORS.values(), name
    tables = [
        name
        for name, value in vars(tm_sidecar._errors).items()
        if not name.startswith("__") and isinstance(value, dict | list | tuple)
    ]
    assert tables == []


@pytest.mark.parametrize("code", sorted(WIRE_ERRORS))
def test_each_wire_error_crosses_the_wire_as_itself(code: str) -> None:
    cls = WIRE_ERRORS[code]
    sent = error_to_wire(cls("why"))
    assert sent == {"code": code, "message": "why", "retryable": cls.retryable}
    back = error_from_wire(json.loads(json.dumps(sent)))
    assert type(back) is cls
    assert str(back) == "why"


def test_an_sdk_error_or_an_unknown_code_goes_as_its_nearest_wire_class() -> None:
    assert error_to_wire(taskmanager.ConnectionLost("gone"))["code"] == "unavailable"
    assert type(error_from_wire({"code": "from_the_future", "message": "?"})) is (TaskManagerError)


def _documented(section: str) -> set[str]:
    """The codes in the first column of a docs/protocol.md section's table."""
    body = PROTOCOL_DOC.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for row in re.findall(r"^\| (`[^|]+)\|", body, flags=re.MULTILINE):
        names |= set(re.findall(r"`([a-z_]+)`", row))
    return names


def test_the_docs_list_every_wire_code_op_and_event_kind() -> None:
    assert _documented("Error codes") == set(WIRE_ERRORS)
    assert _documented("Events") == set(EVENT_KINDS)
    server = SocketServer(None, ServerSettings(path="/nonexistent"))  # type: ignore[arg-type]
    assert _documented("Operations") == set(server.ops)


def _node() -> str:
    return require("node", package="nodejs")[0]


def test_the_node_sdk_has_the_same_error_table() -> None:
    script = """
    import * as sdk from "./index.js";
    import { WIRE_ERRORS } from "./lib/errors.js";
    const describe = (cls) => ({
      name: cls.name,
      base: Object.getPrototypeOf(cls).name,
      retryable: cls.retryable,
    });
    const wire = Object.fromEntries([...WIRE_ERRORS].map(([code, cls]) => [code, describe(cls)]));
    const all = Object.values(sdk)
      .filter((v) => typeof v === "function" && v.prototype instanceof Error && v.code)
      .map((cls) => [cls.code, describe(cls)]);
    console.log(JSON.stringify({ wire, all }));
    """
    run = subprocess.run(
        [_node(), "--input-type=module", "-e", script],
        cwd=ROOT / "sdk" / "js",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    node: dict[str, Any] = json.loads(run.stdout)

    def describe(cls: type[TaskManagerError]) -> dict[str, Any]:
        base = cls.__mro__[1].__name__
        return {"name": cls.__name__, "base": "Error" if base == "Exception" else base}

    python = {
        code: describe(cls) | {"retryable": cls.retryable} for code, cls in WIRE_ERRORS.items()
    }
    assert node["wire"] == python
    # Every error class the Node SDK exports: its code is the Python one's, or one of the
    # few it alone has; never two classes with one code.
    codes = [code for code, _ in node["all"]]
    assert len(codes) == len(set(codes)), codes
    theirs = {**WIRE_ERRORS, **CLIENT_ERRORS}
    for code, described in node["all"]:
        if code in NODE_ONLY:
            continue
        assert code in theirs, f"{code} ({described['name']}) is in the Node SDK only"
        assert described["name"] == theirs[code].__name__
        assert described["retryable"] == theirs[code].retryable
    assert set(theirs) - set(codes) == set(), "the Node SDK lacks these"


def test_one_backoff_serves_both_ends() -> None:
    from taskmanager._connection import reconnect_delay_s
    from taskmanager.protocol import backoff_s

    from tm_sidecar.etcd._retry import CAP_S, FIRST_S, backoff

    assert [backoff_s(n, first_s=0.05, cap_s=1.0) for n in (0, 1, 2, 5, 99)] == [
        0.05,
        0.1,
        0.2,
        1.0,
        1.0,
    ]
    assert backoff_s(3, first_s=0.05, cap_s=1.0, draw=0.0) == 0.2  # half of 0.4 at most off
    for n in range(12):
        assert backoff(n, jitter=False) == backoff_s(n, first_s=FIRST_S, cap_s=CAP_S)
        assert 0 < backoff(n) <= backoff(n, jitter=False)
    assert reconnect_delay_s(0) == 0.0
    assert reconnect_delay_s(99) == backoff_s(99, first_s=0.05, cap_s=2.0) == 2.0
