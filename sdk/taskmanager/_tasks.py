"""Task handles: build a task, commit it, follow its events, wait for its outcome.

:class:`Task` is what :meth:`TaskManager.create` returns: its options are set before
commit; after it, its events (told once each, though two subscriptions may push them)
run its callbacks in order (through :class:`CallQueue`) and settle its outcome, which a
read of the task settles too should events have been missed. The manager's list of the
tasks it follows, and their subscriptions, is :class:`~taskmanager._events.TaskRegistry`.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

from ._callbacks import EVENTS, Callback, CallQueue
from ._otel import producer_span
from ._validate import check_json, finite_number, positive_number, whole_number
from .protocol import MAX_CREATE_MANY, InvalidRequest, TaskFailed, TaskManagerError, WaitTimeout

if TYPE_CHECKING:
    from ._client import TaskManager

#: The order of the events one change can tell (a start, then progress or an outcome).
_RANK = {"queued": 0, "assigned": 1, "started": 2, "updated": 3, "failed": 4, "completed": 4}

#: How long result() trusts the event stream alone before it reads the task once.
RESYNC_S = 30.0


@contextlib.contextmanager
def waiting(timeout: float | None, what: str) -> Iterator[None]:
    """Wait at most ``timeout`` seconds (None: for ever) for the body; past it, raise
    :class:`WaitTimeout`: an ``Unavailable``, as the protocol's ``wait`` answers, and
    Python's ``TimeoutError`` too."""
    with anyio.move_on_after(timeout) as scope:
        yield
    if scope.cancelled_caught:
        raise WaitTimeout(f"{what} did not finish within {timeout:g} s (it goes on)")


def new_task_id() -> str:
    """A fresh task id, made by the SDK (so that a repeated create is the same one)."""
    return f"{int(time.time() * 1000):012x}-{random.getrandbits(48):012x}"


def bulk_tasks(
    items: Sequence[Any],
    task_ids: Sequence[str] | None,
    delay: float | None,
    options: dict[str, Any],
) -> list[dict[str, Any]]:
    """A ``create_many`` request's ``tasks``, checked (see ``TaskManager.create_many``)."""
    tasks: list[dict[str, Any]] = [{"payload": data} for data in items]
    if not tasks:
        raise InvalidRequest("create_many needs at least one item")
    if len(tasks) > MAX_CREATE_MANY:
        raise InvalidRequest(
            f"create_many takes at most {MAX_CREATE_MANY} items at once, not {len(tasks)}"
        )
    check_json(options, "the options")
    if "unique_key" in options:
        raise InvalidRequest("create_many takes no unique_key: create unique tasks alone")
    for index, task in enumerate(tasks):
        check_json(task["payload"], f"items[{index}]")
    ids = [str(t) for t in task_ids] if task_ids is not None else None
    if ids is not None and len(ids) != len(tasks):
        raise InvalidRequest(f"{len(ids)} task_ids for {len(tasks)} items")
    run_at = None
    if delay is not None:
        run_at = time.time() + max(finite_number(delay, "the delay"), 0.0)
    for index, task in enumerate(tasks):
        # Ids chosen here: a request repeated after a reconnect creates nothing twice.
        task["task_id"] = ids[index] if ids is not None else new_task_id()
        if run_at is not None:
            task["run_at"] = run_at
    return tasks


class Task:
    """A task being built, then committed, then waited for.

    Methods chain: ``await (await manager.create(data)).with_timeout(10).commit()``.
    """

    def __init__(self, manager: TaskManager, data: Any, task_id: str | None = None) -> None:
        check_json(data, "data")
        if task_id is not None and not isinstance(task_id, str):
            raise InvalidRequest(f"task_id must be a string, not {task_id!r}")
        self.manager = manager
        self._registry = manager._tasks
        self._own_id = task_id is not None
        self.id = task_id or new_task_id()
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
        self._calls = CallQueue(self._registry.connection.spawn)
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
            self._registry.connection.spawn(self._registry.follow_all, self)
        self._callbacks.setdefault(event, []).append(callback)
        return self

    def _kinds(self) -> list[str]:
        """The event kinds this task needs pushed: its outcome, and what has callbacks."""
        return sorted({"failed", "completed", *(k for k in self._callbacks if k in EVENTS[:6])})

    async def commit(self) -> Task:
        """Queue the task; once this returns it is durable in etcd."""
        if self.committed:
            return self
        registry, connection = self._registry, self._registry.connection
        await connection.ensure_started()
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
        registry.track(self)
        try:
            connections = connection.connections
            # With OpenTelemetry: a producer span, its context carried in the options.
            with producer_span(self.id, self.options):
                answer = await connection.request("create", request, idempotent=True)
        except BaseException:
            registry.untrack(self, ended=False)
            raise
        self.committed = True
        if answer.get("existing") and answer["task_id"] != self.id:
            # The unique key is held by a live task: follow that one.
            registry.tasks.pop(self.id, None)
            self.id, self.existing = answer["task_id"], True
            followed = registry.tasks.setdefault(self.id, self)
            if followed is not self:  # this manager follows it already: hear it from there
                followed._followers.append(self)
            connection.spawn(registry.recheck, self)
        if answer.get("subscription") is None:  # a sidecar from before subscribe-on-create
            sub = await connection.request("subscribe", {"task_id": self.id}, idempotent=True)
            answer["subscription"] = sub["subscription"]
        if not self._final.is_set():
            registry.sub_of[self.id] = answer["subscription"]
        if self._own_id or connections != connection.connections:
            # The task may have existed (an id given again, a create repeated after a
            # reconnect) and finished before this subscription: read where it stands.
            connection.spawn(registry.recheck, self)
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
        """The task's result once it completes; raises :class:`TaskFailed` if it fails,
        :class:`WaitTimeout` (a ``TimeoutError``) after ``timeout`` seconds."""
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
        with waiting(timeout, f"task {self.id}"):
            while not self._final.is_set():
                # The events tell the outcome. Should the sidecar have missed them (its
                # watch fell behind etcd's compaction), a read now and then settles it.
                with anyio.move_on_after(RESYNC_S):
                    await self._final.wait()
                if self._final.is_set():
                    break
                info = await self._registry.connection.request(
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
        self._calls.extend(calls)
        if final is not None:
            self._final.set()
            # A final event from the stream ended the subscription on the sidecar's side.
            self._registry.untrack(self, ended=streamed)
