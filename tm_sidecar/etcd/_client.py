"""The gRPC etcd client behind the adapter's interface (:class:`._interface.Etcd`)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Callable
from typing import Any

import trio
from google.protobuf.json_format import MessageToDict

from .._errors import Compacted, EtcdError, LeaseNotFound
from ..core import KeyValue, Range, RangeResult, Txn, TxnResult
from . import _transport as rpc
from ._codec import decode_kvs, decode_range, decode_txn, encode_range, encode_txn
from ._config import EtcdConfig
from ._interface import Changes, Etcd, range_end
from ._leases import KeepAlives
from ._proto import rpc_pb2 as pb
from ._watch import watch_once


class GrpcEtcd(Etcd):
    """Async access to etcd over its native gRPC API, for Trio code. Share one per process."""

    def __init__(self, cfg: EtcdConfig) -> None:
        self.cfg = cfg
        self.on_request = None
        self._rpc = rpc.Transport(
            endpoints=cfg.endpoints,
            timeout_s=cfg.timeout_s,
            ca_file=cfg.ca_file,
            cert_file=cfg.cert_file,
            key_file=cfg.key_file,
            username=cfg.username,
            password=cfg.password,
            report=self._report,
        )
        self._keepalives = KeepAlives(self._rpc)

    def _report(self, path: str, seconds: float, outcome: str) -> None:
        if self.on_request is not None:
            self.on_request(path, seconds, outcome)

    @property
    def endpoint(self) -> str:
        """The endpoint in use."""
        return self._rpc.endpoint

    async def aclose(self) -> None:
        """Close the streams and the channels."""
        self._keepalives.close()
        await self._rpc.aclose()

    # -- KV --

    async def range(self, r: Range) -> RangeResult:
        """Read a key or a prefix (linearizable)."""
        return decode_range(await self._rpc.unary(rpc.RANGE, encode_range(r), idempotent=True))

    async def page(self, start: str, range_end: str, limit: int) -> RangeResult:
        """Up to ``limit`` keys of ``[start, range_end)`` in key order (one page of a
        listing for a person: ``more`` says whether a next page starts after the last key)."""
        request = pb.RangeRequest(key=start.encode(), range_end=range_end.encode(), limit=limit)
        return decode_range(await self._rpc.unary(rpc.RANGE, request, idempotent=True))

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

        With ``consume``, the pages go to it instead, in order, in a worker thread (which
        also decodes them), each while the next one is fetched; the answer's keys are then
        empty. With ``keys_only``, the values are left out (empty).
        """
        if consume is None:
            kvs: list[KeyValue] = []

            def collect(resp: pb.RangeResponse) -> None:
                kvs.extend(decode_kvs(resp.kvs))

            revision = await self._range_pages(prefix, range_end, page, keys_only, collect)
            return tuple(kvs), revision
        send, receive = trio.open_memory_channel[pb.RangeResponse](1)

        def take(resp: pb.RangeResponse) -> None:
            consume(decode_kvs(resp.kvs))

        async def take_in() -> None:
            async for resp in receive:
                await trio.to_thread.run_sync(take, resp)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(take_in)
                async with send:
                    revision = await self._range_pages(
                        prefix, range_end, page, keys_only, send.send
                    )
        except BaseExceptionGroup as group:
            # Callers catch EtcdUnavailable, Compacted...: raise the error, not a group.
            errors = [e for e in group.exceptions if not isinstance(e, trio.Cancelled)]
            if len(errors) == 1:
                raise errors[0] from None
            raise
        return (), revision

    async def _range_pages(
        self,
        prefix: str,
        end: str | None,
        page: int,
        keys_only: bool,
        out: Callable[[pb.RangeResponse], Any],
    ) -> int:
        start = prefix.encode()
        stop = end.encode() if end is not None else range_end(start)
        revision = 0
        while True:
            request = pb.RangeRequest(
                key=start, range_end=stop, limit=page, revision=revision, keys_only=keys_only
            )
            resp = await self._rpc.unary(rpc.RANGE, request, idempotent=True)
            revision = revision or resp.header.revision
            done = out(resp)
            if done is not None:
                await done
            if not resp.more or not resp.kvs:
                return revision
            start = resp.kvs[-1].key + b"\0"

    async def put(self, key: str, value: str, *, lease: int = 0) -> int:
        """Write one key; answers the revision."""
        request = pb.PutRequest(key=key.encode(), value=value.encode(), lease=lease)
        return int((await self._rpc.unary(rpc.PUT, request)).header.revision)

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        """Delete a key or a prefix; answers how many keys went."""
        raw = key.encode()
        request = pb.DeleteRangeRequest(key=raw, range_end=range_end(raw) if prefix else b"")
        return int((await self._rpc.unary(rpc.DELETE, request)).deleted)

    async def txn(self, txn: Txn) -> TxnResult:
        """Run a transaction."""
        return decode_txn(await self._rpc.unary(rpc.TXN, encode_txn(txn)))

    async def compact(self, revision: int) -> None:
        """Drop history before ``revision``; a revision already compacted is not an error."""
        with contextlib.suppress(Compacted):
            await self._rpc.unary(rpc.COMPACT, pb.CompactionRequest(revision=revision))

    async def status(self) -> dict[str, Any]:
        """The endpoint's status (db size, revision, leader), keyed as the gateway's JSON."""
        answer = await self._rpc.unary(rpc.STATUS, pb.StatusRequest(), idempotent=True)
        return dict(MessageToDict(answer, preserving_proto_field_name=True))

    # -- maintenance --

    async def alarms(self) -> list[tuple[int, str]]:
        """The raised alarms, as (member id, alarm name)."""
        request = pb.AlarmRequest(action=pb.AlarmRequest.GET)
        answer = await self._rpc.unary(rpc.ALARM, request, idempotent=True)
        return [(int(a.memberID), pb.AlarmType.Name(a.alarm)) for a in answer.alarms]

    async def disarm(self, member_id: int, alarm: str) -> None:
        """Clear one alarm (etcd takes writes again once no NOSPACE alarm is left)."""
        request = pb.AlarmRequest(
            action=pb.AlarmRequest.DEACTIVATE, memberID=member_id, alarm=alarm
        )
        await self._rpc.unary(rpc.ALARM, request)

    async def member_urls(self) -> list[str]:
        """Every member's first client URL."""
        answer = await self._rpc.unary(rpc.MEMBER_LIST, pb.MemberListRequest(), idempotent=True)
        return [str(m.clientURLs[0]) for m in answer.members if m.clientURLs]

    async def defragment(self) -> None:
        """Defragment the member this client talks to (give it one endpoint)."""
        await self._rpc.unary(rpc.DEFRAGMENT, pb.DefragmentRequest())

    # -- leases --

    async def lease_grant(self, ttl_s: int) -> tuple[int, int]:
        """A new lease; answers (id, granted TTL)."""
        answer = await self._rpc.unary(rpc.LEASE_GRANT, pb.LeaseGrantRequest(TTL=ttl_s))
        if answer.error:
            raise EtcdError(str(answer.error))
        return int(answer.ID), int(answer.TTL)

    async def lease_keepalive(self, lease: int) -> int:
        """Renew a lease once; answers its TTL, 0 when the lease is gone."""
        return await self._keepalives.once(lease)

    async def lease_revoke(self, lease: int) -> None:
        """Revoke a lease (its keys go with it); an unknown lease is not an error."""
        with contextlib.suppress(LeaseNotFound):
            await self._rpc.unary(rpc.LEASE_REVOKE, pb.LeaseRevokeRequest(ID=lease))

    async def lease_ttl(self, lease: int) -> int:
        """A lease's remaining TTL; -1 when it is gone."""
        request = pb.LeaseTimeToLiveRequest(ID=lease)
        try:
            answer = await self._rpc.unary(rpc.LEASE_TTL, request, idempotent=True)
        except LeaseNotFound:
            return -1
        return int(answer.TTL)

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
        :class:`EtcdUnavailable` when the stream breaks.
        """
        async with contextlib.aclosing(
            watch_once(
                self._rpc,
                key,
                start_revision,
                range_end_key=range_end,
                prefix=prefix,
                prev_kv=prev_kv,
                puts_only=puts_only,
                progress_notify=progress_notify,
            )
        ) as items:
            async for item in items:
                yield item


__all__ = ["GrpcEtcd"]
