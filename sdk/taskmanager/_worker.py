"""The worker runtime: handlers registered with :meth:`TaskManager.process`, and their tasks.

:class:`WorkerRuntime` registers workers (again on each new connection), runs each task
the sidecar pushes on its worker's handler (through :mod:`._handlers`: an async
function, a plain one in a thread or in a child process), cancels a delivery the
sidecar cancels, reports the outcome (a result, a failure with its traceback, a snooze;
one the sidecar could not take becomes a failure of its own), and at shutdown lets
running handlers finish, then hands back the rest.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio

from ._handlers import HandlerRunner
from ._otel import consumer_span
from ._reports import Reports
from ._validate import check_json
from .protocol import ConnectionLost, InvalidRequest, PayloadTooLarge, TaskManagerError

if TYPE_CHECKING:
    from ._client import TaskManager

log = logging.getLogger("taskmanager")

Handler = Callable[["WorkerTask"], Any]

#: The delivery a handler task is running (so that shutdown() from a handler knows).
_DELIVERY: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "taskmanager_delivery", default=None
)


def current_delivery() -> int | None:
    """The delivery whose handler is running in this task, if any."""
    return _DELIVERY.get()


class WorkerTask:
    """What a handler receives."""

    def __init__(self, manager: TaskManager, delivery: int, frame: dict[str, Any]) -> None:
        self._connection = manager._connection
        self._reports = manager._workers.reports
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
        return bool(await self._reports.send(self._delivery, "progress", progress))


class Worker:
    """Handlers registered with :meth:`TaskManager.process`."""

    def __init__(
        self,
        manager: TaskManager,
        handler: Handler,
        queue: str,
        concurrency: int,
        pool: str = "thread",
    ) -> None:
        self.manager = manager
        self._connection = manager._connection
        self.handler = handler
        self.queue = queue
        self.concurrency = concurrency
        #: Runs the handler, one delivery at a time each, within ``concurrency`` slots.
        self.runner = HandlerRunner(handler, concurrency, pool, self._connection.spawn)
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
            await self._connection.request("unregister", {"worker": self.id}, unavailable_ok=True)


class WorkerRuntime:
    """A manager's workers, and the deliveries their handlers are running."""

    def __init__(self, manager: TaskManager) -> None:
        self._manager = manager  # what a handler's WorkerTask belongs to
        self._connection = manager._connection
        #: Where outcomes go: many to a ``report`` where the sidecar serves it.
        self.reports = Reports(manager._connection)
        self._workers: dict[int, Worker] = {}  # by the id the sidecar gave
        self._worker_list: list[Worker] = []  # registered again after a reconnect
        self._deliveries: dict[int, anyio.CancelScope] = {}
        # Set while no handler runs (made on first use: anyio binds it to the loop).
        self._idle: anyio.Event | None = None
        self._early: dict[int, list[dict[str, Any]]] = {}

    async def add(self, worker: Worker) -> None:
        """Register ``worker``; it stays registered across reconnects until closed."""
        await self._register(worker)
        self._worker_list.append(worker)

    async def _register(self, worker: Worker) -> None:
        fields: dict[str, Any] = {"queue": worker.queue, "concurrency": worker.concurrency}
        if self.reports.batched:
            fields["batch"] = True  # deliveries come in ``tasks`` pushes
        answer = await self._connection.send_request("register", fields)
        worker.id, worker.node = answer["worker"], answer.get("node")
        self._workers[answer["worker"]] = worker
        for frame in self._early.pop(answer["worker"], []):
            self.on_task(frame)

    async def register_again(self) -> None:
        """On a new connection, before calls may use it: register the open workers."""
        for worker in self._worker_list:
            if not worker.closed:
                try:
                    await self._register(worker)
                except TaskManagerError as exc:
                    log.error("worker %r could not register again: %s", worker, exc)

    def on_task(self, frame: dict[str, Any]) -> None:
        """A ``task`` push: run it on its worker's handler."""
        delivery = frame["delivery"]
        work = WorkerTask(self._manager, delivery, frame["task"])  # malformed: raises
        worker = self._workers.get(frame["worker"])
        if worker is None:
            # The push can overtake the register reply: keep it for the worker.
            self._early.setdefault(frame["worker"], []).append(frame)
            return
        new_scope = anyio.CancelScope()
        self._deliveries[delivery] = new_scope
        if self._idle is None or self._idle.is_set():
            self._idle = anyio.Event()  # busy now; set again when the last one ends
        self._connection.spawn(self._run, worker, work, new_scope)

    def on_tasks(self, frame: dict[str, Any]) -> None:
        """A ``tasks`` push: each of its deliveries as a ``task`` push of its own."""
        worker = frame["worker"]
        for item in frame["tasks"]:
            self.on_task({"worker": worker, "delivery": item["delivery"], "task": item["task"]})

    def on_cancel(self, frame: dict[str, Any]) -> None:
        """A ``cancel`` push: cancel the delivery's handler."""
        scope = self._deliveries.get(frame["delivery"])
        if scope is not None:
            scope.cancel()

    def cancel_all(self) -> None:
        """The connection was lost: the sidecar has failed these attempts already."""
        for scope in self._deliveries.values():
            scope.cancel()

    async def drain(self, timeout: float) -> None:
        """Take no new tasks, let running handlers finish within ``timeout`` seconds, and
        hand back what could not finish (pending again at once, the attempt not counted).

        The handler calling this, if one does, is not waited for.
        """
        mine = _DELIVERY.get()
        for worker in self._worker_list:
            if not worker.closed:
                with anyio.move_on_after(5):
                    await worker.close()
        with anyio.move_on_after(timeout):
            while any(d != mine for d in self._deliveries):
                assert self._idle is not None
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
                    await self.reports.send(delivery, "release")
                except TaskManagerError as exc:
                    log.warning("could not hand back delivery %d: %s", delivery, exc)
        for worker in self._worker_list:
            with anyio.move_on_after(5):
                await worker.runner.close()  # idle child processes, if any

    async def _run(self, worker: Worker, task: WorkerTask, scope: anyio.CancelScope) -> None:
        delivery = task._delivery
        _DELIVERY.set(delivery)
        outcome: tuple[str, Any] | None = None
        try:
            # With OpenTelemetry: the attempt's span, in the trace of the task's create.
            with consumer_span(task.id, task.attempt, task.options, worker.node) as span:
                with scope:
                    # Running the handler is _handlers' business: its pool, its slot, what
                    # a timeout does to it. Here: which delivery, and the report.
                    op, fields = await worker.runner.run(task)
                    outcome = (op, {"delivery": delivery, **fields})
                    span.outcome(op, fields)
                if outcome is None:
                    span.ended_without_outcome()
            if outcome is not None and not scope.cancel_called:
                await self._report(task, outcome)
        finally:
            self._deliveries.pop(delivery, None)
            if not self._deliveries and self._idle is not None:
                self._idle.set()

    async def _report(self, task: WorkerTask, outcome: tuple[str, dict[str, Any]]) -> None:
        op, fields = outcome
        # The outcome's one field besides its delivery: the result, error or delay.
        value = next(v for k, v in fields.items() if k != "delivery")
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
            await self.reports.send(task._delivery, op, value)
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
            await self.reports.send(delivery, "fail", error)
        except TaskManagerError as exc:
            log.warning("could not report failure of delivery %d: %s", delivery, exc)
