"""Task events for subscribers: the sidecar's one watch (:mod:`._feed`), fanned out."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any

import attrs
import trio

from .._errors import Compacted, EtcdError, EtcdUnavailable
from ..core import EventDeriver, Keyspace, Range, Records, State, TaskEvent, TaskId
from ..etcd import Etcd, Reset, backoff
from ..etcd._feed import Feed

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
    held: list[TaskEvent | dict[str, Any]] | None = None
    closed: bool = False
    #: Told when the hub itself missed events (its watch had to start again): the gap,
    #: as the protocol's ``gap`` push has it. Without it, a stream subscription made
    #: with ``gaps`` gets a ``gap`` event instead; any other is not told.
    on_gap: Callable[[dict[str, Any]], None] | None = None
    gaps: bool = False

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
    feed: Feed
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
        on_gap: Callable[[dict[str, Any]], None] | None = None,
        gaps: bool = False,
    ) -> Subscription:
        """Events of one task, or of every task; they start with the next change.

        With ``from_revision`` (and ``deliver``) they start after that revision instead:
        run :meth:`catch_up` for the subscription to deliver what came before now.
        ``on_gap`` (or, for a stream, ``gaps``: a ``gap`` event) is told when the hub
        misses events itself (see :attr:`Subscription.on_gap`).
        """
        send, receive = trio.open_memory_channel[TaskEvent](0 if deliver else self.buffer)
        sub = Subscription(
            self,
            task_id,
            send,
            receive,
            deliver=deliver,
            revision=self.revision,
            on_gap=on_gap,
            gaps=gaps,
        )
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
                    log.warning(
                        "resumed subscriber fell behind: dropped", extra={"count": self.buffer}
                    )
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
                log.warning("event subscriber fell behind: dropped", extra={"count": self.buffer})
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
                    wait = backoff(failures, jitter=False)
                    log.warning(
                        "event replay interrupted: retrying",
                        extra={"error": str(exc), "delay_s": wait},
                    )
                    await trio.sleep(wait)
        except Compacted as exc:
            log.warning(
                "a resumed subscriber missed compacted events",
                extra={
                    "from_revision": after + 1,
                    "to_revision": up_to,
                    "compact_revision": exc.compact_revision,
                },
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
                for item in held:
                    if sub.closed:
                        break
                    if isinstance(item, dict):
                        on_gap(item)  # the hub's own gap, in its place among the events
                    else:
                        deliver(item)

    async def _gap(self, sub: Subscription, after: int, up_to: int) -> dict[str, Any]:
        """What a subscriber missed: the revisions, and the tasks changed since (to read
        again; at most :data:`GAP_TASKS` of them, else ``truncated``)."""
        ids, truncated = await self._changed_since(after)
        task_ids = sorted(t for t in ids if sub.task_id is None or t == sub.task_id)
        if len(task_ids) > GAP_TASKS:
            task_ids, truncated = task_ids[:GAP_TASKS], True
        return {
            "from_revision": after,
            "to_revision": up_to,
            "reason": "compacted",
            "task_ids": task_ids,
            "truncated": truncated,
        }

    async def _changed_since(self, after: int) -> tuple[set[str], bool]:
        """The tasks whose state changed after revision ``after`` (at most about
        :data:`GAP_TASKS` per state), and whether there were more."""
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
                if parsed is not None and parsed.task_id is not None:
                    ids.add(parsed.task_id)
        return ids, truncated

    async def _missed(self, after: int, up_to: int) -> None:
        """The hub's watch started again at ``up_to``: tell the subscribers what they
        missed, with the tasks changed since ``after`` (to read again)."""
        subs = [*self._all, *(sub for subs in self._by_task.values() for sub in subs)]
        log.warning(
            "event watch started again: events were missed, telling the subscribers",
            extra={"from_revision": after + 1, "to_revision": up_to, "count": len(subs)},
        )
        ids: set[str] = set()
        try:
            ids, truncated = await self._changed_since(after)
        except (EtcdUnavailable, EtcdError) as exc:
            log.warning(
                "could not list the tasks changed",
                extra={"revision": after, "error": str(exc)},
            )
            truncated = True  # read the namespace again
        everything = sorted(ids)[:GAP_TASKS]
        for sub in subs:
            if sub.closed:
                continue
            if sub.task_id is None:
                task_ids, cut = everything, truncated or len(ids) > GAP_TASKS
            elif truncated or sub.task_id in ids:
                task_ids, cut = [sub.task_id], False
            else:
                continue  # its task did not change meanwhile: nothing was missed
            gap: dict[str, Any] = {
                "from_revision": after,
                "to_revision": up_to,
                "reason": "watch_reset",
                "task_ids": task_ids,
                "truncated": cut,
            }
            self._tell_gap(sub, gap)

    def _tell_gap(self, sub: Subscription, gap: dict[str, Any]) -> None:
        if sub.held is not None:
            sub.held.append(gap)  # told after the replay, in order
        elif sub.on_gap is not None:
            try:
                sub.on_gap(gap)
            except Exception:
                log.exception("an event subscriber failed: dropped")
                sub.close()
        elif sub.gaps:
            event = TaskEvent(
                kind="gap",
                task_id=TaskId(sub.task_id or ""),
                revision=gap["to_revision"],
                attempt=0,
            )
            try:
                sub.send.send_nowait(event)
            except trio.WouldBlock:
                sub.overflowed = True
                sub.close()
            except trio.ClosedResourceError:
                self._forget(sub)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Follow the feed until cancelled; ready once the hub knows where it starts."""
        start, end = self._range()
        started = False
        items = self.feed.informer(start, range_end=end, listing=False, puts_only=True)
        async with aclosing(items) as _items:
            async for item in _items:
                if isinstance(item, Reset):
                    after, self.revision = self.revision, item.revision
                    self._deriver.reset()
                    if not started:
                        started = True
                        task_status.started()
                    elif item.revision > after:
                        # The feed fell behind compaction, or the hub behind the feed.
                        await self._missed(after, item.revision)
                    continue
                for change in item.events:
                    if change.kv.mod_revision <= self.revision:
                        continue
                    try:
                        events = self._deriver.derive(change)
                    except (ValueError, KeyError, TypeError) as exc:
                        # Not a record of ours (written by hand?): nothing to tell.
                        log.warning(
                            "malformed value ignored",
                            extra={"key": change.kv.key, "error": str(exc)},
                        )
                        continue
                    for event in events:
                        self._publish(event)
                self.revision = max(self.revision, item.revision)
