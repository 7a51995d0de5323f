"""A blocking facade for producers in non-async code (Django, Flask, scripts).

The async :class:`TaskManager` runs in an event loop of its own, in a background thread
started on first use. A process that forks (gunicorn ``--preload``, uWSGI) keeps the
parent's manager object but not its thread: the first call in the child notices the
new pid and starts a loop and a connection of its own.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import os
import threading
import weakref
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from anyio.from_thread import BlockingPortal

from ._callbacks import Callback
from ._client import TaskManager
from ._tasks import Task
from .protocol import InvalidRequest

T = TypeVar("T")

_managers: weakref.WeakSet[BlockingTaskManager] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A lock held by another thread at fork time would stay held in the child for ever.
    for manager in list(_managers):
        manager._lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _start_portal(backend: str) -> tuple[BlockingPortal, threading.Thread]:
    """An event loop in a daemon thread, and the portal into it.

    Not anyio's ``start_blocking_portal``: its context manager, dropped in a forked
    child, would on collection wait for the parent's thread, which the child lacks.
    """
    ready: concurrent.futures.Future[BlockingPortal] = concurrent.futures.Future()

    async def main() -> None:
        async with BlockingPortal() as portal:
            ready.set_result(portal)
            await portal.sleep_until_stopped()

    def run() -> None:
        try:
            anyio.run(main, backend=backend)
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)

    thread = threading.Thread(target=run, daemon=True, name="taskmanager-loop")
    thread.start()
    return ready.result(), thread


def _in_thread(callback: Callback) -> Callback:
    """``callback`` run in a worker thread: plain blocking code must not stall the loop."""

    async def call(*args: Any) -> None:
        await anyio.to_thread.run_sync(callback, *args)

    return call


class BlockingTask:
    """A :class:`Task` driven from blocking code."""

    def __init__(self, owner: BlockingTaskManager, task: Task, pid: int) -> None:
        self._owner = owner
        self._task = task
        self._pid = pid

    def __repr__(self) -> str:
        return f"<BlockingTask {self._task.id} {self._task.state or 'uncommitted'}>"

    @property
    def id(self) -> str:
        """The task id."""
        return self._task.id

    @property
    def state(self) -> str | None:
        """The last state this process heard of (None before commit)."""
        return self._task.state

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._pid != os.getpid():
            raise InvalidRequest(
                f"task {self.id} was made in process {self._pid}, before a fork: "
                "make it again (or use result(task_id)) in this process"
            )
        return self._owner._call(fn, *args)

    def with_timeout(self, seconds: float) -> BlockingTask:
        """See :meth:`Task.with_timeout`."""
        self._task.with_timeout(seconds)
        return self

    def with_delay_until(self, when: datetime | float) -> BlockingTask:
        """See :meth:`Task.with_delay_until`."""
        self._task.with_delay_until(when)
        return self

    def with_delay(self, seconds: float) -> BlockingTask:
        """See :meth:`Task.with_delay`."""
        self._task.with_delay(seconds)
        return self

    def with_retries(self, max_attempts: int, **backoff: float) -> BlockingTask:
        """See :meth:`Task.with_retries`."""
        self._task.with_retries(max_attempts, **backoff)
        return self

    def with_priority(self, priority: int) -> BlockingTask:
        """See :meth:`Task.with_priority`."""
        self._task.with_priority(priority)
        return self

    def with_unique(self, key: str, *, for_s: float | None = None) -> BlockingTask:
        """See :meth:`Task.with_unique`."""
        self._task.with_unique(key, for_s=for_s)
        return self

    def with_concurrency_key(self, key: str) -> BlockingTask:
        """See :meth:`Task.with_concurrency_key`."""
        self._task.with_concurrency_key(key)
        return self

    @property
    def existing(self) -> bool:
        """See :attr:`Task.existing`."""
        return self._task.existing

    def with_queue(self, queue: str) -> BlockingTask:
        """See :meth:`Task.with_queue`."""
        self._task.with_queue(queue)
        return self

    def on(self, event: str, callback: Callback) -> BlockingTask:
        """See :meth:`Task.on`; ``callback`` runs in a worker thread, so it may block."""
        self._call(lambda: self._task.on(event, _in_thread(callback)))
        return self

    def commit(self) -> BlockingTask:
        """Queue the task; durable once this returns."""
        self._call(self._task.commit)
        return self

    def cancel(self) -> bool:
        """See :meth:`Task.cancel`."""
        return bool(self._call(self._task.cancel))

    def result(self, timeout: float | None = None) -> Any:
        """Block until the result; raises TaskFailed if the task fails."""
        return self._call(self._task.result, timeout)


class BlockingTaskManager:
    """``with BlockingTaskManager() as tm: tm.create(data).with_timeout(5).commit().result()``.

    It may be made at import time and survives a fork (each process connects on its own
    first call). While the sidecar cannot be reached, calls raise :class:`Unavailable`
    after ``connect_timeout_s``.
    """

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        connect_timeout_s: float = 5.0,
        backend: str = "asyncio",
    ) -> None:
        self.socket_path = socket_path
        self.connect_timeout_s = connect_timeout_s
        self._backend = backend
        self._lock = threading.Lock()
        self._pid: int | None = None  # the process whose loop and connection these are
        self._thread: threading.Thread | None = None
        self._portal: BlockingPortal | None = None
        self._manager: TaskManager | None = None
        self._closed = False
        # Checked here, so that a bad argument fails at once rather than on first use.
        TaskManager(socket_path, connect_timeout_s=connect_timeout_s)
        _managers.add(self)

    def _ready(self) -> tuple[BlockingPortal, TaskManager]:
        if self._closed:
            raise InvalidRequest("the task manager is closed")
        pid = os.getpid()
        if self._pid != pid:
            with self._lock:
                if self._pid != pid:
                    # First use, or the first in a forked child: the parent's thread did
                    # not come along, so its loop and connection are left alone (the
                    # socket stays the parent's) and this process makes its own.
                    self._portal, self._thread = _start_portal(self._backend)
                    self._manager = TaskManager(
                        self.socket_path, connect_timeout_s=self.connect_timeout_s
                    )
                    if self._pid is None:
                        # The portal's thread would keep the interpreter from exiting.
                        atexit.register(self.close)
                    self._pid = pid
        assert self._portal is not None
        assert self._manager is not None
        return self._portal, self._manager

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        portal, _ = self._ready()
        return portal.call(fn, *args)

    @property
    def manager(self) -> TaskManager:
        """The async manager behind this one (of this process)."""
        return self._ready()[1]

    def create(self, data: Any, *, task_id: str | None = None) -> BlockingTask:
        """A new task; set options, then ``commit()``. ``task_id`` makes it idempotent."""
        portal, manager = self._ready()
        task = portal.call(lambda: manager.create(data, task_id=task_id))
        return BlockingTask(self, task, os.getpid())

    def submit(self, data: Any, **options: Any) -> BlockingTask:
        """Create and commit in one call (see :meth:`TaskManager.submit`)."""
        portal, manager = self._ready()
        task = portal.call(lambda: manager.submit(data, **options))
        return BlockingTask(self, task, os.getpid())

    def create_many(self, items: Sequence[Any], **options: Any) -> list[str]:
        """Create a task for each of ``items`` in one request; their ids in order (see
        :meth:`TaskManager.create_many`, whose keywords it takes)."""
        portal, manager = self._ready()
        return portal.call(lambda: manager.create_many(items, **options))

    def get(self, task_id: str) -> dict[str, Any]:
        """A task as it stands."""
        portal, manager = self._ready()
        return portal.call(manager.get, task_id)

    def result(self, task_id: str, timeout: float | None = None) -> Any:
        """Block until the task ``task_id`` (made anywhere) completes: see
        :meth:`TaskManager.result`."""
        portal, manager = self._ready()
        return portal.call(manager.result, task_id, timeout)

    def wait(self, task_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Block until the task ``task_id`` ends: see :meth:`TaskManager.wait`."""
        portal, manager = self._ready()
        return portal.call(manager.wait, task_id, timeout)

    def status(self) -> dict[str, Any]:
        """The local sidecar's status."""
        portal, manager = self._ready()
        return portal.call(manager.status)

    def on(self, event: str, callback: Callback) -> BlockingTaskManager:
        """See :meth:`TaskManager.on`; ``callback`` runs in a worker thread.

        Events flow once the subscription is made: this returns after it is.
        """
        portal, manager = self._ready()
        portal.call(lambda: manager.on(event, _in_thread(callback)))  # in the loop's thread
        portal.call(manager.wait_subscribed)
        return self

    def is_master(self) -> bool:
        """Whether the local sidecar is the cluster's leader (as last told)."""
        return self._ready()[1].is_master()

    def cancel(self, task_id: str) -> bool:
        """See :meth:`TaskManager.cancel`."""
        portal, manager = self._ready()
        return bool(portal.call(manager.cancel, task_id))

    def pause_queue(self, queue: str = "default") -> dict[str, Any]:
        """See :meth:`TaskManager.pause_queue`."""
        portal, manager = self._ready()
        return portal.call(manager.pause_queue, queue)

    def resume_queue(self, queue: str = "default") -> dict[str, Any]:
        """See :meth:`TaskManager.resume_queue`."""
        portal, manager = self._ready()
        return portal.call(manager.resume_queue, queue)

    def set_limits(self, queue: str = "default", **limits: Any) -> dict[str, Any]:
        """See :meth:`TaskManager.set_limits`."""
        portal, manager = self._ready()
        return portal.call(lambda: manager.set_limits(queue, **limits))

    def schedule(self, name: str, payload: Any = None, **kw: Any) -> dict[str, Any]:
        """See :meth:`TaskManager.schedule`."""
        portal, manager = self._ready()
        return portal.call(lambda: manager.schedule(name, payload, **kw))

    def schedules(self) -> list[dict[str, Any]]:
        """See :meth:`TaskManager.schedules`."""
        portal, manager = self._ready()
        return portal.call(manager.schedules)

    def pause_schedule(self, name: str) -> dict[str, Any]:
        """See :meth:`TaskManager.pause_schedule`."""
        portal, manager = self._ready()
        return portal.call(manager.pause_schedule, name)

    def resume_schedule(self, name: str) -> dict[str, Any]:
        """See :meth:`TaskManager.resume_schedule`."""
        portal, manager = self._ready()
        return portal.call(manager.resume_schedule, name)

    def queues(self) -> dict[str, dict[str, Any]]:
        """See :meth:`TaskManager.queues`."""
        portal, manager = self._ready()
        return portal.call(manager.queues)

    def delete_schedule(self, name: str) -> bool:
        """See :meth:`TaskManager.delete_schedule`."""
        portal, manager = self._ready()
        return portal.call(manager.delete_schedule, name)

    def close(self) -> None:
        """Disconnect and stop the background event loop (once; also at exit)."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        if self._pid != os.getpid():
            return  # never used in this process (a fork's parent loop is not ours)
        assert self._portal is not None
        assert self._manager is not None
        try:
            self._portal.call(self._manager.shutdown)
        finally:
            self._portal.call(self._portal.stop)
            assert self._thread is not None
            self._thread.join()

    def __enter__(self) -> BlockingTaskManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
