"""The socket server: the listener, the op table, and each request's answer.

Owns the socket file (bound with its mode and group, removed only if it is still ours),
accepting connections (each served by ``_connection.py``, refused if its peer's uid is
not allowed), the handshake (``hello``, ``ping``, ``status``, role pushes), the op
table, and answering each request. The ops themselves live by theme: tasks
(``_tasks.py``), queues and schedules (``_queues.py``), subscriptions
(``_subscriptions.py``) and remote workers (``_workers.py``).

Each connection is independent: a client that sends garbage, stalls or disconnects
affects only itself; tasks it was running become failed attempts at once and are retried
per their policy.

Errors go by whose fault they are: a request that fails validation is answered with
``invalid_request`` (or a kin), raised explicitly where the request is read
(``_requests.py``); anything else an operation raises is the sidecar's bug, logged with
its traceback and answered with ``internal``, and the connection and the sidecar go on
serving.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import trio
from taskmanager.protocol import (
    DEFAULT_MAX_FRAME,
    PROTOCOL_VERSION,
    InvalidRequest,
    PermissionDenied,
    TaskManagerError,
)

from .. import __version__
from ..core import JSON
from ..node._sidecar import Sidecar
from ._connection import Closed, Connection, error_frame
from ._queues import Queues
from ._subscriptions import Subscriptions
from ._tasks import Tasks
from ._workers import Workers

log = logging.getLogger("tm_sidecar.server")

#: An operation: what it answers to one request on one connection.
Op = Callable[[Connection, dict[str, Any]], Awaitable[JSON]]


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


@attrs.define(eq=False)
class SocketServer:
    """Serves the protocol for one sidecar."""

    sidecar: Sidecar
    settings: ServerSettings
    connections: set[Connection] = attrs.Factory(set)
    accepting: bool = True
    _inode: int | None = None
    subscriptions: Subscriptions = attrs.field(init=False)
    tasks: Tasks = attrs.field(init=False)
    queues: Queues = attrs.field(init=False)
    workers: Workers = attrs.field(init=False)
    #: The operations by name (docs/protocol.md, "Operations"); any other is refused.
    ops: dict[str, Op] = attrs.field(init=False)

    @subscriptions.default
    def _subscriptions(self) -> Subscriptions:
        return Subscriptions(self.sidecar)

    @tasks.default
    def _tasks(self) -> Tasks:
        return Tasks(self.sidecar, self.subscriptions)

    @queues.default
    def _queues(self) -> Queues:
        return Queues(self.sidecar)

    @workers.default
    def _workers(self) -> Workers:
        return Workers(self.sidecar, max_frame=self.settings.max_frame)

    @ops.default
    def _op_table(self) -> dict[str, Op]:
        # Written out: an operation is one because it is listed here, not because of its
        # method's name.
        tasks, queues, subs, workers = self.tasks, self.queues, self.subscriptions, self.workers
        return {
            "hello": self.op_hello,
            "ping": self.op_ping,
            "status": self.op_status,
            "create": tasks.op_create,
            "create_many": tasks.op_create_many,
            "get": tasks.op_get,
            "wait": tasks.op_wait,
            "cancel": tasks.op_cancel,
            "pause": queues.op_pause,
            "resume": queues.op_resume,
            "set_limits": queues.op_set_limits,
            "schedule": queues.op_schedule,
            "schedules": queues.op_schedules,
            "pause_schedule": queues.op_pause_schedule,
            "resume_schedule": queues.op_resume_schedule,
            "unschedule": queues.op_unschedule,
            "queues": queues.op_queues,
            "subscribe": subs.op_subscribe,
            "unsubscribe": subs.op_unsubscribe,
            "register": workers.op_register,
            "unregister": workers.op_unregister,
            "progress": workers.op_progress,
            "complete": workers.op_complete,
            "fail": workers.op_fail,
            "snooze": workers.op_snooze,
            "release": workers.op_release,
            "report": workers.op_report,
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ready once the socket accepts connections."""
        sock = await _bind(self.settings)
        self._inode = os.stat(self.settings.path).st_ino
        listener = trio.SocketListener(sock)
        # The mode in octal, as chmod and ls show it: 432 would say nothing to a reader.
        log.info(
            "serving socket",
            extra={"path": self.settings.path, "mode": f"{self.settings.mode:#o}"},
        )
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
        conn = Connection.open(stream)
        log.info("client connected", extra=conn.log_fields)
        self.connections.add(conn)
        try:
            await self._serve_connection(conn)
        except Exception:
            # A bug in serving one client must not take the others (or the sidecar) down.
            log.exception("client connection failed", extra=conn.log_fields)
        finally:
            self._dropped(conn)
            with trio.move_on_after(1, shield=True):
                await stream.aclose()
            log.info("client disconnected", extra=conn.log_fields)

    async def _serve_connection(self, conn: Connection) -> None:
        allowed = self.settings.allowed_uids
        async with trio.open_nursery() as nursery:
            conn.nursery = nursery
            nursery.start_soon(conn.write_frames)
            uid = conn.peer.uid if conn.peer is not None else -1
            if allowed is not None and uid not in allowed:
                # Said to the client (a PermissionDenied it does not retry) and logged
                # here: the operator is the one who can change --allow-uid.
                log.warning(
                    "client refused: its uid is not in --allow-uid",
                    extra=conn.log_fields | {"allowed": ",".join(map(str, sorted(allowed)))},
                )
                refusal = PermissionDenied(
                    f"uid {uid} is not allowed to use this sidecar (its --allow-uid is "
                    f"{','.join(map(str, sorted(allowed)))})"
                )
                conn.push(error_frame(None, refusal))
                conn.outbox_send.close()
                return
            with contextlib.suppress(Closed, trio.BrokenResourceError, trio.ClosedResourceError):
                await conn.read_frames(self.settings.max_frame, self._dispatch)
            # Let the last frames (an error, say) reach the client, briefly.
            conn.outbox_send.close()
            with trio.move_on_after(1):
                await conn.written.wait()
            nursery.cancel_scope.cancel()

    def _dropped(self, conn: Connection) -> None:
        conn.closed = True
        self.connections.discard(conn)
        self.workers.dropped(conn)
        self.subscriptions.dropped(conn)

    def _dispatch(self, conn: Connection, frame: dict[str, Any]) -> None:
        rid = frame.get("id")
        if rid is not None and not isinstance(rid, int | str):
            conn.push(error_frame(None, InvalidRequest("id must be a number or a string")))
            return
        op = frame.get("op")
        if not conn.hello and op != "hello":
            conn.push(error_frame(rid, InvalidRequest("say hello first")))
            return
        handler = self.ops.get(op) if isinstance(op, str) else None
        if handler is None:
            conn.push(error_frame(rid, InvalidRequest(f"unknown op {op!r}")))
            return
        assert conn.nursery is not None
        conn.nursery.start_soon(self._answer, conn, rid, handler, frame)

    async def _answer(self, conn: Connection, rid: Any, handler: Op, frame: dict[str, Any]) -> None:
        try:
            result = await handler(conn, frame)
        except TaskManagerError as exc:
            conn.push(error_frame(rid, exc))
        except Exception as exc:
            # Not the caller's fault (validation raises InvalidRequest where it reads the
            # request): a bug here, told as one, and this connection goes on.
            log.exception("op failed: a bug in the sidecar", extra={"op": frame.get("op")})
            conn.push(error_frame(rid, TaskManagerError(f"internal error: {type(exc).__name__}")))
        else:
            conn.push({"id": rid, "ok": True, "result": result})

    # -- the handshake -------------------------------------------------------------------

    async def op_hello(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        """``hello``: the protocol version agreed, and what this sidecar is."""
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
        """``ping``: ``pong``."""
        return "pong"

    async def op_status(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        """``status``: the sidecar's status."""
        return self.sidecar.status()


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
