"""The TaskManager: the seed's API, in Python, over the local sidecar's Unix socket.

Built on anyio, so asyncio and Trio applications use the same code. One connection per
manager carries requests, replies and pushed frames (docs/protocol.md); it connects on
first use and reconnects with backoff if the sidecar goes away. Outcomes are durable in
etcd, so a result being waited for still arrives after a reconnect.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import inspect
import itertools
import logging
import os
import random
import signal
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime, timedelta
from typing import Any

import anyio
import anyio.lowlevel
import sniffio

from ._outcomes import Permanent, Snooze
from ._validate import check_json, finite_number, positive_number, whole_number
from .protocol import (
    DEFAULT_MAX_FRAME,
    EVENT_KINDS,
    PROTOCOL_VERSION,
    ConnectionLost,
    FrameError,
    FrameTooLarge,
    InvalidRequest,
    LineFramer,
    PayloadTooLarge,
    ProtocolViolation,
    TaskFailed,
    TaskManagerError,
    Unavailable,
    decode_frame,
    encode_frame,
    error_from_wire,
)

log = logging.getLogger("taskmanager")

#: What :meth:`Task.on` takes: the protocol's event kinds, and ``success`` (a
#: ``completed`` event) and ``failure`` (a ``failed`` one that will not be retried).
EVENTS = (*EVENT_KINDS, "success", "failure")
#: What :meth:`TaskManager.on` takes besides :data:`EVENTS`: ``gap``, told when events
#: were missed and cannot be replayed (docs/protocol.md, "Resuming a subscription").
MANAGER_EVENTS = (*EVENTS, "gap")
#: Frames larger than this are sent shielded from cancellation: a frame cut short would
#: corrupt the stream (smaller ones go out in one write, or not at all).
_SHIELDED_SEND = 64 * 1024
#: How much of an error's message and traceback a report carries.
_MAX_MESSAGE = 8 * 1024
_MAX_TRACEBACK = 32 * 1024
Callback = Callable[..., Any]
Handler = Callable[["WorkerTask"], Any]


def default_socket() -> str:
    """``$TM_SOCKET``, else ``$XDG_RUNTIME_DIR/tm-sidecar.sock``, else ``/tmp/tm-sidecar.sock``."""
    if os.environ.get("TM_SOCKET"):
        return os.environ["TM_SOCKET"]
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(runtime, "tm-sidecar.sock") if runtime else "/tmp/tm-sidecar.sock"


def _new_task_id() -> str:
    return f"{int(time.time() * 1000):012x}-{random.getrandbits(48):012x}"


async def _call(callback: Callback, *args: Any) -> None:
    try:
        result = callback(*args)
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception("a task manager callback failed")


class Task:
    """A task being built, then committed, then waited for.

    Methods chain: ``await (await manager.create(data)).with_timeout(10).commit()``.
    """

    def __init__(self, manager: TaskManager, data: Any, task_id: str | None = None) -> None:
        check_json(data, "data")
        if task_id is not None and not isinstance(task_id, str):
            raise InvalidRequest(f"task_id must be a string, not {task_id!r}")
        self.manager = manager
        self._own_id = task_id is not None
        self.id = task_id or _new_task_id()
        self.data = data
        self.options: dict[str, Any] = {}
        self.run_at: float | None = None
        self.committed = False
        #: After commit: True if a live task held this task's unique key, and this Task
        #: now follows that one (its ``id`` is the existing task's).
        self.existing = False
        self.state: str | None = None
        self.result_value: Any = None
        self.error: dict[str, Any] | None = None
        self._callbacks: dict[str, list[Callback]] = {}
        self._final = anyio.Event()
        # The last event taken, as (revision, rank): two subscriptions to one task (one
        # added after commit) push the same events twice.
        self._seen: tuple[int, int] = (-1, -1)
        # Callbacks run in one task per Task, in event order, off the connection's reader.
        self._calls: collections.deque[tuple[Callback, tuple[Any, ...]]] = collections.deque()
        self._calling = False
        # Set when the manager's connection ended for good: result() raises it.
        self._aborted: TaskManagerError | None = None
        #: Tasks of this manager that follow this one (they met its unique key).
        self._followers: list[Task] = []

    def __repr__(self) -> str:
        return f"<Task {self.id} {self.state or 'uncommitted'}>"

    def _editable(self) -> None:
        if self.committed:
            raise InvalidRequest("the task is committed: set its options before commit()")

    def with_timeout(self, seconds: float) -> Task:
        """Fail an attempt that runs longer than ``seconds`` (its handler is cancelled)."""
        self._editable()
        self.options["timeout_s"] = positive_number(seconds, "the timeout")
        return self

    def with_delay_until(self, when: datetime | float) -> Task:
        """Do not start before ``when`` (an aware datetime, or a UTC epoch time)."""
        self._editable()
        if isinstance(when, datetime):
            if when.tzinfo is None:
                raise InvalidRequest(
                    "use an aware datetime (with tzinfo), e.g. datetime(..., tzinfo=timezone.utc)"
                )
            when = when.timestamp()
        self.run_at = finite_number(when, "the delay's time")
        return self

    def with_delay(self, seconds: float) -> Task:
        """Do not start before ``seconds`` from now."""
        return self.with_delay_until(time.time() + finite_number(seconds, "the delay"))

    def with_retries(
        self,
        max_attempts: int,
        *,
        base_s: float = 1.0,
        factor: float = 2.0,
        max_s: float = 300.0,
        jitter: float = 0.5,
    ) -> Task:
        """Try at most ``max_attempts`` times, waiting ``min(max_s, base_s * factor**n)``."""
        self._editable()
        attempts = whole_number(max_attempts, "max_attempts", minimum=1)
        backoff = {
            "base_s": finite_number(base_s, "base_s"),
            "factor": finite_number(factor, "factor"),
            "max_s": finite_number(max_s, "max_s"),
            "jitter": finite_number(jitter, "jitter"),
        }
        self.options["max_attempts"], self.options["backoff"] = attempts, backoff
        return self

    def with_priority(self, priority: int) -> Task:
        """Higher runs first; equal priorities run in commit order."""
        self._editable()
        self.options["priority"] = whole_number(priority, "the priority")
        return self

    def with_unique(self, key: str, *, for_s: float | timedelta | None = None) -> Task:
        """At most one live task per ``key`` (namespace-wide): if one is pending, delayed
        or running when this commits, no new task is made and this Task follows that one
        (``existing`` is then True). With ``for_s``, a key stays taken that long after its
        task finished too."""
        self._editable()
        self.options["unique_key"] = key
        if for_s is not None:
            seconds = for_s.total_seconds() if isinstance(for_s, timedelta) else float(for_s)
            self.options["unique_for_s"] = seconds
        return self

    def with_concurrency_key(self, key: str) -> Task:
        """Count this task against its queue's per-key limits (``key_max_running``,
        ``key_rate``) under ``key``: e.g. one task at a time per customer."""
        self._editable()
        self.options["concurrency_key"] = key
        return self

    def with_queue(self, queue: str) -> Task:
        """Send the task to the workers of ``queue`` (default: ``default``)."""
        self._editable()
        if not isinstance(queue, str) or not queue:
            raise InvalidRequest(f"the queue must be a non-empty string, not {queue!r}")
        self.options["queue"] = queue
        return self

    def on(self, event: str, callback: Callback) -> Task:
        """Call ``callback`` on an event of this task: queued, started, updated (progress),
        failed (with ``will_retry``), completed; success (result) and failure (error)."""
        if event not in EVENTS:
            raise InvalidRequest(f"unknown event {event!r}; one of {', '.join(EVENTS)}")
        if self.committed and not self._final.is_set() and event not in self._kinds():
            # Committed with fewer kinds: follow every kind from now on.
            for kind in EVENTS[:6]:
                self._callbacks.setdefault(kind, [])
            self.manager._spawn(self.manager._follow_all, self)
        self._callbacks.setdefault(event, []).append(callback)
        return self

    def _kinds(self) -> list[str]:
        """The event kinds this task needs pushed: its outcome, and what has callbacks."""
        return sorted({"failed", "completed", *(k for k in self._callbacks if k in EVENTS[:6])})

    async def commit(self) -> Task:
        """Queue the task; once this returns it is durable in etcd."""
        if self.committed:
            return self
        await self.manager._ensure_started()
        # The sidecar subscribes this connection to the task's events before it creates
        # the task (one round trip), and ends the subscription with the final event.
        request: dict[str, Any] = {
            "task_id": self.id,
            "payload": self.data,
            "options": self.options,
            "subscribe": True,
            "events": self._kinds(),
        }
        if self.run_at is not None:
            request["run_at"] = self.run_at
        self.manager._tasks[self.id] = self
        try:
            connections = self.manager._connections
            answer = await self.manager._request("create", request, idempotent=True)
        except BaseException:
            self.manager._untrack(self, ended=False)
            raise
        self.committed = True
        if answer.get("existing") and answer["task_id"] != self.id:
            # The unique key is held by a live task: follow that one.
            self.manager._tasks.pop(self.id, None)
            self.id, self.existing = answer["task_id"], True
            followed = self.manager._tasks.setdefault(self.id, self)
            if followed is not self:  # this manager follows it already: hear it from there
                followed._followers.append(self)
            self.manager._spawn(self.manager._recheck, self)
        if answer.get("subscription") is None:  # a sidecar from before subscribe-on-create
            sub = await self.manager._request("subscribe", {"task_id": self.id}, idempotent=True)
            answer["subscription"] = sub["subscription"]
        if not self._final.is_set():
            self.manager._sub_of[self.id] = answer["subscription"]
        if self._own_id or connections != self.manager._connections:
            # The task may have existed (an id given again, a create repeated after a
            # reconnect) and finished before this subscription: read where it stands.
            self.manager._spawn(self.manager._recheck, self)
        return self

    async def cancel(self, reason: str = "cancelled by its creator") -> bool:
        """Cancel the task: pending or delayed, it fails at once with ``Cancelled``;
        running, its handler is cancelled (on whichever node runs it) and it fails the
        same way, never retried. ``result()`` then raises :class:`TaskFailed` and the
        ``failure`` callbacks run. False if it had finished already (nothing changes)."""
        if not self.committed:
            raise InvalidRequest("commit() the task first")
        return await self.manager.cancel(self.id, reason=reason)

    async def result(self, timeout: float | None = None) -> Any:
        """The task's result once it completes; raises :class:`TaskFailed` if it fails."""
        if not self.committed:
            raise InvalidRequest("commit() the task first")
        if self._final.is_set():
            await anyio.lowlevel.checkpoint()
        else:
            await self._await_final(timeout)
        if self._aborted is not None:
            raise self._aborted
        if self.state == "failed":
            raise TaskFailed(self.id, self.error)
        return self.result_value

    def _abort(self, error: TaskManagerError) -> None:
        """The manager's connection ended for good: whoever waits gets ``error``."""
        if not self._final.is_set():
            self._aborted = error
            self._final.set()

    async def _await_final(self, timeout: float | None) -> None:
        with anyio.fail_after(timeout):
            while not self._final.is_set():
                # The events tell the outcome. Should the sidecar have missed them (its
                # watch fell behind etcd's compaction), a read now and then settles it.
                with anyio.move_on_after(RESYNC_S):
                    await self._final.wait()
                if self._final.is_set():
                    break
                info = await self.manager._request(
                    "get", {"task_id": self.id}, idempotent=True, unavailable_ok=True
                )
                if info is not None:
                    await self._settle(info)

    async def _settle(self, info: dict[str, Any]) -> None:
        """A final state read from the sidecar (after a reconnect, say)."""
        if self._final.is_set() or info.get("state") not in ("completed", "failed"):
            return
        if info["state"] == "completed":
            await self._on_event(
                {"event": "completed", "data": info.get("result"), "attempt": info.get("attempts")},
                streamed=False,
            )
        else:
            await self._on_event(
                {
                    "event": "failed",
                    "error": info.get("error"),
                    "will_retry": False,
                    "attempt": info.get("attempts"),
                },
                streamed=False,
            )

    async def _on_event(self, event: dict[str, Any], *, streamed: bool = True) -> None:
        for follower in self._followers:
            await follower._on_event(event, streamed=streamed)
        kind = event.get("event", "")
        if self._final.is_set():
            return
        if streamed:
            seen = (int(event.get("revision") or 0), _RANK.get(kind, 0))
            if seen <= self._seen:
                return  # the same event through a second subscription
            self._seen = seen
        self.state = kind if kind in ("queued", "assigned", "started", "updated") else self.state
        args: tuple[Any, ...] = (event,)
        if kind == "updated":
            args = (event.get("data"),)
        final = None
        if kind == "completed":
            self.state, self.result_value, final = "completed", event.get("data"), "success"
            args = (self.result_value,)
        elif kind == "failed":
            args = (event.get("error"), event.get("will_retry", False))
            if not event.get("will_retry"):
                self.state, self.error, final = "failed", event.get("error"), "failure"
        # Callbacks run as tasks of their own, in order: one that awaits a request (or
        # blocks) must not stall the connection's reader.
        calls: list[tuple[Callback, tuple[Any, ...]]] = [
            (cb, args) for cb in self._callbacks.get(kind, [])
        ]
        if final == "success":
            calls += [(cb, (self.result_value,)) for cb in self._callbacks.get("success", [])]
        elif final == "failure":
            calls += [(cb, (self.error,)) for cb in self._callbacks.get("failure", [])]
        if calls:
            self._calls.extend(calls)
            if not self._calling:
                self._calling = self.manager._spawn(self._run_calls)
        if final is not None:
            self._final.set()
            # A final event from the stream ended the subscription on the sidecar's side.
            self.manager._untrack(self, ended=streamed)

    async def _run_calls(self) -> None:
        try:
            while self._calls:
                callback, args = self._calls.popleft()
                await _call(callback, *args)
        finally:
            self._calling = False


#: The order of the events one change can tell (a start, then progress or an outcome).
_RANK = {"queued": 0, "assigned": 1, "started": 2, "updated": 3, "failed": 4, "completed": 4}

#: How long result() trusts the event stream alone before it reads the task once.
RESYNC_S = 30.0


class WorkerTask:
    """What a handler receives."""

    def __init__(self, manager: TaskManager, delivery: int, frame: dict[str, Any]) -> None:
        self._manager = manager
        self._delivery = delivery
        self.id: str = frame["id"]
        self.data: Any = frame.get("payload")
        self.attempt: int = frame.get("attempt", 1)
        self.options: dict[str, Any] = frame.get("options", {})
        if not isinstance(self.id, str) or not isinstance(delivery, int):
            raise TypeError("a task push needs a string id and an integer delivery")

    @property
    def payload(self) -> Any:
        """The task's data."""
        return self.data

    async def update(self, progress: Any) -> bool:
        """Publish progress (any JSON); False if the attempt is no longer live."""
        check_json(progress, "the progress")
        return bool(
            await self._manager._request("progress", {"delivery": self._delivery, "data": progress})
        )


class Worker:
    """Handlers registered with :meth:`TaskManager.process`."""

    def __init__(
        self, manager: TaskManager, handler: Handler, queue: str, concurrency: int
    ) -> None:
        self.manager = manager
        self.handler = handler
        self.queue = queue
        self.concurrency = concurrency
        self.id: int | None = None
        self.node: str | None = None
        self.running: set[int] = set()
        self.closed = False

    def __repr__(self) -> str:
        return f"<Worker {self.id} queue={self.queue} concurrency={self.concurrency}>"

    async def close(self) -> None:
        """Take no new tasks (running ones finish)."""
        self.closed = True
        if self.id is not None:
            await self.manager._request("unregister", {"worker": self.id}, unavailable_ok=True)


class TaskManager:
    """A connection to the local sidecar. ``DefaultTaskManager`` is the seed's name for it.

    Use it with ``async with``, or lazily: the first call connects; ``shutdown()``
    releases it. A call that needs the sidecar while it cannot be reached waits at most
    ``connect_timeout_s`` for it, then raises :class:`Unavailable`.
    """

    def __init__(self, socket_path: str | None = None, *, connect_timeout_s: float = 5.0) -> None:
        self.socket_path = socket_path or default_socket()
        self.connect_timeout_s = positive_number(connect_timeout_s, "connect_timeout_s")
        self.node: str | None = None
        self._leader = False
        self._stream: anyio.abc.ByteStream | None = None
        self._ids = itertools.count(1)
        # A reply, or the SDK's own error when none will come.
        self._waiting: dict[int, tuple[anyio.Event, list[dict[str, Any] | TaskManagerError]]] = {}
        self._on_reply: dict[int, Callable[[dict[str, Any]], None]] = {}
        self._tasks: dict[str, Task] = {}
        self._sub_of: dict[str, int] = {}  # task id -> its subscription
        self._connections = 0  # how many connections were made so far
        self._all_sub: int | None = None
        self._subscribing_all = False
        # Where the manager-level stream stands, to resume it after a reconnect: the
        # last revision whose events were taken, and which of that revision's events
        # (one change can tell several, one transaction can change many tasks).
        self._all_revision: int | None = None
        self._all_seen: set[tuple[str, str]] = set()
        self._calls: collections.deque[tuple[Callback, tuple[Any, ...]]] = collections.deque()
        self._calling = False
        self._shutting_down = False
        self._early: dict[int, list[dict[str, Any]]] = {}
        self._callbacks: dict[str, list[Callback]] = {}
        self._workers: dict[int, Worker] = {}
        self._worker_list: list[Worker] = []
        self._deliveries: dict[int, anyio.CancelScope] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self._scope: anyio.CancelScope | None = None
        self._conn_scope: anyio.CancelScope | None = None
        self._started = False
        self._closing = False
        self._own_tg: Any = None
        self._primed = False
        self._max_frame = DEFAULT_MAX_FRAME
        self._violation: dict[str, Any] | None = None  # the sidecar's last protocol_violation
        self._last_error = "not connected yet"  # why the sidecar could not be reached
        self._failure: TaskManagerError | None = None  # why the connection ended for good

    def _prime(self) -> None:
        # anyio's primitives bind to the running event loop: make them on first async use,
        # so that a TaskManager can be made at import time, as in the seed.
        if not self._primed:
            self._primed = True
            self._connected = anyio.Event()
            self._send_lock = anyio.Lock()
            self._idle = anyio.Event()
            self._idle.set()
            self._stopped = anyio.Event()

    # -- life ------------------------------------------------------------------------------

    async def __aenter__(self) -> TaskManager:
        self._prime()
        self._own_tg = anyio.create_task_group()
        tg = await self._own_tg.__aenter__()
        self._started = True
        await tg.start(self._supervise)
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.shutdown()
        finally:
            await self._own_tg.__aexit__(None, None, None)

    async def _ensure_started(self) -> None:
        if self._failure is not None:
            raise self._failed()
        if self._closing:
            raise InvalidRequest("the task manager is shut down")
        self._prime()
        if not self._started:
            self._started = True
            ready = anyio.Event()
            _spawn_detached(lambda: self._supervise(ready=ready))
            await ready.wait()
        if self._connected.is_set():
            return  # the common case, without the cost of a cancel scope
        await self._wait_connected()

    async def _wait_connected(self) -> None:
        # Connected, or the connection loop ended (shut down, or failed for good).
        with anyio.move_on_after(self.connect_timeout_s):
            async with anyio.create_task_group() as tg:

                async def until(event: anyio.Event) -> None:
                    await event.wait()
                    tg.cancel_scope.cancel()

                tg.start_soon(until, self._connected)
                tg.start_soon(until, self._stopped)
        if self._failure is not None:
            raise self._failed()
        if self._closing or self._stopped.is_set():
            raise InvalidRequest("the task manager is shut down")
        if not self._connected.is_set():
            raise Unavailable(
                f"cannot reach the sidecar at {self.socket_path} within "
                f"{self.connect_timeout_s:g} s ({self._last_error}); is tm-sidecar running?"
            )

    async def _supervise(
        self, *, task_status: Any = anyio.TASK_STATUS_IGNORED, ready: anyio.Event | None = None
    ) -> None:
        try:
            with anyio.CancelScope() as self._scope:
                async with anyio.create_task_group() as tg:
                    self._tg = tg
                    task_status.started()
                    if ready is not None:
                        ready.set()
                    await self._connection_loop()
        except Exception as exc:
            self._fail_for_good(exc)
        finally:
            self._stopped.set()

    def _fail_for_good(self, exc: BaseException) -> None:
        """The connection loop ended with an error: every call from now on raises it."""
        cause = exc
        while isinstance(cause, BaseExceptionGroup) and len(cause.exceptions) == 1:
            cause = cause.exceptions[0]
        if isinstance(cause, TaskManagerError) and not isinstance(cause, TaskFailed):
            error: TaskManagerError = type(cause)(
                f"the connection to the sidecar ended for good: {cause}"
            )
            log.error("%s", error)
        else:
            error = TaskManagerError(
                f"the task manager's connection loop failed ({type(cause).__name__}: {cause}); "
                "make a new TaskManager"
            )
            log.error("the task manager's connection loop failed", exc_info=exc)
        error.__cause__ = cause
        self._failure = error
        for task in list(self._tasks.values()):
            task._abort(error)
        for event, slot in self._waiting.values():
            slot.append(self._failed())
            event.set()

    def _failed(self) -> TaskManagerError:
        """A fresh copy of the error that ended the connection (one raised again and
        again would pile up tracebacks)."""
        assert self._failure is not None
        error = type(self._failure)(str(self._failure))
        error.__cause__ = self._failure.__cause__
        return error

    async def _connection_loop(self) -> None:
        failures = 0
        while not self._closing:
            if failures:
                await anyio.sleep(min(2.0, 0.05 * 2**failures))
            try:
                stream = await anyio.connect_unix(self.socket_path)
            except OSError as exc:
                failures += 1
                self._last_error = f"{type(exc).__name__}: {exc.strerror or exc}"
                if failures in (1, 10) or failures % 50 == 0:
                    log.warning(
                        "cannot reach the sidecar at %s (%s); retrying", self.socket_path, exc
                    )
                continue
            began = time.monotonic()
            self._stream = stream
            self._violation = None
            connected = self._connections
            try:
                async with anyio.create_task_group() as conn_tg:
                    self._conn_scope = conn_tg.cancel_scope
                    conn_tg.start_soon(self._read, stream, conn_tg.cancel_scope)
                    await self._handshake()
                    self._connections += 1
                    self._connected.set()
                    await anyio.sleep_forever()
            except* (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, ConnectionLost):
                pass
            finally:
                self._stream = None
                self._conn_scope = None
                self._connected = anyio.Event()
                # Requests in flight were not answered. When the sidecar closed the
                # connection for a protocol violation, they fail with it and are not
                # sent again: a refused frame is never repeated.
                violation = self._violation
                for event, slot in self._waiting.values():
                    if violation is not None:
                        slot.append({"ok": False, "error": violation})
                    else:
                        slot.append(ConnectionLost("the sidecar went away"))
                    event.set()
                self._waiting.clear()
                for scope in self._deliveries.values():
                    scope.cancel()  # the sidecar has failed these attempts already
                with anyio.CancelScope(shield=True):
                    await stream.aclose()
            if self._violation is not None and self._connections == connected:
                # Refused before the handshake was done (a uid not allowed, say): trying
                # again would be refused again.
                raise ProtocolViolation(
                    f"the sidecar refused this client: {self._violation.get('message')}"
                )
            self._last_error = "the connection was lost"
            # A connection that ends at once (refused, or closed over a bad frame) is
            # made again with backoff, not in a tight loop.
            failures = failures + 1 if time.monotonic() - began < 1.0 else 0
            if not self._closing:
                log.warning("connection to the sidecar lost; reconnecting")

    async def _handshake(self) -> None:
        try:
            hello = await self._send_request(
                "hello", {"version": PROTOCOL_VERSION, "client": "taskmanager-py/0.1"}
            )
        except TaskManagerError as exc:
            if exc.retryable:
                raise ConnectionLost(f"the handshake failed: {exc}") from exc
            raise  # refused for good (a version, a uid): ends the connection loop
        self.node = hello.get("node")
        self._leader = bool(hello.get("leader"))
        max_frame = hello.get("max_frame")
        if isinstance(max_frame, int) and not isinstance(max_frame, bool) and max_frame > 0:
            self._max_frame = max_frame
        # Re-establish what the previous connection had.
        self._sub_of.clear()
        self._all_sub = None
        for worker in self._worker_list:
            if not worker.closed:
                try:
                    await self._register(worker)
                except TaskManagerError as exc:
                    log.error("worker %r could not register again: %s", worker, exc)
        for task in list(self._tasks.values()):
            if not task.committed:
                continue  # its commit is repeated, and subscribes
            try:
                sub = await self._send_request(
                    "subscribe", {"task_id": task.id, "until_final": True}
                )
            except TaskManagerError as exc:
                log.error("task %s: could not subscribe again: %s", task.id, exc)
                continue
            self._sub_of[task.id] = sub["subscription"]
            assert self._tg is not None
            self._tg.start_soon(self._recheck, task)
        if self._callbacks:
            self._subscribing_all = True
            try:
                await self._open_all_subscription(self._send_request)
            except TaskManagerError as exc:
                log.error("could not subscribe to the namespace's events again: %s", exc)
            finally:
                self._subscribing_all = False

    async def _recheck(self, task: Task) -> None:
        # Events may have been missed while disconnected: the outcome is in etcd.
        if task.committed:
            with contextlib.suppress(TaskManagerError):
                await task._settle(await self._request("get", {"task_id": task.id}))

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop taking tasks, let running handlers finish within ``timeout`` seconds, hand
        back what could not finish (pending again at once, the attempt not counted),
        then disconnect.

        A handler may call it: its own task is not waited for (it ends with the manager).
        """
        if self._closing or self._shutting_down:
            return
        self._shutting_down = True
        mine = _DELIVERY.get()
        if self._started and self._connected.is_set():
            for worker in self._worker_list:
                if not worker.closed:
                    with anyio.move_on_after(5):
                        await worker.close()
            with anyio.move_on_after(timeout):
                while any(d != mine for d in self._deliveries):
                    with anyio.move_on_after(0.05):
                        await self._idle.wait()
            for delivery, scope in list(self._deliveries.items()):
                if delivery == mine:
                    continue
                scope.cancel()
                # Given back, not failed: the task is pending again at once and this
                # attempt does not count.
                with anyio.move_on_after(2):
                    try:
                        await self._request("release", {"delivery": delivery})
                    except TaskManagerError as exc:
                        log.warning("could not hand back delivery %d: %s", delivery, exc)
        self._closing = True
        if self._scope is not None:
            self._scope.cancel()
            if mine is None:
                with anyio.move_on_after(5):
                    await self._stopped.wait()

    async def serve(self, *, shutdown_timeout: float = 30.0) -> None:
        """Run this manager's workers until SIGTERM or SIGINT (Ctrl-C), then shut down
        gracefully (see :meth:`shutdown`) and return.

        Call it from the main thread. Raises if the connection to the sidecar ends for
        good. :func:`taskmanager.run_worker` is the same in one blocking call.
        """
        await self._ensure_started()
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            await self._serve_until(signals, shutdown_timeout)

    async def _serve_until(self, signals: Any, shutdown_timeout: float) -> None:
        received: list[int] = []
        async with anyio.create_task_group() as tg:

            async def on_signal() -> None:
                async for signum in signals:
                    received.append(signum)
                    break
                tg.cancel_scope.cancel()

            async def on_end() -> None:
                await self._stopped.wait()  # shut down by someone else, or failed
                tg.cancel_scope.cancel()

            tg.start_soon(on_signal)
            tg.start_soon(on_end)
        if self._failure is not None:
            raise self._failed()
        if received:
            log.info(
                "received %s: shutting down (running tasks get %g s to finish)",
                signal.Signals(received[0]).name,
                shutdown_timeout,
            )
        # Further signals stay queued in the receiver meanwhile: no KeyboardInterrupt.
        await self.shutdown(shutdown_timeout)

    # -- framing -----------------------------------------------------------------------------

    async def _read(self, stream: anyio.abc.ByteStream, connection: anyio.CancelScope) -> None:
        # The sidecar is not trusted: a frame that is not a JSON object, is over
        # max_frame, or does not make sense is logged and the connection made again.
        # The framer holds at most max_frame bytes of a line (the hello tells it).
        framer = LineFramer(self._max_frame)
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
            framer.max_frame = self._max_frame
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

    async def _send_request(
        self,
        op: str,
        fields: dict[str, Any],
        *,
        on_reply: Callable[[dict[str, Any]], None] | None = None,
    ) -> Any:
        """Send one request and wait for its answer; ``on_reply`` sees it as it is read."""
        if self._stream is None:
            raise ConnectionLost("not connected")
        rid = next(self._ids)
        try:
            frame = encode_frame({"id": rid, "op": op, **fields}, self._max_frame)
        except FrameTooLarge as exc:
            # The sidecar would refuse it and close the connection: never send it.
            raise PayloadTooLarge(
                f"the {op} request is {exc.size} bytes, over the sidecar's max_frame of "
                f"{exc.limit} bytes"
            ) from exc
        except ValueError as exc:
            raise InvalidRequest(f"the {op} request is not JSON: {exc}") from exc
        event, slot = anyio.Event(), list[dict[str, Any] | TaskManagerError]()
        self._waiting[rid] = (event, slot)
        if on_reply is not None:
            self._on_reply[rid] = on_reply
        try:
            async with self._send_lock:
                if self._stream is None:
                    raise ConnectionLost("not connected")
                await self._send(self._stream, frame)
            await event.wait()
        finally:
            self._waiting.pop(rid, None)
            self._on_reply.pop(rid, None)
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
                if self._conn_scope is not None:
                    self._conn_scope.cancel()
                raise ConnectionLost("the sidecar did not take a frame within 30 s")
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise ConnectionLost(f"the connection to the sidecar broke: {exc!r}") from exc

    async def _request(
        self,
        op: str,
        fields: dict[str, Any],
        *,
        idempotent: bool = False,
        unavailable_ok: bool = False,
        on_reply: Callable[[dict[str, Any]], None] | None = None,
    ) -> Any:
        """A request; repeated after a reconnect when ``idempotent``.

        With ``unavailable_ok``, a passing failure (the sidecar unreachable too) is None.
        """
        while True:
            try:
                await self._ensure_started()
                return await self._send_request(op, fields, on_reply=on_reply)
            except ConnectionLost:
                if not idempotent:
                    raise
            except Unavailable:
                if not unavailable_ok:
                    raise
                return None

    async def _dispatch(self, frame: dict[str, Any]) -> None:
        if "push" not in frame:
            waiting = self._waiting.get(frame.get("id"))  # type: ignore[arg-type]
            if waiting is not None:
                on_reply = self._on_reply.get(frame["id"])
                if on_reply is not None:
                    on_reply(frame)
                waiting[1].append(frame)
                waiting[0].set()
            elif not frame.get("ok", True):
                error = frame.get("error")
                if isinstance(error, dict) and error.get("code") == "protocol_violation":
                    # The sidecar is about to close the connection over a frame of ours.
                    self._violation = error
                    log.error("the sidecar refused a frame: %s", error.get("message"))
                else:
                    log.warning("the sidecar reports: %s", error)
            return
        kind = frame["push"]
        assert self._tg is not None
        if kind == "event":
            event = frame["event"]
            sid = frame.get("subscription")
            if sid is not None and sid == self._all_sub:
                self._on_namespace_event(event)
            else:
                # A task's own subscription (its events may overtake the create's answer).
                task = self._tasks.get(event.get("task_id"))
                if task is not None:
                    await task._on_event(event)
        elif kind == "gap":
            if frame.get("subscription") == self._all_sub:
                self._on_gap({k: v for k, v in frame.items() if k not in ("push", "subscription")})
            else:
                # A task's own subscription missed events (the sidecar's watch started
                # again): its outcome may be among them, so read it from etcd now.
                for task_id in frame.get("task_ids") or ():
                    task = self._tasks.get(task_id)
                    if task is not None:
                        self._spawn(self._recheck, task)
        elif kind == "task":
            delivery = frame["delivery"]
            work = WorkerTask(self, delivery, frame["task"])  # a malformed push raises here
            worker = self._workers.get(frame["worker"])
            if worker is None:
                # The push can overtake the register reply: keep it for the worker.
                self._early.setdefault(frame["worker"], []).append(frame)
            else:
                new_scope = anyio.CancelScope()
                self._deliveries[delivery] = new_scope
                if self._idle.is_set():
                    self._idle = anyio.Event()  # busy now; set again when the last one ends
                self._tg.start_soon(self._run, worker, work, new_scope)
        elif kind == "cancel":
            scope = self._deliveries.get(frame["delivery"])
            if scope is not None:
                scope.cancel()
        elif kind == "role":
            self._leader = bool(frame.get("leader"))

    def _on_namespace_event(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        revision = event.get("revision")
        if isinstance(revision, int):
            # One subscription tells events in revision order, without repeats; only the
            # revision a resumed one starts from may repeat events already told.
            key = (str(event.get("task_id")), kind)
            if revision != self._all_revision:
                self._all_revision, self._all_seen = revision, {key}
            elif key in self._all_seen:
                return  # told before the reconnect
            else:
                self._all_seen.add(key)
        names = [kind]
        if kind == "completed":
            names.append("success")
        elif kind == "failed" and not event.get("will_retry"):
            names.append("failure")
        self._call_in_order(
            [(cb, (event,)) for name in names for cb in self._callbacks.get(name, [])]
        )

    def _call_in_order(self, calls: list[tuple[Callback, tuple[Any, ...]]]) -> None:
        # One task runs the manager's callbacks, in event order, off the reader.
        if calls:
            self._calls.extend(calls)
            if not self._calling:
                self._calling = self._spawn(self._run_calls)

    async def _run_calls(self) -> None:
        try:
            while self._calls:
                callback, args = self._calls.popleft()
                await _call(callback, *args)
        finally:
            self._calling = False

    def _on_gap(self, gap: dict[str, Any]) -> None:
        log.warning(
            "events of the namespace were missed (%s) after revision %s",
            gap.get("reason"),
            gap.get("from_revision"),
        )
        to = gap.get("to_revision")
        if isinstance(to, int) and (self._all_revision is None or to > self._all_revision):
            self._all_revision, self._all_seen = to, set()
        self._call_in_order([(cb, (gap,)) for cb in self._callbacks.get("gap", [])])

    # -- workers -----------------------------------------------------------------------------

    async def _register(self, worker: Worker) -> None:
        answer = await self._send_request(
            "register", {"queue": worker.queue, "concurrency": worker.concurrency}
        )
        worker.id, worker.node = answer["worker"], answer.get("node")
        self._workers[answer["worker"]] = worker
        for frame in self._early.pop(answer["worker"], []):
            await self._dispatch(frame)

    async def _run(self, worker: Worker, task: WorkerTask, scope: anyio.CancelScope) -> None:
        delivery = task._delivery
        _DELIVERY.set(delivery)
        outcome: tuple[str, Any] | None = None
        try:
            with scope:
                try:
                    if inspect.iscoroutinefunction(worker.handler):
                        value = await worker.handler(task)
                    else:
                        # A plain function would block the event loop: run it in a thread.
                        value = await anyio.to_thread.run_sync(
                            worker.handler, task, abandon_on_cancel=True
                        )
                        if inspect.isawaitable(value):
                            value = await value
                    outcome = ("complete", {"delivery": delivery, "result": value})
                except Snooze as snooze:
                    outcome = ("snooze", {"delivery": delivery, "delay_s": snooze.delay_s})
                except Exception as exc:
                    permanent = isinstance(exc, Permanent) or isinstance(exc.__cause__, Permanent)
                    error = {
                        "type": type(exc).__name__,
                        "message": _clip(str(exc), _MAX_MESSAGE),
                        "traceback": _clip(
                            "".join(traceback.format_exception(exc)), _MAX_TRACEBACK, tail=True
                        ),
                        "retryable": not permanent,
                    }
                    outcome = ("fail", {"delivery": delivery, "error": error})
            if outcome is not None and not scope.cancel_called:
                await self._report(task, outcome)
        finally:
            self._deliveries.pop(delivery, None)
            if not self._deliveries:
                self._idle.set()

    async def _report(self, task: WorkerTask, outcome: tuple[str, dict[str, Any]]) -> None:
        op, fields = outcome
        if op == "complete":
            try:
                check_json(fields["result"], "the result")
            except InvalidRequest as exc:
                await self._report_failure(
                    task._delivery,
                    {"type": "ResultNotJSON", "message": str(exc), "retryable": False},
                )
                return
        try:
            await self._request(op, fields)
        except PayloadTooLarge as exc:
            # Sent, it would break the connection; retried, it would fail the same way.
            await self._report_failure(
                task._delivery,
                {
                    "type": "ResultTooLarge" if op == "complete" else "ErrorTooLarge",
                    "message": str(exc),
                    "retryable": False,
                },
            )
        except ConnectionLost:
            log.warning("report of task %s lost with the connection; it will be retried", task.id)
        except TaskManagerError as exc:
            log.warning("report of task %s not taken: %s", task.id, exc)

    async def _report_failure(self, delivery: int, error: dict[str, Any]) -> None:
        try:
            await self._request("fail", {"delivery": delivery, "error": error})
        except TaskManagerError as exc:
            log.warning("could not report failure of delivery %d: %s", delivery, exc)

    # -- the API -----------------------------------------------------------------------------

    async def create(
        self,
        data: Any,
        *,
        task_id: str | None = None,
        unique_key: str | None = None,
        unique_for: float | timedelta | None = None,
    ) -> Task:
        """A new task for ``data`` (any JSON); set its options, then ``await task.commit()``.

        Raises :class:`InvalidRequest` (naming the field) for data that is not JSON.
        ``unique_key`` (and ``unique_for``): see :meth:`Task.with_unique`.
        """
        task = Task(self, data, task_id)  # checked before connecting
        await self._ensure_started()
        if unique_key is not None:
            task.with_unique(unique_key, for_s=unique_for)
        return task

    async def submit(self, data: Any, **options: Any) -> Task:
        """Create and commit in one call; ``options`` as the protocol's (timeout_s, ...)."""
        check_json(options, "the options")
        task = Task(self, data)
        task.options.update(options)
        return await task.commit()

    async def process(
        self, handler: Handler, *, concurrency: int = 1, queue: str = "default"
    ) -> Worker:
        """Run ``handler(task)`` for tasks of ``queue``, up to ``concurrency`` at once.

        The handler may be a plain or an async function; what it returns (any JSON) is
        the result; what it raises fails the attempt (retried per the task's policy, or
        not at all for :class:`Permanent`).
        """
        await self._ensure_started()
        worker = Worker(self, handler, queue, concurrency)
        await self._register(worker)
        self._worker_list.append(worker)  # registered again after a reconnect
        return worker

    def on(self, event: str, callback: Callback) -> TaskManager:
        """Call ``callback(event)`` on every task event of the namespace.

        ``event`` is one of :data:`EVENTS` (``success`` is a ``completed`` event,
        ``failure`` a ``failed`` one that will not be retried), or ``gap``: events were
        missed and could not be replayed (``callback(gap)`` with ``from_revision``,
        ``to_revision``, ``reason`` and ``task_ids``, the tasks to read again).
        Across a reconnect the stream resumes where it stopped.
        """
        if event not in MANAGER_EVENTS:
            raise InvalidRequest(f"unknown event {event!r}; one of {', '.join(MANAGER_EVENTS)}")
        first = not self._callbacks
        self._callbacks.setdefault(event, []).append(callback)
        if first and self._tg is not None and self._connected.is_set():
            self._tg.start_soon(self._subscribe_all)
        return self

    async def _subscribe_all(self) -> None:
        if self._all_sub is not None or self._subscribing_all:
            while self._subscribing_all:  # noqa: ASYNC110 - brief, rare, bounded by one request
                await anyio.sleep(0.01)
            return
        self._subscribing_all = True
        try:
            await self._open_all_subscription(self._request)
        finally:
            self._subscribing_all = False

    async def _open_all_subscription(self, send: Callable[..., Awaitable[Any]]) -> None:
        fields: dict[str, Any] = {}
        resume = self._all_revision
        if resume is not None:
            # From the revision before the last one told when some of its events were:
            # the rest of them may not have arrived; the ones that did are skipped.
            fields["from_revision"] = resume - 1 if self._all_seen else resume

        def took(reply: dict[str, Any]) -> None:
            # Set as the answer is read: the events that follow it are this stream's.
            if reply.get("ok") and isinstance(reply.get("result"), dict):
                self._all_sub = reply["result"]["subscription"]

        answer = await send("subscribe", fields, on_reply=took)
        if answer is None:
            return
        self._all_sub = answer["subscription"]
        revision = answer.get("revision")
        if resume is None:
            if isinstance(revision, int) and self._all_revision is None:
                self._all_revision, self._all_seen = revision, set()
        elif not isinstance(revision, int):
            # A sidecar that cannot resume a subscription: say what may have been missed.
            self._on_gap(
                {
                    "from_revision": resume,
                    "to_revision": None,
                    "reason": "not_supported",
                    "task_ids": None,
                }
            )

    async def wait_subscribed(self) -> None:
        """Return once manager-level callbacks receive events (after :meth:`on`)."""
        await self._ensure_started()
        await self._subscribe_all()

    async def get(self, task_id: str) -> dict[str, Any]:
        """A task as it stands: state, attempts, result or error, payload, options."""
        return dict(await self._request("get", {"task_id": task_id}, idempotent=True))

    async def task(self, task_id: str) -> Task:
        """A :class:`Task` for a task committed elsewhere (another process, say).

        Its :meth:`Task.result` and :meth:`Task.on` work as on a task committed here.
        Raises :class:`TaskNotFound` for an unknown (or expired) task.
        """
        await self._ensure_started()
        known = self._tasks.get(task_id)
        if known is not None and known.committed:
            return known
        task = Task(self, None, task_id)
        task.committed = True
        for kind in EVENTS[:6]:  # its subscription pushes every kind
            task._callbacks.setdefault(kind, [])
        self._tasks[task_id] = task
        try:
            sub = await self._request(
                "subscribe", {"task_id": task_id, "until_final": True}, idempotent=True
            )
            if not task._final.is_set():
                self._sub_of[task_id] = sub["subscription"]
            # Subscribed first, read second: nothing between the two can be missed.
            info = await self._request("get", {"task_id": task_id}, idempotent=True)
        except BaseException:
            self._untrack(task, ended=False)
            raise
        task.data, task.options = info.get("payload"), dict(info.get("options") or {})
        if task.state is None:
            task.state = info.get("state")
        await task._settle(info)
        return task

    async def result(self, task_id: str, timeout: float | None = None) -> Any:
        """The result of the task ``task_id`` once it completes, wherever it was committed.

        Raises :class:`TaskFailed` if it fails, :class:`TaskNotFound` if there is no
        such task, ``TimeoutError`` after ``timeout`` seconds.
        """
        with anyio.fail_after(timeout):
            return await (await self.task(task_id)).result()

    async def wait(self, task_id: str, timeout: float | None = None) -> dict[str, Any]:
        """The task ``task_id`` (as :meth:`get` shows it) once it completed or failed for good.

        Raises ``TimeoutError`` after ``timeout`` seconds.
        """
        with anyio.fail_after(timeout):
            task = await self.task(task_id)
            with contextlib.suppress(TaskFailed):
                await task.result()
            return await self.get(task_id)

    async def cancel(self, task_id: str, *, reason: str = "cancelled by a client") -> bool:
        """Cancel a task by id (see :meth:`Task.cancel`); False if it had finished."""
        answer = await self._request(
            "cancel", {"task_id": task_id, "reason": reason}, idempotent=True
        )
        return bool(answer["cancelled"])

    async def pause_queue(self, queue: str = "default") -> dict[str, Any]:
        """Pause a queue, cluster-wide: the leader assigns nothing more from it (creates
        still land, running tasks finish). Answers the queue's settings."""
        return dict(await self._request("pause", {"queue": queue}, idempotent=True))

    async def resume_queue(self, queue: str = "default") -> dict[str, Any]:
        """Resume a paused queue. Answers the queue's settings."""
        return dict(await self._request("resume", {"queue": queue}, idempotent=True))

    async def set_limits(self, queue: str = "default", **limits: Any) -> dict[str, Any]:
        """Set a queue's cluster-wide limits; None lifts one. ``max_running`` (tasks of the
        queue running at once), ``key_max_running`` (per ``concurrency_key``), ``rate``
        and ``key_rate`` (starts: ``(limit, period_s)`` or ``{"limit", "period_s"}``).
        Answers the queue's settings."""
        fields: dict[str, Any] = {"queue": queue}
        for name, value in limits.items():
            if name in ("rate", "key_rate") and isinstance(value, tuple | list):
                limit, period = value
                period_s = period.total_seconds() if isinstance(period, timedelta) else period
                value = {"limit": limit, "period_s": period_s}
            fields[name] = value
        return dict(await self._request("set_limits", fields, idempotent=True))

    async def schedule(
        self,
        name: str,
        payload: Any = None,
        *,
        cron: str | None = None,
        every: float | timedelta | None = None,
        timezone: str = "UTC",
        options: dict[str, Any] | None = None,
        missed: str = "one",
        max_catch_up: int | None = None,
        grace: float | timedelta | None = None,
    ) -> dict[str, Any]:
        """Create or replace the schedule ``name``: a task with ``payload`` (and task
        ``options``: queue, timeout_s, ...) at each slot of ``cron`` (in ``timezone``) or
        ``every`` interval. The leader fires each slot exactly once, across failovers.
        Slots later than ``grace`` (60 s) are missed: ``missed`` says what then fires,
        ``"skip"`` (none), ``"one"`` (the latest) or ``"all"`` (each, at most
        ``max_catch_up``). Answers the schedule, with its ``next_at``."""
        fields: dict[str, Any] = {
            "name": name,
            "payload": payload,
            "timezone": timezone,
            "missed": missed,
            "options": options or {},
        }
        if cron is not None:
            fields["cron"] = cron
        if every is not None:
            fields["every_s"] = every.total_seconds() if isinstance(every, timedelta) else every
        if max_catch_up is not None:
            fields["max_catch_up"] = max_catch_up
        if grace is not None:
            fields["grace_s"] = grace.total_seconds() if isinstance(grace, timedelta) else grace
        return dict(await self._request("schedule", fields, idempotent=True))

    async def schedules(self) -> list[dict[str, Any]]:
        """Every schedule of the namespace."""
        return list(await self._request("schedules", {}, idempotent=True))

    async def pause_schedule(self, name: str) -> dict[str, Any]:
        """Fire nothing more from schedule ``name`` until resumed."""
        return dict(await self._request("pause_schedule", {"name": name}, idempotent=True))

    async def resume_schedule(self, name: str) -> dict[str, Any]:
        """Fire again, from the first slot after now."""
        return dict(await self._request("resume_schedule", {"name": name}, idempotent=True))

    async def delete_schedule(self, name: str) -> bool:
        """Delete schedule ``name`` (its tasks stay); False if there was none."""
        return bool(await self._request("unschedule", {"name": name}, idempotent=True))

    async def queues(self) -> dict[str, dict[str, Any]]:
        """The settings of every queue that has some (paused, limits), by name."""
        return dict(await self._request("queues", {}, idempotent=True))

    async def status(self) -> dict[str, Any]:
        """The local sidecar's status."""
        return dict(await self._request("status", {}, idempotent=True))

    def is_master(self) -> bool:
        """Whether the local sidecar is the cluster's leader (as last told)."""
        return self._leader

    is_leader = is_master

    # -- bookkeeping ---------------------------------------------------------------------------

    async def _follow_all(self, task: Task) -> None:
        with contextlib.suppress(TaskManagerError):
            sub = await self._request(
                "subscribe", {"task_id": task.id, "until_final": True}, idempotent=True
            )
            if task._final.is_set():
                await self._unsubscribe(sub["subscription"])

    def _untrack(self, task: Task, *, ended: bool) -> None:
        """Stop following ``task``; ``ended`` when its subscription ended by itself."""
        self._tasks.pop(task.id, None)
        sid = self._sub_of.pop(task.id, None)
        if sid is not None and not ended and self._tg is not None and self._connected.is_set():
            self._tg.start_soon(self._unsubscribe, sid)

    def _spawn(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> bool:
        if self._tg is None:
            return False
        self._tg.start_soon(fn, *args)
        return True

    async def _unsubscribe(self, sid: int) -> None:
        with contextlib.suppress(TaskManagerError):
            await self._request("unsubscribe", {"subscription": sid})


DefaultTaskManager = TaskManager


def _clip(text: str, limit: int, *, tail: bool = False) -> str:
    """At most ``limit`` characters of ``text`` (its end with ``tail``), marked if cut."""
    if len(text) <= limit:
        return text
    return "[...] " + text[-limit:] if tail else text[:limit] + " [...]"


#: The delivery a handler task is running (so that shutdown() from a handler knows).
_DELIVERY: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "taskmanager_delivery", default=None
)


_detached: set[Any] = set()


def _spawn_detached(fn: Callable[[], Awaitable[None]]) -> None:
    """Start a background task outside any task group (for lazy use without ``async with``)."""
    library = sniffio.current_async_library()
    if library == "trio":
        import trio

        trio.lowlevel.spawn_system_task(fn)
    else:
        import asyncio

        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(fn())  # type: ignore[arg-type]
        _detached.add(task)
        task.add_done_callback(_detached.discard)
