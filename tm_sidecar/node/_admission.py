"""Admission: the namespace's counts, refreshed each second (tasks by state, live
nodes, queue settings, etcd's size and alarms), the size of the results tasks end
with, and the checks a new task must pass (payload size, live tasks, etcd's quota less
the room the accepted tasks' results need)."""

from __future__ import annotations

import logging
from collections import deque
from contextlib import aclosing

import attrs
import trio

from .._errors import EtcdError, EtcdFull, PayloadTooLarge, QueueFull, Unavailable
from ..core import Keyspace, QueueConfig, Range, State, Txn
from ..etcd import Etcd, Feed, Reset
from ._queues import list_queues
from ._values import SidecarSettings

log = logging.getLogger("tm_sidecar")

_FULL = (
    "etcd's database is full (its NOSPACE alarm is raised): new tasks are refused until an "
    "operator frees space with `tmctl recover`; the tasks already accepted wait, nothing is lost"
)


#: The least room kept for each accepted task's outcome, and all that is kept before
#: any result has been seen: a task's moves rewrite its record a few times, and etcd
#: keeps each revision until the next compaction.
MIN_RESULT_ROOM = 1024
#: The typical result is the largest of this many latest results.
RESULT_WINDOW = 1024
#: Completed records read at start, before any new result is seen.
RESULT_SAMPLE = 8
#: Revisions kept for the watch's lag (one a second): the oldest is what counts, so a
#: watch stuck for longer than this many seconds still reads as stuck since then.
_MAX_REVISIONS = 3600


@attrs.define(eq=False)
class LargestRecent:
    """The largest of the last ``window`` sizes seen (a sliding maximum, O(1) a size)."""

    window: int = RESULT_WINDOW
    _seen: int = 0
    #: (index, size), sizes strictly decreasing: the candidates for the maximum.
    _candidates: deque[tuple[int, int]] = attrs.Factory(deque)

    def see(self, size: int) -> None:
        """Count one more size."""
        while self._candidates and self._candidates[-1][1] <= size:
            self._candidates.pop()
        self._candidates.append((self._seen, size))
        self._seen += 1
        if self._candidates[0][0] <= self._seen - 1 - self.window:
            self._candidates.popleft()

    @property
    def largest(self) -> int:
        """The largest size in the window (0 before any)."""
        return self._candidates[0][1] if self._candidates else 0


@attrs.define(eq=False)
class Admission:
    """What a create is checked against, and the counts the metrics and status show."""

    etcd: Etcd
    ks: Keyspace
    settings: SidecarSettings
    #: The sidecar's one watch, to size the results tasks end with (None: not sized,
    #: every task gets MIN_RESULT_ROOM).
    feed: Feed | None = None
    #: The completed records' sizes, namespace-wide (a record holds its result).
    results: LargestRecent = attrs.Factory(LargestRecent)
    #: Tasks by state (``State.value``), as last counted.
    depths: dict[str, int] = attrs.Factory(dict)
    #: Live sidecars registered in the namespace, as last counted.
    node_count: int = 0
    #: Every queue's settings, as last read (for metrics and status).
    queue_configs: dict[str, QueueConfig] = attrs.Factory(dict)
    #: etcd's space in use, as last read.
    db_size: int = 0
    #: Whether etcd's NOSPACE alarm is raised.
    nospace: bool = False
    #: The version etcd's status answered, as last read ("" before the first read).
    etcd_version: str = ""
    #: etcd's revisions as read (with the Trio time of the read) that the watch had
    #: not reached yet: what ``watch_lag_s`` measures.
    _revisions: deque[tuple[int, float]] = attrs.Factory(deque)
    _live_tasks: int = 0
    _created: int = 0
    _written: int = 0  # bytes created since db_size was read

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the counts fresh and size the results; started once the counts have been
        read (or tried) the first time."""
        async with trio.open_nursery() as nursery:
            if self.feed is not None:
                await nursery.start(self._size_results, self.feed)
            starting = True
            while True:
                await self.refresh()
                if starting:
                    starting = False
                    task_status.started()
                await trio.sleep(1.0)

    async def _size_results(
        self, feed: Feed, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Count every completed record's size as it is written (any node's)."""
        items = feed.informer(self.ks.state_prefix(State.COMPLETED), listing=False, puts_only=True)
        async with aclosing(items) as changes:
            task_status.started()
            await self._sample_results()
            async for item in changes:
                if isinstance(item, Reset):
                    continue  # what was missed is missed: the next results count
                for change in item.events:
                    self.results.see(len(change.kv.key) + len(change.kv.value))

    async def _sample_results(self) -> None:
        """Seed the sizes with a few completed records already in etcd (the oldest: a
        read with a limit and no filter costs etcd only those), so that a restarted
        sidecar keeps room for results like them before it sees new ones."""
        sample = Range(self.ks.state_prefix(State.COMPLETED), prefix=True, limit=RESULT_SAMPLE)
        try:
            kvs = (await self.etcd.range(sample)).kvs
        except (Unavailable, EtcdError) as exc:  # only a seed: the watch sizes the rest
            log.debug("result sample failed", extra={"error": str(exc)})
            return
        for kv in kvs:
            self.results.see(len(kv.key) + len(kv.value))

    @property
    def result_room(self) -> int:
        """The room kept in etcd for each accepted task's outcome: the largest of the
        latest results seen (RESULT_WINDOW of them), at least MIN_RESULT_ROOM and at least
        ``result_room`` (set to the result limit, it holds for any result)."""
        return max(MIN_RESULT_ROOM, self.results.largest, self.settings.result_room)

    @property
    def limit_bytes(self) -> int:
        """The database size past which creates are refused: ``quota_fraction`` of the
        quota, less the room the outcomes of the live tasks (waiting and running) need."""
        settings = self.settings
        allowed = settings.quota_bytes * settings.quota_fraction
        return int(allowed - self._live_tasks * self.result_room)

    async def refresh(self) -> None:
        """Read the counts once (a failure to read leaves the last ones)."""
        created_before = self._created
        try:
            for s in State:
                r = Range(self.ks.state_prefix(s), prefix=True, count_only=True)
                self.depths[s.value] = (await self.etcd.range(r)).count
            nodes = Range(self.ks.nodes(), prefix=True, count_only=True)
            self.node_count = (await self.etcd.range(nodes)).count
            self.queue_configs = await list_queues(self.etcd, self.ks)
            # Creates that raced the count may be missing from it: count them again
            # (an over-count only makes the limit stricter for a second).
            self._live_tasks = sum(
                self.depths[s.value] for s in (State.PENDING, State.DELAYED, State.PROCESSING)
            ) + (self._created - created_before)
            written_before = self._written
            status = await self.etcd.status()
            # The space in use (freed pages are reused), not the file's size, which
            # shrinks only when an operator defragments.
            self.db_size = int(status.get("dbSizeInUse") or status.get("dbSize") or 0)
            self._written -= written_before
            self.nospace = any("NOSPACE" in str(e) for e in status.get("errors") or ())
            self.etcd_version = str(status.get("version") or "")
            revision = int((status.get("header") or {}).get("revision") or 0)
            if revision and len(self._revisions) < _MAX_REVISIONS:
                self._revisions.append((revision, trio.current_time()))
        except Unavailable as exc:
            log.debug("limit refresh failed", extra={"error": str(exc)})

    def watch_lag_s(self) -> float:
        """How far the sidecar's watch is behind etcd, in seconds: since when etcd has
        been at a revision (as read every second) that the watch has not delivered yet;
        0 when it has delivered every one read (or there is no watch)."""
        if self.feed is None:
            return 0.0
        while self._revisions and self._revisions[0][0] <= self.feed.revision:
            self._revisions.popleft()
        if not self._revisions:
            return 0.0
        return max(0.0, trio.current_time() - self._revisions[0][1])

    def admit(self, payload_bytes: int) -> None:
        """Raise if a new task with a payload of ``payload_bytes`` may not be created:
        :class:`PayloadTooLarge`, :class:`QueueFull` (too many live tasks, or too little
        room left for the tasks already accepted), :class:`EtcdFull`."""
        settings = self.settings
        if payload_bytes > settings.max_payload_bytes:
            raise PayloadTooLarge(
                f"payload of {payload_bytes} bytes is over the limit of "
                f"{settings.max_payload_bytes} bytes (max_payload_bytes)"
            )
        if self._live_tasks >= settings.max_live_tasks:
            raise QueueFull(
                f"namespace {settings.namespace!r} holds {self._live_tasks} live tasks, "
                f"the limit is {settings.max_live_tasks} (max_live_tasks)"
            )
        if self.nospace:
            raise EtcdFull(_FULL)
        used = self.db_size + self._written
        # This task's own outcome needs room too, once accepted.
        if used + self.result_room >= self.limit_bytes:
            raise QueueFull(
                f"etcd's database holds about {used} bytes of its {settings.quota_bytes}-"
                f"byte quota; new tasks may fill {settings.quota_fraction:.0%} of it "
                f"(quota_fraction) less {self.result_room} bytes for the outcome of each "
                f"of the {self._live_tasks} tasks already accepted (the largest recent "
                "result): free space with `tmctl recover`, or raise etcd's quota "
                "(etcd_quota)"
            )

    def admit_many(self, payload_bytes: list[int]) -> None:
        """Raise as :meth:`admit` if the tasks of a bulk create (their payloads' sizes) may
        not all be created: each payload is checked, and the live-task limit for them all
        (a bulk create is refused whole rather than cut at the limit)."""
        limit = self.settings.max_payload_bytes
        for index, size in enumerate(payload_bytes):
            if size > limit:
                raise PayloadTooLarge(
                    f"tasks[{index}]: payload of {size} bytes is over the limit of "
                    f"{limit} bytes (max_payload_bytes)"
                )
        self.admit(0)
        room = self.settings.max_live_tasks - self._live_tasks
        if len(payload_bytes) > room:
            raise QueueFull(
                f"namespace {self.settings.namespace!r} has room for {room} more live tasks "
                f"(max_live_tasks {self.settings.max_live_tasks}), not {len(payload_bytes)}"
            )

    def full(self) -> EtcdFull:
        """etcd refused a create for want of space: refuse the next ones at once, and
        the error to raise for this one."""
        self.nospace = True
        return EtcdFull(_FULL)

    def wrote(self, txn: Txn) -> None:
        """Count the bytes a create sent, until the next read of etcd's size."""
        self._written += sum(len(op.key) + len(getattr(op, "value", "")) for op in txn.success)

    def created(self) -> None:
        """Count a task created here as live, until the next count."""
        self._live_tasks += 1
        self._created += 1
