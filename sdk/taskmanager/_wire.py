"""Frames on one connection to the sidecar: reading them, sending requests, matching answers.

:class:`Wire` reads the sidecar's frames through :mod:`taskmanager.protocol` (the sidecar
is not trusted: a frame that makes no sense ends the connection), hands each answer to
the request waiting for it (:class:`_Answers`) and each push to its ``on_push`` hook, and
sends requests, refusing before sending one the sidecar would refuse. It outlives a
connection: :class:`~taskmanager._connection.Connection` gives it each new stream.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc

from .protocol import (
    DEFAULT_MAX_FRAME,
    ConnectionLost,
    FrameError,
    FrameTooLarge,
    InvalidRequest,
    LineFramer,
    PayloadTooLarge,
    TaskManagerError,
    decode_frame,
    encode_frame,
    error_from_wire,
)

log = logging.getLogger("taskmanager")

#: Frames larger than this are sent shielded from cancellation: a frame cut short would
#: corrupt the stream (smaller ones go out in one write, or not at all).
_SHIELDED_SEND = 64 * 1024

Reply = dict[str, Any]

#: The codes of an error about no request that the sidecar closes the connection after.
_CLOSING_CODES = ("protocol_violation", "permission_denied")


class _Answers:
    """Requests waiting for their answer, by request id: the reply, or the SDK's own
    error when none will come."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[anyio.Event, list[Reply | TaskManagerError]]] = {}
        self._on_reply: dict[int, Callable[[Reply], None]] = {}

    def next_id(self) -> int:
        """The id of the next request."""
        return next(self._ids)

    def expect(
        self, rid: int, on_reply: Callable[[Reply], None] | None
    ) -> tuple[anyio.Event, list[Reply | TaskManagerError]]:
        """Wait for an answer to ``rid``: the event set then, and where the answer goes."""
        event, slot = anyio.Event(), list[Reply | TaskManagerError]()
        self._waiting[rid] = (event, slot)
        if on_reply is not None:
            self._on_reply[rid] = on_reply
        return event, slot

    def forget(self, rid: int) -> None:
        """Nobody waits for ``rid`` any more."""
        self._waiting.pop(rid, None)
        self._on_reply.pop(rid, None)

    def answer(self, frame: Reply) -> bool:
        """Hand ``frame`` to the request it answers; False if no request waits for it."""
        waiting = self._waiting.get(frame.get("id"))  # type: ignore[arg-type]
        if waiting is None:
            return False
        on_reply = self._on_reply.get(frame["id"])
        if on_reply is not None:
            on_reply(frame)
        waiting[1].append(frame)
        waiting[0].set()
        return True

    def fail_all(self, answer: Callable[[], Reply | TaskManagerError], *, clear: bool) -> None:
        """Answer every waiting request with ``answer()``."""
        for event, slot in self._waiting.values():
            slot.append(answer())
            event.set()
        if clear:
            self._waiting.clear()


class Wire:
    """The framing of the current connection, and the requests waiting for answers."""

    def __init__(self, on_push: Callable[[Reply], Awaitable[None]]) -> None:
        self._on_push = on_push
        self.answers = _Answers()
        #: The current connection's stream, and the cancel scope that ends it.
        self.stream: anyio.abc.ByteStream | None = None
        self.scope: anyio.CancelScope | None = None
        #: The largest frame the sidecar takes (its hello says).
        self.max_frame = DEFAULT_MAX_FRAME
        #: The sidecar's last protocol_violation on this connection.
        self.violation: Reply | None = None
        self._send_lock: anyio.Lock | None = None

    def lost(self) -> None:
        """The connection ended: fail the requests it did not answer."""
        self.stream = None
        self.scope = None
        # When the sidecar closed the connection for a protocol violation, they fail with
        # it and are not sent again: a refused frame is never repeated.
        violation = self.violation
        if violation is not None:
            self.answers.fail_all(lambda: {"ok": False, "error": violation}, clear=True)
        else:
            self.answers.fail_all(lambda: ConnectionLost("the sidecar went away"), clear=True)

    async def read(self, stream: anyio.abc.ByteStream, connection: anyio.CancelScope) -> None:
        # The sidecar is not trusted: a frame that is not a JSON object, is over
        # max_frame, or does not make sense is logged and the connection made again.
        # The framer holds at most max_frame bytes of a line (the hello tells it).
        framer = LineFramer(self.max_frame)
        while True:
            try:
                chunk = await stream.receive(65536)
            except (
                anyio.EndOfStream,
                anyio.BrokenResourceError,
                anyio.ClosedResourceError,
                OSError,
            ):
                connection.cancel()  # the sidecar went away: reconnect
                return
            framer.max_frame = self.max_frame
            try:
                for line in framer.feed(chunk):
                    if not await self._take(line):
                        connection.cancel()
                        return
            except FrameTooLarge as exc:
                log.error("the sidecar sent %s: reconnecting", exc)
                connection.cancel()
                return

    async def _take(self, line: bytes) -> bool:
        """Handle one frame from the sidecar; False if it is malformed."""
        try:
            frame = decode_frame(line)
        except FrameError as exc:
            log.error("the sidecar sent %s: reconnecting", exc)
            return False
        if frame is None:
            return True
        try:
            await self._dispatch(frame)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            log.error(
                "the sidecar sent a malformed frame (%s: %s): reconnecting %.200r",
                type(exc).__name__,
                exc,
                line,
            )
            return False
        return True

    async def _dispatch(self, frame: Reply) -> None:
        """A frame from the sidecar: an answer to its request, or a push to ``on_push``.

        Raises ``KeyError``, ``TypeError``... for a frame that makes no sense.
        """
        if "push" in frame:
            await self._on_push(frame)
        elif not self.answers.answer(frame) and not frame.get("ok", True):
            error = frame.get("error")
            if isinstance(error, dict) and error.get("code") in _CLOSING_CODES:
                # The sidecar is about to close the connection: over a frame of ours, or
                # because this client may not use it.
                self.violation = error
                log.error("the sidecar refused a frame: %s", error.get("message"))
            else:
                log.warning("the sidecar reports: %s", error)

    async def send_request(
        self,
        op: str,
        fields: dict[str, Any],
        *,
        on_reply: Callable[[Reply], None] | None = None,
    ) -> Any:
        """Send one request and wait for its answer; ``on_reply`` sees it as it is read."""
        if self.stream is None:
            raise ConnectionLost("not connected")
        rid = self.answers.next_id()
        try:
            frame = encode_frame({"id": rid, "op": op, **fields}, self.max_frame)
        except FrameTooLarge as exc:
            # The sidecar would refuse it and close the connection: never send it.
            raise PayloadTooLarge(
                f"the {op} request is {exc.size} bytes, over the sidecar's max_frame of "
                f"{exc.limit} bytes"
            ) from exc
        except ValueError as exc:
            raise InvalidRequest(f"the {op} request is not JSON: {exc}") from exc
        return await self._exchange(rid, frame, on_reply)

    async def send_items(self, op: str, key: str, items: list[bytes]) -> Any:
        """Send one request whose only field ``key`` is the list of ``items``, each
        encoded already (compact JSON, as :func:`encode_frame` makes), and wait for its
        answer. The caller keeps the frame within :attr:`max_frame`."""
        if self.stream is None:
            raise ConnectionLost("not connected")
        rid = self.answers.next_id()
        head = b'{"id":%d,"op":"%s","%s":[' % (rid, op.encode(), key.encode())
        return await self._exchange(rid, head + b",".join(items) + b"]}\n", None)

    async def _exchange(
        self, rid: int, frame: bytes, on_reply: Callable[[Reply], None] | None
    ) -> Any:
        event, slot = self.answers.expect(rid, on_reply)
        try:
            if self._send_lock is None:
                self._send_lock = anyio.Lock()
            async with self._send_lock:
                if self.stream is None:
                    raise ConnectionLost("not connected")
                await self._send(self.stream, frame)
            await event.wait()
        finally:
            self.answers.forget(rid)
        reply = slot[0]
        if isinstance(reply, TaskManagerError):
            raise reply
        if not reply.get("ok"):
            raise error_from_wire(reply.get("error") or {})
        return reply.get("result")

    async def _send(self, stream: anyio.abc.ByteStream, data: bytes) -> None:
        try:
            if len(data) <= _SHIELDED_SEND:
                await stream.send(data)
                return
            with anyio.move_on_after(30, shield=True) as scope:
                await stream.send(data)
            if scope.cancelled_caught:
                # Part of the frame may be out: the stream cannot be used any more.
                if self.scope is not None:
                    self.scope.cancel()
                raise ConnectionLost("the sidecar did not take a frame within 30 s")
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise ConnectionLost(f"the connection to the sidecar broke: {exc!r}") from exc
