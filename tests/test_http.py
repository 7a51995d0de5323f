"""The gateway client's HTTP framing, against answers written byte by byte.

etcd's gateway answers small bodies with Content-Length and large ones (and watches)
chunked; these tests also cover what it does not usually send (interim answers, split
writes, closing) and what it must never send (garbage), which a real etcd cannot be
made to produce.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable, Callable

import pytest
import trio

from tm_sidecar import Etcd, EtcdConfig, EtcdUnavailable

Answer = Callable[[trio.SocketStream, bytes], Awaitable[None]]


async def serve(answer: Answer, task_status: trio.TaskStatus[int]) -> None:
    async def handle(stream: trio.SocketStream) -> None:
        # The answer may close the connection, or the client go away.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await requests(stream)

    async def requests(stream: trio.SocketStream) -> None:
        buffer = b""
        while True:
            while b"\r\n\r\n" not in buffer:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buffer += data
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            while len(buffer) < length:
                buffer += await stream.receive_some(65536)
            body, buffer = buffer[:length], buffer[length:]
            await answer(stream, body)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


async def call_with(answer: Answer, times: int = 1) -> list[dict[str, object]]:
    answers: list[dict[str, object]] = []
    error: Exception | None = None
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve, answer)
        endpoint = f"http://127.0.0.1:{port}"
        etcd = Etcd(EtcdConfig(endpoints=(endpoint,), timeout_s=2.0, transport="native"))
        try:
            for _ in range(times):
                answers.append(await etcd.call("/kv/range", {"key": "eA=="}))
        except Exception as exc:
            error = exc
        finally:
            await etcd.aclose()
            nursery.cancel_scope.cancel()
    if error is not None:
        raise error
    return answers


def header(status: str = "200 OK", extra: str = "") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{extra}".encode()


async def test_length_framed_answers_reuse_one_connection() -> None:
    streams: set[trio.SocketStream] = set()

    async def answer(stream: trio.SocketStream, body: bytes) -> None:
        streams.add(stream)
        data = json.dumps({"echo": json.loads(body)}).encode()
        await stream.send_all(header(extra=f"Content-Length: {len(data)}\r\n\r\n") + data)

    answers = await call_with(answer, times=3)
    assert answers == [{"echo": {"key": "eA=="}}] * 3
    assert len(streams) == 1


async def test_chunked_answers_split_across_writes_and_after_an_interim_answer() -> None:
    async def answer(stream: trio.SocketStream, body: bytes) -> None:
        data = json.dumps({"kvs": ["x" * 5000]}).encode()
        wire = b"HTTP/1.1 100 Continue\r\n\r\n" + header(extra="Transfer-Encoding: chunked\r\n\r\n")
        for part in (data[:10], data[10:4000], data[4000:]):
            wire += f"{len(part):x};ext=1\r\n".encode() + part + b"\r\n"
        wire += b"0\r\nTrailer: x\r\n\r\n"
        for i in range(0, len(wire), 7):  # a few bytes at a time
            await stream.send_all(wire[i : i + 7])

    (answer_body,) = await call_with(answer)
    assert answer_body == {"kvs": ["x" * 5000]}


async def test_a_closing_answer_is_read_and_the_next_call_reconnects() -> None:
    async def answer(stream: trio.SocketStream, body: bytes) -> None:
        data = b'{"ok":1}'
        await stream.send_all(
            header(extra=f"Connection: close\r\nContent-Length: {len(data)}\r\n\r\n") + data
        )
        await stream.aclose()

    assert await call_with(answer, times=2) == [{"ok": 1}, {"ok": 1}]


@pytest.mark.parametrize(
    "wire",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\n{}",  # neither length nor chunks
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{}",  # cut short by a close
        b"HTTP/1.1 200 OK\r\nContent-Length: lots\r\n\r\n{}",
        b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nnot json!",  # not etcd's answer
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}XX0\r\n\r\n",
    ],
)
async def test_a_broken_answer_is_unavailability_not_a_crash(wire: bytes) -> None:
    async def answer(stream: trio.SocketStream, body: bytes) -> None:
        await stream.send_all(wire)
        await stream.aclose()

    with pytest.raises(EtcdUnavailable):
        await call_with(answer)
