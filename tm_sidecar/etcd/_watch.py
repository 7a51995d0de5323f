"""Watches over gRPC (the informer on top of them is ``_informer.py``, shared by both
transports).

One Watch stream per :func:`watch_once`, carrying one watch. etcd sends whole revisions
in each response (we never ask for fragments), so a response's last event is a safe
point to resume from.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import trio

from .._errors import Compacted, EtcdUnavailable
from ._codec import decode_event
from ._errors import watch_refused
from ._interface import Changes, range_end
from ._proto import rpc_pb2 as pb
from ._transport import WATCH, Transport


async def watch_once(
    transport: Transport,
    key: str,
    start_revision: int,
    *,
    range_end_key: str | None = None,
    prefix: bool = True,
    prev_kv: bool = True,
    puts_only: bool = False,
    progress_notify: bool = False,
) -> AsyncGenerator[Changes, None]:
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
                if watch_refused(response.cancel_reason):
                    # Maybe a token etcd dropped: the next stream authenticates again.
                    transport.invalidate_token(opened.token)
                raise EtcdUnavailable(f"etcd cancelled the watch: {response.cancel_reason}")
            if not response.events:
                if progress_notify and not response.created:
                    yield Changes((), int(response.header.revision))
                continue  # the creation, or a progress notification
            events = tuple(decode_event(e) for e in response.events)
            # Seen up to the last event, not the header's revision: a watch catching up
            # on history comes in responses of at most 1,000 revisions, each stamped with
            # the store's current revision, ahead of what has been delivered.
            yield Changes(events, events[-1].kv.mod_revision)
    finally:
        stream.close()


async def _receive(transport: Transport, opened: Any) -> Any:
    try:
        return await opened.stream.receive()
    except Exception as exc:
        raise transport.stream_error(exc, opened, "watch") from None
