"""Running one delivery's handler, and what its end is as a report: apart from how
deliveries arrive and outcomes leave (:mod:`._worker`).

A handler is one of three kinds, and a timeout (or a cancel, or a shutdown's end) does
to each what it can:

- an ``async def``: cancelled at its next ``await``; its slot is free once it unwinds.
- a plain function in a thread (``pool="thread"``, the default): Python cannot stop a
  thread, so the attempt ends (the sidecar fails it, ``Timeout``) and the thread runs on
  to its end, its result dropped; it keeps its concurrency slot until then, so a retry
  pushed meanwhile waits for it and the worker never runs more than its concurrency.
- a plain function in a child process (``pool="process"``): the child is killed at
  once, and its slot is free; a new child is started for the next task. The hard limit,
  as Celery's ``time_limit``: the handler must be picklable (a module-level function),
  and so must what it returns.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import multiprocessing
import multiprocessing.connection
import pickle
import signal
import sys
import traceback
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from ._outcomes import Permanent, Snooze
from .protocol import InvalidRequest

if TYPE_CHECKING:
    from ._worker import WorkerTask

log = logging.getLogger("taskmanager")

#: How much of an error's message and traceback a report carries.
_MAX_MESSAGE = 8 * 1024
_MAX_TRACEBACK = 32 * 1024
#: The pools a plain function may run in.
POOLS = ("thread", "process")
#: The name of a process-pool child (``multiprocessing.current_process().name``).
CHILD_NAME = "taskmanager-handler"

#: What ends an attempt: an op (``complete``, ``fail``, ``snooze``) and its fields but the
#: delivery.
Outcome = tuple[str, dict[str, Any]]
#: Runs a coroutine function in the background, beyond the delivery that started it.
Spawn = Callable[..., Any]


def _clip(text: str, limit: int, *, tail: bool = False) -> str:
    """At most ``limit`` characters of ``text`` (its end with ``tail``), marked if cut."""
    if len(text) <= limit:
        return text
    return "[...] " + text[-limit:] if tail else text[:limit] + " [...]"


def error_of(exc: BaseException) -> dict[str, Any]:
    """A handler's exception as a ``fail`` report's ``error``."""
    permanent = isinstance(exc, Permanent) or isinstance(exc.__cause__, Permanent)
    return {
        "type": type(exc).__name__,
        "message": _clip(str(exc), _MAX_MESSAGE),
        "traceback": _clip("".join(traceback.format_exception(exc)), _MAX_TRACEBACK, tail=True),
        "retryable": not permanent,
    }


def outcome_of_error(exc: Exception) -> Outcome:
    """What a handler's exception makes of its attempt: a snooze, or a failure."""
    if isinstance(exc, Snooze):
        return ("snooze", {"delay_s": exc.delay_s})
    return ("fail", {"error": error_of(exc)})


def check_pool(handler: Callable[..., Any], pool: str) -> None:
    """Refuse a pool that cannot run ``handler``, before registering it."""
    if pool not in POOLS:
        raise InvalidRequest(f"pool is 'thread' or 'process', not {pool!r}")
    if pool == "process":
        if inspect.iscoroutinefunction(handler):
            raise InvalidRequest(
                "pool='process' runs plain functions; an async handler is cancelled at its "
                "timeout already"
            )
        try:
            pickle.dumps(handler)
        except Exception as exc:
            raise InvalidRequest(
                f"pool='process' needs a handler a child process can import (a module-level "
                f"function), not {handler!r}: {exc}"
            ) from None


class HandlerRunner:
    """Runs a worker's handler for one delivery at a time each, in its pool, and answers
    the outcome (:data:`Outcome`). Its slots bound what runs, timed-out threads included.
    """

    def __init__(
        self, handler: Callable[..., Any], concurrency: int, pool: str, spawn: Spawn
    ) -> None:
        check_pool(handler, pool)
        self.handler = handler
        self.concurrency = concurrency
        self.pool = pool
        self._spawn = spawn
        self._is_async = inspect.iscoroutinefunction(handler)
        self._slots: anyio.Semaphore | None = None  # made in the loop, on first use
        self._children: ChildPool | None = None
        #: Threads still running whose attempt ended (timed out, cancelled): each holds
        #: a slot until it returns.
        self.overdue = 0
        #: Deliveries waiting for a slot that such a thread holds.
        self.waiting = 0

    async def run(self, task: WorkerTask) -> Outcome:
        """Run the handler for ``task``; its outcome. Cancelled (a timeout), it returns
        nothing: the attempt is over, and the pool does what it can (see the module)."""
        try:
            if self._is_async:
                value = await self.handler(task)
            elif self.pool == "process":
                return await self._pool().run(task)
            else:
                value = await self._in_thread(task)
            if inspect.isawaitable(value):
                value = await value
        except Exception as exc:
            return outcome_of_error(exc)
        return ("complete", {"result": value})

    def _slots_now(self) -> anyio.Semaphore:
        if self._slots is None:
            self._slots = anyio.Semaphore(self.concurrency)
        return self._slots

    def _pool(self) -> ChildPool:
        if self._children is None:
            self._children = ChildPool(self.handler, self._slots_now())
        return self._children

    async def _in_thread(self, task: WorkerTask) -> Any:
        slots = self._slots_now()
        self.waiting += 1
        try:
            await slots.acquire()  # a timed-out thread may still hold one
        finally:
            self.waiting -= 1
        done = anyio.Event()
        box: dict[str, Any] = {}

        async def hold() -> None:
            # Outlives the delivery when it is cancelled: the thread keeps its slot until
            # it returns (its result then goes nowhere).
            try:
                box["value"] = await anyio.to_thread.run_sync(
                    self.handler, task, abandon_on_cancel=True
                )
            except Exception as exc:
                box["error"] = exc
            finally:
                slots.release()
                if box.get("abandoned"):
                    self.overdue -= 1
                done.set()

        self._spawn(hold)
        try:
            await done.wait()
        except BaseException:
            if not done.is_set():
                box["abandoned"] = True
                self.overdue += 1
                log.warning(
                    "the handler of task %s runs on in its thread after its attempt ended "
                    "(a thread cannot be stopped); it keeps its slot until it returns, and "
                    "its result is dropped. pool='process' stops it at once",
                    task.id,
                )
            raise
        if "error" in box:
            raise box["error"]
        return box["value"]

    async def close(self) -> None:
        """Stop the idle child processes (busy ones are killed by their cancel)."""
        if self._children is not None:
            await self._children.close()


# -- the process pool -----------------------------------------------------------------------


class ChildTask:
    """What a handler in a child process receives: the task's fields, and ``update``."""

    def __init__(self, conn: multiprocessing.connection.Connection, fields: dict[str, Any]):
        self._conn = conn
        self.id: str = fields["id"]
        self.data: Any = fields["payload"]
        self.attempt: int = fields["attempt"]
        self.options: dict[str, Any] = fields["options"]

    @property
    def payload(self) -> Any:
        """The task's data."""
        return self.data

    def update(self, progress: Any) -> bool:
        """Publish progress (any JSON); False if the attempt is no longer live."""
        self._conn.send(("progress", progress))
        return bool(self._conn.recv())


def _child_main(conn: multiprocessing.connection.Connection, handler: Callable[..., Any]) -> None:
    """A child's loop: run the handler for each task sent, send back how it ended."""
    # The parent decides when to stop (a Ctrl-C to the process group, a SIGTERM from
    # systemd's control group); it kills this child at a timeout.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if sys.platform == "linux":
        with contextlib.suppress(Exception):
            import ctypes

            # Dies with its parent even while busy (PR_SET_PDEATHSIG).
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    while True:
        try:
            fields = conn.recv()
        except (EOFError, OSError):
            return  # the parent closed the pipe (or died)
        task = ChildTask(conn, fields)
        try:
            reply: tuple[str, Any] = ("result", handler(task))
        except Snooze as snooze:
            reply = ("snooze", snooze.delay_s)
        except Exception as exc:
            reply = ("error", error_of(exc))
        try:
            conn.send(reply)
        except Exception as exc:  # a result pickle cannot carry
            conn.send(
                (
                    "error",
                    {
                        "type": "ResultNotJSON",
                        "message": f"the result cannot be sent from the child process: {exc}",
                        "retryable": False,
                    },
                )
            )


class _Child:
    """One child process and its end of the pipe."""

    def __init__(self, handler: Callable[..., Any]) -> None:
        # spawn: a fresh interpreter, not a fork of one with threads and an event loop.
        ctx = multiprocessing.get_context("spawn")
        self.conn, theirs = ctx.Pipe()
        self.proc = ctx.Process(
            target=_child_main, args=(theirs, handler), daemon=True, name=CHILD_NAME
        )
        self.proc.start()
        theirs.close()  # its only copy is the child's: a kill ends our recv with EOF

    def kill(self) -> None:
        self.proc.kill()
        self.conn.close()


class ChildPool:
    """Child processes for a plain handler, one per slot at most, reused between tasks."""

    def __init__(self, handler: Callable[..., Any], slots: anyio.Semaphore) -> None:
        self.handler = handler
        self._slots = slots
        self._idle: list[_Child] = []

    async def run(self, task: WorkerTask) -> Outcome:
        """Run ``task`` in a child; cancelled, the child is killed before this returns."""
        async with self._slots:
            child = self._idle.pop() if self._idle else None
            if child is None or not child.proc.is_alive():
                child = await anyio.to_thread.run_sync(_Child, self.handler)
            fields = {
                "id": task.id,
                "payload": task.data,
                "attempt": task.attempt,
                "options": task.options,
            }
            try:
                outcome = await self._talk(child, task, fields)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    child.kill()
                    await anyio.to_thread.run_sync(child.proc.join, 5.0)
                raise
            self._idle.append(child)
            return outcome

    async def _talk(self, child: _Child, task: WorkerTask, fields: dict[str, Any]) -> Outcome:
        await anyio.to_thread.run_sync(child.conn.send, fields, abandon_on_cancel=True)
        while True:
            try:
                kind, value = await anyio.to_thread.run_sync(
                    child.conn.recv, abandon_on_cancel=True
                )
            except EOFError:
                code = child.proc.exitcode
                raise ChildDied(
                    f"the handler's child process ended without an answer (exit code {code})"
                ) from None
            if kind == "progress":
                live = await _send_progress(task.update(value))
                await anyio.to_thread.run_sync(child.conn.send, live, abandon_on_cancel=True)
            elif kind == "result":
                return ("complete", {"result": value})
            elif kind == "snooze":
                return ("snooze", {"delay_s": value})
            else:
                return ("fail", {"error": value})

    async def close(self) -> None:
        """Let the idle children go (they exit when their pipe closes)."""
        idle, self._idle = self._idle, []
        for child in idle:
            child.conn.close()
        for child in idle:
            await anyio.to_thread.run_sync(child.proc.join, 5.0)
            if child.proc.is_alive():
                child.proc.kill()


class ChildDied(Exception):
    """The child process running a handler died (a crash, an OOM kill, ``os._exit``)."""


async def _send_progress(update: Awaitable[bool]) -> bool:
    """A child's progress, published; False (not an error) when it cannot be."""
    try:
        return await update
    except Exception as exc:
        log.warning("progress from a child process not published: %s", exc)
        return False
