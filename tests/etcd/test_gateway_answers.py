"""The gateway transport against answers no real etcd sends (a proxy's page, a body cut
short, garbage): each is unavailability, never a crash nor an empty success. A real etcd
cannot be made to produce these, so a small HTTP server plays the gateway."""

from __future__ import annotations

import contextlib
import json

import pytest
import trio

from tm_sidecar import EtcdConfig, EtcdError, EtcdUnavailable
from tm_sidecar.etcd import connect

VERSION = json.dumps({"etcdserver": "3.5.1", "etcdcluster": "3.5.0"}).encode()


async def serve(wire: bytes, task_status: trio.TaskStatus[int]) -> None:
    """Answers ``GET /version`` as etcd does, and every POST with ``wire``, then closes."""

    async def handle(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            buffer = b""
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buffer) < length:
                    buffer += await stream.receive_some(65536)
                buffer = buffer[length:]
                if head.startswith(b"GET /version"):
                    await stream.send_all(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        + f"Content-Length: {len(VERSION)}\r\n\r\n".encode()
                        + VERSION
                    )
                    continue
                await stream.send_all(wire)
                await stream.aclose()
                return

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


@pytest.mark.parametrize(
    "wire",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{}",  # cut short by a close
        b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nnot json!",  # not etcd's answer
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]",  # JSON, but not etcd's
        b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 5\r\n\r\noops!",  # a proxy's page
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
async def test_a_broken_answer_is_unavailability_not_a_crash(wire: bytes) -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve, wire)
        etcd = connect(
            EtcdConfig(endpoints=(f"http://127.0.0.1:{port}",), timeout_s=2.0, transport="gateway")
        )
        try:
            with trio.fail_after(5), pytest.raises(EtcdUnavailable):
                await etcd.get("/x")
        finally:
            await etcd.aclose()
            nursery.cancel_scope.cancel()


async def test_a_refusal_without_etcds_code_is_an_error_with_its_text() -> None:
    wire = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 12\r\n\r\nnot for you!"
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve, wire)
        etcd = connect(
            EtcdConfig(endpoints=(f"http://127.0.0.1:{port}",), timeout_s=2.0, transport="gateway")
        )
        try:
            with pytest.raises(EtcdError, match="not for you") as refused:
                await etcd.get("/x")
            assert not isinstance(refused.value, EtcdUnavailable)
        finally:
            await etcd.aclose()
            nursery.cancel_scope.cancel()
