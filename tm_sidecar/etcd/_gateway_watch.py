"""The gateway's watch streams: etcd3-py's streaming call read by one thread of its own per
stream, into a bounded Trio channel; closing the stream shuts its socket down, which ends
the thread (etcd3-py's own Watcher is not used: ETCD-NOTES)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import attrs
import trio

from .._errors import Compacted, EtcdError, EtcdUnavailable
from ._errors import code_needs_auth, gateway_status, translate_gateway
from ._gateway_codec import (
    Body,
    decode_event,
)
from ._interface import Changes

if TYPE_CHECKING:
    from ._gateway import GatewayEtcd


def _watch_message(message: Body) -> Changes | None:
    if "error" in message:
        err = message["error"]
        raise translate_gateway(int(err.get("http_code", 503) or 503), message, "watch")
    result = message.get("result", {})
    if result.get("canceled"):
        compact = int(result.get("compact_revision", 0) or 0)
        if compact:
            raise Compacted("watch start revision was compacted", compact)
        raise EtcdUnavailable(f"etcd cancelled the watch: {result.get('cancel_reason', '')}")
    events = tuple(decode_event(e) for e in result.get("events", ()))
    if not events:
        return None  # the creation, or a progress notification
    # Seen up to the last event, not the header's revision: a watch catching up on
    # history comes in responses of at most 1,000 revisions, each stamped with the
    # store's current revision, so the stamp runs ahead of what has been delivered.
    return Changes(events, events[-1].kv.mod_revision)


class _WatchStream:
    """One streaming ``/watch`` call, read by a thread of its own into a Trio channel.

    :meth:`receive` answers the stream's messages (JSON objects) and raises what ended
    it: :class:`EtcdUnavailable` for a broken stream, or the translated refusal.
    :meth:`close` (non-blocking, idempotent) shuts the stream's socket down, which wakes
    the reader from its blocking read and ends the thread.
    """

    def __init__(self, owner: GatewayEtcd, conn: _Conn, body: Body, buffer: int = 16) -> None:
        self._owner = owner
        self._conn = conn
        self._body = body
        self._send, self._receive = trio.open_memory_channel[Body](buffer)
        self._token = trio.lowlevel.current_trio_token()
        self._lock = threading.Lock()
        self._resp: Any = None
        self._closed = False
        #: The token the stream was opened with (set by the reader thread).
        self.token: str | None = None
        self._error: Exception | None = None
        self._thread = threading.Thread(target=self._read, name="tm-etcd-watch", daemon=True)
        self._thread.start()

    async def receive(self) -> Body:
        """The next message; raises what ended the stream."""
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            raise self._error or EtcdUnavailable("etcd ended the watch stream") from None

    def close(self) -> None:
        """End the stream and its thread (non-blocking, idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            resp = self._resp
        self._receive.close()
        if resp is not None:
            _shut_down(resp)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    # -- the reader thread --

    def _open(self) -> Any:
        import etcd3.errors
        import requests

        owner, conn = self._owner, self._conn
        timeout = owner.cfg.timeout_s
        for attempt in range(2):
            if owner.cfg.username and conn.token is None:
                owner._authenticate(conn, timeout)  # a token was dropped
            self.token = conn.token
            headers = {"authorization": conn.token} if conn.token else {}
            try:
                # A deadline to connect and to get the answer's head; none on reading
                # the stream, which is quiet for as long as nothing changes.
                return conn.client.call_rpc(
                    "/watch",
                    self._body,
                    stream=True,
                    encode=False,
                    raw=True,
                    timeout=(timeout, timeout),
                    headers=headers,
                )
            except requests.RequestException as exc:
                raise EtcdUnavailable(f"watch: etcd request failed: {exc}") from None
            except etcd3.errors.Etcd3Exception as exc:
                status, answer = _error_answer(exc)
                code, details = gateway_status(answer)
                if attempt == 0 and owner.cfg.username and code_needs_auth(code, details):
                    owner._authenticate(conn, timeout)
                    continue
                raise translate_gateway(status, answer, "watch") from None
        raise AssertionError("unreachable")

    def _messages(self, resp: Any) -> Iterator[Body]:
        # The gateway ends each message with a newline; a chunk may hold several, or a
        # part of one.
        pending = b""
        for chunk in resp.iter_content(chunk_size=65536):
            *complete, pending = (pending + chunk).split(b"\n")
            for line in complete:
                if line.strip():
                    message = json.loads(line)
                    if not isinstance(message, dict):
                        raise EtcdUnavailable("watch: a message that is not etcd's JSON")
                    yield message

    def _read(self) -> None:
        error: Exception | None = None
        resp = None
        try:
            resp = self._open()
            with self._lock:
                if self._closed:
                    return
                self._resp = resp
            # The socket's read timeout was for the head only.
            sock = _socket_of(resp)
            if sock is not None:
                sock.settimeout(None)
                _keepalive(sock)
            for message in self._messages(resp):
                trio.from_thread.run(self._send.send, message, trio_token=self._token)
            error = EtcdUnavailable("etcd ended the watch stream")
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.RunFinishedError):
            return  # closed from the Trio side, or the run is over
        except trio.Cancelled:
            return  # the run is ending
        except EtcdError as exc:  # EtcdUnavailable included
            error = exc
        except Exception as exc:  # a broken or shut-down stream
            if self._closed:
                return
            error = EtcdUnavailable(f"watch stream broke: {exc!r}")
        finally:
            if resp is not None:
                with contextlib.suppress(Exception):
                    resp.close()
        with contextlib.suppress(trio.RunFinishedError):
            trio.from_thread.run_sync(self._finish, error, trio_token=self._token)

    def _finish(self, error: Exception | None) -> None:
        self._error = error
        self._send.close()


def _socket_of(resp: Any) -> socket.socket | None:
    """The socket under a streaming ``requests`` answer (urllib3 2's connection)."""
    conn = getattr(resp.raw, "connection", None) or getattr(resp.raw, "_connection", None)
    sock = getattr(conn, "sock", None)
    return sock if isinstance(sock, socket.socket) else None


def _shut_down(resp: Any) -> None:
    """Wake a thread blocked reading ``resp``: closing a socket from another thread does
    not, shutting it down does."""
    sock = _socket_of(resp)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _keepalive(sock: socket.socket) -> None:
    """TCP keep-alives, so that a watch on a connection that died silently ends in seconds."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


@attrs.define(eq=False)
class _Conn:
    """etcd3-py's client for one endpoint, and our auth token for it (kept here, not in
    etcd3-py, which would send a stale one even to ``authenticate``)."""

    client: Any
    token: str | None = None


def _error_answer(exc: Exception) -> tuple[int, Any]:
    """The HTTP status and the JSON body (or the text) of an error answer etcd3-py raised."""
    resp = getattr(exc, "response", None)
    status = int(getattr(resp, "status_code", 0) or getattr(exc, "status", 0) or 0)
    if resp is None:
        return status, {"message": str(getattr(exc, "error", "") or exc)}
    try:
        return status, resp.json()
    except ValueError:
        return status, resp.text
