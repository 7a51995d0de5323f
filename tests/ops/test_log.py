"""Structured logs (tm_sidecar/ops/_log.py): each field its own key, in logfmt and JSON,
checked by parsing the lines of real sidecar processes."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from typing import Any

import pytest

from tests.procs import ROOT
from tm_sidecar.ops._embedded import EtcdProcess
from tm_sidecar.ops._log import StructuredFormatter

_PAIR = re.compile(r'([A-Za-z0-9_.\-]+)=("(?:[^"\\]|\\.)*"|[^\s"=]*)(?: |$)')


def parse_logfmt(line: str) -> dict[str, str]:
    """One logfmt line to its fields; fails on anything that is not ``key=value`` pairs
    (a quoted value is a JSON string)."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(line):
        found = _PAIR.match(line, pos)
        assert found, f"not logfmt at {pos}: {line[pos:]!r} in {line!r}"
        key, raw = found.groups()
        assert key not in fields, f"{key} twice in {line!r}"
        fields[key] = json.loads(raw) if raw.startswith('"') else raw
        pos = found.end()
    return fields


def _format(fmt: str, emit: Any) -> list[str]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(StructuredFormatter(fmt))
    logger = logging.getLogger("tm_sidecar.test_log")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        emit(logger)
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    return out.getvalue().splitlines()


def _emit(logger: logging.Logger) -> None:
    logger.warning(
        "task started",
        extra={
            "task": "01J0",
            "attempt": 2,
            "took_s": 0.25,
            "retry": False,
            "node": None,
            "error": 'ValueError: "bad"\nsecond line',
            "data": {"sum": 3, "text": "a b"},
            "level": "a field named like a base key",
            "odd key!": "x=y",
        },
    )
    logger.info("took %.1f s for %d tasks", 1.25, 3)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("handler crashed", extra={"task": "01J1"})


def test_fields_are_keys_in_both_formats() -> None:
    parsed = {
        "logfmt": [parse_logfmt(line) for line in _format("logfmt", _emit)],
        "json": [json.loads(line) for line in _format("json", _emit)],
    }
    for fmt, (event, old_style, crash) in parsed.items():
        assert list(event)[:4] == ["ts", "level", "logger", "msg"], fmt
        assert event["level"] == "warning"
        assert event["logger"] == "tm_sidecar.test_log"
        assert event["msg"] == "task started"
        assert event["task"] == "01J0"
        assert event["error"] == 'ValueError: "bad"\nsecond line'
        assert event["_level"] == "a field named like a base key"
        assert event["odd_key_"] == "x=y"
        assert old_style["msg"] == "took 1.2 s for 3 tasks"
        assert crash["msg"] == "handler crashed"
        assert crash["task"] == "01J1"
        assert "RuntimeError: boom" in crash["exc"]
        assert "Traceback" in crash["exc"]
    text, native = parsed["logfmt"][0], parsed["json"][0]
    assert (text["attempt"], text["took_s"], text["retry"], text["node"]) == (
        "2",
        "0.25",
        "false",
        "",
    )
    assert json.loads(text["data"]) == {"sum": 3, "text": "a b"}
    assert (native["attempt"], native["took_s"], native["retry"], native["node"]) == (
        2,
        0.25,
        False,
        None,
    )
    assert native["data"] == {"sum": 3, "text": "a b"}
    # One line per event, whatever the values hold.
    assert len(_format("logfmt", _emit)) == 3


#: The loggers of the modules whose calls carry their values as fields.
CONVERTED = ("tm_sidecar.cli", "tm_sidecar.web", "tm_sidecar.metrics", "tm_sidecar.embedded")
SECRETS = {"TM_ETCD_PASSWORD": "pw-s3cret-9", "TM_WEB_TOKEN": "tok-s3cret-8"}


@pytest.mark.parametrize("fmt", ["logfmt", "json"])
def test_a_real_sidecar_logs_each_field_as_a_key(
    fmt: str, etcd_server: EtcdProcess, namespace: str, tmp_path: Any
) -> None:
    env = {
        **os.environ,
        **SECRETS,
        "PYTHONPATH": str(ROOT),
        "TM_SOCKET": str(tmp_path / "s.sock"),
        "TM_LOG_FORMAT": fmt,
    }
    args = ["--etcd", etcd_server.endpoint, "--namespace", namespace, "--node-id", "logs-1"]
    args += ["--demo", "--demo-tasks", "3", "--log-level", "debug"]
    args += ["--web", "127.0.0.1:0", "--metrics", "127.0.0.1:0"]
    run = subprocess.run(
        [sys.executable, "-m", "tm_sidecar", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for secret in SECRETS.values():
        assert secret not in run.stderr
    parse = json.loads if fmt == "json" else parse_logfmt
    lines = [parse(line) for line in run.stderr.splitlines()]
    assert lines
    for line in lines:
        assert list(line)[:4] == ["ts", "level", "logger", "msg"]
        if line["logger"] in CONVERTED:
            assert "=" not in line["msg"], f"a field left in the message: {line}"

    def the(msg: str) -> list[dict[str, Any]]:
        found = [line for line in lines if line["msg"] == msg]
        assert found, f"no {msg!r} among {[line['msg'] for line in lines]}"
        return found

    (start,) = the("starting tm-sidecar")
    assert (start["node"], start["etcd"]) == ("logs-1", etcd_server.endpoint)
    assert start["client"]
    (board,) = the("dashboard listening")
    assert board["url"].startswith("http://127.0.0.1:")
    assert board["token"] == "required"
    assert the("dashboard token")[0]["token_from"] == "TM_WEB_TOKEN"
    assert the("serving metrics")[0]["url"].endswith("/metrics")
    events = the("task event")
    completed = [e for e in events if e["event"] == "completed"]
    assert len(completed) == 3
    started = [e for e in events if e["event"] == "started"]
    assert {e["task"] for e in started} == {e["task"] for e in completed}
    assert {e["node"] for e in started} == {"logs-1"}
    data = [e["data"] if fmt == "json" else json.loads(e["data"]) for e in completed]
    assert {d["sum"] for d in data} <= {0, 1}
    assert str(the("demo finished")[0]["tasks"]) == "3"
    assert the("stopped")
