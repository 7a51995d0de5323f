"""Structured logs (tm_sidecar/ops/_log.py): each field its own key, in logfmt and JSON,
checked by parsing the lines of real sidecar processes."""

from __future__ import annotations

import ast
import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import tm_sidecar
from tests.procs import ROOT
from tm_sidecar.core import Keyspace
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
CONVERTED = (
    "tm_sidecar.cli",
    "tm_sidecar.web",
    "tm_sidecar.metrics",
    "tm_sidecar.embedded",
    "tm_sidecar.notify",
    "tm_sidecar.etcd",
    "tm_sidecar.session",
    "tm_sidecar.group",
    "tm_sidecar.feed",
    "tm_sidecar.election",
    "tm_sidecar.leader",
)
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
    # The session, the election and the leader's view, each value a field of its own.
    (session,) = the("session opened")
    assert int(session["lease"]) > 0
    assert int(session["ttl_s"]) > 0
    assert [r["lease"] for r in the("session revoked")] == [session["lease"]]
    (candidate,) = the("candidate")
    (leading,) = the("leading with fence")
    assert (leading["key"], leading["revision"]) == (candidate["key"], candidate["revision"])
    assert leading["key"] == Keyspace(namespace=namespace).candidate(int(session["lease"]))
    listed = the("leader view listed")[0]
    assert int(listed["revision"]) >= int(leading["revision"])
    for count in ("pending", "delayed", "processing", "nodes"):
        assert int(listed[count]) >= 0


# -- the rule, held in the source: a constant message, the values in ``extra`` --------------

PACKAGE = Path(tm_sidecar.__file__).parent
_LEVELS = {"debug", "info", "warning", "warn", "error", "exception", "critical", "fatal", "log"}
_LOGGERS = {"log", "logger", "logging", "_log", "_logger"}
#: A %-conversion (``%s``, ``%(name)s``, ``%.2f``...); ``%%`` is a literal percent sign.
_PERCENT = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[diouxXeEfFgGcrsa]")
_SNAKE = re.compile(r"[a-z][a-z0-9_]*")
#: What logging refuses in ``extra`` (it raises KeyError on them).
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}


def _is_log_call(node: ast.Call) -> bool:
    func = node.func
    if not (isinstance(func, ast.Attribute) and func.attr in _LEVELS):
        return False
    owner = func.value
    name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
    return name in _LOGGERS


def module_constants(tree: ast.Module) -> dict[str, str]:
    """A module's constant strings (``NAME = "text"`` at its top level)."""
    return {
        target.id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
        for target in node.targets
        if isinstance(target, ast.Name)
    }


def log_rule_breaches(
    source: str, where: str = "<source>", imported: dict[str, str] | None = None
) -> list[str]:
    """Every log call in ``source`` that breaks the structured-log rule, as ``where:line:
    why``: a message that is not one constant string (an f-string, ``%`` or ``.format``,
    a concatenation), %-arguments or a %-conversion in the message, and ``extra`` keys
    that are not snake_case or are a LogRecord's own attribute (logging raises on those)."""
    tree = ast.parse(source)
    # Its own constants, and those it imports by name from the package's other modules
    # (``imported``: every module's, when the whole package is checked).
    names = {
        alias.asname or alias.name
        for node in tree.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    constants = {k: v for k, v in (imported or {}).items() if k in names}
    constants.update(module_constants(tree))
    breaches: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            breaches += _repeats_breaches(node, f"{where}:{node.lineno}")
        if not (isinstance(node, ast.Call) and _is_log_call(node)):
            continue
        assert isinstance(node.func, ast.Attribute)
        args = node.args[1:] if node.func.attr == "log" else node.args
        at = f"{where}:{node.lineno}"
        if not args:
            breaches.append(f"{at}: no message")
            continue
        msg, rest = args[0], args[1:]
        if isinstance(msg, ast.Name) and msg.id in constants:
            text: str | None = constants[msg.id]
        elif isinstance(msg, ast.Constant) and isinstance(msg.value, str):
            text = msg.value
        else:
            kind = "an f-string" if isinstance(msg, ast.JoinedStr) else "not a constant string"
            breaches.append(f"{at}: the message is {kind}")
            text = None
        if rest:
            breaches.append(f"{at}: %-arguments after the message")
        if text is not None and _PERCENT.search(text.replace("%%", "")):
            breaches.append(f"{at}: a %-conversion in the message {text!r}")
        for keyword in node.keywords:
            if keyword.arg == "extra" and isinstance(keyword.value, ast.Dict):
                for key in keyword.value.keys:
                    if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
                        continue
                    if key.value in _RECORD_ATTRS:
                        breaches.append(f"{at}: {key.value!r} is a LogRecord attribute")
                    elif not _SNAKE.fullmatch(key.value):
                        breaches.append(f"{at}: {key.value!r} is not a snake_case key")
    return breaches


def _repeats_breaches(node: ast.Call, at: str) -> list[str]:
    """The same rule for a warning that repeats (tm_sidecar/_repeats.py): a constant
    message given to ``Repeats(logger, message)``, snake_case fields given to ``note``."""
    func = node.func
    name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
    if name == "Repeats":
        msg = node.args[1] if len(node.args) > 1 else None
        if not (isinstance(msg, ast.Constant) and isinstance(msg.value, str)):
            return [f"{at}: a Repeats' message is not a constant string"]
    if name == "note":
        return [
            f"{at}: {k.arg!r} is not a snake_case key or is a LogRecord attribute"
            for k in node.keywords
            if k.arg is not None and (k.arg in _RECORD_ATTRS or not _SNAKE.fullmatch(k.arg))
        ]
    return []


def test_the_rule_check_sees_each_kind_of_breach() -> None:
    source = """
import logging
log = logging.getLogger(__name__)
NOTE = "a constant sentence"
OLD = "took %.1f s"
log.info("task started", extra={"task": t, "took_s": 1.5})
log.warning(NOTE, extra={"signal": "SIGTERM"})
log.info("100%% done")
self.log.error("handler crashed", exc_info=True)
log.info(f"task {t} started")
log.info("took %.1f s", took)
log.info("took %(s)s" % {"s": took})
log.info("took {} s".format(took))
log.info("took " + str(took))
log.warning(OLD)
logging.log(logging.INFO, "lease=%x", lease)
log.info("sidecar ready", extra={"name": n, "TaskId": t})
WAITS = Repeats(log, f"waits for {what}")
WAITS.note(task=t, name=n)
OK = Repeats(log, "waits for etcd")
OK.note(task=t, delay_s=1.0)
"""
    found = log_rule_breaches(source)
    lines = sorted({int(b.split(":")[1]) for b in found})
    assert lines == list(range(10, 20)), found
    assert any("an f-string" in b for b in found)
    assert any("'name' is a LogRecord attribute" in b for b in found)
    assert any("'TaskId' is not a snake_case key" in b for b in found)


def test_every_log_call_in_tm_sidecar_keeps_the_rule() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    checked = list(files)
    assert len(checked) > 40  # the walk found the package
    everywhere: dict[str, str] = {}
    for f in checked:
        everywhere.update(module_constants(ast.parse(f.read_text())))
    breaches = [
        b
        for f in checked
        for b in log_rule_breaches(
            f.read_text(), str(f.relative_to(PACKAGE.parent)), imported=everywhere
        )
    ]
    assert not breaches, "\n".join(breaches)


# -- warnings that repeat (tm_sidecar/_repeats.py) ------------------------------------------


def test_a_repeated_warning_is_one_line_then_one_count_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import trio
    import trio.testing

    from tm_sidecar._repeats import Repeats

    caplog.set_level(logging.WARNING, logger="tm_sidecar.test")
    waits = Repeats(logging.getLogger("tm_sidecar.test"), "report waits for etcd", interval_s=1.0)
    seen: list[tuple[float, str | None, int | None]] = []
    clock = trio.testing.MockClock(autojump_threshold=0)

    def lines() -> None:
        for r in caplog.records:
            seen.append((clock.current_time(), vars(r).get("task"), vars(r).get("repeats")))
        caplog.clear()

    async def main() -> None:
        for n in range(50):  # one stall: 50 in a second
            waits.note(task=f"t{n}", delay_s=0.019)
            await trio.sleep(0.019)
        lines()
        waits.note("other", task="x")  # another key is a line of its own
        lines()
        await trio.sleep(0.1)  # the first window's line comes at 1.0
        lines()
        await trio.sleep(5)  # quiet: no line, and the windows close
        lines()
        waits.note(task="again")
        lines()
        waits.note(task="last")  # counted; told when the run ends

    trio.run(main, clock=clock)
    lines()
    assert [(task, repeats) for _, task, repeats in seen] == [
        ("t0", None),
        ("x", None),
        ("t49", 49),
        ("again", None),
        ("last", 1),
    ]
    assert [round(at, 2) for at, _, _ in seen[:3]] == [0.95, 0.95, 1.05]
