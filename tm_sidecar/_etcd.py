"""The etcd adapter: the only module that imports ``etcd3``.

It speaks etcd's JSON gateway (``/v3/...``). Unary calls go through etcd3-py's client
(raw JSON through ``call_rpc``, in worker threads bounded by a limiter of their own) or,
with ``transport="native"``, through a small HTTP/1.1 client on Trio streams. Watches are
always read natively: etcd3-py's ``Watcher`` is unsafe (ETCD-NOTES) and a blocking
stream in a thread cannot be cancelled from Trio.

Foreign exceptions are translated here, once: connectivity problems become
:class:`EtcdUnavailable`, refusals :class:`EtcdError` (or :class:`Compacted`).

Writes are never retried here: a write that timed out may or may not have committed.
Callers make every move idempotent (compares) and re-read after an error.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import inspect
import json
import logging
import math
import random
import socket
import ssl
import urllib.parse
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing
from typing import Any, Literal, Protocol, TypeVar

import attrs
import trio

from ._errors import Compacted, EtcdError, EtcdFull, EtcdUnavailable, LeaseNotFound
from .core import (
    Compare,
    Delete,
    KeyValue,
    Put,
    Range,
    RangeResult,
    Request,
    Touch,
    Txn,
    TxnResult,
    WatchEvent,
)

log = logging.getLogger("tm_sidecar.etcd")

T = TypeVar("T")
_Body = dict[str, Any]


@attrs.frozen(kw_only=True)
class EtcdConfig:
    """How to reach etcd. ``password`` never appears in a repr or a log."""

    endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=lambda v: "***" if v else "None")
    timeout_s: float = 5.0
    #: "grpc", the default, is etcd's native API; "native" (our HTTP/1.1 client) and
    #: "etcd3" (etcd3-py) speak its JSON gateway. ``tm_sidecar.etcd.connect(cfg)`` makes
    #: the client for it (``Etcd(cfg)`` is the gateway client only).
    transport: Literal["etcd3", "native", "grpc"] = "grpc"
    threads: int = 16

    @property
    def tls(self) -> bool:
        """Whether the endpoints use TLS."""
        return any(e.startswith("https://") for e in self.endpoints) or self.ca_file is not None


# -- encoding ------------------------------------------------------------------------------


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: str | None) -> str:
    # binascii directly: base64.b64decode's argument checks cost as much as the decoding.
    return binascii.a2b_base64(text).decode() if text else ""


def _range_end_b64(prefix: str) -> str:
    raw = bytearray(prefix.encode())
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return base64.b64encode(b"\0").decode()
    raw[-1] += 1
    return base64.b64encode(bytes(raw)).decode()


def encode_range(r: Range) -> _Body:
    """The gateway form of a range request."""
    body: _Body = {"key": _b64(r.key)}
    if r.prefix:
        body["range_end"] = _range_end_b64(r.key)
    if r.limit:
        body["limit"] = r.limit
    if r.revision:
        body["revision"] = r.revision
    if r.keys_only:
        body["keys_only"] = True
    if r.count_only:
        body["count_only"] = True
    if r.min_mod_revision:
        body["min_mod_revision"] = r.min_mod_revision
    return body


def encode_request(req: Request) -> _Body:
    """The gateway form of one operation of a transaction."""
    if isinstance(req, Put):
        body: _Body = {"key": _b64(req.key), "value": _b64(req.value)}
        if req.lease:
            body["lease"] = req.lease
        return {"request_put": body}
    if isinstance(req, Touch):
        return {"request_put": {"key": _b64(req.key), "lease": req.lease, "ignore_value": True}}
    if isinstance(req, Delete):
        body = {"key": _b64(req.key)}
        if req.prefix:
            body["range_end"] = _range_end_b64(req.key)
        return {"request_delete_range": body}
    return {"request_range": encode_range(req)}


_TARGET_FIELD = {
    "VERSION": "version",
    "CREATE": "create_revision",
    "MOD": "mod_revision",
    "VALUE": "value",
    "LEASE": "lease",
}


def encode_compare(c: Compare) -> _Body:
    """The gateway form of a compare."""
    field = _TARGET_FIELD[c.target.value]
    value: Any = _b64(str(c.value)) if field == "value" else int(c.value)
    return {"key": _b64(c.key), "target": c.target.value, "result": c.op.value, field: value}


def encode_txn(txn: Txn) -> _Body:
    """The gateway form of a transaction."""
    return {
        "compare": [encode_compare(c) for c in txn.compare],
        "success": [encode_request(r) for r in txn.success],
        "failure": [encode_request(r) for r in txn.failure],
    }


def decode_kv(kv: _Body) -> KeyValue:
    """A key-value from the gateway's JSON."""
    get = kv.get
    value = get("value")
    lease = get("lease")
    return KeyValue(
        binascii.a2b_base64(kv["key"]).decode(),
        binascii.a2b_base64(value).decode() if value else "",
        int(get("create_revision", 0)),
        int(get("mod_revision", 0)),
        int(get("version", 0)),
        int(lease) if lease else 0,
    )


def decode_range(body: _Body, revision: int | None = None) -> RangeResult:
    """A range answer from the gateway's JSON."""
    rev = revision if revision is not None else int(body.get("header", {}).get("revision", 0))
    return RangeResult(
        kvs=tuple(decode_kv(kv) for kv in body.get("kvs", ())),
        count=int(body.get("count", 0)),
        more=bool(body.get("more", False)),
        revision=rev,
    )


def decode_txn(body: _Body) -> TxnResult:
    """A transaction answer from the gateway's JSON."""
    revision = int(body.get("header", {}).get("revision", 0))
    ranges = tuple(
        decode_range(r["response_range"], revision)
        for r in body.get("responses", ())
        if "response_range" in r
    )
    return TxnResult(succeeded=bool(body.get("succeeded", False)), revision=revision, ranges=ranges)


def decode_event(ev: _Body) -> WatchEvent:
    """A watch event from the gateway's JSON."""
    prev = ev.get("prev_kv")
    return WatchEvent(
        kind=ev.get("type", "PUT"),
        kv=decode_kv(ev["kv"]),
        prev=decode_kv(prev) if prev else None,
    )


def translate_error(status: int, body: _Body | None, text: str = "") -> Exception:
    """The tm-sidecar exception for an error answer of the gateway."""
    message = ""
    if body:
        message = str(body.get("message") or body.get("error") or "")
    message = message or text or f"HTTP {status}"
    code = int(body.get("code", 0)) if body else 0
    # gRPC 8 is RESOURCE_EXHAUSTED: the NOSPACE alarm ("database space exceeded"), or
    # etcd's applier falling behind ("too many requests"), which passes. The gateway
    # gives both the same code and status, so only the text tells them apart.
    if code == 8 or status == 429:
        if "too many requests" in message:
            return EtcdUnavailable(message)
        return EtcdFull(message)
    if "compacted" in message:
        return Compacted(message)
    if "lease not found" in message:
        return LeaseNotFound(message)
    # gRPC codes: 4 deadline exceeded, 14 unavailable; plus etcd's own leader trouble.
    if (
        code in (4, 14)
        or status in (502, 503, 504)
        or "leader" in message
        or "timed out" in message
    ):
        return EtcdUnavailable(message)
    return EtcdError(message)


# -- transports ------------------------------------------------------------------------------


def _ssl_context(cfg: EtcdConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cfg.ca_file)
    if cfg.cert_file:
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    return ctx


class HttpProtocolError(Exception):
    """The gateway's answer is not HTTP/1.1 as we speak it."""


#: What a broken or refused connection raises while we talk to the gateway.
_BROKEN = (
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    HttpProtocolError,
)


@attrs.define(eq=False)
class _HttpConn:
    """One keep-alive connection to the gateway and what it has received but not read."""

    stream: trio.abc.Stream
    buffer: bytearray = attrs.Factory(bytearray)
    #: How the body of the answer being read is framed: its length, or -1 if chunked.
    length: int = 0
    #: Whether the connection can carry another request once this answer is read.
    keep_alive: bool = True

    async def fill(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            raise trio.BrokenResourceError("etcd closed the connection")
        self.buffer += data

    async def line(self) -> bytes:
        while (end := self.buffer.find(b"\r\n")) < 0:
            if len(self.buffer) > _MAX_LINE:
                raise HttpProtocolError("a line of the answer is too long")
            await self.fill()
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 2]
        return line

    async def take(self, size: int) -> bytes:
        while len(self.buffer) < size:
            await self.fill()
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data


_MAX_LINE = 64 * 1024


class _NativeHttp:
    """A small keep-alive HTTP/1.1 client for the gateway, on Trio streams.

    It speaks just what the gateway needs: POST with a JSON body; answers framed by
    Content-Length or chunked. Written for speed: framing with a general HTTP library
    cost a third of the sidecar's CPU under load.
    """

    def __init__(self, cfg: EtcdConfig) -> None:
        self._cfg = cfg
        self._idle: dict[str, list[_HttpConn]] = {}
        self._ssl = _ssl_context(cfg) if cfg.tls else None
        self._hosts: dict[str, bytes] = {}

    async def _connect(self, endpoint: str) -> _HttpConn:
        url = urllib.parse.urlsplit(endpoint)
        host, port = url.hostname or "127.0.0.1", url.port or 2379
        try:
            stream: trio.abc.Stream
            if url.scheme == "https":
                assert self._ssl is not None
                stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=self._ssl)
            else:
                stream = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            raise EtcdUnavailable(f"cannot connect to {endpoint}: {exc}") from exc
        _keepalive(stream)
        return _HttpConn(stream)

    async def open(
        self, endpoint: str, path: str, body: _Body, headers: list[tuple[str, str]]
    ) -> tuple[_HttpConn, int]:
        """Send a POST and read the status line; the caller reads the body.

        A pooled connection may have died while idle (etcd restarted): then the request
        goes once more on a fresh one. Every request we send is safe to repeat.
        """
        pool = self._idle.setdefault(endpoint, [])
        if pool:
            try:
                return await self._open_on(pool.pop(), endpoint, path, body, headers)
            except EtcdUnavailable:
                # The others idled as long: likely dead too (etcd restarted). Close them.
                stale, self._idle[endpoint] = self._idle[endpoint], []
                for conn in stale:
                    await self._discard(conn)
        return await self._open_on(await self._connect(endpoint), endpoint, path, body, headers)

    def _request(
        self, endpoint: str, path: str, data: bytes, headers: list[tuple[str, str]]
    ) -> bytes:
        host = self._hosts.get(endpoint)
        if host is None:
            netloc = urllib.parse.urlsplit(endpoint).netloc
            host = self._hosts[endpoint] = f"Host: {netloc}\r\n".encode("latin-1")
        extra = "".join(f"{name}: {value}\r\n" for name, value in headers)
        return b"".join(
            (
                b"POST ",
                path.encode("latin-1"),
                b" HTTP/1.1\r\n",
                host,
                b"Content-Type: application/json\r\nContent-Length: ",
                str(len(data)).encode(),
                b"\r\n",
                extra.encode("latin-1"),
                b"\r\n",
                data,
            )
        )

    async def _open_on(
        self, conn: _HttpConn, endpoint: str, path: str, body: _Body, headers: list[tuple[str, str]]
    ) -> tuple[_HttpConn, int]:
        data = json.dumps(body, separators=(",", ":")).encode()
        try:
            await conn.stream.send_all(self._request(endpoint, path, data, headers))
            return conn, await self._head(conn)
        except _BROKEN as exc:
            await self._discard(conn)
            raise EtcdUnavailable(f"etcd connection to {endpoint} failed: {exc!r}") from exc
        except BaseException:
            await self._discard(conn)
            raise

    async def _head(self, conn: _HttpConn) -> int:
        """Read an answer's status line and headers; answers the status."""
        while True:
            status_line = await conn.line()
            version, _, rest = status_line.partition(b" ")
            try:
                status = int(rest[:3])
            except ValueError:
                raise HttpProtocolError(f"not a status line: {status_line[:80]!r}") from None
            length, chunked, close = None, False, version != b"HTTP/1.1"
            while line := await conn.line():
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    try:
                        length = int(value)
                    except ValueError:
                        raise HttpProtocolError(f"bad Content-Length {value[:40]!r}") from None
                    if length < 0:
                        raise HttpProtocolError("a negative Content-Length")
                elif name == b"transfer-encoding":
                    chunked = b"chunked" in value.lower()
                elif name == b"connection":
                    close = b"close" in value.lower()
            if 100 <= status < 200:
                continue  # an interim answer: the real one follows
            if chunked:
                conn.length = -1
            elif length is not None:
                conn.length = length
            else:
                raise HttpProtocolError("an answer with neither length nor chunks")
            conn.keep_alive = not close
            return status

    async def read_chunks(self, conn: _HttpConn) -> AsyncGenerator[bytes, None]:
        """The body, as it arrives (each chunk whole)."""
        if conn.length >= 0:
            yield await conn.take(conn.length)
            return
        while True:
            size_line = await conn.line()
            try:
                size = int(size_line.split(b";", 1)[0], 16)
            except ValueError:
                raise HttpProtocolError(f"not a chunk size: {size_line[:80]!r}") from None
            if size == 0:
                while await conn.line():
                    pass  # trailers
                return
            data = await conn.take(size + 2)
            if data[-2:] != b"\r\n":
                raise HttpProtocolError("a chunk does not end where its size says")
            yield data[:-2]

    async def call(
        self, endpoint: str, path: str, body: _Body, headers: list[tuple[str, str]]
    ) -> tuple[int, bytes]:
        """One request and its whole answer."""
        conn, status = await self.open(endpoint, path, body, headers)
        parts = []
        try:
            async with aclosing(self.read_chunks(conn)) as _items:
                async for chunk in _items:
                    parts.append(chunk)
        except _BROKEN as exc:
            await self._discard(conn)
            raise EtcdUnavailable(f"etcd connection to {endpoint} failed: {exc!r}") from exc
        except BaseException:
            await self._discard(conn)
            raise
        if conn.keep_alive and not conn.buffer:
            self._idle.setdefault(endpoint, []).append(conn)
        else:
            await self._discard(conn)
        return status, parts[0] if len(parts) == 1 else b"".join(parts)

    async def _discard(self, conn: _HttpConn) -> None:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(conn.stream)

    async def aclose(self) -> None:
        for pool in self._idle.values():
            for conn in pool:
                await self._discard(conn)
        self._idle.clear()


# -- the adapter ------------------------------------------------------------------------------


@attrs.frozen
class Reset:
    """The watched prefix as a whole, at ``revision``: start over from this.

    With a ``loader``, the keys went to ``loaded`` (what the loader made of them) and
    ``kvs`` is empty.
    """

    kvs: tuple[KeyValue, ...]
    revision: int
    loaded: Any = None


class Loader(Protocol):
    """Takes in a listing page by page, in a worker thread (see :meth:`Etcd.informer`)."""

    def load(self, kvs: Sequence[KeyValue]) -> None:
        """Take in one page, in key order."""


@attrs.frozen
class Changes:
    """Changes to the watched prefix; ``revision`` is the last one's (everything up to it
    has been delivered)."""

    events: tuple[WatchEvent, ...]
    revision: int


class Etcd:
    """Async access to etcd for Trio code. Share one per process."""

    def __init__(self, cfg: EtcdConfig) -> None:
        if cfg.transport == "grpc":
            raise ValueError("the gRPC transport is tm_sidecar.etcd.connect(cfg), not Etcd(cfg)")
        self.cfg = cfg
        self._endpoint_index = 0
        self._native = _NativeHttp(cfg)
        self._limiter = trio.CapacityLimiter(cfg.threads)
        self._client: Any = None
        self._client_lock = trio.Lock()
        self._token: str | None = None
        self._auth_lock = trio.Lock()
        #: Called after each request with (path, seconds, "ok" or "error"), for metrics.
        self.on_request: Callable[[str, float, str], None] | None = None

    @property
    def endpoint(self) -> str:
        """The endpoint in use."""
        return self.cfg.endpoints[self._endpoint_index % len(self.cfg.endpoints)]

    def _rotate(self) -> None:
        if len(self.cfg.endpoints) > 1:
            self._endpoint_index += 1
            log.warning("etcd endpoint switched to %s", self.endpoint)
            self._client = None

    async def aclose(self) -> None:
        """Close every connection."""
        await self._native.aclose()
        client, self._client = self._client, None
        if client is not None:
            await trio.to_thread.run_sync(client.close, limiter=self._limiter)

    # -- calls --

    async def call(self, path: str, body: _Body) -> _Body:
        """One unary gateway call (``path`` such as ``/kv/range``); answers its JSON."""
        started = trio.current_time()
        outcome = "error"
        try:
            with trio.fail_after(self.cfg.timeout_s):
                if self.cfg.transport == "native":
                    answer = await self._call_native(path, body)
                else:
                    answer = await self._call_etcd3(path, body)
            outcome = "ok"
            return answer
        except trio.TooSlowError as exc:
            self._rotate()
            raise EtcdUnavailable(
                f"etcd did not answer {path} within {self.cfg.timeout_s} s"
            ) from exc
        except EtcdUnavailable:
            self._rotate()
            raise
        finally:
            if self.on_request is not None:
                self.on_request(path, trio.current_time() - started, outcome)

    async def _headers(self) -> list[tuple[str, str]]:
        if self.cfg.username and self._token is None:
            await self._authenticate()
        return [("Authorization", self._token)] if self._token else []

    async def _authenticate(self) -> None:
        async with self._auth_lock:
            status, raw = await self._native.call(
                self.endpoint,
                "/v3/auth/authenticate",
                {"name": self.cfg.username, "password": self.cfg.password},
                [],
            )
            body = _loads(raw, status)
            if status != 200:
                raise translate_error(status, body, "authentication failed")
            self._token = str(body["token"])

    async def _call_native(self, path: str, body: _Body) -> _Body:
        for attempt in range(2):
            status, raw = await self._native.call(
                self.endpoint, "/v3" + path, body, await self._headers()
            )
            answer = _loads(raw, status)
            if status == 200:
                return answer
            if attempt == 0 and self.cfg.username and "token" in str(answer.get("message", "")):
                self._token = None  # expired: authenticate again, once
                continue
            raise translate_error(status, answer, raw.decode(errors="replace"))
        raise AssertionError("unreachable")

    async def _etcd3_client(self) -> Any:
        async with self._client_lock:
            if self._client is None:
                self._client = await trio.to_thread.run_sync(
                    self._make_client, limiter=self._limiter
                )
            return self._client

    def _make_client(self) -> Any:
        import warnings

        import etcd3

        url = urllib.parse.urlsplit(self.endpoint)
        cert: tuple[str, ...] = ()
        if self.cfg.cert_file:
            cert = (self.cfg.cert_file, self.cfg.key_file or self.cfg.cert_file)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                client = etcd3.Client(
                    host=url.hostname or "127.0.0.1",
                    port=url.port or 2379,
                    protocol=url.scheme or "http",
                    cert=cert,
                    verify=self.cfg.ca_file or (url.scheme == "https"),
                    timeout=self.cfg.timeout_s,
                    username=self.cfg.username,
                    password=self.cfg.password,
                )
        except AttributeError as exc:
            # etcd3-py's constructor probes the server and fails this way when it is down.
            raise EtcdUnavailable(f"cannot reach etcd at {self.endpoint}") from exc
        if url.scheme == "https":
            client.protocol = "https"
        if self.cfg.ca_file:
            # requests lets REQUESTS_CA_BUNDLE override a session's own CA: ours must win.
            client._session.trust_env = False
        if self.cfg.username:
            client.auth()
        return client

    async def _call_etcd3(self, path: str, body: _Body) -> _Body:
        client = await self._etcd3_client()

        def run() -> _Body:
            import etcd3.errors
            import requests

            for attempt in range(2):
                try:
                    resp = client.call_rpc(path, body, encode=False, raw=True)
                    return dict(resp.json())
                except requests.RequestException as exc:
                    raise EtcdUnavailable(f"etcd request {path} failed: {exc}") from exc
                except etcd3.errors.ErrInvalidAuthToken:
                    if attempt == 0 and self.cfg.username:
                        client.auth()
                        continue
                    raise
                except etcd3.errors.Etcd3Exception as exc:
                    message = str(getattr(exc, "error", "") or exc)
                    status = int(getattr(exc, "status", 0) or 0)
                    code = getattr(exc, "code", 0)
                    code = code if isinstance(code, int) else 0
                    raise translate_error(status, {"message": message, "code": code}) from exc
            raise AssertionError("unreachable")

        # Abandoning the thread on cancel is safe: the caller treats the outcome of a
        # cancelled write as unknown, and the thread ends with its request's timeout.
        return await trio.to_thread.run_sync(run, limiter=self._limiter, abandon_on_cancel=True)

    # -- KV --

    async def range(self, r: Range) -> RangeResult:
        """Read a key or a prefix (linearizable)."""
        return decode_range(await self.call("/kv/range", encode_range(r)))

    async def revision(self) -> int:
        """The store's current revision."""
        return (await self.range(Range("\0", limit=1, count_only=True))).revision

    async def get(self, key: str) -> KeyValue | None:
        """One key, or None."""
        result = await self.range(Range(key))
        return result.kvs[0] if result.kvs else None

    async def list_prefix(
        self,
        prefix: str,
        *,
        range_end: str | None = None,
        page: int = 2000,
        consume: Callable[[tuple[KeyValue, ...]], None] | None = None,
        keys_only: bool = False,
    ) -> tuple[tuple[KeyValue, ...], int]:
        """Every key under ``prefix`` (or in ``[prefix, range_end)``), in pages at one revision.

        With ``consume``, the pages go to it instead, in order, in a worker thread, each
        while the next one is fetched (a large listing costs about as much CPU to take in
        as etcd takes to send); the answer's keys are then empty. With ``keys_only``, the
        values are left out (empty).
        """
        if consume is None:
            kvs: list[KeyValue] = []
            revision = await self._pages(prefix, range_end, page, kvs.extend, keys_only)
            return tuple(kvs), revision
        send, receive = trio.open_memory_channel[tuple[KeyValue, ...]](1)

        async def take_in() -> None:
            async for kvs_page in receive:
                await trio.to_thread.run_sync(consume, kvs_page)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(take_in)
                async with send:
                    revision = await self._pages(prefix, range_end, page, send.send)
        except BaseExceptionGroup as group:
            # Callers catch EtcdUnavailable, Compacted...: raise the error, not a group.
            errors = [e for e in group.exceptions if not isinstance(e, trio.Cancelled)]
            if len(errors) == 1:
                raise errors[0] from None
            raise
        return (), revision

    async def _pages(
        self,
        prefix: str,
        range_end: str | None,
        page: int,
        out: Callable[[tuple[KeyValue, ...]], object],
        keys_only: bool = False,
    ) -> int:
        start, revision = prefix, 0
        end = _b64(range_end) if range_end is not None else _range_end_b64(prefix)
        while True:
            body: _Body = {"key": _b64(start), "range_end": end, "limit": page}
            if revision:
                body["revision"] = revision
            if keys_only:
                body["keys_only"] = True
            result = decode_range(await self.call("/kv/range", body))
            revision = revision or result.revision
            done = out(result.kvs)
            if inspect.isawaitable(done):
                await done
            if not result.more or not result.kvs:
                return revision
            start = result.kvs[-1].key + "\0"

    async def page(self, start: str, range_end: str, limit: int) -> RangeResult:
        """Up to ``limit`` keys of ``[start, range_end)`` in key order (one page of a
        listing for a person: ``more`` says whether a next page starts after the last key)."""
        body: _Body = {"key": _b64(start), "range_end": _b64(range_end), "limit": limit}
        return decode_range(await self.call("/kv/range", body))

    async def put(self, key: str, value: str, *, lease: int = 0) -> int:
        """Write one key; answers the revision."""
        body: _Body = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = lease
        answer = await self.call("/kv/put", body)
        return int(answer.get("header", {}).get("revision", 0))

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        """Delete a key or a prefix; answers how many keys went."""
        body: _Body = {"key": _b64(key)}
        if prefix:
            body["range_end"] = _range_end_b64(key)
        answer = await self.call("/kv/deleterange", body)
        return int(answer.get("deleted", 0))

    async def txn(self, txn: Txn) -> TxnResult:
        """Run a transaction."""
        return decode_txn(await self.call("/kv/txn", encode_txn(txn)))

    async def compact(self, revision: int) -> None:
        """Drop history before ``revision``; a revision already compacted is not an error."""
        with contextlib.suppress(Compacted):
            await self.call("/kv/compaction", {"revision": revision, "physical": False})

    async def status(self) -> _Body:
        """The endpoint's status (db size, revision, leader)."""
        return await self.call("/maintenance/status", {})

    # -- maintenance (what an operator needs to recover a full etcd) --

    async def alarms(self) -> list[tuple[int, str]]:
        """The raised alarms, as (member id, alarm name)."""
        answer = await self.call("/maintenance/alarm", {"action": "GET"})
        return [(int(a.get("memberID", 0)), str(a["alarm"])) for a in answer.get("alarms") or ()]

    async def disarm(self, member_id: int, alarm: str) -> None:
        """Clear one alarm (etcd takes writes again once no NOSPACE alarm is left)."""
        await self.call(
            "/maintenance/alarm", {"action": "DEACTIVATE", "memberID": member_id, "alarm": alarm}
        )

    async def member_urls(self) -> list[str]:
        """Every member's first client URL."""
        answer = await self.call("/cluster/member/list", {})
        return [str(m["clientURLs"][0]) for m in answer.get("members") or () if m.get("clientURLs")]

    async def defragment(self) -> None:
        """Defragment the member this client talks to (give it one endpoint)."""
        await self.call("/maintenance/defragment", {})

    # -- leases --

    async def lease_grant(self, ttl_s: int) -> tuple[int, int]:
        """A new lease; answers (id, granted TTL)."""
        answer = await self.call("/lease/grant", {"TTL": ttl_s})
        if answer.get("error"):
            raise EtcdError(str(answer["error"]))
        return int(answer["ID"]), int(answer["TTL"])

    async def lease_keepalive(self, lease: int) -> int:
        """Renew a lease once; answers its TTL, 0 when the lease is gone."""
        answer = await self.call("/lease/keepalive", {"ID": lease})
        result = answer.get("result", answer)
        return int(result.get("TTL", 0) or 0)

    async def lease_revoke(self, lease: int) -> None:
        """Revoke a lease (its keys go with it); an unknown lease is not an error."""
        try:
            await self.call("/lease/revoke", {"ID": lease})
        except EtcdError as exc:
            if "not found" not in str(exc):
                raise

    async def lease_ttl(self, lease: int) -> int:
        """A lease's remaining TTL; -1 when it is gone."""
        answer = await self.call("/lease/timetolive", {"ID": lease})
        return int(answer.get("TTL", -1))

    # -- watches --

    async def watch_once(
        self,
        key: str,
        start_revision: int,
        *,
        range_end: str | None = None,
        prefix: bool = True,
        prev_kv: bool = True,
        puts_only: bool = False,
        progress_notify: bool = False,
    ) -> AsyncGenerator[Changes, None]:
        """One watch stream from ``start_revision``; ends only by raising.

        Watches the keys under ``key`` (``prefix``), the keys in ``[key, range_end)``, or
        the one key. Raises :class:`Compacted` when the start revision is gone, and
        :class:`EtcdUnavailable` when the stream breaks. Each event carries the key's
        previous value only with ``prev_kv``; ``puts_only`` leaves deletions out. Both
        spare etcd and us the bytes of what a watcher does not look at.
        ``progress_notify`` is asked of etcd, but the gateway's notifications are not
        passed on (the gRPC client passes them on as changes with no events).
        """
        request: _Body = {"key": _b64(key), "start_revision": start_revision}
        if progress_notify:
            request["progress_notify"] = True
        if prev_kv:
            request["prev_kv"] = True
        if puts_only:
            request["filters"] = ["NODELETE"]
        if range_end is not None:
            request["range_end"] = _b64(range_end)
        elif prefix:
            request["range_end"] = _range_end_b64(key)
        body = {"create_request": request}
        endpoint = self.endpoint
        try:
            with trio.fail_after(self.cfg.timeout_s):
                conn, status = await self._native.open(
                    endpoint, "/v3/watch", body, await self._headers()
                )
        except trio.TooSlowError as exc:
            raise EtcdUnavailable("etcd did not accept the watch in time") from exc
        try:
            if status != 200:
                raise EtcdUnavailable(f"watch refused with HTTP {status}")
            # The gateway ends each message with a newline.
            pending: list[bytes] = []
            async with aclosing(self._native.read_chunks(conn)) as _items:
                async for chunk in _items:
                    *complete, rest = chunk.split(b"\n")
                    for piece in complete:
                        pending.append(piece)
                        line = b"".join(pending)
                        pending = []
                        if line.strip():
                            changes = self._watch_message(json.loads(line))
                            if changes is not None:
                                yield changes
                    if rest:
                        pending.append(rest)
            raise EtcdUnavailable("etcd ended the watch stream")
        except _BROKEN as exc:
            raise EtcdUnavailable(f"watch stream broke: {exc!r}") from exc
        finally:
            await self._native._discard(conn)

    @staticmethod
    def _watch_message(message: _Body) -> Changes | None:
        if "error" in message:
            err = message["error"]
            raise translate_error(int(err.get("http_code", 503)), err)
        result = message.get("result", {})
        if result.get("canceled"):
            compact = int(result.get("compact_revision", 0) or 0)
            if compact:
                raise Compacted("watch start revision was compacted", compact)
            raise EtcdUnavailable(f"etcd cancelled the watch: {result.get('cancel_reason', '')}")
        events = tuple(decode_event(e) for e in result.get("events", ()))
        if not events:
            return None
        # Seen up to the last event, not the header's revision: a watch catching up on
        # history comes in responses of at most 1,000 revisions, each stamped with the
        # store's current revision, so the stamp runs ahead of what has been delivered.
        return Changes(events, events[-1].kv.mod_revision)

    async def informer(
        self,
        prefix: str,
        *,
        range_end: str | None = None,
        backoff: Callable[[int], float] | None = None,
        prev_kv: bool = True,
        loader: Callable[[], Loader] | None = None,
        page: int = 2000,
    ) -> AsyncGenerator[Reset | Changes, None]:
        """List-then-watch ``prefix`` (or ``[prefix, range_end)``) forever.

        Yields a :class:`Reset`, then :class:`Changes`.

        Reconnects with backoff when etcd goes away and resumes from the last revision
        seen; when that revision has been compacted, it lists again and yields a new
        :class:`Reset`. Changes are never repeated nor skipped between resets.
        """
        delay = backoff or _default_backoff
        failures = 0
        last: int | None = None
        while True:
            try:
                if last is None:
                    loaded = loader() if loader is not None else None
                    kvs, revision = await self.list_prefix(
                        prefix,
                        range_end=range_end,
                        consume=loaded.load if loaded is not None else None,
                        page=page,
                    )
                    last = revision
                    failures = 0
                    yield Reset(kvs, revision, loaded)
                async with aclosing(
                    self.watch_once(prefix, last + 1, range_end=range_end, prev_kv=prev_kv)
                ) as _items:
                    async for changes in _items:
                        fresh = tuple(e for e in changes.events if e.kv.mod_revision > last)
                        last = max(last, changes.revision)
                        failures = 0
                        if fresh:
                            yield Changes(fresh, last)
            except Compacted:
                log.warning("watch on %s fell behind compaction; listing again", prefix)
                last = None
            except EtcdUnavailable as exc:
                failures += 1
                wait = delay(failures)
                log.warning("watch on %s interrupted (%s); retrying in %.2f s", prefix, exc, wait)
                await trio.sleep(wait)


def _keepalive(stream: trio.abc.Stream) -> None:
    """TCP keep-alives, so that a watch on a connection that died silently ends in seconds."""
    sock_stream = getattr(stream, "transport_stream", stream)
    if not isinstance(sock_stream, trio.SocketStream):
        return
    sock_stream.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            sock_stream.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def _default_backoff(failures: int) -> float:
    return float(min(2.0, 0.05 * 2.0 ** min(failures, 10)) * (0.5 + random.random() / 2))


def _loads(raw: bytes, status: int) -> _Body:
    """The JSON object of an answer.

    A 200 answer that is not one is not etcd's (a proxy's page, a cut body): its outcome
    is unknown, so it is unavailability, never a refusal or an empty success. An error
    answer that is not JSON keeps its text as the message.
    """
    try:
        value = json.loads(raw) if raw else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        value = None
    if isinstance(value, dict):
        return value
    if status == 200:
        raise EtcdUnavailable("the answer is not etcd's JSON")
    return {"message": raw.decode(errors="replace")}


async def retrying(
    op: Callable[[], Awaitable[T]],
    *,
    what: str,
    deadline_s: float = math.inf,
    on_retry: Callable[[Exception], None] | None = None,
) -> T:
    """Run a safe-to-repeat operation until it stops failing with EtcdUnavailable (or
    EtcdFull: a full etcd takes writes again once an operator has freed space)."""
    failures = 0
    with trio.fail_after(deadline_s) if math.isfinite(deadline_s) else trio.CancelScope():
        while True:
            try:
                return await op()
            except (EtcdUnavailable, EtcdFull) as exc:
                failures += 1
                if on_retry is not None:
                    on_retry(exc)
                wait = _default_backoff(failures)
                if isinstance(exc, EtcdFull):
                    log.error(
                        "%s refused: etcd is full (%s); free space with `tmctl recover`; "
                        "retrying in %.2f s",
                        what,
                        exc,
                        wait,
                    )
                else:
                    log.warning("%s failed (%s); retrying in %.2f s", what, exc, wait)
                await trio.sleep(wait)
