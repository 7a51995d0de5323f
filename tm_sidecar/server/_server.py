"""The socket server: the documented protocol (docs/protocol.md) over a Unix socket.

Frames are JSON objects, one per line, framed and coded by :mod:`taskmanager.protocol`
(the SDK's, shared with it, as are the error classes and their wire codes). Each
connection is independent: a client that sends garbage, stalls or disconnects affects
only itself; tasks it was running become failed attempts at once and are retried per
their policy.

Errors go by whose fault they are: a request that fails validation is answered with
``invalid_request`` (or a kin), raised explicitly where the request is read; anything
else an operation raises is the sidecar's bug, logged with its traceback and answered
with ``internal``, and the connection and the sidecar go on serving.
"""

from __future__ import annotations

import contextlib
import grp
import itertools
import logging
import math
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import trio
from taskmanager.protocol import (
    DEFAULT_MAX_FRAME,
    EVENT_KINDS,
    PROTOCOL_VERSION,
    FrameError,
    InvalidRequest,
    LineFramer,
    ProtocolViolation,
    TaskManagerError,
    Unavailable,
    decode_frame,
    encode_frame,
    error_to_wire,
)

from .. import __version__
from ..core import (
    DEFAULT_MAX_SNOOZES,
    JSON,
    LIMIT_FIELDS,
    Backoff,
    State,
    TaskError,
    TaskEvent,
    TaskId,
    TaskOptions,
    check_name,
    dumps,
)
from ..node._agent import HandedBack, HandlerFailed, Registration, Snooze, TaskContext
from ..node._hub import Subscription
from ..node._sidecar import Created, Sidecar, TaskInfo, is_final

log = logging.getLogger("tm_sidecar.server")

#: Frames waiting to be written to one client; a client this far behind is dropped.
OUTBOX = 1000


@attrs.frozen(kw_only=True)
class ServerSettings:
    """Where and how the socket is served."""

    path: str
    mode: int = 0o660
    group: str | None = None
    max_frame: int = DEFAULT_MAX_FRAME
    allowed_uids: frozenset[int] | None = None


class SocketInUse(Exception):
    """Another process serves the socket path."""


class _Closed(Exception):
    """The connection is to be closed (after the frames already queued)."""


@attrs.define(eq=False)
class _Delivery:
    """A task handed to a client's worker, waiting for its outcome."""

    id: int
    ctx: TaskContext
    done: trio.Event = attrs.Factory(trio.Event)
    result: JSON = None
    error: TaskError | None = None
    handed_back: bool = False
    snooze_s: float | None = None


@attrs.define(eq=False)
class Connection:
    """One client."""

    server: SocketServer
    stream: trio.SocketStream
    peer: str
    outbox_send: trio.MemorySendChannel[bytes]
    outbox_receive: trio.MemoryReceiveChannel[bytes]
    nursery: trio.Nursery | None = None
    hello: bool = False
    registrations: dict[int, Registration] = attrs.Factory(dict)
    deliveries: dict[int, _Delivery] = attrs.Factory(dict)
    subscriptions: dict[int, Subscription] = attrs.Factory(dict)
    written: trio.Event = attrs.Factory(trio.Event)
    closed: bool = False

    def push(self, frame: dict[str, Any]) -> None:
        """Queue a frame; a client that does not read is dropped rather than waited for."""
        try:
            self.outbox_send.send_nowait(encode_frame(frame))
        except trio.WouldBlock:
            log.warning("client %s is not reading: dropping it", self.peer)
            self.outbox_send.close()
            if self.nursery is not None:
                self.nursery.cancel_scope.cancel()
        except trio.ClosedResourceError:
            pass


_ids = itertools.count(1)

#: An operation: what it answers to one request on one connection.
_Op = Callable[[Connection, dict[str, Any]], Awaitable[JSON]]


@attrs.define(eq=False)
class SocketServer:
    """Serves the protocol for one sidecar."""

    sidecar: Sidecar
    settings: ServerSettings
    connections: set[Connection] = attrs.Factory(set)
    accepting: bool = True
    _inode: int | None = None
    #: The operations by name (docs/protocol.md, "Operations"); any other is refused.
    ops: dict[str, _Op] = attrs.field(init=False)

    @ops.default
    def _op_table(self) -> dict[str, _Op]:
        # Written out: an operation is one because it is listed here, not because of its
        # method's name.
        return {
            "hello": self.op_hello,
            "ping": self.op_ping,
            "status": self.op_status,
            "create": self.op_create,
            "get": self.op_get,
            "wait": self.op_wait,
            "cancel": self.op_cancel,
            "pause": self.op_pause,
            "resume": self.op_resume,
            "set_limits": self.op_set_limits,
            "schedule": self.op_schedule,
            "schedules": self.op_schedules,
            "pause_schedule": self.op_pause_schedule,
            "resume_schedule": self.op_resume_schedule,
            "unschedule": self.op_unschedule,
            "queues": self.op_queues,
            "subscribe": self.op_subscribe,
            "unsubscribe": self.op_unsubscribe,
            "register": self.op_register,
            "unregister": self.op_unregister,
            "progress": self.op_progress,
            "complete": self.op_complete,
            "fail": self.op_fail,
            "snooze": self.op_snooze,
            "release": self.op_release,
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ready once the socket accepts connections."""
        sock = await _bind(self.settings)
        self._inode = os.stat(self.settings.path).st_ino
        listener = trio.SocketListener(sock)
        log.info("serving %s mode=%o", self.settings.path, self.settings.mode)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while self.accepting:
                    stream = await listener.accept()
                    nursery.start_soon(self._serve, stream)
        finally:
            with trio.move_on_after(1, shield=True):
                await listener.aclose()
            self._unlink()

    def stop_accepting(self) -> None:
        """New connections are refused from now on (existing ones go on)."""
        self.accepting = False
        self._unlink()

    def _unlink(self) -> None:
        # Only the socket we bound: a successor may already serve this path.
        with contextlib.suppress(FileNotFoundError):
            if self._inode is not None and os.stat(self.settings.path).st_ino == self._inode:
                os.unlink(self.settings.path)
                self._inode = None

    async def _serve(self, stream: trio.SocketStream) -> None:
        peer = _peer(stream)
        uid = _peer_uid(stream)
        send, receive = trio.open_memory_channel[bytes](OUTBOX)
        conn = Connection(self, stream, peer, send, receive)
        log.info("client connected %s", peer)
        self.connections.add(conn)
        try:
            await self._serve_connection(conn, uid)
        except Exception:
            # A bug in serving one client must not take the others (or the sidecar) down.
            log.exception("client %s: connection failed", peer)
        finally:
            self._dropped(conn)
            with trio.move_on_after(1, shield=True):
                await stream.aclose()
            log.info("client disconnected %s", peer)

    async def _serve_connection(self, conn: Connection, uid: int) -> None:
        allowed = self.settings.allowed_uids
        async with trio.open_nursery() as nursery:
            conn.nursery = nursery
            nursery.start_soon(self._write, conn)
            if allowed is not None and uid not in allowed:
                conn.push(_error(None, ProtocolViolation(f"uid {uid} is not allowed")))
                conn.outbox_send.close()
                return
            with contextlib.suppress(_Closed, trio.BrokenResourceError, trio.ClosedResourceError):
                await self._read(conn)
            # Let the last frames (an error, say) reach the client, briefly.
            conn.outbox_send.close()
            with trio.move_on_after(1):
                await conn.written.wait()
            nursery.cancel_scope.cancel()

    def _dropped(self, conn: Connection) -> None:
        conn.closed = True
        self.connections.discard(conn)
        for reg in conn.registrations.values():
            reg.close()
        for delivery in conn.deliveries.values():
            if not delivery.done.is_set():
                delivery.error = TaskError(
                    type="WorkerDisconnected",
                    message="the worker's connection closed during the attempt",
                )
                delivery.done.set()
        for sub in conn.subscriptions.values():
            sub.close()
        conn.subscriptions.clear()

    async def _write(self, conn: Connection) -> None:
        try:
            async for frame in conn.outbox_receive:
                # Whatever else is queued goes in the same write: one system call, not many.
                frames = [frame]
                while len(frames) < 256:
                    try:
                        frames.append(conn.outbox_receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await conn.stream.send_all(b"".join(frames) if len(frames) > 1 else frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            conn.written.set()
        with trio.move_on_after(1, shield=True):
            await conn.stream.aclose()

    async def _read(self, conn: Connection) -> None:
        framer = LineFramer(self.settings.max_frame)
        while True:
            chunk = await conn.stream.receive_some(65536)
            if not chunk:
                raise _Closed
            try:
                for line in framer.feed(chunk):
                    frame = decode_frame(line)
                    if frame is not None:
                        self._dispatch(conn, frame)
            except FrameError as exc:
                conn.push(_error(None, ProtocolViolation(f"{exc}: closing")))
                raise _Closed from exc

    def _dispatch(self, conn: Connection, frame: dict[str, Any]) -> None:
        rid = frame.get("id")
        if rid is not None and not isinstance(rid, int | str):
            conn.push(_error(None, InvalidRequest("id must be a number or a string")))
            return
        op = frame.get("op")
        if not conn.hello and op != "hello":
            conn.push(_error(rid, InvalidRequest("say hello first")))
            return
        handler = self.ops.get(op) if isinstance(op, str) else None
        if handler is None:
            conn.push(_error(rid, InvalidRequest(f"unknown op {op!r}")))
            return
        assert conn.nursery is not None
        conn.nursery.start_soon(self._answer, conn, rid, handler, frame)

    async def _answer(
        self, conn: Connection, rid: Any, handler: _Op, frame: dict[str, Any]
    ) -> None:
        try:
            result = await handler(conn, frame)
        except TaskManagerError as exc:
            conn.push(_error(rid, exc))
        except Exception as exc:
            # Not the caller's fault (validation raises InvalidRequest where it reads the
            # request): a bug here, told as one, and this connection goes on.
            log.exception("op %r failed: a bug in the sidecar", frame.get("op"))
            conn.push(_error(rid, TaskManagerError(f"internal error: {type(exc).__name__}")))
        else:
            conn.push({"id": rid, "ok": True, "result": result})

    # -- operations ----------------------------------------------------------------------

    async def op_hello(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        if conn.hello:
            raise InvalidRequest("hello was already said on this connection")
        version = frame.get("version")
        if version != PROTOCOL_VERSION:
            raise InvalidRequest(
                f"protocol version {version!r} is not spoken here; use {PROTOCOL_VERSION}"
            )
        conn.hello = True
        assert conn.nursery is not None
        conn.nursery.start_soon(self._role_pushes, conn)
        return {
            "version": PROTOCOL_VERSION,
            "server": f"tm-sidecar/{__version__}",
            "node": self.sidecar.node_id,
            "namespace": self.sidecar.settings.namespace,
            "leader": self.sidecar.is_leader,
            "max_frame": self.settings.max_frame,
            "ops": sorted(self.ops),
        }

    async def _role_pushes(self, conn: Connection) -> None:
        while True:
            await self.sidecar.role_changed.wait()
            conn.push({"push": "role", "leader": self.sidecar.is_leader})

    async def op_ping(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        return "pong"

    async def op_status(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        return self.sidecar.status()

    async def op_create(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        options = _options(frame.get("options") or {})
        run_at = frame.get("run_at")
        if run_at is not None and not _finite(run_at):
            raise InvalidRequest("run_at must be a UTC epoch time in seconds")
        task_id = frame.get("task_id")
        if task_id is not None:
            task_id = _task_id(frame)
        if not frame.get("subscribe"):
            created = await self.sidecar.create_task(
                frame.get("payload"), options=options, run_at=run_at, task_id=task_id
            )
            return _created(created)
        # Subscribed before the task exists, so that no event of it can be missed; the
        # subscription ends with the task's final event.
        task_id = task_id or self.sidecar.new_task_id()
        kinds = frame.get("events")
        if kinds is not None and (
            not isinstance(kinds, list) or not kinds or any(k not in EVENT_KINDS for k in kinds)
        ):
            raise InvalidRequest(f"events must be a list of some of {', '.join(EVENT_KINDS)}")
        chosen = frozenset(kinds) if kinds else None
        sid, sub = self._subscribe(conn, task_id, until_final=True, kinds=chosen)
        try:
            created = await self.sidecar.create_task(
                frame.get("payload"), options=options, run_at=run_at, task_id=task_id
            )
        except BaseException:
            conn.subscriptions.pop(sid, None)
            sub.close()
            raise
        if created.spec.id != task_id:
            # The unique key's holder answered: follow that task instead (it may finish
            # before this subscription starts: a client reads it once to be sure).
            conn.subscriptions.pop(sid, None)
            sub.close()
            sid, _ = self._subscribe(conn, created.spec.id, until_final=True, kinds=chosen)
        return {**_created(created), "subscription": sid}

    async def op_get(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        info = await self.sidecar.get(_task_id(frame))
        return task_json(info)

    async def op_wait(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        task_id = _task_id(frame)
        timeout = frame.get("timeout_s")
        if timeout is not None and not (timeout == math.inf or (_finite(timeout) and timeout >= 0)):
            raise InvalidRequest("timeout_s must be a number of seconds, 0 or more")
        try:
            info = await self.sidecar.wait(task_id, timeout)
        except trio.TooSlowError as exc:
            raise Unavailable(f"the task did not finish within {timeout} s") from exc
        return task_json(info)

    async def op_cancel(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        task_id = _task_id(frame)
        message = frame.get("reason", "cancelled by a client")
        if not isinstance(message, str) or len(message) > 1000:
            raise InvalidRequest("reason must be a string of at most 1000 characters")
        done, info = await self.sidecar.cancel(task_id, message=message)
        answer: dict[str, JSON] = {
            "task_id": task_id,
            "cancelled": done,
            "state": info.state.value if info.state else None,
        }
        if not done:
            answer["message"] = f"task {task_id} is already {answer['state']}: nothing to cancel"
        return answer

    async def op_pause(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        queue = _name("queue", frame.get("queue", "default"))
        return (await self.sidecar.pause_queue(queue)).to_obj()

    async def op_resume(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        queue = _name("queue", frame.get("queue", "default"))
        return (await self.sidecar.resume_queue(queue)).to_obj()

    async def op_set_limits(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        queue = _name("queue", frame.get("queue", "default"))
        changes = {name: frame[name] for name in LIMIT_FIELDS if name in frame}
        _numbers_fit(changes)
        unknown = set(frame) - {"id", "op", "queue", *LIMIT_FIELDS}
        if unknown:
            raise InvalidRequest(f"unknown fields: {sorted(unknown)}")
        return (await self.sidecar.set_limits(queue, changes)).to_obj()

    async def op_schedule(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        known = {"id", "op", "name", "payload", "options", *_SCHEDULE_FIELDS}
        unknown = set(frame) - known
        if unknown:
            raise InvalidRequest(f"unknown fields: {sorted(unknown)}")
        if not isinstance(frame.get("name"), str):
            raise InvalidRequest("a schedule needs a name")
        for name in ("cron", "timezone", "missed"):
            if frame.get(name) is not None and not isinstance(frame[name], str):
                raise InvalidRequest(f"{name} must be a string")
        _numbers_fit({k: frame[k] for k in _SCHEDULE_FIELDS if k in frame})
        fields = {k: frame[k] for k in ("name", "payload", *_SCHEDULE_FIELDS) if k in frame}
        fields["options"] = _options(frame.get("options") or {})
        return (await self.sidecar.schedule(fields)).to_obj()

    async def op_schedules(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        return [s.to_obj() for s in await self.sidecar.schedules()]

    async def op_pause_schedule(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        name = _name("schedule", frame.get("name"))
        return (await self.sidecar.pause_schedule(name, True)).to_obj()

    async def op_resume_schedule(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        name = _name("schedule", frame.get("name"))
        return (await self.sidecar.pause_schedule(name, False)).to_obj()

    async def op_unschedule(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        return await self.sidecar.delete_schedule(_name("schedule", frame.get("name")))

    async def op_queues(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        return {name: config.to_obj() for name, config in (await self.sidecar.queues()).items()}

    async def op_subscribe(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        task_id = frame.get("task_id")
        if task_id is not None:
            task_id = _task_id(frame)
        until_final = bool(frame.get("until_final", False))
        if until_final and task_id is None:
            raise InvalidRequest("until_final needs a task_id")
        after = frame.get("from_revision")
        if after is not None and (
            isinstance(after, bool) or not isinstance(after, int) or after < 0
        ):
            raise InvalidRequest("from_revision must be a whole number, 0 or more")
        sid, sub = self._subscribe(conn, task_id, until_final=until_final, from_revision=after)
        if sub.replay is not None:
            # Resumed: the events after from_revision are read back first (or a gap told).
            def on_gap(gap: dict[str, Any]) -> None:
                conn.push({"push": "gap", "subscription": sid, **gap})

            async def room() -> None:
                # Replayed events wait for the client to read, rather than overflow its
                # outbox (which would drop it) in one go.
                while conn.outbox_send.statistics().current_buffer_used > OUTBOX // 2:  # noqa: ASYNC110 - polled while the client reads
                    await trio.sleep(0.005)

            assert conn.nursery is not None
            conn.nursery.start_soon(self.sidecar.hub.catch_up, sub, on_gap, room)
        return {"subscription": sid, "revision": sub.revision}

    def _subscribe(
        self,
        conn: Connection,
        task_id: TaskId | None,
        *,
        until_final: bool,
        kinds: frozenset[str] | None = None,
        from_revision: int | None = None,
    ) -> tuple[int, Subscription]:
        sid = next(_ids)

        # Called by the hub for each event: no task, no channel per subscription.
        def deliver(event: TaskEvent) -> None:
            if kinds is None or event.kind in kinds:
                conn.push({"push": "event", "subscription": sid, "event": event.to_json()})
            if until_final and is_final(event):
                conn.subscriptions.pop(sid, None)
                sub.close()

        # Told when the sidecar's own watch missed events (it started again).
        def on_gap(gap: dict[str, Any]) -> None:
            conn.push({"push": "gap", "subscription": sid, **gap})

        if from_revision is None:
            sub = self.sidecar.subscribe(task_id, deliver=deliver, on_gap=on_gap)
        else:
            sub = self.sidecar.hub.subscribe(
                task_id, deliver, from_revision=from_revision, on_gap=on_gap
            )
        conn.subscriptions[sid] = sub
        return sid, sub

    async def op_unsubscribe(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        sub = conn.subscriptions.pop(_whole(frame, "subscription"), None)
        if sub is not None:
            sub.close()
        return sub is not None

    async def op_register(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        queue = _name("queue", frame.get("queue", "default"))
        concurrency = frame.get("concurrency", 1)
        if not isinstance(concurrency, int) or not 1 <= concurrency <= 10_000:
            raise InvalidRequest("concurrency must be a whole number from 1 to 10000")
        wid = next(_ids)

        async def handler(ctx: TaskContext) -> JSON:
            return await self._deliver(conn, wid, ctx)

        conn.registrations[wid] = self.sidecar.register(
            handler, queue=queue, concurrency=concurrency
        )
        log.info(
            "worker %d registered by %s queue=%s concurrency=%d", wid, conn.peer, queue, concurrency
        )
        return {"worker": wid, "node": self.sidecar.node_id}

    async def op_unregister(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        reg = conn.registrations.pop(_whole(frame, "worker"), None)
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
        delivery = _Delivery(next(_ids), ctx)
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

    def _delivery(self, conn: Connection, frame: dict[str, Any]) -> _Delivery:
        delivery = conn.deliveries.get(_whole(frame, "delivery"))
        if delivery is None:
            raise InvalidRequest("no such delivery (finished, cancelled, or never made)")
        return delivery

    async def op_progress(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        delivery = self._delivery(conn, frame)
        return await delivery.ctx.update(_json(frame.get("data"), "data"))

    async def op_complete(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        delivery = self._delivery(conn, frame)
        delivery.result = _json(frame.get("result"), "result")
        delivery.done.set()
        return True

    async def op_fail(self, conn: Connection, frame: dict[str, Any]) -> JSON:
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
        # The handler asks to run its task again later: this attempt does not count.
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
        # A worker shutting down gives its task back unfinished: no attempt is spent.
        delivery = self._delivery(conn, frame)
        delivery.handed_back = True
        delivery.done.set()
        return True


def _created(created: Created) -> dict[str, JSON]:
    answer: dict[str, JSON] = {"task_id": created.spec.id}
    if created.existing:
        answer["existing"] = True
    return answer


def task_json(info: TaskInfo) -> dict[str, JSON]:
    """A task as the protocol shows it."""
    record = info.record
    obj: dict[str, JSON] = {
        "task_id": info.spec.id,
        "state": info.state.value if info.state else None,
        "payload": info.spec.payload,
        "options": info.spec.options.to_json(),
        "created_at": info.spec.created_at,
        "attempts": record.attempts if record else None,
    }
    if record is not None:
        if info.state is State.COMPLETED:
            obj["result"] = record.result
        if record.error is not None:
            obj["error"] = record.error.to_json()
        if record.node is not None:
            obj["node"] = record.node
        if record.due_at is not None:
            obj["due_at"] = record.due_at
    return obj


#: A schedule's fields besides its name, payload and task options.
_SCHEDULE_FIELDS = ("cron", "every_s", "timezone", "missed", "max_catch_up", "grace_s", "paused")

_OPTION_NAMES = {
    "queue",
    "priority",
    "max_attempts",
    "timeout_s",
    "backoff",
    "unique_key",
    "unique_for_s",
    "concurrency_key",
    "max_snoozes",
}


def _options(obj: JSON) -> TaskOptions:
    if not isinstance(obj, dict):
        raise InvalidRequest("options must be an object")
    unknown = set(obj) - _OPTION_NAMES
    if unknown:
        raise InvalidRequest(f"unknown options: {sorted(unknown)}")
    backoff = obj.get("backoff") or {}
    if not isinstance(backoff, dict):
        raise InvalidRequest("backoff must be an object")
    try:
        priority = obj.get("priority", 0)
        attempts = obj.get("max_attempts", 3)
        snoozes = obj.get("max_snoozes", DEFAULT_MAX_SNOOZES)
        if not all(isinstance(n, int) for n in (priority, attempts, snoozes)):
            raise InvalidRequest("priority, max_attempts and max_snoozes are whole numbers")
        for name in ("unique_key", "concurrency_key"):
            if obj.get(name) is not None and not isinstance(obj[name], str):
                raise InvalidRequest(f"{name} must be a string")
        timeout = obj.get("timeout_s")
        window = obj.get("unique_for_s")
        return TaskOptions(
            queue=obj.get("queue", "default"),
            priority=priority,
            max_attempts=attempts,
            timeout_s=None if timeout is None else float(timeout),
            backoff=Backoff.from_json(backoff),
            unique_key=obj.get("unique_key"),
            unique_for_s=None if window is None else float(window),
            concurrency_key=obj.get("concurrency_key"),
            max_snoozes=snoozes,
        )
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidRequest(str(exc)) from exc


def _error(rid: Any, exc: TaskManagerError) -> dict[str, Any]:
    return {"id": rid, "ok": False, "error": error_to_wire(exc)}


# -- reading a request: what is wrong with it is the caller's fault, said so explicitly ----


def _name(kind: str, value: object) -> str:
    """``value`` as a key-safe name (a task id, a queue, a schedule), else InvalidRequest."""
    if not isinstance(value, str):
        raise InvalidRequest(f"{kind} must be a string, not {value!r:.100}")
    try:
        return check_name(kind, value)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


def _task_id(frame: dict[str, Any]) -> TaskId:
    if "task_id" not in frame:
        raise InvalidRequest(f"{frame.get('op')} needs a task_id")
    return TaskId(_name("task id", frame["task_id"]))


def _whole(frame: dict[str, Any], field: str) -> int:
    """A field that names something by number (a delivery, a worker, a subscription)."""
    value = frame.get(field)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequest(f"{frame.get('op')} needs {field}, a whole number")
    return value


def _finite(value: object) -> bool:
    """A finite number (not a bool, and not an integer too large for a float)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _numbers_fit(value: JSON) -> None:
    """Settings are numbers a float can hold: JSON allows integers of any length, and
    the checks after this one compare them with floats."""
    if isinstance(value, dict):
        for item in value.values():
            _numbers_fit(item)
    elif isinstance(value, list):
        for item in value:
            _numbers_fit(item)
    elif isinstance(value, int) and not isinstance(value, bool) and not _finite(value):
        raise InvalidRequest("a number is too large (the most is about 1.8e308)")


def _json(value: JSON, field: str) -> JSON:
    """``value`` if it is JSON as the sidecar writes it (NaN and the infinities, which
    Python's parser takes, are not)."""
    try:
        dumps(value)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"{field} is not JSON: {exc}") from None
    return value


def _clear_path(path: Path) -> None:
    """Make room for the socket: remove one left by a crash, never one still served."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()
        else:
            raise SocketInUse(
                f"{path} is served by another process (give each sidecar its own --socket)"
            )
        finally:
            probe.close()


async def _bind(settings: ServerSettings) -> trio.socket.SocketType:
    _clear_path(Path(settings.path))
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Created without group or other access, then opened up to ``mode`` (and ``group``).
    old = os.umask(0o177)
    try:
        await sock.bind(settings.path)
    finally:
        os.umask(old)
    if settings.group:
        os.chown(settings.path, -1, grp.getgrnam(settings.group).gr_gid)
    os.chmod(settings.path, settings.mode)
    sock.listen(128)
    return sock


def _peer(stream: trio.SocketStream) -> str:
    try:
        pid, uid, gid = struct.unpack(
            "3i", stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        )
    except OSError:
        return "unknown"
    return f"pid={pid} uid={uid} gid={gid}"


def _peer_uid(stream: trio.SocketStream) -> int:
    try:
        return int(
            struct.unpack(
                "3i", stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            )[1]
        )
    except OSError:
        return -1
