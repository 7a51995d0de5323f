"""node/'s logs follow the structured rule: a constant message, every value a field of
its own (checked in the source, and on the records of a running sidecar)."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest

import tm_sidecar
from tests.helpers import running_sidecars
from tests.ops.test_log import parse_logfmt
from tm_sidecar.core import TaskId
from tm_sidecar.ops._embedded import EtcdProcess
from tm_sidecar.ops._log import StructuredFormatter

NODE = Path(tm_sidecar.__file__).parent / "node"
LEVELS = {"debug", "info", "warning", "error", "exception", "critical"}
#: What logging refuses as a field, or would shadow.
RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}


def log_call_problems(source: str, where: str) -> list[str]:
    """What breaks the rule in one module's ``log.<level>(...)`` calls."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "log"
            and node.func.attr in LEVELS
        ):
            continue
        at = f"{where}:{node.lineno}"
        first = node.args[0] if node.args else None
        if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
            problems.append(f"{at}: the message is not a constant")
            continue
        msg = first.value
        if len(node.args) > 1 or "%" in msg or "=" in msg:
            problems.append(f"{at}: values in the message {msg!r}")
        if msg != msg.lower() and msg[:1] != msg[:1].lower():
            problems.append(f"{at}: not a lower-case sentence {msg!r}")
        for kw in node.keywords:
            if kw.arg != "extra":
                continue
            if not isinstance(kw.value, ast.Dict):
                continue  # built beforehand: its keys are checked at run time by logging
            for key in kw.value.keys:
                if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
                    problems.append(f"{at}: a field name that is not a constant")
                elif key.value in RECORD_ATTRS or not key.value.isidentifier():
                    problems.append(f"{at}: bad field name {key.value!r}")
    return problems


def test_every_log_call_in_node_has_a_constant_message_and_fields() -> None:
    modules = sorted(NODE.glob("*.py"))
    assert len(modules) > 5
    problems = [p for path in modules for p in log_call_problems(path.read_text(), path.name)]
    assert not problems, "\n".join(problems)


def test_the_rule_check_sees_values_in_a_message() -> None:
    old = 'log.info("became leader node=%s", node_id)\nlog.info("ok", extra={"name": 1})\n'
    assert len(log_call_problems(old, "old.py")) == 2


async def test_a_sidecars_records_carry_their_values_as_fields(
    etcd_server: EtcdProcess, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tm_sidecar")
    async with running_sidecars(etcd_server.endpoint, namespace, "n1") as (sc,):
        spec = await sc.create({"x": 1}, run_at=sc.clock() + 3600)
        cancelled, _ = await sc.cancel(TaskId(spec.id))
        assert cancelled
        await sc.pause_queue("mail")
    formatter = StructuredFormatter("logfmt")
    lines = [parse_logfmt(formatter.format(r)) for r in caplog.records]

    def the(msg: str) -> dict[str, str]:
        found = [line for line in lines if line["msg"] == msg]
        assert found, f"no {msg!r} among {[line['msg'] for line in lines]}"
        return found[0]

    assert (the("sidecar ready")["node"], the("sidecar ready")["namespace"]) == ("n1", namespace)
    assert the("became leader")["node"] == "n1"
    assert (the("task cancelled")["task"], the("task cancelled")["was"]) == (spec.id, "delayed")
    assert the("queue paused")["queue"] == "mail"
