"""One watch per sidecar: the namespace's changes, read once, for every part that needs them.

The leader's view (while leading), the agent (its own assignments) and the event hub
each take a :class:`Tap` of one :class:`Feed` instead of a watch of their own. A tap
lists its own range, then takes the feed's events in that range after the listing's
revision: the same :class:`Reset` then :class:`Changes` as :meth:`Etcd.informer`, with
none repeated nor skipped between resets.

The tap is registered before it lists, and the feed hands it every event from then on,
so nothing between the listing and the feed's position can be missed: the listing's
revision is at least the feed's (etcd's current revision is never behind a watch), and
the tap drops what the listing already holds.

A tap buffers at most ``limit`` events while its consumer is busy. One that falls
further behind drops what it holds and lists again (a new :class:`Reset`): memory stays
bounded, the feed never waits for it, and the other taps never notice. When the feed's
own watch falls behind etcd's compaction, every tap lists again the same way.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing

import attrs
import trio

from .._errors import Compacted, EtcdUnavailable
from ..core import Keyspace, KeyValue, WatchEvent
from ._interface import Changes, Etcd, Loader, Reset, prefix_end
from ._retry import Retries
from ._retry import backoff as default_backoff

log = logging.getLogger("tm_sidecar.feed")


#: Events a tap holds for a busy consumer before it drops them and lists again.
TAP_LIMIT = 50_000


@attrs.define(eq=False)
class Tap:
    """One consumer's share of the feed: the events in ``[start, end)`` not yet taken."""

    start: str
    end: str
    limit: int
    puts_only: bool = False
    events: list[WatchEvent] = attrs.Factory(list)
    #: Everything up to this revision has been handed over (events or not).
    revision: int = 0
    #: Set when the consumer must list again: why (an overflow, or a compacted feed).
    stale: str = ""
    wake: trio.Event = attrs.Factory(trio.Event)
    overflows: int = 0

    def take(self, events: tuple[WatchEvent, ...], revision: int) -> None:
        """Hand over one response's events (the feed's, in this tap's range or not)."""
        if self.stale:
            return
        start, end = self.start, self.end
        mine = [
            e
            for e in events
            if start <= e.kv.key < end and not (self.puts_only and e.kind == "DELETE")
        ]
        if len(self.events) + len(mine) > self.limit:
            self.overflows += 1
            self.relist(f"fell {self.limit} events behind")
            return
        self.events.extend(mine)
        self.revision = max(self.revision, revision)
        self.wake.set()

    def relist(self, reason: str) -> None:
        """Drop what is held: the consumer lists again."""
        self.stale = reason
        self.events = []
        self.wake.set()


@attrs.define(eq=False)
class Feed:
    """The sidecar's one watch, on every key of the namespace but the payloads.

    ``await nursery.start(feed.run)`` before anything takes a tap of it.
    """

    etcd: Etcd
    ks: Keyspace
    limit: int = TAP_LIMIT
    backoff: Callable[[int], float] = default_backoff
    #: Everything up to this revision has been handed to the taps.
    revision: int = 0
    #: How often the watch fell behind compaction (and every tap listed again).
    compactions: int = 0
    _taps: set[Tap] = attrs.Factory(set)
    _lost: bool = False

    @property
    def range(self) -> tuple[str, str]:
        """The watched keys: the namespace up to ``task/``. Payloads (``task/<id>``,
        written once, large) and unique guards sort after it: nobody watches them."""
        return self.ks.prefix, self.ks.prefix + "task"

    @property
    def taps(self) -> int:
        """Taps taken now."""
        return len(self._taps)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Watch until cancelled; ready once the watch's start revision is known."""
        start, end = self.range
        started = False
        retries = Retries("namespace watch", self.backoff)
        while True:
            try:
                if not self.revision:
                    self.revision = await self.etcd.revision(start)
                if self._lost:
                    # Only now that the new start is known: a tap's listing comes after it.
                    self._lost = False
                    for tap in self._taps:
                        tap.relist("the feed fell behind compaction")
                if not started:
                    started = True
                    task_status.started()
                watch = self.etcd.watch_once(
                    start, self.revision + 1, range_end=end, prev_kv=False, progress_notify=True
                )
                async with aclosing(watch) as items:
                    async for changes in items:
                        retries.reset()
                        if changes.revision <= self.revision:
                            continue
                        self.revision = changes.revision
                        for tap in self._taps:
                            tap.take(changes.events, changes.revision)
            except Compacted as exc:
                log.warning(
                    "the namespace watch fell behind compaction: every consumer lists again",
                    extra={"revision": exc.compact_revision},
                )
                self.compactions += 1
                self.revision = 0
                self._lost = True
            except EtcdUnavailable as exc:
                await retries.pause(exc)

    async def informer(
        self,
        prefix: str,
        *,
        range_end: str | None = None,
        loader: Callable[[], Loader] | None = None,
        page: int = 2000,
        listing: bool = True,
        progress: bool = False,
        puts_only: bool = False,
        track_prev: bool = False,
    ) -> AsyncGenerator[Reset | Changes, None]:
        """A :class:`Reset`, then :class:`Changes`, of ``prefix`` (or ``[prefix,
        range_end)``), as :meth:`Etcd.informer` yields them, from the feed.

        Without ``listing``, a reset holds no keys: only the revision the changes go on
        from (what came between is lost: tell whoever needs to know). With ``progress``,
        changes with no events say how far the feed has come. With ``puts_only``,
        deletions are left out. With ``track_prev`` (not with a ``loader``), a deletion
        carries the key's value as last seen, as a watch's ``prev_kv`` would.
        """
        end = range_end if range_end is not None else prefix_end(prefix)
        first, last_key = self.range
        if not (first <= prefix and end <= last_key):
            raise ValueError(f"[{prefix}, {end}) is not within the feed's [{first}, {last_key})")
        tap = Tap(prefix, end, self.limit, puts_only=puts_only)
        self._taps.add(tap)
        retries = Retries("listing", self.backoff)
        known: dict[str, KeyValue] = {}
        try:
            while True:
                tap.stale, tap.events = "", []
                try:
                    loaded = loader() if loader is not None else None
                    if listing:
                        kvs, revision = await self.etcd.list_prefix(
                            prefix,
                            range_end=range_end,
                            consume=loaded.load if loaded is not None else None,
                            page=page,
                        )
                    else:
                        kvs, revision = (), await self.etcd.revision(prefix)
                except EtcdUnavailable as exc:
                    await retries.pause(exc, prefix=prefix)
                    continue
                retries.reset()
                if tap.stale:
                    continue  # it overflowed while listing: the listing may be incomplete
                last = revision
                if track_prev:
                    known = {kv.key: kv for kv in kvs}
                yield Reset(kvs, revision, loaded)
                while True:
                    if not tap.events and not tap.stale and tap.revision <= last:
                        await tap.wake.wait()
                    tap.wake = trio.Event()
                    if tap.stale:
                        log.warning(
                            "consumer lists again", extra={"prefix": prefix, "reason": tap.stale}
                        )
                        break
                    events, tap.events = tap.events, []
                    fresh = tuple(e for e in events if e.kv.mod_revision > last)
                    if tap.revision <= last and not fresh:
                        continue
                    last = max(last, tap.revision)
                    if track_prev and fresh:
                        fresh = tuple(_with_prev(known, e) for e in fresh)
                    if fresh or progress:
                        yield Changes(fresh, last)
        finally:
            self._taps.discard(tap)


def _with_prev(known: dict[str, KeyValue], event: WatchEvent) -> WatchEvent:
    if event.kind == "PUT":
        known[event.kv.key] = event.kv
        return event
    prev = known.pop(event.kv.key, None)
    return event if prev is None else WatchEvent(event.kind, event.kv, prev)
