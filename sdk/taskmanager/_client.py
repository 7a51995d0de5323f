"""The TaskManager: the seed's API, in Python, over the local sidecar's Unix socket.

Built on anyio, so asyncio and Trio applications use the same code. One connection per
manager carries requests, replies and pushed frames (docs/protocol.md); it connects on
first use and reconnects with backoff if the sidecar goes away. Outcomes are durable in
etcd, so a result being waited for still arrives after a reconnect.

:class:`TaskManager` is a facade: the work is done by the parts it composes, each in a
module of its own: the connection (:mod:`._connection`, its frames in :mod:`._wire`),
task handles (:mod:`._tasks`), the namespace's events (:mod:`._events`) and the worker
runtime (:mod:`._worker`). It routes the sidecar's pushes to them, restores them on a new
connection, and shuts them down in order.

Size: the whole public API in one class, each method a short delegation with its
docstring (the user's reference); the work is in the parts named above.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import anyio

from ._callbacks import Callback
from ._connection import Connection, default_socket
from ._events import NamespaceEvents, TaskRegistry
from ._tasks import Task, bulk_tasks, waiting
from ._validate import check_json, positive_number
from ._worker import Handler, Worker, WorkerRuntime, current_delivery
from .protocol import TaskFailed, TaskManagerError

log = logging.getLogger("taskmanager")


class TaskManager:
    """A connection to the local sidecar. ``DefaultTaskManager`` is the seed's name for it.

    Use it with ``async with``, or lazily: the first call connects; ``shutdown()``
    releases it. A call that needs the sidecar while it cannot be reached waits at most
    ``connect_timeout_s`` for it, then raises :class:`Unavailable`.
    """

    def __init__(self, socket_path: str | None = None, *, connect_timeout_s: float = 5.0) -> None:
        self._connection = Connection(
            socket_path or default_socket(),
            positive_number(connect_timeout_s, "connect_timeout_s"),
            on_push=self._on_push,
            on_connected=self._on_connected,
            on_lost=self._on_lost,
            on_failure=self._on_failure,
        )
        self._tasks = TaskRegistry(self._connection)
        self._events = NamespaceEvents(self._connection)
        self._workers = WorkerRuntime(self)
        self._shutting_down = False

    @property
    def socket_path(self) -> str:
        """Where the sidecar's socket is."""
        return self._connection.socket_path

    @property
    def connect_timeout_s(self) -> float:
        """How long a call waits for the sidecar to be reachable."""
        return self._connection.connect_timeout_s

    @property
    def node(self) -> str | None:
        """The local sidecar's node, as its hello said (None before the first connection)."""
        return self._connection.node

    @property
    def _connections(self) -> int:
        # How many connections were made so far (tests read it).
        return self._connection.connections

    @property
    def _closing(self) -> bool:
        # Whether shutdown() has ended the connection loop (tests read it).
        return self._connection.closing

    async def _request(self, op: str, fields: dict[str, Any], **how: Any) -> Any:
        return await self._connection.request(op, fields, **how)

    # -- life ------------------------------------------------------------------------------

    async def __aenter__(self) -> TaskManager:
        await self._connection.enter()
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.shutdown()
        finally:
            await self._connection.exit()

    async def _on_connected(self) -> None:
        # Re-establish what the previous connection had, before calls may use this one.
        self._tasks.forget_subscriptions()
        self._events.forget_subscription()
        await self._workers.register_again()
        await self._tasks.subscribe_again()
        await self._events.subscribe_again()

    def _on_lost(self) -> None:
        self._workers.cancel_all()

    def _on_failure(self, error: TaskManagerError) -> None:
        self._tasks.abort_all(error)

    async def _on_push(self, frame: dict[str, Any]) -> None:
        kind = frame["push"]
        if kind == "event":
            event = frame["event"]
            sid = frame.get("subscription")
            if sid is not None and sid == self._events.subscription:
                self._events.on_event(event)
            else:
                await self._tasks.on_event(event)
        elif kind == "gap":
            if frame.get("subscription") == self._events.subscription:
                self._events.on_gap(
                    {k: v for k, v in frame.items() if k not in ("push", "subscription")}
                )
            else:
                self._tasks.on_gap(frame.get("task_ids"))
        elif kind == "task":
            self._workers.on_task(frame)
        elif kind == "tasks":
            self._workers.on_tasks(frame)
        elif kind == "cancel":
            self._workers.on_cancel(frame)
        elif kind == "role":
            self._connection.leader = bool(frame.get("leader"))

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Stop taking tasks, let running handlers finish within ``timeout`` seconds, hand
        back what could not finish (pending again at once, the attempt not counted),
        then disconnect.

        A handler may call it: its own task is not waited for (it ends with the manager).
        """
        connection = self._connection
        if connection.closing or self._shutting_down:
            return
        self._shutting_down = True
        mine = current_delivery()
        if connection.started and connection.is_connected():
            await self._workers.drain(timeout)
        connection.closing = True
        if connection.stop() and mine is None:
            with anyio.move_on_after(5):
                await connection.wait_stopped()

    async def serve(self, *, shutdown_timeout: float = 30.0) -> None:
        """Run this manager's workers until SIGTERM or SIGINT (Ctrl-C), then shut down
        gracefully (see :meth:`shutdown`) and return.

        Call it from the main thread. Raises if the connection to the sidecar ends for
        good. :func:`taskmanager.run_worker` is the same in one blocking call.
        """
        await self._connection.ensure_started()
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
                await self._connection.wait_stopped()  # shut down by someone else, or failed
                tg.cancel_scope.cancel()

            tg.start_soon(on_signal)
            tg.start_soon(on_end)
        if self._connection.failure is not None:
            raise self._connection.failed()
        if received:
            log.info(
                "received %s: shutting down (running tasks get %g s to finish)",
                signal.Signals(received[0]).name,
                shutdown_timeout,
            )
        # Further signals stay queued in the receiver meanwhile: no KeyboardInterrupt.
        await self.shutdown(shutdown_timeout)

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
        await self._connection.ensure_started()
        if unique_key is not None:
            task.with_unique(unique_key, for_s=unique_for)
        return task

    async def submit(self, data: Any, **options: Any) -> Task:
        """Create and commit in one call; ``options`` as the protocol's (timeout_s, ...)."""
        check_json(options, "the options")
        task = Task(self, data)
        task.options.update(options)
        return await task.commit()

    async def create_many(
        self,
        items: Sequence[Any],
        *,
        task_ids: Sequence[str] | None = None,
        delay: float | None = None,
        **options: Any,
    ) -> list[str]:
        """A task for each of ``items`` (any JSON), with ``options`` (as :meth:`submit`'s),
        in one request; their ids in order, once all are durable. On a failure midway the
        error's ``details`` say which exist (docs/protocol.md, ``create_many``): call again
        with its ``task_ids`` to finish. ``delay`` (seconds) delays them all."""
        fields = {"tasks": bulk_tasks(items, task_ids, delay, options), "options": options}
        answer = await self._request("create_many", fields, idempotent=True)
        return [str(task_id) for task_id in answer["task_ids"]]

    async def process(
        self,
        handler: Handler,
        *,
        concurrency: int = 1,
        queue: str = "default",
        pool: str = "thread",
    ) -> Worker:
        """Run ``handler(task)`` for tasks of ``queue``, up to ``concurrency`` at once.

        The handler may be a plain or an async function; what it returns (any JSON) is
        the result; what it raises fails the attempt (retried per the task's policy, or
        not at all for :class:`Permanent`).

        A timeout cancels an async handler at its next ``await``. A plain function runs
        in a thread (``pool="thread"``), which cannot be stopped: at a timeout its attempt
        ends, its result is dropped, and it keeps its slot until it returns (a retry
        waits for it). ``pool="process"`` runs a plain, module-level function in child
        processes instead (``concurrency`` of them at most), killed at a timeout: a hard
        limit. Raises :class:`InvalidRequest` for a handler the pool cannot run.
        """
        worker = Worker(self, handler, queue, concurrency, pool)  # checked before connecting
        await self._connection.ensure_started()
        await self._workers.add(worker)
        return worker

    def on(self, event: str, callback: Callback) -> TaskManager:
        """Call ``callback(event)`` on every task event of the namespace.

        ``event`` is one of :data:`EVENTS` (``success`` is a ``completed`` event,
        ``failure`` a ``failed`` one that will not be retried), or ``gap``: events were
        missed and could not be replayed (``callback(gap)`` with ``from_revision``,
        ``to_revision``, ``reason`` and ``task_ids``, the tasks to read again).
        Across a reconnect the stream resumes where it stopped.
        """
        self._events.on(event, callback)
        return self

    async def wait_subscribed(self) -> None:
        """Return once manager-level callbacks receive events (after :meth:`on`)."""
        await self._connection.ensure_started()
        await self._events.subscribe()

    async def get(self, task_id: str) -> dict[str, Any]:
        """A task as it stands: state, attempts, result or error, payload, options."""
        return dict(await self._request("get", {"task_id": task_id}, idempotent=True))

    async def task(self, task_id: str) -> Task:
        """A :class:`Task` for a task committed elsewhere (another process, say).

        Its :meth:`Task.result` and :meth:`Task.on` work as on a task committed here.
        Raises :class:`TaskNotFound` for an unknown (or expired) task.
        """
        await self._connection.ensure_started()
        known = self._tasks.get(task_id)
        if known is not None and known.committed:
            return known
        return await self._tasks.follow(Task(self, None, task_id))

    async def result(self, task_id: str, timeout: float | None = None) -> Any:
        """The result of the task ``task_id`` once it completes, wherever it was committed.

        Raises :class:`TaskFailed` if it fails, :class:`TaskNotFound` if there is no
        such task, :class:`WaitTimeout` (an :class:`Unavailable`, and a ``TimeoutError``)
        after ``timeout`` seconds.
        """
        with waiting(timeout, f"task {task_id}"):
            return await (await self.task(task_id)).result()
        raise AssertionError("unreachable: waiting() raises when it runs out")

    async def wait(self, task_id: str, timeout: float | None = None) -> dict[str, Any]:
        """The task ``task_id`` (as :meth:`get` shows it) once it completed or failed for good.

        Raises :class:`WaitTimeout` after ``timeout`` seconds: an :class:`Unavailable`,
        as the protocol's ``wait`` answers, and Python's ``TimeoutError`` too.
        """
        with waiting(timeout, f"task {task_id}"):
            task = await self.task(task_id)
            with contextlib.suppress(TaskFailed):
                await task.result()
            return await self.get(task_id)
        raise AssertionError("unreachable: waiting() raises when it runs out")

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
        and ``key_rate`` (assignments per window: ``(limit, period_s)``, or ``(limit,
        period_s, slack_s)`` to count each window ``slack_s`` longer, so that the starts
        at the handlers keep to the limit too when each comes within ``slack_s`` of its
        assignment; or ``{"limit", "period_s", "slack_s"}``). Answers the queue's
        settings."""
        fields: dict[str, Any] = {"queue": queue}
        for name, value in limits.items():
            if name in ("rate", "key_rate") and isinstance(value, tuple | list):
                limit, period, *slack = value
                seconds = [
                    p.total_seconds() if isinstance(p, timedelta) else p for p in (period, *slack)
                ]
                value = {"limit": limit, "period_s": seconds[0]}
                if slack:
                    value["slack_s"] = seconds[1]
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
        A slot not fired by the time the next is due, or more than ``grace`` (60 s)
        late, is missed: ``missed`` says what then fires, ``"skip"`` (the latest due slot
        if within ``grace``, else none), ``"one"`` (one task, for the latest due slot) or
        ``"all"`` (each; of those older than ``grace``, at most ``max_catch_up``).
        Answers the schedule, with its ``next_at``."""
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

    async def ping(self) -> str:
        """``"pong"`` once the local sidecar answers (a liveness check)."""
        return str(await self._request("ping", {}, idempotent=True))

    def is_master(self) -> bool:
        """Whether the local sidecar is the cluster's leader (as last told)."""
        return self._connection.leader

    is_leader = is_master


DefaultTaskManager = TaskManager
