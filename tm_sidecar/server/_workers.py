"""The remote workers' runtime: tasks run by SDK workers on the other end of a socket.

Owns the ``register``/``unregister`` ops (a client's worker becomes a handler of the
local agent, with its queue and concurrency), the deliveries (an assignment pushed to
the worker as a ``task`` push, waiting for its outcome), and the ops a worker answers a
delivery with: ``progress``, ``complete``, ``fail``, ``snooze`` and ``release``. A
delivery's outcome becomes what the agent's handler returns or raises; a worker that
leaves fails its attempts at once (``WorkerDisconnected``), retried per their policy.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
import trio
from taskmanager.protocol import InvalidRequest

from ..core import JSON, TaskError
from ..node._agent import HandedBack, HandlerFailed, Snooze, TaskContext
from ..node._sidecar import Sidecar
from ._connection import Connection, ids
from ._requests import read_json, read_queue, read_whole

log = logging.getLogger("tm_sidecar.server")


@attrs.define(eq=False)
class Delivery:
    """A task handed to a client's worker, waiting for its outcome."""

    id: int
    ctx: TaskContext
    done: trio.Event = attrs.Factory(trio.Event)
    result: JSON = None
    error: TaskError | None = None
    handed_back: bool = False
    snooze_s: float | None = None


@attrs.define(eq=False)
class Workers:
    """The remote workers of one sidecar's server."""

    sidecar: Sidecar

    async def op_register(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        """``register``: the client's worker takes tasks of a queue."""
        queue = read_queue(frame)
        concurrency = frame.get("concurrency", 1)
        if not isinstance(concurrency, int) or not 1 <= concurrency <= 10_000:
            raise InvalidRequest("concurrency must be a whole number from 1 to 10000")
        wid = next(ids)

        async def handler(ctx: TaskContext) -> JSON:
            return await self._deliver(conn, wid, ctx)

        conn.registrations[wid] = self.sidecar.register(
            handler, queue=queue, concurrency=concurrency
        )
        log.info(
            "worker registered",
            extra={"worker": wid, "queue": queue, "concurrency": concurrency, **conn.log_fields},
        )
        return {"worker": wid, "node": self.sidecar.node_id}

    async def op_unregister(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        """``unregister``: True if the worker was registered."""
        reg = conn.registrations.pop(read_whole(frame, "worker"), None)
        if reg is not None:
            reg.close()
        return reg is not None

    async def _deliver(self, conn: Connection, wid: int, ctx: TaskContext) -> JSON:
        if conn.closed or wid not in conn.registrations:
            # The worker left between the assignment and now: fail the attempt at once.
            raise HandlerFailed(
                TaskError(
                    type="WorkerDisconnected", message="the worker left before the task reached it"
                )
            )
        delivery = Delivery(next(ids), ctx)
        conn.deliveries[delivery.id] = delivery
        try:
            conn.push(
                {
                    "push": "task",
                    "worker": wid,
                    "delivery": delivery.id,
                    "task": {
                        "id": ctx.id,
                        "payload": ctx.payload,
                        "attempt": ctx.attempt,
                        "options": ctx.spec.options.to_json(),
                        "created_at": ctx.spec.created_at,
                    },
                }
            )
            await delivery.done.wait()
        except trio.Cancelled:
            # A timeout, a withdrawn assignment, or shutdown: tell the worker to stop.
            conn.push({"push": "cancel", "delivery": delivery.id})
            raise
        finally:
            conn.deliveries.pop(delivery.id, None)
        if delivery.handed_back:
            raise HandedBack
        if delivery.snooze_s is not None:
            raise Snooze(delivery.snooze_s)
        if delivery.error is not None:
            raise HandlerFailed(delivery.error)
        return delivery.result

    @staticmethod
    def _delivery(conn: Connection, frame: dict[str, Any]) -> Delivery:
        delivery = conn.deliveries.get(read_whole(frame, "delivery"))
        if delivery is None:
            raise InvalidRequest("no such delivery (finished, cancelled, or never made)")
        return delivery

    async def op_progress(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        """``progress``: the worker tells how far its task is."""
        delivery = self._delivery(conn, frame)
        return await delivery.ctx.update(read_json(frame.get("data"), "data"))

    async def op_complete(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        """``complete``: the task's result."""
        delivery = self._delivery(conn, frame)
        delivery.result = read_json(frame.get("result"), "result")
        delivery.done.set()
        return True

    async def op_fail(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        """``fail``: the attempt failed, retryable or not."""
        delivery = self._delivery(conn, frame)
        err = frame.get("error") or {}
        if not isinstance(err, dict):
            raise InvalidRequest("error must be an object")
        delivery.error = TaskError(
            type=str(err.get("type", "Error")),
            message=str(err.get("message", "")),
            traceback=None if err.get("traceback") is None else str(err["traceback"]),
            retryable=bool(err.get("retryable", True)),
        )
        delivery.done.set()
        return True

    async def op_snooze(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        """``snooze``: run the task again later; this attempt does not count."""
        delivery = self._delivery(conn, frame)
        delay = frame.get("delay_s")
        if not isinstance(delay, int | float) or isinstance(delay, bool):
            raise InvalidRequest("delay_s must be a number of seconds")
        try:
            Snooze(delay)  # checks the range
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        delivery.snooze_s = float(delay)
        delivery.done.set()
        return True

    async def op_release(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        """``release``: a worker shutting down gives its task back; no attempt is spent."""
        delivery = self._delivery(conn, frame)
        delivery.handed_back = True
        delivery.done.set()
        return True

    @staticmethod
    def dropped(conn: Connection) -> None:
        """``conn`` closed: its workers take no more tasks, its deliveries fail."""
        for reg in conn.registrations.values():
            reg.close()
        for delivery in conn.deliveries.values():
            if not delivery.done.is_set():
                delivery.error = TaskError(
                    type="WorkerDisconnected",
                    message="the worker's connection closed during the attempt",
                )
                delivery.done.set()
