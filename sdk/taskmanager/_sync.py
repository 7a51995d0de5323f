"""A blocking facade for producers in non-async code (Django, Flask, scripts)."""

from __future__ import annotations

import atexit
from datetime import datetime
from typing import Any

from anyio.from_thread import BlockingPortal, start_blocking_portal

from ._client import Task, TaskManager


class BlockingTask:
    """A :class:`Task` driven from blocking code."""

    def __init__(self, portal: BlockingPortal, task: Task) -> None:
        self._portal = portal
        self._task = task

    @property
    def id(self) -> str:
        """The task id."""
        return self._task.id

    def with_timeout(self, seconds: float) -> BlockingTask:
        """See :meth:`Task.with_timeout`."""
        self._task.with_timeout(seconds)
        return self

    def with_delay_until(self, when: datetime | float) -> BlockingTask:
        """See :meth:`Task.with_delay_until`."""
        self._task.with_delay_until(when)
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

    def commit(self) -> BlockingTask:
        """Queue the task; durable once this returns."""
        self._portal.call(self._task.commit)
        return self

    def cancel(self) -> bool:
        """See :meth:`Task.cancel`."""
        return bool(self._portal.call(self._task.cancel))

    def result(self, timeout: float | None = None) -> Any:
        """Block until the result; raises TaskFailed if the task fails."""
        return self._portal.call(self._task.result, timeout)


class BlockingTaskManager:
    """``with BlockingTaskManager() as tm: tm.create(data).with_timeout(5).commit().result()``."""

    def __init__(self, socket_path: str | None = None, *, backend: str = "asyncio") -> None:
        self._portal_cm = start_blocking_portal(backend)
        self._portal = self._portal_cm.__enter__()
        self._manager = TaskManager(socket_path)
        self._closed = False
        # The portal's thread would keep the interpreter from exiting: close at exit.
        atexit.register(self.close)

    def create(self, data: Any) -> BlockingTask:
        """A new task; set options, then ``commit()``."""
        return BlockingTask(self._portal, self._portal.call(self._manager.create, data))

    def get(self, task_id: str) -> dict[str, Any]:
        """A task as it stands."""
        return self._portal.call(self._manager.get, task_id)

    def cancel(self, task_id: str) -> bool:
        """See :meth:`TaskManager.cancel`."""
        return bool(self._portal.call(self._manager.cancel, task_id))

    def pause_queue(self, queue: str = "default") -> dict[str, Any]:
        """See :meth:`TaskManager.pause_queue`."""
        return self._portal.call(self._manager.pause_queue, queue)

    def resume_queue(self, queue: str = "default") -> dict[str, Any]:
        """See :meth:`TaskManager.resume_queue`."""
        return self._portal.call(self._manager.resume_queue, queue)

    def set_limits(self, queue: str = "default", **limits: Any) -> dict[str, Any]:
        """See :meth:`TaskManager.set_limits`."""
        return self._portal.call(lambda: self._manager.set_limits(queue, **limits))

    def schedule(self, name: str, payload: Any = None, **kw: Any) -> dict[str, Any]:
        """See :meth:`TaskManager.schedule`."""
        return self._portal.call(lambda: self._manager.schedule(name, payload, **kw))

    def schedules(self) -> list[dict[str, Any]]:
        """See :meth:`TaskManager.schedules`."""
        return self._portal.call(self._manager.schedules)

    def pause_schedule(self, name: str) -> dict[str, Any]:
        """See :meth:`TaskManager.pause_schedule`."""
        return self._portal.call(self._manager.pause_schedule, name)

    def resume_schedule(self, name: str) -> dict[str, Any]:
        """See :meth:`TaskManager.resume_schedule`."""
        return self._portal.call(self._manager.resume_schedule, name)

    def queues(self) -> dict[str, dict[str, Any]]:
        """See :meth:`TaskManager.queues`."""
        return self._portal.call(self._manager.queues)

    def delete_schedule(self, name: str) -> bool:
        """See :meth:`TaskManager.delete_schedule`."""
        return self._portal.call(self._manager.delete_schedule, name)

    def close(self) -> None:
        """Disconnect and stop the background event loop (once; also at exit)."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        try:
            self._portal.call(self._manager.shutdown)
        finally:
            self._portal_cm.__exit__(None, None, None)

    def __enter__(self) -> BlockingTaskManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
