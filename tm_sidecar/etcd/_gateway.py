"""etcd's JSON gateway through etcd3-py: the transport for deployments that can reach
only the gateway (``--etcd-transport gateway``).

Unary calls are etcd3-py's ``call_rpc`` with raw JSON bodies, in worker threads bounded
by a limiter of our own. Each watch is one streaming ``call_rpc('/watch', ...,
stream=True)`` read by a dedicated thread that hands whole messages to a bounded Trio
channel, so a slow consumer slows the reader; cancelling the watch shuts the stream's
socket down, which ends the thread. etcd3-py's stateful helpers (``Watcher``,
``Lease.keepalive``, ``Lock``) are not used: see ETCD-NOTES.

One etcd3-py client per endpoint, made on first use (its constructor probes the server);
a call that finds etcd unavailable moves on to the next endpoint. A read goes straight
on to it within the same deadline; a write is not repeated (it may have committed).
Every call has the config's deadline, authentication included. The watch streams are
``_gateway_watch``'s; the JSON each call sends and reads is ``_gateway_codec``'s.

Size: one class, :class:`GatewayEtcd`, whose methods are the adapter's interface (about
twenty calls, each a few lines over one shared call path with its failover and auth);
the gRPC transport spreads the same over ``_transport``, ``_leases``, ``_watch`` and
``_client`` because grpcio needs a bridge of its own for each.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import urllib.parse
import warnings
from collections.abc import AsyncGenerator, Callable
from typing import Any

import trio

from .._errors import Compacted, EtcdError, EtcdUnavailable, LeaseNotFound
from ..core import KeyValue, Range, RangeResult, Txn, TxnResult
from ._config import EtcdConfig
from ._errors import code_needs_auth, gateway_status, translate_gateway, watch_refused
from ._gateway_codec import (
    Body,
    b64,
    decode_range,
    decode_txn,
    encode_range,
    encode_txn,
    range_end_b64,
)
from ._gateway_watch import _Conn, _error_answer, _watch_message, _WatchStream
from ._interface import Changes, Etcd

log = logging.getLogger("tm_sidecar.etcd")


class GatewayEtcd(Etcd):
    """Async access to etcd over its JSON gateway, through etcd3-py, for Trio code."""

    def __init__(self, cfg: EtcdConfig) -> None:
        if not cfg.endpoints:
            raise ValueError("no etcd endpoint")
        self.cfg = cfg
        self.on_request = None
        self._index = 0
        self._clients: dict[int, _Conn] = {}
        self._client_lock = trio.Lock()
        self._limiter = trio.CapacityLimiter(cfg.threads)
        self._watches: set[_WatchStream] = set()
        self._closed = False

    @property
    def endpoint(self) -> str:
        """The endpoint in use."""
        return self.cfg.endpoints[self._index % len(self.cfg.endpoints)]

    def _rotate(self, failed: int) -> None:
        """Move on to the next endpoint (unless another call already has, from ``failed``)."""
        if len(self.cfg.endpoints) > 1 and failed == self._index:
            self._index = (self._index + 1) % len(self.cfg.endpoints)
            log.warning("etcd endpoint switched", extra={"endpoint": self.endpoint})

    async def aclose(self) -> None:
        """Close every watch stream and connection."""
        self._closed = True
        for watch in list(self._watches):
            watch.close()
        clients, self._clients = self._clients, {}
        for conn in clients.values():
            await trio.to_thread.run_sync(conn.client.close, limiter=self._limiter)

    # -- clients --

    async def _client(self, index: int, deadline: float) -> _Conn:
        conn = self._clients.get(index)
        if conn is not None:
            return conn
        async with self._client_lock:
            conn = self._clients.get(index)
            if conn is None:
                if self._closed:
                    raise EtcdUnavailable("the etcd client is closed")
                endpoint = self.cfg.endpoints[index]
                remaining = deadline - trio.current_time()
                conn = await self._in_thread(
                    functools.partial(self._make_client, endpoint, remaining), deadline
                )
                self._clients[index] = conn
            return conn

    def _make_client(self, endpoint: str, timeout_s: float) -> _Conn:
        import etcd3
        import requests

        cfg = self.cfg
        url = urllib.parse.urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
        cert: tuple[str, str] | None = None
        if cfg.cert_file:
            cert = (cfg.cert_file, cfg.key_file or cfg.cert_file)
        verify: str | bool = cfg.ca_file or (url.scheme == "https")
        try:
            # etcd3-py's constructor probes the server with a fixed 0.3 s timeout and
            # then fails with an AttributeError; probe first with our own deadline, so
            # that a slow etcd is waited for and a refusing one passed over at once.
            with requests.Session() as probe:
                probe.trust_env = not cfg.ca_file
                probe.get(
                    f"{url.scheme or 'http'}://{url.netloc}/version",
                    timeout=max(timeout_s, 0.001),
                    verify=verify,
                    cert=cert,
                ).raise_for_status()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                client = etcd3.Client(
                    host=url.hostname or "127.0.0.1",
                    port=url.port or 2379,
                    protocol=url.scheme or "http",
                    cert=cert or (),
                    # etcd3-py verifies nothing unless told to: a CA file, or the system's.
                    verify=verify,
                    timeout=cfg.timeout_s,
                )
        except (AttributeError, requests.RequestException) as exc:
            raise EtcdUnavailable(f"cannot reach etcd at {endpoint}: {exc}") from None
        if url.scheme == "https":
            client.protocol = "https"
        if cfg.ca_file:
            # requests lets REQUESTS_CA_BUNDLE override a session's own CA: ours must win.
            client._session.trust_env = False
        conn = _Conn(client)
        if cfg.username:
            self._authenticate(conn, max(timeout_s, 0.001))
        return conn

    def _authenticate(self, conn: _Conn, timeout_s: float) -> None:
        """Get a fresh token for ``conn`` (in a worker thread), within ``timeout_s``."""
        answer = self._post(conn, "/auth/authenticate", _auth_body(self.cfg), timeout_s, False)
        token = answer.get("token")
        if not token:
            raise EtcdError("etcd's authentication answered no token (is auth enabled?)")
        conn.token = str(token)

    async def _in_thread(self, fn: Callable[[], Any], deadline: float) -> Any:
        remaining = deadline - trio.current_time()
        if remaining <= 0:
            raise EtcdUnavailable(f"etcd did not answer within {self.cfg.timeout_s} s")
        try:
            with trio.fail_after(remaining):
                # Abandoning the thread on cancel is safe: the caller treats the outcome
                # of a cancelled write as unknown, and the thread ends with its request's
                # own timeout (the same deadline).
                return await trio.to_thread.run_sync(
                    fn, limiter=self._limiter, abandon_on_cancel=True
                )
        except trio.TooSlowError:
            raise EtcdUnavailable(f"etcd did not answer within {self.cfg.timeout_s} s") from None

    # -- calls --

    def _post(
        self, conn: _Conn, path: str, body: Body, timeout_s: float, authenticated: bool = True
    ) -> Body:
        """One gateway request on ``conn`` (blocking); answers its JSON object."""
        import etcd3.errors
        import requests

        for attempt in range(2):
            headers = {}
            if authenticated and self.cfg.username and conn.token is None:
                self._authenticate(conn, timeout_s)  # a token was dropped
            if authenticated and conn.token:
                headers["authorization"] = conn.token
            try:
                resp = conn.client.call_rpc(
                    path, body, encode=False, raw=True, timeout=timeout_s, headers=headers
                )
                return _json_object(resp)
            except requests.RequestException as exc:
                raise EtcdUnavailable(f"etcd request {path} failed: {exc}") from None
            except etcd3.errors.Etcd3Exception as exc:
                status, answer = _error_answer(exc)
                code, details = gateway_status(answer)
                refused_token = self.cfg.username and code_needs_auth(code, details)
                if authenticated and refused_token and attempt == 0:
                    # Refused before anything was applied: authenticate, then once more.
                    self._authenticate(conn, timeout_s)
                    continue
                raise translate_gateway(status, answer, path) from None
        raise AssertionError("unreachable")

    async def call(self, path: str, body: Body, *, idempotent: bool = False) -> Body:
        """One unary gateway call (``path`` such as ``/kv/range``); answers its JSON.

        Raises :class:`EtcdUnavailable` when etcd cannot be reached or does not answer
        within the deadline (a read first tries the other endpoints), the translated
        refusal otherwise.
        """
        started = trio.current_time()
        deadline = started + self.cfg.timeout_s
        outcome = "error"
        tried = 0
        try:
            while True:
                index = self._index
                try:
                    conn = await self._client(index, deadline)
                    remaining = max(deadline - trio.current_time(), 0.001)
                    answer = await self._in_thread(
                        functools.partial(self._post, conn, path, body, remaining), deadline
                    )
                except EtcdUnavailable:
                    self._rotate(index)
                    tried += 1
                    if (
                        idempotent
                        and tried < len(self.cfg.endpoints)
                        and trio.current_time() < deadline
                    ):
                        continue
                    raise
                outcome = "ok"
                return dict(answer)
        finally:
            if self.on_request is not None:
                self.on_request(path, trio.current_time() - started, outcome)

    # -- KV --

    async def range(self, r: Range) -> RangeResult:
        """Read a key or a prefix (linearizable)."""
        return decode_range(await self.call("/kv/range", encode_range(r), idempotent=True))

    async def page(self, start: str, range_end: str, limit: int) -> RangeResult:
        """Up to ``limit`` keys of ``[start, range_end)`` in key order (one page of a
        listing for a person: ``more`` says whether a next page starts after the last key)."""
        body: Body = {"key": b64(start), "range_end": b64(range_end), "limit": limit}
        return decode_range(await self.call("/kv/range", body, idempotent=True))

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
        while the next one is fetched; the answer's keys are then empty. With
        ``keys_only``, the values are left out (empty).
        """
        if consume is None:
            kvs: list[KeyValue] = []

            async def collect(page_kvs: tuple[KeyValue, ...]) -> None:
                kvs.extend(page_kvs)

            revision = await self._pages(prefix, range_end, page, keys_only, collect)
            return tuple(kvs), revision
        send, receive = trio.open_memory_channel[tuple[KeyValue, ...]](1)

        async def take_in() -> None:
            async for kvs_page in receive:
                await trio.to_thread.run_sync(consume, kvs_page)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(take_in)
                async with send:
                    revision = await self._pages(prefix, range_end, page, keys_only, send.send)
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
        keys_only: bool,
        out: Callable[[tuple[KeyValue, ...]], Any],
    ) -> int:
        start, revision = prefix, 0
        end = b64(range_end) if range_end is not None else range_end_b64(prefix)
        while True:
            body: Body = {"key": b64(start), "range_end": end, "limit": page}
            if revision:
                body["revision"] = revision
            if keys_only:
                body["keys_only"] = True
            result = decode_range(await self.call("/kv/range", body, idempotent=True))
            revision = revision or result.revision
            await out(result.kvs)
            if not result.more or not result.kvs:
                return revision
            start = result.kvs[-1].key + "\0"

    async def put(self, key: str, value: str, *, lease: int = 0) -> int:
        """Write one key; answers the revision."""
        body: Body = {"key": b64(key), "value": b64(value)}
        if lease:
            body["lease"] = lease
        answer = await self.call("/kv/put", body)
        return int(answer.get("header", {}).get("revision", 0))

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        """Delete a key or a prefix; answers how many keys went."""
        body: Body = {"key": b64(key)}
        if prefix:
            body["range_end"] = range_end_b64(key)
        answer = await self.call("/kv/deleterange", body)
        return int(answer.get("deleted", 0))

    async def txn(self, txn: Txn) -> TxnResult:
        """Run a transaction."""
        return decode_txn(await self.call("/kv/txn", encode_txn(txn)))

    async def compact(self, revision: int) -> None:
        """Drop history before ``revision``; a revision already compacted is not an error."""
        with contextlib.suppress(Compacted):
            await self.call("/kv/compaction", {"revision": revision, "physical": False})

    async def status(self) -> dict[str, Any]:
        """The endpoint's status (db size, revision, leader), as the gateway's JSON."""
        return await self.call("/maintenance/status", {}, idempotent=True)

    # -- maintenance --

    async def alarms(self) -> list[tuple[int, str]]:
        """The raised alarms, as (member id, alarm name)."""
        answer = await self.call("/maintenance/alarm", {"action": "GET"}, idempotent=True)
        return [(int(a.get("memberID", 0)), str(a["alarm"])) for a in answer.get("alarms") or ()]

    async def disarm(self, member_id: int, alarm: str) -> None:
        """Clear one alarm (etcd takes writes again once no NOSPACE alarm is left)."""
        await self.call(
            "/maintenance/alarm", {"action": "DEACTIVATE", "memberID": member_id, "alarm": alarm}
        )

    async def member_urls(self) -> list[str]:
        """Every member's first client URL."""
        answer = await self.call("/cluster/member/list", {}, idempotent=True)
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
        # The gateway's keep-alive is a stream: one request gets one answer, then it ends.
        answer = await self.call("/lease/keepalive", {"ID": lease}, idempotent=True)
        if "error" in answer:
            raise translate_gateway(200, answer, "/lease/keepalive")
        result = answer.get("result", answer)
        # etcd answers a lease it does not know (expired, revoked) with no TTL.
        return max(int(result.get("TTL", 0) or 0), 0)

    async def lease_revoke(self, lease: int) -> None:
        """Revoke a lease (its keys go with it); an unknown lease is not an error."""
        with contextlib.suppress(LeaseNotFound):
            await self.call("/lease/revoke", {"ID": lease})

    async def lease_ttl(self, lease: int) -> int:
        """A lease's remaining TTL; -1 when it is gone."""
        try:
            answer = await self.call("/lease/timetolive", {"ID": lease}, idempotent=True)
        except LeaseNotFound:
            return -1
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
        """One watch stream from ``start_revision``; ends only by raising (see
        :meth:`Etcd.watch_once`)."""
        request: Body = {"key": b64(key), "start_revision": start_revision}
        if progress_notify:
            request["progress_notify"] = True
        if prev_kv:
            request["prev_kv"] = True
        if puts_only:
            request["filters"] = ["NODELETE"]
        if range_end is not None:
            request["range_end"] = b64(range_end)
        elif prefix:
            request["range_end"] = range_end_b64(key)
        deadline = trio.current_time() + self.cfg.timeout_s
        index = self._index
        try:
            conn = await self._client(index, deadline)
        except EtcdUnavailable:
            self._rotate(index)
            raise
        watch = _WatchStream(self, conn, {"create_request": request})
        self._watches.add(watch)
        try:
            created = False
            while True:
                if created:
                    message = await watch.receive()
                else:
                    with trio.move_on_after(max(deadline - trio.current_time(), 0)):
                        message = await watch.receive()
                        created = True
                    if not created:
                        raise EtcdUnavailable(
                            f"etcd did not confirm the watch within {self.cfg.timeout_s} s"
                        )
                result = message.get("result") or {}
                refused = result.get("canceled") and watch_refused(str(result.get("cancel_reason")))
                if refused and conn.token == watch.token:
                    # Maybe a token etcd dropped: the next stream authenticates again.
                    conn.token = None
                changes = _watch_message(message)
                if changes is not None:
                    yield changes
                elif progress_notify and created and not result.get("created"):
                    # A progress notification: everything up to its revision was sent.
                    revision = int((result.get("header") or {}).get("revision", 0) or 0)
                    if revision:
                        yield Changes((), revision)
        except EtcdUnavailable:
            self._rotate(index)
            raise
        finally:
            watch.close()
            self._watches.discard(watch)


def _auth_body(cfg: EtcdConfig) -> Body:
    return {"name": cfg.username, "password": cfg.password or ""}


def _json_object(resp: Any) -> Body:
    """The JSON object of a 200 answer. One that is not (a proxy's page, a cut body) is
    not etcd's: its outcome is unknown, so it is unavailability, never an empty success."""
    try:
        value = json.loads(resp.content) if resp.content else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        value = None
    if not isinstance(value, dict):
        raise EtcdUnavailable("the answer is not etcd's JSON")
    return value
