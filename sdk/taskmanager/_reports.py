"""Sending outcomes: what the handlers' deliveries ended with, on its way to the sidecar.

:class:`Reports` is the worker runtime's one way to report a delivery (a result, a
failure, a snooze, a hand-back, progress). Where the sidecar serves ``report``
(docs/protocol.md, "Running tasks"), outcomes go many to a frame: the first one at once
(after one pass of the event loop, so that what ends together goes together), and
those that come while a ``report`` is in flight together in the next, as its answer
arrives; so a lone outcome is never held back, and under load one frame carries many.
Each item is encoded once, checked against ``max_frame`` alone, and answered alone. A
sidecar without ``report`` gets the single ops (``complete``, ``fail``...) as before.

Running a handler is :mod:`._worker`'s business; this module only carries outcomes.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from .protocol import (
    ConnectionLost,
    InvalidRequest,
    PayloadTooLarge,
    TaskManagerError,
    encode_frame,
    error_from_wire,
)

if TYPE_CHECKING:
    from ._connection import Connection

#: The most outcomes one ``report`` carries (the sidecar takes up to 1,000).
MAX_REPORT_ITEMS = 500
#: Room kept in a ``report`` frame for its id, op and brackets.
_FRAME_OVERHEAD = 64

#: A report item's kind, as the single op and field a sidecar without ``report`` takes.
_SINGLE = {
    "complete": ("complete", "result"),
    "fail": ("fail", "error"),
    "snooze": ("snooze", "delay_s"),
    "progress": ("progress", "data"),
    "release": ("release", None),
}


class _Pending:
    """One outcome waiting for its answer."""

    __slots__ = ("answer", "done", "item")

    def __init__(self, item: bytes) -> None:
        self.item = item
        self.done = anyio.Event()
        self.answer: Any = None


class Reports:
    """The outcomes of one manager's deliveries, batched into ``report`` requests."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._queue: deque[_Pending] = deque()
        self._flushing = False

    @property
    def batched(self) -> bool:
        """Whether the sidecar takes outcomes in batches (and pushes tasks in them)."""
        return "report" in self._connection.ops

    async def send(self, delivery: int, kind: str, value: Any = True) -> Any:
        """Report ``kind`` (``complete``, ``fail``, ``snooze``, ``release``,
        ``progress``) of ``delivery``: its answer, or its error raised.

        Raises :class:`PayloadTooLarge` for an item that cannot fit a frame (it is not
        sent), :class:`ConnectionLost` if the connection ended first.
        """
        if not self.batched:
            op, field = _SINGLE[kind]
            fields = (
                {"delivery": delivery} if field is None else {"delivery": delivery, field: value}
            )
            return await self._connection.request(op, fields)
        try:
            item = encode_frame({"delivery": delivery, kind: value})[:-1]
        except ValueError as exc:
            raise InvalidRequest(f"the {kind} is not JSON: {exc}") from exc
        if len(item) + _FRAME_OVERHEAD > self._connection.max_frame:
            raise PayloadTooLarge(
                f"the {kind} of delivery {delivery} is {len(item)} bytes, over the sidecar's "
                f"max_frame of {self._connection.max_frame} bytes"
            )
        pending = _Pending(item)
        self._queue.append(pending)
        if not self._flushing:
            self._flushing = True
            if not self._connection.spawn(self._flush):
                await self._flush()
        await pending.done.wait()
        answer = pending.answer
        if isinstance(answer, TaskManagerError):
            raise answer
        if not isinstance(answer, dict):
            raise ConnectionLost("the report was interrupted")
        if not answer.get("ok"):
            raise error_from_wire(answer.get("error") or {})
        return answer.get("result")

    async def _flush(self) -> None:
        """Send what is queued, one ``report`` at a time, until nothing is."""
        try:
            while self._queue:
                # One pass of the event loop: outcomes that end together go together.
                await anyio.lowlevel.checkpoint()
                batch = self._take()
                try:
                    answer = await self._connection.send_items(
                        "report", "outcomes", [p.item for p in batch]
                    )
                    results = answer["results"] if isinstance(answer, dict) else None
                    if not isinstance(results, list) or len(results) != len(batch):
                        raise ConnectionLost("the sidecar's report answer does not match")
                    for pending, result in zip(batch, results, strict=True):
                        pending.answer = result
                except TaskManagerError as exc:
                    for pending in batch:
                        pending.answer = exc
                finally:
                    for pending in batch:
                        pending.done.set()
        except BaseException:
            # Stopped with outcomes still queued: their senders must not wait for ever.
            while self._queue:
                pending = self._queue.popleft()
                pending.answer = ConnectionLost("the task manager stopped")
                pending.done.set()
            raise
        finally:
            self._flushing = False

    def _take(self) -> list[_Pending]:
        room = self._connection.max_frame - _FRAME_OVERHEAD
        batch: list[_Pending] = []
        size = 0
        while self._queue and len(batch) < MAX_REPORT_ITEMS:
            nxt = len(self._queue[0].item) + 1
            if batch and size + nxt > room:
                break
            batch.append(self._queue.popleft())
            size += nxt
        return batch
