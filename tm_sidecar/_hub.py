"""Task events for subscribers: one watch per sidecar, fanned out."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any

import attrs
import trio

from ._errors import Compacted, EtcdUnavailable
from ._etcd import Etcd
from .core import EventDeriver, Keyspace, Range, Records, State, TaskEvent, TaskId

log = logging.getLogger("tm_sidecar.events")

#: The most task ids a gap event names; beyond, it says ``truncated`` (re-list them all).
GAP_TASKS = 1000


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
    #: Live events come after this revision (the hub's when it subscribed).
    revision: int = 0
    #: Resumed from an earlier revision: the missed events, ``(after, up_to)``, are read
    #: back from etcd first (:meth:`EventHub.catch_up`), and live ones wait in ``held``.
    replay: tuple[int, int] | None = None
    held: list[TaskEvent] | None = None
    closed: bool = False

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> TaskEvent:
        try:
            return await self.receive.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def close(self) -> None:
        """Stop receiving events."""
        self.closed = True
        self.held = None
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
    #: Parses the records it sees (the sidecar's, shared with its leader and agent).
    records: Records = attrs.field(factory=Records, kw_only=True)
    # Subscribers to every task, and to one task by its id: publishing is O(interested).
    _all: set[Subscription] = attrs.Factory(set)
    _by_task: dict[TaskId, set[Subscription]] = attrs.Factory(dict)
    _deriver: EventDeriver = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._deriver = EventDeriver(self.ks, records=self.records)

    def subscribe(
        self,
        task_id: TaskId | None = None,
        deliver: Callable[[TaskEvent], None] | None = None,
        *,
        from_revision: int | None = None,
    ) -> Subscription:
        """Events of one task, or of every task; they start with the next change.

        With ``from_revision`` (and ``deliver``) they start after that revision instead:
        run :meth:`catch_up` for the subscription to deliver what came before now.
        """
        send, receive = trio.open_memory_channel[TaskEvent](0 if deliver else self.buffer)
        sub = Subscription(self, task_id, send, receive, deliver=deliver, revision=self.revision)
        if from_revision is not None and deliver is not None and from_revision < self.revision:
            sub.replay, sub.held = (from_revision, self.revision), []
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
            if sub.held is not None:
                # Resuming: live events wait until the missed ones are told.
                sub.held.append(event)
                if len(sub.held) > self.buffer:
                    log.warning("resumed subscriber fell %d events behind: dropped", self.buffer)
                    sub.overflowed = True
                    sub.close()
                continue
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

    def _range(self) -> tuple[str, str]:
        # completed/ to processing/ : every state key, and nothing else of size.
        return self.ks.state_prefix(State.COMPLETED), self.ks.prefix + "task"

    async def catch_up(
        self,
        sub: Subscription,
        on_gap: Callable[[dict[str, Any]], None],
        room: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Tell a resumed subscription the events it missed, read back from etcd, then
        the live ones held meanwhile. When etcd has compacted what it missed, call
        ``on_gap`` with the revisions missed and the tasks changed since, instead.

        A replay can be long: ``room`` is awaited before each event, so that the
        subscriber may take its time rather than overflow.
        """
        assert sub.replay is not None
        assert sub.deliver is not None
        after, up_to = sub.replay
        deliver = sub.deliver
        # A deriver of its own: a start whose announcement came before ``after`` may be
        # told again with its outcome.
        deriver = EventDeriver(self.ks, records=self.records)
        start, end = self._range()
        failures = 0
        try:
            while after < up_to and not sub.closed:
                try:
                    watch = self.etcd.watch_once(
                        start, after + 1, range_end=end, prev_kv=False, puts_only=True
                    )
                    async with aclosing(watch) as _items:
                        async for changes in _items:
                            failures = 0
                            for change in changes.events:
                                revision = change.kv.mod_revision
                                if revision > up_to:
                                    after = up_to  # live from here: the hub has the rest
                                    break
                                for event in deriver.derive(change):
                                    if sub.task_id is None or event.task_id == sub.task_id:
                                        if room is not None:
                                            await room()
                                        if sub.closed:
                                            return
                                        deliver(event)
                                if sub.closed:
                                    return
                            else:
                                # A watch message holds whole revisions: resume after it.
                                after = max(after, changes.events[-1].kv.mod_revision)
                            if after >= up_to:
                                break
                except EtcdUnavailable as exc:
                    failures += 1
                    wait = min(2.0, 0.05 * 2 ** min(failures, 6))
                    log.warning("event replay interrupted (%s); retrying in %.2f s", exc, wait)
                    await trio.sleep(wait)
        except Compacted as exc:
            log.warning(
                "a resumed subscriber missed events %d..%d: compacted up to %d",
                after + 1,
                up_to,
                exc.compact_revision,
            )
            try:
                gap = await self._gap(sub, after, up_to)
            except EtcdUnavailable:
                gap = {"from_revision": after, "to_revision": up_to, "reason": "compacted",
                       "task_ids": None, "truncated": True}  # fmt: skip
            on_gap(gap)
        finally:
            held, sub.held = sub.held or [], None
            if not sub.closed:
                for event in held:
                    if sub.closed:
                        break
                    deliver(event)

    async def _gap(self, sub: Subscription, after: int, up_to: int) -> dict[str, Any]:
        """What a subscriber missed: the revisions, and the tasks changed since (to read
        again; at most :data:`GAP_TASKS` of them, else ``truncated``)."""
        ids: set[str] = set()
        truncated = False
        for state in State:
            answer = await self.etcd.range(
                Range(
                    self.ks.state_prefix(state),
                    prefix=True,
                    keys_only=True,
                    limit=GAP_TASKS + 1,
                    min_mod_revision=after + 1,
                )
            )
            truncated = truncated or answer.more or len(answer.kvs) > GAP_TASKS
            for kv in answer.kvs:
                parsed = self.ks.parse(kv.key)
                tid = parsed.task_id if parsed is not None else None
                if tid is not None and (sub.task_id is None or tid == sub.task_id):
                    ids.add(tid)
        task_ids = sorted(ids)
        if len(task_ids) > GAP_TASKS:
            task_ids, truncated = task_ids[:GAP_TASKS], True
        return {
            "from_revision": after,
            "to_revision": up_to,
            "reason": "compacted",
            "task_ids": task_ids,
            "truncated": truncated,
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Watch until cancelled; ready once the watch starts from the current revision."""
        start, end = self._range()
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
