"""Task events for subscribers: one watch per sidecar, fanned out."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import aclosing

import attrs
import trio

from ._errors import Compacted, EtcdUnavailable
from ._etcd import Etcd
from .core import EventDeriver, Keyspace, State, TaskEvent, TaskId

log = logging.getLogger("tm_sidecar.events")


@attrs.define(eq=False)
class Subscription:
    """A stream of task events; iterate it, and close it when done.

    Made with a callback instead, it has no stream: the hub calls ``deliver`` with each
    event as it comes (it must not block), which costs no task and no channel.
    """

    hub: EventHub
    task_id: TaskId | None
    send: trio.MemorySendChannel[TaskEvent]
    receive: trio.MemoryReceiveChannel[TaskEvent]
    overflowed: bool = False
    deliver: Callable[[TaskEvent], None] | None = None

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> TaskEvent:
        try:
            return await self.receive.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def close(self) -> None:
        """Stop receiving events."""
        self.hub._forget(self)
        self.send.close()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@attrs.define(eq=False)
class EventHub:
    """Watches the namespace's state keys and hands each event to its subscribers."""

    etcd: Etcd
    ks: Keyspace
    buffer: int = 10_000
    revision: int = 0
    # Subscribers to every task, and to one task by its id: publishing is O(interested).
    _all: set[Subscription] = attrs.Factory(set)
    _by_task: dict[TaskId, set[Subscription]] = attrs.Factory(dict)
    _deriver: EventDeriver = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._deriver = EventDeriver(self.ks)

    def subscribe(
        self, task_id: TaskId | None = None, deliver: Callable[[TaskEvent], None] | None = None
    ) -> Subscription:
        """Events of one task, or of every task; they start with the next change."""
        send, receive = trio.open_memory_channel[TaskEvent](0 if deliver else self.buffer)
        sub = Subscription(self, task_id, send, receive, deliver=deliver)
        if task_id is None:
            self._all.add(sub)
        else:
            self._by_task.setdefault(task_id, set()).add(sub)
        return sub

    def _forget(self, sub: Subscription) -> None:
        if sub.task_id is None:
            self._all.discard(sub)
            return
        subs = self._by_task.get(sub.task_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._by_task[sub.task_id]

    def _publish(self, event: TaskEvent) -> None:
        for sub in [*self._all, *self._by_task.get(event.task_id, ())]:
            if sub.deliver is not None:
                try:
                    sub.deliver(event)
                except Exception:
                    # One subscriber's bug must not end the hub (and the sidecar).
                    log.exception("an event subscriber failed: dropped")
                    sub.close()
                continue
            try:
                sub.send.send_nowait(event)
            except trio.WouldBlock:
                # A subscriber this far behind is dropped rather than allowed to stall others.
                log.warning("event subscriber fell %d events behind: dropped", self.buffer)
                sub.overflowed = True
                sub.close()
            except trio.ClosedResourceError:
                self._forget(sub)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Watch until cancelled; ready once the watch starts from the current revision."""
        # completed/ to processing/ : every state key, and nothing else of size.
        start = self.ks.state_prefix(State.COMPLETED)
        end = self.ks.prefix + "task"
        started = False
        failures = 0
        while True:
            try:
                if not self.revision:
                    self.revision = await self.etcd.revision()
                if not started:
                    task_status.started()
                    started = True
                watch = self.etcd.watch_once(
                    start, self.revision + 1, range_end=end, prev_kv=False, puts_only=True
                )
                async with aclosing(watch) as _items:
                    async for changes in _items:
                        failures = 0
                        for change in changes.events:
                            if change.kv.mod_revision <= self.revision:
                                continue
                            try:
                                events = self._deriver.derive(change)
                            except (ValueError, KeyError, TypeError) as exc:
                                # Not a record of ours (written by hand?): nothing to tell.
                                log.warning("malformed value at %s ignored: %s", change.kv.key, exc)
                                continue
                            for event in events:
                                self._publish(event)
                        self.revision = max(self.revision, changes.revision)
            except Compacted as exc:
                log.warning(
                    "event watch fell behind compaction at %d: events were missed",
                    exc.compact_revision,
                )
                self.revision = 0
                self._deriver.reset()
            except EtcdUnavailable as exc:
                failures += 1
                wait = min(2.0, 0.05 * 2 ** min(failures, 6))
                log.warning("event watch interrupted (%s); retrying in %.2f s", exc, wait)
                await trio.sleep(wait)
