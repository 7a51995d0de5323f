"""Errors by whose fault: the socket server, in process on a real etcd, answers a bad
request with ``invalid_request`` and its own bug with ``internal`` (logged with its
traceback), and goes on serving that connection and every other."""

from __future__ import annotations

import ast
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from taskmanager.protocol import LineFramer, decode_frame, encode_frame

import tm_sidecar.server as server_package
from tests.helpers import running_sidecars
from tm_sidecar.core import JSON
from tm_sidecar.ops._embedded import EtcdProcess
from tm_sidecar.server._connection import Connection
from tm_sidecar.server._server import ServerSettings, SocketServer


class Client:
    """One connection, speaking the protocol through taskmanager.protocol."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.framer = LineFramer()
        self.frames: list[dict[str, Any]] = []
        self.next_id = 0

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        self.next_id += 1
        rid = self.next_id
        await self.stream.send_all(encode_frame({"id": rid, "op": op, **fields}))
        with trio.fail_after(10):
            while True:
                for answer in self.frames:
                    if answer.get("id") == rid:
                        self.frames.remove(answer)
                        return answer
                chunk = await self.stream.receive_some(65536)
                assert chunk, "the server closed a well-behaved connection"
                for line in self.framer.feed(chunk):
                    if (frame := decode_frame(line)) is not None:
                        self.frames.append(frame)


@asynccontextmanager
async def serving(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> AsyncIterator[tuple[SocketServer, Client]]:
    async with running_sidecars(etcd_server.endpoint, namespace, "n1") as (sidecar,):
        server = SocketServer(sidecar, ServerSettings(path=str(tmp_path / "tm.sock")))
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            async with await trio.open_unix_socket(str(tmp_path / "tm.sock")) as stream:
                client = Client(stream)
                assert (await client.call("hello", version=1))["ok"]
                yield server, client
            nursery.cancel_scope.cancel()


#: Requests that are wrong, each in a way that once raised a stray KeyError, TypeError,
#: ValueError or OverflowError inside the server.
BAD_REQUESTS: list[dict[str, Any]] = [
    {"op": "get"},  # no task_id
    {"op": "get", "task_id": ["not", "a", "name"]},
    {"op": "cancel", "task_id": "bad/name"},
    {"op": "wait", "task_id": "t1", "timeout_s": -1},
    {"op": "unsubscribe", "subscription": "seven"},
    {"op": "unregister", "worker": 2.5},
    {"op": "progress", "delivery": 10**400, "data": 1},
    {"op": "complete", "delivery": None},
    {"op": "create", "payload": {}, "run_at": 10**400},
    {"op": "create", "payload": {}, "options": {"timeout_s": 10**400}},
    {"op": "create", "payload": {}, "subscribe": True, "events": [{}]},
    {"op": "pause", "queue": 5},
    {"op": "set_limits", "rate": {"limit": 1, "period_s": 10**400}},
    {"op": "schedule", "name": "s", "payload": {}, "every_s": 10**400},
    {"op": "schedule", "name": "s", "payload": {}, "every_s": 60, "grace_s": 10**400},
    {"op": "unschedule"},
    {"op": "no_such_op"},
]


async def test_a_bad_request_is_the_callers_fault(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving(etcd_server, namespace, tmp_path) as (_, client):
        for request in BAD_REQUESTS:
            answer = await client.call(**request)
            assert answer["ok"] is False, request
            assert answer["error"]["code"] == "invalid_request", (request, answer)
            assert answer["error"]["retryable"] is False
        assert (await client.call("ping"))["result"] == "pong"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no bug logged


#: Every field an op reads (docs/protocol.md), and values of every wrong kind for them.
FIELDS = (
    *("task_id", "queue", "name", "payload", "options", "run_at", "subscribe", "events"),
    *("timeout_s", "reason", "subscription", "worker", "delivery", "data", "result", "error"),
    *("delay_s", "concurrency", "until_final", "from_revision", "cron", "every_s", "timezone"),
    *("missed", "max_catch_up", "grace_s", "paused", "max_running", "key_max_running"),
    *("rate", "key_rate", "tasks"),
)
WRONG: tuple[JSON, ...] = (10**400, -1, 0, 2.5, 1e308, True, None, "x", "bad/name", [], {})


async def test_no_field_of_any_op_can_make_the_sidecar_blame_itself(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    blamed = []
    async with serving(etcd_server, namespace, tmp_path) as (server, client):
        for op in sorted(set(server.ops) - {"hello"}):
            for field in FIELDS:
                for value in WRONG:
                    fields: dict[str, Any] = {field: value}
                    if op == "wait":
                        fields.setdefault("timeout_s", 0)
                    if op == "schedule":
                        fields.setdefault("name", "sweep")
                    answer = await client.call(op, **fields)
                    if not answer["ok"] and answer["error"]["code"] == "internal":
                        blamed.append((op, field, value))
    assert blamed == []


async def test_a_sidecar_bug_is_internal_logged_and_serving_goes_on(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def buggy(conn: Connection, frame: dict[str, Any]) -> JSON:
        # The kind of slip that used to pass for the caller's invalid_request.
        seen: dict[str, JSON] = {}
        return {"answer": seen["missing"]}

    async with serving(etcd_server, namespace, tmp_path) as (server, client):
        server.ops["status"] = buggy  # a planted bug, in the op table the server serves
        with caplog.at_level(logging.ERROR, logger="tm_sidecar.server"):
            answer = await client.call("status")
        assert answer["ok"] is False
        assert answer["error"]["code"] == "internal", answer
        assert answer["error"]["retryable"] is False
        assert "KeyError" in answer["error"]["message"]
        logged = [r for r in caplog.records if r.name == "tm_sidecar.server"]
        assert any(r.exc_info and r.exc_info[0] is KeyError for r in logged), logged
        assert any("bug" in r.getMessage() for r in logged)
        # The same connection, and a new one, go on.
        assert (await client.call("ping"))["result"] == "pong"
        async with await trio.open_unix_socket(server.settings.path) as stream:
            other = Client(stream)
            assert (await other.call("hello", version=1))["ok"]
            assert (await other.call("ping"))["result"] == "pong"


async def test_the_op_table_is_what_hello_lists(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    async with serving(etcd_server, namespace, tmp_path) as (server, client):
        async with await trio.open_unix_socket(server.settings.path) as stream:
            hello = await Client(stream).call("hello", version=1)
        assert hello["result"]["ops"] == sorted(server.ops)
        # A method named like an op is not one unless the table lists it.
        assert "_op_table" not in server.ops
        refused = await client.call("op_table")
        assert refused["error"]["code"] == "invalid_request"
        assert "unknown op" in refused["error"]["message"]


def test_every_server_log_line_is_a_constant_message_with_fields() -> None:
    """The structured-log rule for the server: a constant sentence, the values as fields
    (no %-arguments, no f-strings, no values folded into the message)."""
    offenders = []
    for path in sorted(Path(server_package.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "log"
            ):
                continue
            first = node.args[0] if node.args else None
            constant = isinstance(first, ast.Constant) and isinstance(first.value, str)
            if not constant or len(node.args) > 1 or "%" in str(getattr(first, "value", "")):
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


async def test_the_server_logs_its_clients_and_workers_as_fields(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="tm_sidecar.server"):
        async with serving(etcd_server, namespace, tmp_path) as (_server, client):
            answer = await client.call("register", queue="mail", concurrency=2)
            assert answer["ok"], answer
    # A record's fields are its attributes: what the call passed as ``extra``.
    by_msg = {r.getMessage(): vars(r) for r in caplog.records if r.name == "tm_sidecar.server"}
    # The peer is this process: its credentials, read from the socket, as numbers.
    connected = by_msg["client connected"]
    assert (connected["pid"], connected["uid"], connected["gid"]) == (
        os.getpid(),
        os.getuid(),
        os.getgid(),
    )
    registered = by_msg["worker registered"]
    assert registered["worker"] == answer["result"]["worker"]
    assert (registered["queue"], registered["concurrency"]) == ("mail", 2)
    assert registered["pid"] == os.getpid()
    assert by_msg["serving socket"]["path"] == str(tmp_path / "tm.sock")
    assert "client disconnected" in by_msg
