"""The adapter's interface: what the sidecar, tmctl and the dashboard use of etcd.

:class:`Etcd` is what each transport implements (``_client.GrpcEtcd``,
``_gateway.GatewayEtcd``); :class:`Reset`, :class:`Changes` and :class:`Loader` are what
its watches and informer deal in. The informer itself is written once, on top of
``list_prefix`` and ``watch_once`` (``_informer.py``).

Foreign exceptions never leave a transport: connectivity problems are
:class:`~tm_sidecar.EtcdUnavailable`, refusals :class:`~tm_sidecar.EtcdError` (or one of
its kinds: :class:`~tm_sidecar.Compacted`, :class:`~tm_sidecar.EtcdFull`, lease not
found). Writes are never repeated by a transport: one that timed out may or may not have
committed, so callers make every move idempotent (compares) and re-read after an error.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from typing import Any, Protocol

import attrs

from ..core import KeyValue, Range, RangeResult, Txn, TxnResult, WatchEvent
from ._config import EtcdConfig


def range_end(prefix: bytes) -> bytes:
    """The end of the range of keys under ``prefix`` (every key, for an empty one)."""
    raw = bytearray(prefix)
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return b"\0"
    raw[-1] += 1
    return bytes(raw)


def prefix_end(prefix: str) -> str:
    """The first key after every key under ``prefix``, as text (keys are ASCII paths,
    docs/keys.md)."""
    return range_end(prefix.encode()).decode()


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


class Etcd(abc.ABC):
    """Async access to etcd for Trio code, whatever the transport. Share one per process.

    Make one with :func:`tm_sidecar.etcd.connect`.
    """

    #: The configuration it was made with.
    cfg: EtcdConfig
    #: Called after each request with (path, seconds, "ok" or "error"), for metrics;
    #: ``path`` is the gateway's name of the call (``/kv/range``) on every transport.
    on_request: Callable[[str, float, str], None] | None

    @property
    @abc.abstractmethod
    def endpoint(self) -> str:
        """The endpoint in use."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close every connection and stream."""

    # -- KV --

    @abc.abstractmethod
    async def range(self, r: Range) -> RangeResult:
        """Read a key or a prefix (linearizable)."""

    @abc.abstractmethod
    async def page(self, start: str, range_end: str, limit: int) -> RangeResult:
        """Up to ``limit`` keys of ``[start, range_end)`` in key order (one page of a
        listing for a person: ``more`` says whether a next page starts after the last key)."""

    @abc.abstractmethod
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

    @abc.abstractmethod
    async def put(self, key: str, value: str, *, lease: int = 0) -> int:
        """Write one key; answers the revision."""

    @abc.abstractmethod
    async def delete(self, key: str, *, prefix: bool = False) -> int:
        """Delete a key or a prefix; answers how many keys went."""

    @abc.abstractmethod
    async def txn(self, txn: Txn) -> TxnResult:
        """Run a transaction."""

    @abc.abstractmethod
    async def compact(self, revision: int) -> None:
        """Drop history before ``revision``; a revision already compacted is not an error."""

    @abc.abstractmethod
    async def status(self) -> dict[str, Any]:
        """The endpoint's status (db size, revision, leader), keyed as the gateway's JSON."""

    async def revision(self, key: str = "\0") -> int:
        """The store's current revision, from the header of a one-key read of ``key``.

        Any answer's header carries the revision, so the key read is only what etcd checks
        permissions on: give one the caller may read (a sidecar whose etcd role covers
        its namespace's prefix alone passes a key under that prefix, issue 21)."""
        return (await self.range(Range(key, limit=1, count_only=True))).revision

    async def get(self, key: str) -> KeyValue | None:
        """One key, or None."""
        result = await self.range(Range(key))
        return result.kvs[0] if result.kvs else None

    # -- maintenance (what an operator needs to recover a full etcd) --

    @abc.abstractmethod
    async def alarms(self) -> list[tuple[int, str]]:
        """The raised alarms, as (member id, alarm name)."""

    @abc.abstractmethod
    async def disarm(self, member_id: int, alarm: str) -> None:
        """Clear one alarm (etcd takes writes again once no NOSPACE alarm is left)."""

    @abc.abstractmethod
    async def member_urls(self) -> list[str]:
        """Every member's first client URL."""

    @abc.abstractmethod
    async def defragment(self) -> None:
        """Defragment the member this client talks to (give it one endpoint)."""

    # -- leases --

    @abc.abstractmethod
    async def lease_grant(self, ttl_s: int) -> tuple[int, int]:
        """A new lease; answers (id, granted TTL)."""

    @abc.abstractmethod
    async def lease_keepalive(self, lease: int) -> int:
        """Renew a lease once; answers its TTL, 0 when the lease is gone."""

    @abc.abstractmethod
    async def lease_revoke(self, lease: int) -> None:
        """Revoke a lease (its keys go with it); an unknown lease is not an error."""

    @abc.abstractmethod
    async def lease_ttl(self, lease: int) -> int:
        """A lease's remaining TTL; -1 when it is gone."""

    # -- watches --

    @abc.abstractmethod
    def watch_once(
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
        the one key. Raises :class:`~tm_sidecar.Compacted` when the start revision is
        gone, and :class:`~tm_sidecar.EtcdUnavailable` when the stream breaks or etcd does
        not confirm the watch within the deadline. Each event carries the key's previous
        value only with ``prev_kv``; ``puts_only`` leaves deletions out. Each
        :class:`Changes` holds whole revisions. With ``progress_notify``, etcd's progress
        notifications come as changes with no events, at the revision up to which
        everything has been sent.
        """

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
        """List-then-watch ``prefix`` (or ``[prefix, range_end)``) for ever: a
        :class:`Reset`, then :class:`Changes`; see :func:`tm_sidecar.etcd._informer.informer`."""
        from ._informer import informer

        stream = informer(
            self,
            prefix,
            range_end=range_end,
            backoff=backoff,
            prev_kv=prev_kv,
            loader=loader,
            page=page,
        )
        async with aclosing(stream) as items:
            async for item in items:
                yield item


__all__ = ["Changes", "Etcd", "KeyValue", "Loader", "Reset"]
