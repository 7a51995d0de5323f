"""The connection to the local sidecar: connect, say hello, reconnect with backoff.

:class:`Connection` owns the one Unix-socket connection a manager has at a time
(docs/protocol.md) and the task group its background work runs in: it connects on first
use, says hello, and connects again with backoff (:func:`reconnect_delay_s`, the SDK's one
backoff) when the sidecar goes away, until shut down or refused for good. Frames and the
matching of answers to requests are :mod:`taskmanager._wire`'s. What the pushes mean is not
its business either: the hooks given at construction handle them, restore subscriptions
and workers on a new connection, and hear when one is lost or the loop ended for good.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import anyio
import anyio.abc
import sniffio

from ._wire import Reply, Wire
from .protocol import (
    PROTOCOL_VERSION,
    ConnectionLost,
    InvalidRequest,
    PermissionDenied,
    TaskFailed,
    TaskManagerError,
    Unavailable,
    backoff_s,
    error_from_wire,
)

log = logging.getLogger("taskmanager")

#: Sends one request on the current connection and returns its answer's result.
Send = Callable[..., Awaitable[Any]]


def default_socket() -> str:
    """``$TM_SOCKET``, else ``$XDG_RUNTIME_DIR/tm-sidecar.sock``, else ``/tmp/tm-sidecar.sock``."""
    if os.environ.get("TM_SOCKET"):
        return os.environ["TM_SOCKET"]
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(runtime, "tm-sidecar.sock") if runtime else "/tmp/tm-sidecar.sock"


def reconnect_delay_s(failures: int) -> float:
    """How long to wait before connecting again after ``failures`` failures in a row
    (the protocol's one backoff, 50 ms doubling to 2 s; none before the first try)."""
    return backoff_s(failures, first_s=0.05, cap_s=2.0) if failures else 0.0


class Connection:
    """One connection to the sidecar at a time, made again while the manager lives.

    ``on_push(frame)`` handles what the sidecar pushes; ``on_connected()`` restores, with
    :meth:`send_request`, what the previous connection had, before calls may use the new
    one; ``on_lost()`` hears that a connection ended; ``on_failure(error)`` that the
    connection loop ended for good with ``error``.
    """

    def __init__(
        self,
        socket_path: str,
        connect_timeout_s: float,
        *,
        on_push: Callable[[Reply], Awaitable[None]],
        on_connected: Callable[[], Awaitable[None]],
        on_lost: Callable[[], None],
        on_failure: Callable[[TaskManagerError], None],
    ) -> None:
        self.socket_path = socket_path
        self.connect_timeout_s = connect_timeout_s
        self._on_connected = on_connected
        self._on_lost, self._on_failure = on_lost, on_failure
        #: What the hello answered: the sidecar's node, and whether it leads (kept
        #: current by ``role`` pushes).
        self.node: str | None = None
        self.leader = False
        #: The operations the sidecar serves (``hello``'s ``ops``; empty from one that
        #: does not say): the batched ``report`` is used only where served.
        self.ops: frozenset[str] = frozenset()
        #: How many connections were made so far.
        self.connections = 0
        #: Set by shutdown: no new connection, no new call.
        self.closing = False
        #: Why the connection ended for good.
        self.failure: TaskManagerError | None = None
        self._wire = Wire(on_push)
        self._tg: anyio.abc.TaskGroup | None = None
        self._scope: anyio.CancelScope | None = None
        self._started = False
        self._own_tg: Any = None
        self._primed = False
        self._last_error = "not connected yet"  # why the sidecar could not be reached

    def _prime(self) -> None:
        # anyio's primitives bind to the running event loop: make them on first async use,
        # so that a TaskManager can be made at import time, as in the seed.
        if not self._primed:
            self._primed = True
            self._connected = anyio.Event()
            self._stopped = anyio.Event()

    # -- life ------------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        """Whether the connection loop was started."""
        return self._started

    def is_connected(self) -> bool:
        """Whether a connection is up and said hello."""
        return self._primed and self._connected.is_set()

    async def wait_stopped(self) -> None:
        """Return once the connection loop ended."""
        self._prime()
        await self._stopped.wait()

    async def enter(self) -> None:
        """Run the connection loop in a task group of its own, until :meth:`exit`."""
        self._prime()
        self._own_tg = anyio.create_task_group()
        tg = await self._own_tg.__aenter__()
        self._started = True
        await tg.start(self._supervise)

    async def exit(self) -> None:
        """Wait for the task group :meth:`enter` made."""
        await self._own_tg.__aexit__(None, None, None)

    def stop(self) -> bool:
        """End the connection loop (after ``closing`` is set); False if it never ran."""
        if self._scope is None:
            return False
        self._scope.cancel()
        return True

    def spawn(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> bool:
        """Run ``fn(*args)`` in the background; False if the loop has not started yet."""
        if self._tg is None:
            return False
        self._tg.start_soon(fn, *args)
        return True

    def spawn_if_connected(self, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
        """Run ``fn(*args)`` in the background if a connection is up."""
        if self._tg is not None and self.is_connected():
            self._tg.start_soon(fn, *args)

    async def ensure_started(self) -> None:
        """Start the connection loop on first use; wait (at most ``connect_timeout_s``)
        for a connection."""
        if self.failure is not None:
            raise self.failed()
        if self.closing:
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
        if self.failure is not None:
            raise self.failed()
        if self.closing or self._stopped.is_set():
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
        self.failure = error
        self._on_failure(error)
        self._wire.answers.fail_all(self.failed, clear=False)

    def failed(self) -> TaskManagerError:
        """A fresh copy of the error that ended the connection (one raised again and
        again would pile up tracebacks)."""
        assert self.failure is not None
        error = type(self.failure)(str(self.failure))
        error.__cause__ = self.failure.__cause__
        return error

    async def _connection_loop(self) -> None:
        failures = 0
        while not self.closing:
            if failures:
                await anyio.sleep(reconnect_delay_s(failures))
            try:
                stream = await anyio.connect_unix(self.socket_path)
            except PermissionError as exc:
                # EACCES: the socket's mode or group (or a directory on its path) does
                # not let this user in. Waiting will not change that: say so at once.
                raise PermissionDenied(
                    f"this user (uid {os.getuid()}) may not open the sidecar's socket at "
                    f"{self.socket_path} ({exc.strerror or exc}): the socket's group "
                    "(--socket-group) and mode (--socket-mode), and every directory above "
                    'it, must let this user in; see docs/operations.md, "Sockets for other '
                    'users"'
                ) from exc
            except OSError as exc:
                failures += 1
                self._last_error = f"{type(exc).__name__}: {exc.strerror or exc}"
                if failures in (1, 10) or failures % 50 == 0:
                    log.warning(
                        "cannot reach the sidecar at %s (%s); retrying", self.socket_path, exc
                    )
                continue
            began = time.monotonic()
            self._wire.stream = stream
            self._wire.violation = None
            connected = self.connections
            try:
                async with anyio.create_task_group() as conn_tg:
                    self._wire.scope = conn_tg.cancel_scope
                    conn_tg.start_soon(self._wire.read, stream, conn_tg.cancel_scope)
                    await self._handshake()
                    self.connections += 1
                    self._connected.set()
                    await anyio.sleep_forever()
            except* (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, ConnectionLost):
                pass
            finally:
                self._connected = anyio.Event()
                self._wire.lost()
                self._on_lost()
                with anyio.CancelScope(shield=True):
                    await stream.aclose()
            if self._wire.violation is not None and self.connections == connected:
                # Refused before the handshake was done (a uid not allowed, say): trying
                # again would be refused again. The refusal's own class (PermissionDenied
                # for --allow-uid), ProtocolViolation from an older sidecar.
                refusal = error_from_wire(self._wire.violation)
                raise type(refusal)(f"the sidecar refused this client: {refusal}")
            self._last_error = "the connection was lost"
            # A connection that ends at once (refused, or closed over a bad frame) is
            # made again with backoff, not in a tight loop.
            failures = failures + 1 if time.monotonic() - began < 1.0 else 0
            if not self.closing:
                log.warning("connection to the sidecar lost; reconnecting")

    async def _handshake(self) -> None:
        try:
            hello = await self._wire.send_request(
                "hello", {"version": PROTOCOL_VERSION, "client": "taskmanager-py/0.1"}
            )
        except TaskManagerError as exc:
            if exc.retryable:
                raise ConnectionLost(f"the handshake failed: {exc}") from exc
            raise  # refused for good (a version, a uid): ends the connection loop
        self.node = hello.get("node")
        self.leader = bool(hello.get("leader"))
        ops = hello.get("ops")
        self.ops = (
            frozenset(o for o in ops if isinstance(o, str))
            if isinstance(ops, list)
            else frozenset()
        )
        max_frame = hello.get("max_frame")
        if isinstance(max_frame, int) and not isinstance(max_frame, bool) and max_frame > 0:
            self._wire.max_frame = max_frame
        await self._on_connected()

    async def send_request(
        self, op: str, fields: dict[str, Any], *, on_reply: Callable[[Reply], None] | None = None
    ) -> Any:
        """Send one request on the current connection and wait for its answer, without
        waiting for a connection: for ``on_connected``, which runs before calls may use it.
        """
        return await self._wire.send_request(op, fields, on_reply=on_reply)

    @property
    def max_frame(self) -> int:
        """The largest frame the sidecar takes (its ``hello`` says; 1 MiB until then)."""
        return self._wire.max_frame

    async def send_items(self, op: str, key: str, items: list[bytes]) -> Any:
        """A request of one list of encoded ``items`` on the current connection (see
        :meth:`Wire.send_items`); never sent again after a reconnect."""
        await self.ensure_started()
        return await self._wire.send_items(op, key, items)

    async def request(
        self,
        op: str,
        fields: dict[str, Any],
        *,
        idempotent: bool = False,
        unavailable_ok: bool = False,
        on_reply: Callable[[Reply], None] | None = None,
    ) -> Any:
        """A request; repeated after a reconnect when ``idempotent``.

        With ``unavailable_ok``, a passing failure (the sidecar unreachable too) is None.
        """
        while True:
            try:
                await self.ensure_started()
                return await self._wire.send_request(op, fields, on_reply=on_reply)
            except ConnectionLost:
                if not idempotent:
                    raise
            except Unavailable:
                if not unavailable_ok:
                    raise
                return None


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
