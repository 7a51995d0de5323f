"""One client's connection: who it is, its outbox, and its frames in and out.

Owns the peer's credentials (``SO_PEERCRED``, read here and nowhere else in the
repository), the bounded outbox (a client that does not read is dropped, not waited for),
the writer that sends what is queued, and the reader that frames what arrives with
:mod:`taskmanager.protocol`'s codec and bounded line framer. What a frame asks for is the
server's business (``_server.py``); what a connection holds for the ops (workers,
deliveries, subscriptions) is kept here so that it goes with the connection.
"""

from __future__ import annotations

import itertools
import logging
import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import trio
from taskmanager.protocol import (
    FrameError,
    LineFramer,
    ProtocolViolation,
    TaskManagerError,
    decode_frame,
    encode_frame,
    error_to_wire,
)

from ..core import PrefetchWindow
from ..node._agent import Registration
from ..node._hub import Subscription

if TYPE_CHECKING:
    from ._workers import Delivery

log = logging.getLogger("tm_sidecar.server")

#: Frames waiting to be written to one client; a client this far behind is dropped.
OUTBOX = 1000

#: Numbers for what a client names by number (workers, deliveries, subscriptions): one
#: counter for all of them, so that no two share a number.
ids = itertools.count(1)


@attrs.frozen
class PeerCred:
    """Who is at the other end of a Unix socket, as the kernel tells it."""

    pid: int
    uid: int
    gid: int

    @classmethod
    def of(cls, sock: socket.socket | trio.socket.SocketType) -> PeerCred | None:
        """The peer of ``sock`` (``SO_PEERCRED``), or None where the kernel does not say."""
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return None
        pid, uid, gid = struct.unpack("3i", raw)
        return cls(pid=pid, uid=uid, gid=gid)


def peer_fields(peer: PeerCred | None) -> dict[str, Any]:
    """A peer as log fields (``pid``, ``uid``, ``gid``; ``peer=unknown`` if not known)."""
    if peer is None:
        return {"peer": "unknown"}
    return {"pid": peer.pid, "uid": peer.uid, "gid": peer.gid}


class Closed(Exception):
    """The connection is to be closed (after the frames already queued)."""


def error_frame(rid: Any, exc: TaskManagerError) -> dict[str, Any]:
    """The answer to request ``rid`` that failed with ``exc``."""
    return {"id": rid, "ok": False, "error": error_to_wire(exc)}


@attrs.define(eq=False)
class Connection:
    """One client: its stream, its outbox, and what the ops keep for it."""

    stream: trio.SocketStream
    peer: PeerCred | None
    outbox_send: trio.MemorySendChannel[bytes]
    outbox_receive: trio.MemoryReceiveChannel[bytes]
    nursery: trio.Nursery | None = None
    hello: bool = False
    registrations: dict[int, Registration] = attrs.Factory(dict)
    deliveries: dict[int, Delivery] = attrs.Factory(dict)
    subscriptions: dict[int, Subscription] = attrs.Factory(dict)
    written: trio.Event = attrs.Factory(trio.Event)
    closed: bool = False
    #: The prefetch windows of the workers registered with ``batch``, by worker: their
    #: deliveries (by id) wait there for the next ``tasks`` push (woken by ``tasks_wake``).
    windows: dict[int, PrefetchWindow] = attrs.Factory(dict)
    tasks_wake: trio.Event = attrs.Factory(trio.Event)
    #: Whether the one task that makes the ``tasks`` pushes runs (from the first batched
    #: registration to the connection's end).
    pushing_tasks: bool = False

    @classmethod
    def open(cls, stream: trio.SocketStream) -> Connection:
        """A connection on ``stream``, its peer read from the socket."""
        send, receive = trio.open_memory_channel[bytes](OUTBOX)
        return cls(stream, PeerCred.of(stream.socket), send, receive)

    @property
    def log_fields(self) -> dict[str, Any]:
        """Who this client is, as log fields."""
        return peer_fields(self.peer)

    def push(self, frame: dict[str, Any]) -> None:
        """Queue a frame; a client that does not read is dropped rather than waited for."""
        self.push_line(encode_frame(frame))

    def push_line(self, line: bytes) -> None:
        """Queue a frame encoded already (its newline included), as :meth:`push` does."""
        try:
            self.outbox_send.send_nowait(line)
        except trio.WouldBlock:
            log.warning("client is not reading: dropping it", extra=self.log_fields)
            self.outbox_send.close()
            if self.nursery is not None:
                self.nursery.cancel_scope.cancel()
        except trio.ClosedResourceError:
            pass

    async def write_frames(self) -> None:
        """Send what is queued until the outbox closes, then close the stream."""
        try:
            async for frame in self.outbox_receive:
                # Whatever else is queued goes in the same write: one system call, not many.
                frames = [frame]
                while len(frames) < 256:
                    try:
                        frames.append(self.outbox_receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await self.stream.send_all(b"".join(frames) if len(frames) > 1 else frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.written.set()
        with trio.move_on_after(1, shield=True):
            await self.stream.aclose()

    async def read_frames(
        self, max_frame: int, dispatch: Callable[[Connection, dict[str, Any]], None]
    ) -> None:
        """Give each frame that arrives to ``dispatch``; raise :class:`Closed` at the end.

        A frame that breaks the framing (too long, not JSON, not an object) is answered
        with ``protocol_violation`` and ends the connection.
        """
        framer = LineFramer(max_frame)
        while True:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise Closed
            try:
                for line in framer.feed(chunk):
                    frame = decode_frame(line)
                    if frame is not None:
                        dispatch(self, frame)
            except FrameError as exc:
                self.push(error_frame(None, ProtocolViolation(f"{exc}: closing")))
                raise Closed from exc
