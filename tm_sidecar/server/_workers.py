"""The remote workers' runtime: tasks run by SDK workers on the other end of a socket.

Owns the ``register``/``unregister`` ops (a client's worker becomes a handler of the
local agent, with its queue and concurrency), the deliveries (an assignment pushed to
the worker, waiting for its outcome), and the ops a worker answers a delivery with:
``progress``, ``complete``, ``fail``, ``snooze`` and ``release`` one at a time, or any
number of them in one ``report``. A delivery's outcome becomes what the agent's handler
returns or raises; a worker that leaves fails its attempts at once
(``WorkerDisconnected``), retried per their policy.

A worker registered with ``batch`` gets its deliveries in ``tasks`` pushes: every
delivery made in one scheduler tick goes in one frame (cut to ``max_frame``), each
task encoded once, so that a burst of assignments costs one frame, not one per task.
Such a worker is the agent's remote handler (``BatchedWorker``): its attempts take no
task each (``node/_remote.py``), and a delivery's outcome reaches its attempt as a call.

Size: both worker protocols side by side (a delivery at a time, and batched), which
share their checks and their answers; split, each would re-read the other's.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio
from taskmanager.protocol import (
    DEFAULT_MAX_FRAME,
    InvalidRequest,
    TaskManagerError,
    encode_frame,
    error_to_wire,
)

from ..core import JSON, PrefetchWindow, TaskError
from ..node._agent import (
    HandedBack,
    HandlerFailed,
    RemoteAttempt,
    Snooze,
    TaskContext,
)
from ..node._sidecar import Sidecar
from ._connection import Connection, ids
from ._requests import read_json, read_queue, read_whole

log = logging.getLogger("tm_sidecar.server")

#: The most items one ``report`` may carry; a longer one is refused whole.
MAX_REPORT_ITEMS = 1000
#: The outcome kinds a ``report`` item may carry (exactly one each).
REPORT_KINDS = ("complete", "fail", "snooze", "release", "progress")
#: The field of the single op that a ``report`` item's value stands for.
_REPORT_FIELD = {"complete": "result", "fail": "error", "snooze": "delay_s"}


@attrs.define(eq=False)
class Delivery:
    """A task handed to a client's worker, waiting for its outcome: its attempt's task
    waits on ``done`` (a single-task worker's), or, for a batched worker's, the outcome
    goes to its ``attempt`` as a call (no task, no event)."""

    id: int
    ctx: TaskContext
    done: trio.Event | None = attrs.Factory(trio.Event)
    attempt: RemoteAttempt | None = None
    #: Its outcome is taken: a second report must not change it.
    reported: bool = False
    result: JSON = None
    error: TaskError | None = None
    handed_back: bool = False
    snooze_s: float | None = None
    #: A batched worker's delivery waits in its worker's prefetch window until pushed
    #: (``pushed``), encoded once as its ``tasks`` item; a cancel before then takes it
    #: out of the window instead.
    pushed: bool = True
    item: bytes = b""


@attrs.define(eq=False)
class Workers:
    """The remote workers of one sidecar's server."""

    sidecar: Sidecar
    #: The largest frame this server sends: a ``tasks`` push is cut to fit.
    max_frame: int = DEFAULT_MAX_FRAME
    _terminal: dict[str, Callable[[Connection, dict[str, Any]], Awaitable[JSON]]] = attrs.field(
        init=False
    )

    @_terminal.default
    def _terminal_ops(self) -> dict[str, Callable[[Connection, dict[str, Any]], Awaitable[JSON]]]:
        return {
            "complete": self.op_complete,
            "fail": self.op_fail,
            "snooze": self.op_snooze,
            "release": self.op_release,
        }

    async def op_register(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        """``register``: the client's worker takes tasks of a queue."""
        queue = read_queue(frame)
        concurrency = frame.get("concurrency", 1)
        if not isinstance(concurrency, int) or not 1 <= concurrency <= 10_000:
            raise InvalidRequest("concurrency must be a whole number from 1 to 10000")
        batch = frame.get("batch", False)
        if not isinstance(batch, bool):
            raise InvalidRequest("batch must be true or false")
        wid = next(ids)
        if batch:
            if not conn.pushing_tasks:
                conn.pushing_tasks = True
                assert conn.nursery is not None
                conn.nursery.start_soon(self._push_tasks, conn)
            conn.windows[wid] = PrefetchWindow(concurrency)

        async def handler(ctx: TaskContext) -> JSON:
            return await self._deliver(conn, wid, ctx, batch=batch)

        conn.registrations[wid] = self.sidecar.register(
            handler,
            queue=queue,
            concurrency=concurrency,
            # A batched worker's attempts are driven without a task each.
            remote=BatchedWorker(conn, wid) if batch else None,
        )
        log.info(
            "worker registered",
            extra={
                "worker": wid,
                "queue": queue,
                "concurrency": concurrency,
                "batch": batch,
                **conn.log_fields,
            },
        )
        return {"worker": wid, "node": self.sidecar.node_id}

    async def op_unregister(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        """``unregister``: True if the worker was registered."""
        wid = read_whole(frame, "worker")
        reg = conn.registrations.pop(wid, None)
        if reg is not None:
            reg.close()
        window = conn.windows.get(wid)
        if window is not None and not window.outstanding and not window.waiting:
            del conn.windows[wid]  # else when its last delivery is over
        return reg is not None

    async def _deliver(self, conn: Connection, wid: int, ctx: TaskContext, *, batch: bool) -> JSON:
        if conn.closed or wid not in conn.registrations:
            # The worker left between the assignment and now: fail the attempt at once.
            raise HandlerFailed(
                TaskError(
                    type="WorkerDisconnected", message="the worker left before the task reached it"
                )
            )
        delivery = Delivery(next(ids), ctx)
        conn.deliveries[delivery.id] = delivery
        task = {
            "id": ctx.id,
            "payload": ctx.payload,
            "attempt": ctx.attempt,
            "options": ctx.spec.options.to_json(),
            "created_at": ctx.spec.created_at,
        }
        window = conn.windows.get(wid) if batch else None
        try:
            if window is not None:
                # Encoded once, here; the push joins the encoded items as they are.
                delivery.item = encode_frame({"delivery": delivery.id, "task": task})[:-1]
                delivery.pushed = False
                window.offer(delivery.id)
                conn.tasks_wake.set()
            else:
                conn.push({"push": "task", "worker": wid, "delivery": delivery.id, "task": task})
            assert delivery.done is not None
            await delivery.done.wait()
        except trio.Cancelled:
            # A timeout, a withdrawn assignment, or shutdown: tell the worker to stop
            # (unless it was never pushed: the window forgets it below).
            if delivery.pushed:
                conn.push({"push": "cancel", "delivery": delivery.id})
            raise
        finally:
            conn.deliveries.pop(delivery.id, None)
            if window is not None:
                window.finish(delivery.id)
                if window.waiting:
                    conn.tasks_wake.set()  # room for the next
                elif not window.outstanding and wid not in conn.registrations:
                    conn.windows.pop(wid, None)  # the worker left and its last is over
        if delivery.handed_back:
            raise HandedBack
        if delivery.snooze_s is not None:
            raise Snooze(delivery.snooze_s)
        if delivery.error is not None:
            raise HandlerFailed(delivery.error)
        return delivery.result

    async def _push_tasks(self, conn: Connection) -> None:
        """The ``tasks`` pushes of one connection's batched workers: one task for all.

        Each push carries what each worker's prefetch window lets through (at most its
        free concurrency), cut to ``max_frame``."""
        while True:
            await conn.tasks_wake.wait()
            # One more pass of the scheduler: the deliveries of this burst join the push.
            await trio.lowlevel.checkpoint()
            conn.tasks_wake = trio.Event()
            for wid, window in conn.windows.items():
                items = [conn.deliveries[d] for d in window.take() if d in conn.deliveries]
                if not items:
                    continue
                head = b'{"push":"tasks","worker":%d,"tasks":[' % wid
                room = self.max_frame - len(head) - 2
                frame: list[bytes] = []
                size = 0
                for delivery in items:
                    if frame and size + len(delivery.item) + 1 > room:
                        conn.push_line(head + b",".join(frame) + b"]}\n")
                        frame, size = [], 0
                    frame.append(delivery.item)
                    size += len(delivery.item) + 1
                    delivery.pushed = True
                conn.push_line(head + b",".join(frame) + b"]}\n")

    @staticmethod
    def _delivery(conn: Connection, frame: dict[str, Any]) -> Delivery:
        delivery = conn.deliveries.get(read_whole(frame, "delivery"))
        if delivery is None:
            raise InvalidRequest("no such delivery (finished, cancelled, or never made)")
        if delivery.reported:
            # Its outcome is taken (the agent may not have committed it yet): a second
            # report (a release after a complete, say) must not change it.
            raise InvalidRequest("the delivery was reported already: its first outcome stands")
        return delivery

    async def op_progress(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        """``progress``: the worker tells how far its task is."""
        delivery = self._delivery(conn, frame)
        return await delivery.ctx.update(read_json(frame.get("data"), "data"))

    async def op_complete(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        """``complete``: the task's result."""
        delivery = self._delivery(conn, frame)
        delivery.result = read_json(frame.get("result"), "result")
        self._settle(conn, delivery)
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
        self._settle(conn, delivery)
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
        self._settle(conn, delivery)
        return True

    async def op_release(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        """``release``: a worker shutting down gives its task back; no attempt is spent."""
        delivery = self._delivery(conn, frame)
        delivery.handed_back = True
        self._settle(conn, delivery)
        return True

    async def op_report(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        """``report``: many outcomes (and progress) in one request, answered per item in
        order; a bad item gets its own error and the others are taken."""
        items = frame.get("outcomes")
        if not isinstance(items, list) or not items:
            raise InvalidRequest("outcomes must be a non-empty list")
        if len(items) > MAX_REPORT_ITEMS:
            raise InvalidRequest(
                f"a report carries at most {MAX_REPORT_ITEMS} outcomes, not {len(items)}: "
                "nothing was taken"
            )
        answers: list[JSON] = [None] * len(items)
        progress: list[tuple[int, Awaitable[JSON]]] = []
        for i, item in enumerate(items):
            try:
                if not isinstance(item, dict):
                    raise InvalidRequest("an outcome must be an object")
                kinds = [k for k in REPORT_KINDS if k in item]
                if len(kinds) != 1:
                    raise InvalidRequest(f"an outcome has exactly one of {', '.join(REPORT_KINDS)}")
                kind = kinds[0]
                if kind == "progress":
                    # Checked now, in order (a progress before its complete is taken);
                    # written concurrently with the report's other progress below.
                    delivery = self._delivery(conn, item)
                    data = read_json(item["progress"], "progress")
                    progress.append((i, delivery.ctx.update(data)))
                    continue
                answers[i] = {"ok": True, "result": await self._apply(conn, kind, item)}
            except TaskManagerError as exc:
                answers[i] = {"ok": False, "error": error_to_wire(exc)}
        if progress:
            async with trio.open_nursery() as nursery:
                for i, call in progress:
                    nursery.start_soon(_answer_into, answers, i, call)
        return {"results": answers}

    async def _apply(self, conn: Connection, kind: str, item: dict[str, Any]) -> JSON:
        """One terminal outcome of a ``report``, as its single op would take it."""
        fields: dict[str, Any] = {"delivery": item.get("delivery")}
        if kind == "release":
            if item[kind] is not True:
                raise InvalidRequest("release must be true")
        else:
            fields[_REPORT_FIELD[kind]] = item[kind]
        return await self._terminal[kind](conn, fields)

    @staticmethod
    def dropped(conn: Connection) -> None:
        """``conn`` closed: its workers take no more tasks, its deliveries fail."""
        for reg in conn.registrations.values():
            reg.close()
        for delivery in list(conn.deliveries.values()):
            if not delivery.reported:
                delivery.error = TaskError(
                    type="WorkerDisconnected",
                    message="the worker's connection closed during the attempt",
                )
                Workers._settle(conn, delivery)

    @staticmethod
    def _settle(conn: Connection, delivery: Delivery) -> None:
        """``delivery``'s outcome is taken (set on it): hand it to its attempt."""
        delivery.reported = True
        attempt = delivery.attempt
        if attempt is None:
            assert delivery.done is not None
            delivery.done.set()
            return
        remote = attempt.reg.remote
        if isinstance(remote, BatchedWorker):
            remote.taken(delivery)
        if delivery.handed_back:
            attempt.handed_back()
        elif delivery.snooze_s is not None:
            attempt.snoozed(delivery.snooze_s)
        elif delivery.error is not None:
            attempt.failed(delivery.error)
        else:
            attempt.returned(delivery.result)


@attrs.define(eq=False)
class BatchedWorker:
    """A worker registered with ``batch``, as the agent's remote handler: its
    deliveries join its prefetch window and go in ``tasks`` pushes, and its outcomes
    are handed to their attempts as calls (see ``node/_remote.py``)."""

    conn: Connection
    wid: int

    def deliver(self, attempt: RemoteAttempt) -> None:
        """Queue ``attempt`` for the next ``tasks`` push (encoded once, here)."""
        conn = self.conn
        window = conn.windows.get(self.wid)
        if conn.closed or self.wid not in conn.registrations or window is None:
            attempt.failed(
                TaskError(
                    type="WorkerDisconnected",
                    message="the worker left before the task reached it",
                )
            )
            return
        ctx = attempt.ctx
        assert ctx is not None
        delivery = Delivery(next(ids), ctx, done=None, attempt=attempt, pushed=False)
        task = {
            "id": ctx.id,
            "attempt": ctx.attempt,
            "options": ctx.spec.options.to_json(),
            "created_at": ctx.spec.created_at,
        }
        raw = attempt.encoded_payload
        if raw is None:
            task["payload"] = ctx.payload
            delivery.item = encode_frame({"delivery": delivery.id, "task": task})[:-1]
        else:
            # The payload as the creator encoded it, joined in as it is: encoded once.
            head = encode_frame({"delivery": delivery.id, "task": task})[:-3]
            delivery.item = head + b',"payload":' + raw.encode() + b"}}"
        attempt.token = delivery
        conn.deliveries[delivery.id] = delivery
        window.offer(delivery.id)
        conn.tasks_wake.set()

    def taken(self, delivery: Delivery) -> None:
        """``delivery``'s outcome is taken: room in the window at once. The delivery
        itself is kept until its report is committed (:meth:`settled`), so that a second
        outcome meanwhile is refused, not taken."""
        window = self.conn.windows.get(self.wid)
        if window is not None:
            window.finish(delivery.id)
            if window.waiting:
                self.conn.tasks_wake.set()

    def withdraw(self, attempt: RemoteAttempt) -> None:
        """Tell the worker to stop (a timeout, a withdrawn assignment, a stop), unless
        the task never reached it (the window forgets it), and forget the delivery: a
        later outcome of it finds no such delivery."""
        delivery = attempt.token
        if isinstance(delivery, Delivery) and delivery.pushed and not delivery.reported:
            self.conn.push({"push": "cancel", "delivery": delivery.id})
        self.settled(attempt)

    def settled(self, attempt: RemoteAttempt) -> None:
        """The attempt is over here: forget its delivery."""
        delivery = attempt.token
        attempt.token = None
        if not isinstance(delivery, Delivery):
            return
        conn = self.conn
        conn.deliveries.pop(delivery.id, None)
        window = conn.windows.get(self.wid)
        if window is None:
            return
        window.finish(delivery.id)
        if window.waiting:
            conn.tasks_wake.set()  # room for the next
        elif not window.outstanding and self.wid not in conn.registrations:
            conn.windows.pop(self.wid, None)  # the worker left and its last is over


async def _answer_into(answers: list[JSON], i: int, call: Awaitable[JSON]) -> None:
    try:
        answers[i] = {"ok": True, "result": await call}
    except TaskManagerError as exc:
        answers[i] = {"ok": False, "error": error_to_wire(exc)}
