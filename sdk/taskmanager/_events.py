"""Subscriptions: each followed task's own, and the namespace's for :meth:`TaskManager.on`.

:class:`TaskRegistry` is the list of the tasks a manager follows and their
subscriptions: it routes their pushed events, subscribes them again on a new connection,
and reads a task's outcome when its events may have been missed (after a reconnect, or
a ``gap``). :class:`NamespaceEvents` holds the manager-level callbacks and the one
subscription to every task event of the namespace they need; it remembers where that
stream stands (the last revision taken, and which of its events), so that a new
connection resumes it without repeats, and tells the ``gap`` callbacks when events were
missed and cannot be replayed (docs/protocol.md, "Resuming a subscription").
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio

from ._callbacks import EVENTS, MANAGER_EVENTS, Callback, CallQueue
from ._connection import Connection
from .protocol import InvalidRequest, TaskManagerError

if TYPE_CHECKING:
    from ._tasks import Task

log = logging.getLogger("taskmanager")


class TaskRegistry:
    """The tasks a manager follows, by id, and their subscriptions."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.tasks: dict[str, Task] = {}
        self.sub_of: dict[str, int] = {}  # task id -> its subscription

    def get(self, task_id: str) -> Task | None:
        """The task followed under ``task_id``, if any."""
        return self.tasks.get(task_id)

    def track(self, task: Task) -> None:
        """Follow ``task``: its pushed events reach it from now on."""
        self.tasks[task.id] = task

    def untrack(self, task: Task, *, ended: bool) -> None:
        """Stop following ``task``; ``ended`` when its subscription ended by itself."""
        self.tasks.pop(task.id, None)
        sid = self.sub_of.pop(task.id, None)
        if sid is not None and not ended:
            self.connection.spawn_if_connected(self._unsubscribe, sid)

    async def follow(self, task: Task) -> Task:
        """Follow ``task``, committed elsewhere: subscribe to it, then read where it stands."""
        task.committed = True
        for kind in EVENTS[:6]:  # its subscription pushes every kind
            task._callbacks.setdefault(kind, [])
        self.track(task)
        try:
            sub = await self.connection.request(
                "subscribe", {"task_id": task.id, "until_final": True}, idempotent=True
            )
            if not task._final.is_set():
                self.sub_of[task.id] = sub["subscription"]
            # Subscribed first, read second: nothing between the two can be missed.
            info = await self.connection.request("get", {"task_id": task.id}, idempotent=True)
        except BaseException:
            self.untrack(task, ended=False)
            raise
        task.data, task.options = info.get("payload"), dict(info.get("options") or {})
        if task.state is None:
            task.state = info.get("state")
        await task._settle(info)
        return task

    async def recheck(self, task: Task) -> None:
        """Read ``task``'s outcome: events may have been missed (while disconnected, say),
        but the outcome is in etcd."""
        if task.committed:
            with contextlib.suppress(TaskManagerError):
                await task._settle(await self.connection.request("get", {"task_id": task.id}))

    async def follow_all(self, task: Task) -> None:
        """Subscribe to every event kind of ``task`` (a callback was added after commit)."""
        with contextlib.suppress(TaskManagerError):
            sub = await self.connection.request(
                "subscribe", {"task_id": task.id, "until_final": True}, idempotent=True
            )
            if task._final.is_set():
                await self._unsubscribe(sub["subscription"])

    async def _unsubscribe(self, sid: int) -> None:
        with contextlib.suppress(TaskManagerError):
            await self.connection.request("unsubscribe", {"subscription": sid})

    async def on_event(self, event: dict[str, Any]) -> None:
        """An event of a task's own subscription (it may overtake the create's answer)."""
        task = self.tasks.get(event.get("task_id"))  # type: ignore[arg-type]
        if task is not None:
            await task._on_event(event)

    def on_gap(self, task_ids: Any) -> None:
        """A task's own subscription missed events (the sidecar's watch started again):
        its outcome may be among them, so read it from etcd now."""
        for task_id in task_ids or ():
            task = self.tasks.get(task_id)
            if task is not None:
                self.connection.spawn(self.recheck, task)

    def forget_subscriptions(self) -> None:
        """A new connection: the previous one's subscriptions are gone."""
        self.sub_of.clear()

    async def subscribe_again(self) -> None:
        """On a new connection, before calls may use it: subscribe to each committed
        task again, and read where it stands."""
        for task in list(self.tasks.values()):
            if not task.committed:
                continue  # its commit is repeated, and subscribes
            try:
                sub = await self.connection.send_request(
                    "subscribe", {"task_id": task.id, "until_final": True}
                )
            except TaskManagerError as exc:
                log.error("task %s: could not subscribe again: %s", task.id, exc)
                continue
            self.sub_of[task.id] = sub["subscription"]
            self.connection.spawn(self.recheck, task)

    def abort_all(self, error: TaskManagerError) -> None:
        """The connection ended for good: whoever waits for a task gets ``error``."""
        for task in list(self.tasks.values()):
            task._abort(error)


class NamespaceEvents:
    """The manager-level callbacks and their subscription."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._callbacks: dict[str, list[Callback]] = {}
        #: The subscription the namespace's events come by, on the current connection.
        self.subscription: int | None = None
        self._subscribing = False
        # Where the stream stands, to resume it after a reconnect: the last revision
        # whose events were taken, and which of that revision's events (one change can
        # tell several, one transaction can change many tasks).
        self._revision: int | None = None
        self._seen: set[tuple[str, str]] = set()
        # One task runs the manager's callbacks, in event order, off the reader.
        self._calls = CallQueue(connection.spawn)

    def on(self, event: str, callback: Callback) -> None:
        """Call ``callback`` on ``event``; the first callback opens the subscription."""
        if event not in MANAGER_EVENTS:
            raise InvalidRequest(f"unknown event {event!r}; one of {', '.join(MANAGER_EVENTS)}")
        first = not self._callbacks
        self._callbacks.setdefault(event, []).append(callback)
        if first:
            self._connection.spawn_if_connected(self.subscribe)

    async def subscribe(self) -> None:
        """Return once the namespace's events come (subscribing if need be)."""
        if self.subscription is not None or self._subscribing:
            while self._subscribing:  # noqa: ASYNC110 - brief, rare, bounded by one request
                await anyio.sleep(0.01)
            return
        self._subscribing = True
        try:
            await self._open(self._connection.request)
        finally:
            self._subscribing = False

    def forget_subscription(self) -> None:
        """A new connection: the previous one's subscription is gone."""
        self.subscription = None

    async def subscribe_again(self) -> None:
        """On a new connection, before calls may use it: resume the stream, if wanted."""
        if not self._callbacks:
            return
        self._subscribing = True
        try:
            await self._open(self._connection.send_request)
        except TaskManagerError as exc:
            log.error("could not subscribe to the namespace's events again: %s", exc)
        finally:
            self._subscribing = False

    async def _open(self, send: Callable[..., Awaitable[Any]]) -> None:
        fields: dict[str, Any] = {}
        resume = self._revision
        if resume is not None:
            # From the revision before the last one told when some of its events were:
            # the rest of them may not have arrived; the ones that did are skipped.
            fields["from_revision"] = resume - 1 if self._seen else resume

        def took(reply: dict[str, Any]) -> None:
            # Set as the answer is read: the events that follow it are this stream's.
            if reply.get("ok") and isinstance(reply.get("result"), dict):
                self.subscription = reply["result"]["subscription"]

        answer = await send("subscribe", fields, on_reply=took)
        if answer is None:
            return
        self.subscription = answer["subscription"]
        revision = answer.get("revision")
        if resume is None:
            if isinstance(revision, int) and self._revision is None:
                self._revision, self._seen = revision, set()
        elif not isinstance(revision, int):
            # A sidecar that cannot resume a subscription: say what may have been missed.
            self.on_gap(
                {
                    "from_revision": resume,
                    "to_revision": None,
                    "reason": "not_supported",
                    "task_ids": None,
                }
            )

    def on_event(self, event: dict[str, Any]) -> None:
        """An event of the namespace's subscription."""
        kind = event["event"]
        revision = event.get("revision")
        if isinstance(revision, int):
            # One subscription tells events in revision order, without repeats; only the
            # revision a resumed one starts from may repeat events already told.
            key = (str(event.get("task_id")), kind)
            if revision != self._revision:
                self._revision, self._seen = revision, {key}
            elif key in self._seen:
                return  # told before the reconnect
            else:
                self._seen.add(key)
        names = [kind]
        if kind == "completed":
            names.append("success")
        elif kind == "failed" and not event.get("will_retry"):
            names.append("failure")
        self._calls.extend(
            [(cb, (event,)) for name in names for cb in self._callbacks.get(name, [])]
        )

    def on_gap(self, gap: dict[str, Any]) -> None:
        """Events of the namespace were missed and cannot be replayed."""
        log.warning(
            "events of the namespace were missed (%s) after revision %s",
            gap.get("reason"),
            gap.get("from_revision"),
        )
        to = gap.get("to_revision")
        if isinstance(to, int) and (self._revision is None or to > self._revision):
            self._revision, self._seen = to, set()
        self._calls.extend([(cb, (gap,)) for cb in self._callbacks.get("gap", [])])
