"""The SDK does not trust its sidecar: a fake one on a real Unix socket misbehaves.

A malformed or oversized frame must give a logged error and a reconnect, never a dead
client; a sidecar that refuses the handshake for good makes calls raise at once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from taskmanager import InvalidRequest, TaskManager, WorkerTask

MAX_FRAME = 4096

#: What a fake connection does once it has read the client's hello: (stream, hello, n).
Behaviour = Callable[[trio.SocketStream, dict[str, Any], int], Awaitable[None]]


class Lines:
    """Newline-delimited frames read from one stream."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def next(self) -> dict[str, Any] | None:
        while b"\n" not in self.buffer:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        frame: dict[str, Any] = json.loads(line)
        return frame


async def send(stream: trio.SocketStream, frame: dict[str, Any]) -> None:
    await stream.send_all(json.dumps(frame).encode() + b"\n")


def hello_answer(rid: Any) -> dict[str, Any]:
    return {
        "id": rid,
        "ok": True,
        "result": {"version": 1, "node": "fake", "leader": True, "max_frame": MAX_FRAME},
    }


async def answer_requests(lines: Lines) -> None:
    """Answer what a well-behaved sidecar would, for the few ops these tests use."""
    while (frame := await lines.next()) is not None:
        op = frame.get("op")
        result: Any = {"status": {"node": "fake"}, "register": {"worker": 1, "node": "fake"}}.get(
            str(op), True
        )
        await send(lines.stream, {"id": frame.get("id"), "ok": True, "result": result})


@asynccontextmanager
async def fake_sidecar(path: Path, behave: Behaviour) -> AsyncIterator[list[int]]:
    """Serve ``path``: each connection reads a hello, then runs ``behave``. Yields the
    numbers of the connections made so far."""
    seen: list[int] = []
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(16)
    listener = trio.SocketListener(sock)

    async def serve_one(stream: trio.SocketStream) -> None:
        seen.append(len(seen) + 1)
        number = seen[-1]
        async with stream:
            hello = await Lines(stream).next()
            assert hello is not None
            assert hello["op"] == "hello"
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await behave(stream, hello, number)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, serve_one, [listener])
        yield seen
        nursery.cancel_scope.cancel()


def misbehaving_once(bad: bytes) -> Behaviour:
    """The first connection answers hello, then sends ``bad`` for the first request;
    later ones behave."""

    async def behave(stream: trio.SocketStream, hello: dict[str, Any], number: int) -> None:
        await send(stream, hello_answer(hello["id"]))
        lines = Lines(stream)
        if number == 1:
            await lines.next()  # a request: answered with garbage
            await stream.send_all(bad)
            await trio.sleep_forever()  # the client is the one to hang up
        await answer_requests(lines)

    return behave


@pytest.mark.parametrize(
    ("bad", "logged"),
    [
        (b"{this is not json\n", "not JSON"),
        (b"[1, 2, 3]\n", "not a JSON object"),
        (b'"a string"\n', "not a JSON object"),
        (b"{" + b" " * (2 * MAX_FRAME) + b"}\n", "over max_frame"),
        (b"x" * (2 * MAX_FRAME), "without ending the frame"),  # and never a newline
        (b'{"push": "task", "worker": 1}\n', "malformed frame"),
        (b'{"push": "event", "event": 7}\n', "malformed frame"),
        (b"\xff\xfe\n", "not JSON"),
    ],
    ids=["bad-json", "array", "string", "oversized-line", "endless-line", "task", "event", "utf8"],
)
async def test_a_bad_frame_from_the_sidecar_is_logged_and_the_client_reconnects(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, bad: bytes, logged: str
) -> None:
    path = tmp_path / "fake.sock"
    async with (
        fake_sidecar(path, misbehaving_once(bad)) as seen,
        TaskManager(str(path)) as manager,
    ):
        with trio.fail_after(10):
            status = await manager.status()  # idempotent: asked again on the new connection
            assert status == {"node": "fake"}
            assert await manager.status() == {"node": "fake"}
        assert seen == [1, 2]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(logged in e and "reconnecting" in e for e in errors), errors


async def test_a_refused_handshake_makes_calls_raise_at_once(tmp_path: Path) -> None:
    path = tmp_path / "fake.sock"

    async def refuse(stream: trio.SocketStream, hello: dict[str, Any], number: int) -> None:
        error = {"code": "invalid_request", "message": "protocol version 1 is not spoken here"}
        await send(stream, {"id": hello["id"], "ok": False, "error": error})
        await trio.sleep_forever()

    async def handler(task: WorkerTask) -> None:
        return None

    async with fake_sidecar(path, refuse), TaskManager(str(path), connect_timeout_s=30) as manager:
        with trio.fail_after(5):  # far less than the connect timeout
            with pytest.raises(InvalidRequest, match="not spoken here"):
                await manager.process(handler)
            with pytest.raises(InvalidRequest, match="ended for good"):
                await manager.status()


async def test_a_worker_whose_connection_ends_for_good_raises_instead_of_idling(
    tmp_path: Path,
) -> None:
    path = tmp_path / "fake.sock"

    async def once(stream: trio.SocketStream, hello: dict[str, Any], number: int) -> None:
        if number == 1:
            await send(stream, hello_answer(hello["id"]))
            lines = Lines(stream)
            register = await lines.next()
            assert register is not None
            await send(stream, {"id": register["id"], "ok": True, "result": {"worker": 1}})
            await trio.sleep(0.2)
            return  # hangs up: the client reconnects ...
        # ... and is refused from now on (say, a uid no longer allowed).
        await send(
            stream,
            {
                "id": None,
                "ok": False,
                "error": {"code": "protocol_violation", "message": "uid 0 is not allowed"},
            },
        )

    async def handler(task: WorkerTask) -> None:
        return None

    async with fake_sidecar(path, once), TaskManager(str(path)) as manager:
        await manager.process(handler)
        with trio.fail_after(10), pytest.raises(Exception, match="uid 0 is not allowed"):
            await manager.serve()
