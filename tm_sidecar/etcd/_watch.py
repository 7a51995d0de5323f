"""Watches over gRPC, and the informer: list, then watch from the listing's revision.

One Watch stream per :func:`watch_once`, carrying one watch. etcd sends whole revisions
in each response (we never ask for fragments), so a response's last event is a safe
point to resume from.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any, Protocol

import trio

from .._errors import Compacted, EtcdUnavailable
from ..core import KeyValue, WatchEvent
from ._codec import decode_event, range_end
from ._proto import rpc_pb2 as pb
from ._transport import WATCH, Transport

log = logging.getLogger("tm_sidecar.etcd")


class ChangesType(Protocol):
    """What :func:`watch_once` makes of a response (the adapter's ``Changes``)."""

    def __call__(self, events: tuple[WatchEvent, ...], revision: int) -> Any: ...


async def watch_once(
    transport: Transport,
    changes: ChangesType,
    key: str,
    start_revision: int,
    *,
    range_end_key: str | None = None,
    prefix: bool = True,
    prev_kv: bool = True,
    puts_only: bool = False,
    progress_notify: bool = False,
) -> AsyncGenerator[Any, None]:
    """One watch stream from ``start_revision``; ends only by raising.

    With ``progress_notify``, etcd's progress notifications come as changes with no
    events, at the revision up to which everything has been sent (etcd sends them only
    to a watch that has caught up). Raises :class:`Compacted` when the start revision
    is gone, :class:`EtcdUnavailable` when the stream breaks or etcd does not confirm the
    watch within the deadline.
    """
    raw = key.encode()
    end = range_end(raw) if prefix else b""
    if range_end_key is not None:
        end = range_end_key.encode()
    create = pb.WatchCreateRequest(
        key=raw,
        range_end=end,
        start_revision=start_revision,
        prev_kv=prev_kv,
        filters=[pb.WatchCreateRequest.NODELETE] if puts_only else [],
        progress_notify=progress_notify,
    )
    opened = await transport.open_stream(WATCH, pb.WatchRequest(create_request=create))
    stream = opened.stream
    try:
        created = False
        while True:
            if created:
                response = await _receive(transport, opened)
            else:
                with trio.move_on_after(transport.timeout_s):
                    response = await _receive(transport, opened)
                    created = True
                if not created:
                    raise EtcdUnavailable(
                        f"etcd did not confirm the watch within {transport.timeout_s} s"
                    )
            if response.canceled:
                if response.compact_revision:
                    raise Compacted(
                        "watch start revision was compacted", int(response.compact_revision)
                    )
                raise EtcdUnavailable(f"etcd cancelled the watch: {response.cancel_reason}")
            if not response.events:
                if progress_notify and not response.created:
                    yield changes((), int(response.header.revision))
                continue  # the creation, or a progress notification
            events = tuple(decode_event(e) for e in response.events)
            # Seen up to the last event, not the header's revision: a watch catching up
            # on history comes in responses of at most 1,000 revisions, each stamped with
            # the store's current revision, ahead of what has been delivered.
            yield changes(events, events[-1].kv.mod_revision)
    finally:
        stream.close()


async def _receive(transport: Transport, opened: Any) -> Any:
    try:
        return await opened.stream.receive()
    except Exception as exc:
        raise transport.stream_error(exc, opened, "watch") from None


class Lister(Protocol):
    """What the informer needs of the client."""

    async def list_prefix(
        self,
        prefix: str,
        *,
        range_end: str | None = None,
        page: int = 2000,
        consume: Callable[[tuple[KeyValue, ...]], None] | None = None,
        keys_only: bool = False,
    ) -> tuple[tuple[KeyValue, ...], int]: ...

    def watch_once(
        self,
        key: str,
        start_revision: int,
        *,
        range_end: str | None = None,
        prefix: bool = True,
        prev_kv: bool = True,
        puts_only: bool = False,
    ) -> AsyncGenerator[Any, None]: ...


def default_backoff(failures: int) -> float:
    """Seconds to wait after ``failures`` failures in a row: 50 ms doubling to 2 s, with
    jitter so that many watchers do not come back at once."""
    return float(min(2.0, 0.05 * 2.0 ** min(failures, 10)) * (0.5 + random.random() / 2))


async def informer(
    client: Lister,
    reset: Callable[[tuple[KeyValue, ...], int, Any], Any],
    changes: ChangesType,
    prefix: str,
    *,
    range_end: str | None = None,
    backoff: Callable[[int], float] | None = None,
    prev_kv: bool = True,
    loader: Callable[[], Any] | None = None,
    page: int = 2000,
) -> AsyncGenerator[Any, None]:
    """List-then-watch ``prefix`` (or ``[prefix, range_end)``) for ever.

    Yields ``reset(kvs, revision, loaded)``, then ``changes(events, revision)``. Resumes
    from the last revision seen when etcd goes away (with backoff); lists again, with a
    new reset, when that revision has been compacted. Changes are never repeated nor
    skipped between resets.
    """
    delay = backoff or default_backoff
    failures = 0
    last: int | None = None
    while True:
        try:
            if last is None:
                loaded = loader() if loader is not None else None
                kvs, revision = await client.list_prefix(
                    prefix,
                    range_end=range_end,
                    consume=loaded.load if loaded is not None else None,
                    page=page,
                )
                last = revision
                failures = 0
                yield reset(kvs, revision, loaded)
            watch = client.watch_once(prefix, last + 1, range_end=range_end, prev_kv=prev_kv)
            async with aclosing(watch) as items:
                async for item in items:
                    fresh = tuple(e for e in item.events if e.kv.mod_revision > last)
                    last = max(last, item.revision)
                    failures = 0
                    if fresh:
                        yield changes(fresh, last)
        except Compacted:
            log.warning("watch on %s fell behind compaction; listing again", prefix)
            last = None
        except EtcdUnavailable as exc:
            failures += 1
            wait = delay(failures)
            log.warning("watch on %s interrupted (%s); retrying in %.2f s", prefix, exc, wait)
            await trio.sleep(wait)
