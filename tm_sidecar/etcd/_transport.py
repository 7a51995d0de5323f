"""Channels to etcd's endpoints: TLS, the auth token, deadlines, failover, metrics.

One gRPC channel per endpoint, made on first use. Every unary call has a deadline (the
config's ``timeout_s``, auth included; a key-value write's is at most
``write_timeout_s``, see :data:`WRITE_TIMEOUT_S`); a call that finds etcd unavailable
moves the client to the next endpoint. A read, which is safe to repeat, goes straight on
to the next endpoint within the same deadline; a write is not repeated (it may have committed)
and fails with :class:`EtcdUnavailable` for the caller to re-read and retry.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import attrs
import grpc
import trio
from google.protobuf.message import Message

from .._errors import EtcdUnavailable
from ._bridge import Stream, wait_future
from ._errors import needs_auth, translate
from ._proto import rpc_pb2 as pb

log = logging.getLogger("tm_sidecar.etcd")

M = TypeVar("M", bound=Message)


@attrs.frozen
class Method:
    """One etcd RPC: its gRPC path, its answer's type, and its name for metrics (the
    gateway's path, so that dashboards read the same whatever the transport)."""

    path: str
    response: type[Message]
    metric: str


RANGE = Method("/etcdserverpb.KV/Range", pb.RangeResponse, "/kv/range")
PUT = Method("/etcdserverpb.KV/Put", pb.PutResponse, "/kv/put")
DELETE = Method("/etcdserverpb.KV/DeleteRange", pb.DeleteRangeResponse, "/kv/deleterange")
TXN = Method("/etcdserverpb.KV/Txn", pb.TxnResponse, "/kv/txn")
COMPACT = Method("/etcdserverpb.KV/Compact", pb.CompactionResponse, "/kv/compaction")
WATCH = Method("/etcdserverpb.Watch/Watch", pb.WatchResponse, "/watch")
LEASE_GRANT = Method("/etcdserverpb.Lease/LeaseGrant", pb.LeaseGrantResponse, "/lease/grant")
LEASE_REVOKE = Method("/etcdserverpb.Lease/LeaseRevoke", pb.LeaseRevokeResponse, "/lease/revoke")
LEASE_KEEPALIVE = Method(
    "/etcdserverpb.Lease/LeaseKeepAlive", pb.LeaseKeepAliveResponse, "/lease/keepalive"
)
LEASE_TTL = Method(
    "/etcdserverpb.Lease/LeaseTimeToLive", pb.LeaseTimeToLiveResponse, "/lease/timetolive"
)
MEMBER_LIST = Method(
    "/etcdserverpb.Cluster/MemberList", pb.MemberListResponse, "/cluster/member/list"
)
ALARM = Method("/etcdserverpb.Maintenance/Alarm", pb.AlarmResponse, "/maintenance/alarm")
STATUS = Method("/etcdserverpb.Maintenance/Status", pb.StatusResponse, "/maintenance/status")
DEFRAGMENT = Method(
    "/etcdserverpb.Maintenance/Defragment", pb.DefragmentResponse, "/maintenance/defragment"
)
AUTHENTICATE = Method(
    "/etcdserverpb.Auth/Authenticate", pb.AuthenticateResponse, "/auth/authenticate"
)

#: The longest a write waits for etcd. A write that reaches a member just as etcd's raft
#: leader dies is forwarded to the dead leader and lost: etcd answers nothing until the
#: call's deadline, however soon a new leader is elected (about a second). Every write
#: of ours is guarded and its callers re-read and retry on :class:`EtcdUnavailable`, so
#: a short deadline turns that wait into a retry that meets the new leader. Reads wait
#: on etcd's side for the new leader instead (ReadIndex), and keep ``timeout_s``.
WRITE_TIMEOUT_S = 1.0

#: The calls :data:`WRITE_TIMEOUT_S` bounds: the key-value writes (a defragmentation,
#: say, may take longer than any write).
WRITES = frozenset({PUT, DELETE, TXN})

CHANNEL_OPTIONS = (
    # etcd answers ranges of any size (its own client lifts the limit the same way).
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    # HTTP/2 pings find a connection that died silently, so a watch on it ends in
    # seconds. etcd refuses pings more often than every 5 s, and pings with no call open.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
    # Reconnect soon after etcd comes back (the default backoff grows to two minutes).
    # While a channel waits to reconnect, its calls fail at once: every second of
    # backoff is a second a returning etcd goes unused, on top of our callers' own
    # backoff (the gateway client connects afresh per call and has none). A refused
    # connection costs next to nothing, so try a down endpoint about 4 times a second.
    # Not grpc.min_reconnect_backoff_ms: grpc-core also takes it as the connect timeout.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 250),
    # We decide what is repeated: a write may have committed.
    ("grpc.enable_retries", 0),
)


def grpc_target(endpoint: str) -> tuple[str, bool]:
    """The gRPC target of an endpoint URL (``https://host:port``) and whether it is TLS."""
    url = urllib.parse.urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    host = url.hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{url.port or 2379}", url.scheme == "https"


@attrs.define(eq=False)
class _Conn:
    channel: Any
    calls: dict[str, Any] = attrs.Factory(dict)

    def unary(self, method: Method) -> Any:
        call = self.calls.get(method.path)
        if call is None:
            call = self.calls[method.path] = self.channel.unary_unary(
                method.path,
                request_serializer=_serialize,
                response_deserializer=method.response.FromString,
            )
        return call

    def stream(self, method: Method) -> Any:
        call = self.calls.get(method.path)
        if call is None:
            call = self.calls[method.path] = self.channel.stream_stream(
                method.path,
                request_serializer=_serialize,
                response_deserializer=method.response.FromString,
            )
        return call


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


class Transport:
    """Calls to etcd over gRPC for Trio code: see the module docstring."""

    def __init__(
        self,
        *,
        endpoints: tuple[str, ...],
        timeout_s: float,
        write_timeout_s: float | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        username: str | None = None,
        password: str | None = None,
        report: Callable[[str, float, str], None] | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoint")
        self.endpoints = endpoints
        self.timeout_s = timeout_s
        self.write_timeout_s = min(timeout_s, write_timeout_s or WRITE_TIMEOUT_S)
        self._tls_files = (ca_file, cert_file, key_file)
        self._username = username
        self._password = password
        self.report = report
        self._index = 0
        self._conns: dict[int, _Conn] = {}
        self._credentials: Any = None
        self._token: str | None = None
        self._auth_lock = trio.Lock()
        self._closed = False

    @property
    def endpoint(self) -> str:
        """The endpoint in use."""
        return self.endpoints[self._index % len(self.endpoints)]

    def rotate(self, failed: int | None = None) -> None:
        """Move on to the next endpoint (unless another call already has, from ``failed``)."""
        if len(self.endpoints) > 1 and (failed is None or failed == self._index):
            self._index = (self._index + 1) % len(self.endpoints)
            log.warning("etcd endpoint switched", extra={"endpoint": self.endpoint})

    async def _conn(self, index: int) -> _Conn:
        conn = self._conns.get(index)
        if conn is not None:
            return conn
        if self._closed:
            raise EtcdUnavailable("the etcd client is closed")
        target, tls = grpc_target(self.endpoints[index])
        if tls:
            if self._credentials is None:
                self._credentials = await trio.to_thread.run_sync(self._read_credentials)
            channel = grpc.secure_channel(target, self._credentials, options=CHANNEL_OPTIONS)
        else:
            channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        conn = self._conns.setdefault(index, _Conn(channel))
        if conn.channel is not channel:
            channel.close()  # another task made one meanwhile
        return conn

    def _read_credentials(self) -> Any:
        def read(path: str | None) -> bytes | None:
            if path is None:
                return None
            with open(path, "rb") as f:
                return f.read()

        ca, cert, key = self._tls_files
        return grpc.ssl_channel_credentials(
            root_certificates=read(ca),
            private_key=read(key or cert) if cert else None,
            certificate_chain=read(cert),
        )

    # -- auth --

    async def _metadata(self, deadline: float) -> tuple[tuple[str, str], ...]:
        if not self._username:
            return ()
        if self._token is None:
            await self._authenticate(None, deadline)
        return (("token", self._token or ""),)

    async def _authenticate(self, stale: str | None, deadline: float) -> None:
        """Get a token, unless another task already replaced ``stale`` meanwhile."""
        async with self._auth_lock:
            if self._token is not None and self._token != stale:
                return
            request = pb.AuthenticateRequest(name=self._username, password=self._password or "")
            index = self._index
            conn = await self._conn(index)
            future = conn.unary(AUTHENTICATE).future(
                request, timeout=max(deadline - trio.current_time(), 0.001)
            )
            try:
                answer = await wait_future(future)
            except grpc.RpcError as exc:
                error = translate(exc, "authentication")
                if isinstance(error, EtcdUnavailable):
                    self.rotate(index)
                raise error from None
            self._token = str(answer.token)

    def invalidate_token(self, stale: str | None) -> None:
        """Forget a token etcd refused (the next call authenticates again)."""
        if self._token == stale:
            self._token = None

    # -- calls --

    async def unary(self, method: Method, request: Message, *, idempotent: bool = False) -> Any:
        """One unary call; answers the response message.

        Raises :class:`EtcdUnavailable` when etcd cannot be reached or does not answer
        within the deadline, and the translated refusal otherwise.
        """
        started = trio.current_time()
        limit = self.write_timeout_s if method in WRITES else self.timeout_s
        deadline = started + limit
        outcome = "error"
        reauthenticated = False
        tried = 0
        try:
            while True:
                index = self._index
                metadata = await self._metadata(deadline)
                remaining = deadline - trio.current_time()
                if remaining <= 0:
                    raise EtcdUnavailable(f"etcd did not answer within {limit} s")
                conn = await self._conn(index)
                future = conn.unary(method).future(request, timeout=remaining, metadata=metadata)
                try:
                    answer = await wait_future(future)
                except grpc.RpcError as exc:
                    if needs_auth(exc) and self._username and not reauthenticated:
                        reauthenticated = True  # refused before anything was applied
                        self.invalidate_token(metadata[0][1] if metadata else None)
                        continue
                    error = translate(exc, method.metric)
                    if isinstance(error, EtcdUnavailable):
                        self.rotate(index)
                        tried += 1
                        if idempotent and tried < len(self.endpoints):
                            continue
                    raise error from None
                outcome = "ok"
                return answer
        finally:
            if self.report is not None:
                self.report(method.metric, trio.current_time() - started, outcome)

    async def open_stream(self, method: Method, *first: Message) -> OpenStream:
        """A bidirectional stream on the endpoint in use, with ``first`` already queued."""
        deadline = trio.current_time() + self.timeout_s
        metadata = await self._metadata(deadline)
        index = self._index
        callable_ = (await self._conn(index)).stream(method)

        def open_call(requests: Iterator[Message]) -> Any:
            return callable_(requests, metadata=metadata)

        stream: Stream[Message, Any] = Stream(open_call)
        for request in first:
            stream.send(request)
        return OpenStream(stream, index, metadata[0][1] if metadata else None)

    def stream_error(self, exc: BaseException, opened: OpenStream, what: str) -> Exception:
        """What the end of a stream means for its reader, once the bookkeeping is done: a
        refused token is forgotten and a lost endpoint left behind (both answer
        :class:`EtcdUnavailable`, so that the reader opens a new stream)."""
        if isinstance(exc, EOFError):
            self.rotate(opened.index)
            return EtcdUnavailable(f"{what}: etcd ended the stream")
        if needs_auth(exc):
            self.invalidate_token(opened.token)
            return EtcdUnavailable(f"{what}: etcd refused the auth token; authenticating again")
        error = translate(exc, what)
        if isinstance(error, EtcdUnavailable):
            self.rotate(opened.index)
        return error

    async def aclose(self) -> None:
        """Close every channel (in-flight calls fail as cancelled)."""
        self._closed = True
        conns, self._conns = self._conns, {}
        for conn in conns.values():
            conn.channel.close()


@attrs.frozen(eq=False)
class OpenStream:
    """A stream, with the endpoint and the token it was opened with."""

    stream: Stream[Message, Any]
    index: int
    token: str | None
