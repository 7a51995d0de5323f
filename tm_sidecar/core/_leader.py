"""The leader's view of the queue, rebuilt by list-then-watch, and its decisions.

The view is fed every change of the namespace in revision order (``load`` then
``apply``); ``decide`` says, for a given time, which moves to make now and when to look
again. The shell turns the moves into fenced, batched transactions and reports back with
``settle``. Moves in flight are *claimed* so that no task is planned twice before the
watch shows the outcome (Kubernetes controllers call these expectations).

Size: one class, on purpose. The view's indexes (pending by queue and priority, delayed
by due time, processing by node, claims, counts per concurrency key, rate windows) are
kept consistent by ``_put``/``_delete`` and read by every ``_decide_*``; split across
modules, one invariant would live in several places. What can stand alone already does:
batches (``_batch``), flow control (``_flow``), schedules (``_schedule``), policy.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Iterable

import attrs

from ._batch import Batch, Decision, LeaderPolicy, assign_batches, chunk_moves
from ._flow import KeyCounts, QueueConfig, RateWindow, queue_guard
from ._keys import Keyspace, NodeId, State, TaskId
from ._model import NodeInfo, Record, TaskError
from ._plan import Slot
from ._policy import after_failure, assigned, place, promoted
from ._records import Records
from ._schedule import Schedule, firing_batch
from ._txn import KeyValue, WatchEvent


@attrs.define(eq=False)
class LeaderView:
    """Everything the leader knows, as of ``revision``."""

    ks: Keyspace
    revision: int = 0
    #: Parses the records it sees (the shell's, shared with the agent and the hub).
    records: Records = attrs.field(factory=Records, kw_only=True, repr=False)
    nodes: dict[NodeId, NodeInfo] = attrs.Factory(dict)
    pending: dict[TaskId, Slot] = attrs.Factory(dict)
    delayed: dict[TaskId, Slot] = attrs.Factory(dict)
    processing: dict[TaskId, Slot] = attrs.Factory(dict)
    inflight: Counter[tuple[NodeId, str]] = attrs.Factory(Counter)
    #: Each queue's flow-control settings (queues/<name>), and its key's mod revision.
    queue_settings: dict[str, QueueConfig] = attrs.Factory(dict)
    queue_revisions: dict[str, int] = attrs.Factory(dict)
    #: Tasks running or being assigned per (queue, concurrency key), and parked tasks.
    keys: KeyCounts = attrs.Factory(KeyCounts)
    _key_claims: dict[TaskId, tuple[str, str]] = attrs.Factory(dict)
    #: Rate windows by (queue, concurrency key or None for the whole queue).
    rate_windows: dict[tuple[str, str | None], RateWindow] = attrs.Factory(dict)
    # When a rate window has room again: (time, queue, key) for parked keys, and per queue.
    _rate_wakes: list[tuple[float, str, str]] = attrs.Factory(list)
    _queue_rate_wakes: dict[str, float] = attrs.Factory(dict)
    #: Schedules (schedules/<name>) as seen, with their keys; and firings in flight.
    schedules: dict[str, tuple[KeyValue, Schedule]] = attrs.Factory(dict)
    _firing: set[str] = attrs.Factory(set)
    _settling_firings: list[tuple[int, str]] = attrs.Factory(list)
    _queues: dict[str, list[tuple[int, int, int, TaskId]]] = attrs.Factory(dict)
    # Moves in flight that put a task back in pending at the place it kept (a lost
    # node's task, a promotion of one): task id -> (queue, its rank). Until the view
    # shows it pending, nothing ranked after it in its queue is assigned.
    _requeues: dict[TaskId, tuple[str, tuple[int, int]]] = attrs.Factory(dict)
    _due: list[tuple[float, int, TaskId]] = attrs.Factory(list)
    _deadlines: list[tuple[float, int, TaskId]] = attrs.Factory(list)
    _suspects: set[TaskId] = attrs.Factory(set)
    # When held suspects (tasks of an absent node, within the policy's hold) are due.
    _hold_wake: float | None = None
    #: Keys whose value is not a record of ours: ignored, and shown for an operator.
    malformed: set[str] = attrs.Factory(set)
    # task id -> (node, queue) of an assignment in flight, or None for other moves
    _claims: dict[TaskId, tuple[NodeId, str] | None] = attrs.Factory(dict)
    # revision the view must reach before the claims of a committed batch are released
    _settling: list[tuple[int, tuple[TaskId, ...]]] = attrs.Factory(list)

    # -- feeding ---------------------------------------------------------------------

    @classmethod
    def from_listing(cls, ks: Keyspace, kvs: Iterable[KeyValue], revision: int) -> LeaderView:
        """A view built from a full listing of the namespace at ``revision``."""
        view = cls(ks)
        view.load(kvs)
        return view.listed(revision)

    def load(self, kvs: Iterable[KeyValue]) -> None:
        """Take in part of a listing (then :meth:`listed`)."""
        for kv in kvs:
            # Listed values are seen once: the shared parse cache would only churn.
            self._put(kv, self.records.parse_once)

    def listed(self, revision: int) -> LeaderView:
        """The listing taken in with :meth:`load` was at ``revision``: the view is ready."""
        self.revision = revision
        self._suspects.update(self.processing)
        return self

    def apply(self, event: WatchEvent) -> None:
        """Apply one change seen by the watch."""
        if event.kind == "PUT":
            self._put(event.kv)
        else:
            self._delete(event.kv.key)
        self.revision = max(self.revision, event.kv.mod_revision)
        self._release_settled()

    def advance(self, revision: int) -> None:
        """The watch has reported everything up to ``revision``."""
        self.revision = max(self.revision, revision)
        self._release_settled()

    def _put(self, kv: KeyValue, parse: Callable[[State, str], Record] | None = None) -> None:
        try:
            self._put_parsed(kv, parse or self.records.parse)
        except (ValueError, KeyError, TypeError):
            # Not a record of ours (written by hand?): as good as absent, and shown.
            self._delete(kv.key)
            self.malformed.add(kv.key)
        else:
            self.malformed.discard(kv.key)

    def _put_parsed(self, kv: KeyValue, parse: Callable[[State, str], Record]) -> None:
        parsed = self.ks.parse(kv.key)
        if parsed is None:
            return
        if parsed.kind == "node" and parsed.node is not None:
            info = NodeInfo.from_json(kv.value)
            old = self.nodes.get(parsed.node)
            self.nodes[parsed.node] = info
            if old is None or old.session != info.session or old.carries != info.carries:
                self._suspects.update(self._tasks_of(parsed.node))
            return
        if parsed.kind == "queue" and parsed.name is not None:
            self.queue_settings[parsed.name] = QueueConfig.from_json(kv.value)
            self.queue_revisions[parsed.name] = kv.mod_revision
            self._unpark(self.keys.unpark_queue(parsed.name))
            return
        if parsed.kind == "schedule" and parsed.name is not None:
            self.schedules[parsed.name] = (kv, Schedule.from_json(kv.value))
            return
        if parsed.kind == "rate" and parsed.name is not None:
            window = (parsed.name, parsed.key)
            if window not in self.rate_windows:  # a listing: where the last leader left it
                self.rate_windows[window] = RateWindow.from_json(kv.value)
            return
        if parsed.kind != "state" or parsed.task_id is None or parsed.state is None:
            return
        tid, record = parsed.task_id, parse(parsed.state, kv.value)
        slot = Slot(tid, kv.key, kv.create_revision, kv.mod_revision, record)
        if parsed.state is State.PENDING:
            fresh = (
                tid not in self.pending or self.pending[tid].create_revision != kv.create_revision
            )
            self.pending[tid] = slot
            if fresh:
                heap = self._queues.setdefault(record.options.queue, [])
                heapq.heappush(heap, _entry(slot))
        elif parsed.state is State.DELAYED:
            self.delayed[tid] = slot
            heapq.heappush(self._due, (record.due_at or 0.0, kv.mod_revision, tid))
        elif parsed.state is State.PROCESSING:
            old_slot = self.processing.get(tid)
            if old_slot is None or old_slot.key != kv.key:
                if old_slot is not None:
                    self._count_out(old_slot)
                self.inflight[(record.node or NodeId(""), record.options.queue)] += 1
                if record.options.concurrency_key is not None:
                    self.keys.add(record.options.queue, record.options.concurrency_key)
            new_attempt = old_slot is None or old_slot.create_revision != kv.create_revision
            self.processing[tid] = slot
            if new_attempt and record.deadline_at is not None:
                heapq.heappush(self._deadlines, (record.deadline_at, kv.create_revision, tid))
            if new_attempt:
                self._suspects.add(tid)

    def _delete(self, key: str) -> None:
        self.malformed.discard(key)
        parsed = self.ks.parse(key)
        if parsed is None:
            return
        if parsed.kind == "node" and parsed.node is not None:
            if self.nodes.pop(parsed.node, None) is not None:
                self._suspects.update(self._tasks_of(parsed.node))
            return
        if parsed.kind == "schedule" and parsed.name is not None:
            self.schedules.pop(parsed.name, None)
            return
        if parsed.kind == "queue" and parsed.name is not None:
            self.queue_settings.pop(parsed.name, None)
            self.queue_revisions.pop(parsed.name, None)
            self._unpark(self.keys.unpark_queue(parsed.name))
            return
        if parsed.kind != "state" or parsed.task_id is None:
            return
        tid = parsed.task_id
        if parsed.state is State.PENDING:
            self.pending.pop(tid, None)
        elif parsed.state is State.DELAYED:
            self.delayed.pop(tid, None)
        elif parsed.state is State.PROCESSING:
            slot = self.processing.get(tid)
            if slot is not None and slot.key == key:
                del self.processing[tid]
                self._count_out(slot)

    def _count_out(self, slot: Slot) -> None:
        k = (slot.record.node or NodeId(""), slot.record.options.queue)
        self.inflight[k] -= 1
        if self.inflight[k] <= 0:
            del self.inflight[k]
        key = slot.record.options.concurrency_key
        if key is not None:
            self._unpark(self.keys.remove(slot.record.options.queue, key))

    def _unpark(self, entries: Iterable[tuple[int, int, int, TaskId]]) -> None:
        for entry in entries:
            slot = self.pending.get(entry[3])
            if slot is not None and slot.create_revision == entry[2]:
                heapq.heappush(self._queues.setdefault(slot.record.options.queue, []), entry)

    def _tasks_of(self, node: NodeId) -> list[TaskId]:
        return [tid for tid, slot in self.processing.items() if slot.record.node == node]

    # -- claims ----------------------------------------------------------------------

    def settle(self, batch: Batch, *, committed_at: int | None) -> None:
        """Report a batch's outcome: committed at a revision, or not committed (None)."""
        if committed_at is None or committed_at <= self.revision:
            self._release(batch.task_ids)
            if batch.schedule is not None:
                self._firing.discard(batch.schedule)
        else:
            self._settling.append((committed_at, batch.task_ids))
            if batch.schedule is not None:
                self._settling_firings.append((committed_at, batch.schedule))

    def _release_settled(self) -> None:
        if self._settling_firings:
            done = [name for rev, name in self._settling_firings if rev <= self.revision]
            self._firing.difference_update(done)
            self._settling_firings = [f for f in self._settling_firings if f[0] > self.revision]
        if not self._settling:
            return
        keep = []
        for revision, tids in self._settling:
            if revision <= self.revision:
                self._release(tids)
            else:
                keep.append((revision, tids))
        self._settling = keep

    def _release(self, tids: Iterable[TaskId]) -> None:
        for tid in tids:
            claim = self._claims.pop(tid, None)
            if claim is not None:
                self.inflight[claim] -= 1
                if self.inflight[claim] <= 0:
                    del self.inflight[claim]
            self._requeues.pop(tid, None)
            keyed = self._key_claims.pop(tid, None)
            if keyed is not None:
                self._unpark(self.keys.remove(*keyed))
            # A released task that is still where it was is a candidate again.
            slot = self.pending.get(tid)
            if slot is not None:
                heap = self._queues.setdefault(slot.record.options.queue, [])
                heapq.heappush(heap, _entry(slot))
            dslot = self.delayed.get(tid)
            if dslot is not None:
                heapq.heappush(self._due, (dslot.record.due_at or 0.0, dslot.mod_revision, tid))
            if tid in self.processing:
                self._suspects.add(tid)
                pslot = self.processing[tid]
                if pslot.record.deadline_at is not None:
                    heapq.heappush(
                        self._deadlines, (pslot.record.deadline_at, pslot.create_revision, tid)
                    )

    def claimed(self, tid: TaskId) -> bool:
        """Whether a move of this task is in flight."""
        return tid in self._claims

    # -- deciding --------------------------------------------------------------------

    def decide(self, now: float, policy: LeaderPolicy, fractions: Iterable[float] = ()) -> Decision:
        """The moves to make at ``now``; ``fractions`` are random draws for backoff jitter."""
        draws = iter(fractions)
        batches: list[Batch] = self._decide_firings(now)
        reaps = self._decide_reaps(now, policy, draws)
        ops = policy.max_txn_ops
        batches += [
            Batch("reap", tuple(c)) for c in chunk_moves(reaps, policy.reap_batch, max_ops=ops)
        ]
        promotes = self._decide_promotions(now)
        batches += [
            Batch("promote", tuple(c))
            for c in chunk_moves(promotes, policy.assign_batch, max_ops=ops)
        ]
        budget = max(policy.max_batches - len(batches), 1) * policy.assign_batch
        self._wake_rates(now)
        for queue, assigns in self._decide_assignments(now, policy, budget):
            batches += self._assign_batches(queue, assigns, ops)
        return Decision(tuple(batches), self._wake_at())

    def _assign_batches(
        self, queue: str, assigns: list[tuple[Slot, Record]], max_ops: int
    ) -> list[Batch]:
        """One queue's assignments in batches: each guarded by the queue's settings key
        and carrying the rate windows its moves count in."""
        config = self.queue_config(queue)
        windows: dict[tuple[str, str | None], tuple[RateWindow, float]] = {}
        if config.rate is not None:
            windows[(queue, None)] = (self._window(queue, None), config.rate.window_s)
        if config.key_rate is not None:
            for _, record in assigns:
                key = record.options.concurrency_key
                if key is not None:
                    windows[(queue, key)] = (self._window(queue, key), config.key_rate.window_s)
        guard = queue_guard(self.ks, queue, self.queue_revisions.get(queue, 0))
        return assign_batches(self.ks, assigns, guard, windows, max_ops)

    def _decide_firings(self, now: float) -> list[Batch]:
        """A batch per schedule with slots due (see _schedule.py); claimed until the
        watch shows it, so that a slot is not planned twice."""
        out: list[Batch] = []
        for name, (kv, schedule) in self.schedules.items():
            if name in self._firing:
                continue
            batch = firing_batch(self.ks, kv, schedule, now)
            if batch is not None:
                self._firing.add(name)
                out.append(batch)
        return out

    def _wake_rates(self, now: float) -> None:
        """Keys parked on a full rate window whose window has room again go back."""
        while self._rate_wakes and self._rate_wakes[0][0] <= now:
            _, queue, key = heapq.heappop(self._rate_wakes)
            self._unpark(self.keys.unpark(queue, key))
        for queue, at in list(self._queue_rate_wakes.items()):
            if at <= now:
                del self._queue_rate_wakes[queue]

    def _window(self, queue: str, key: str | None) -> RateWindow:
        return self.rate_windows.setdefault((queue, key), RateWindow())

    def queue_config(self, queue: str) -> QueueConfig:
        """A queue's settings (the defaults when it has no key)."""
        return self.queue_settings.get(queue) or _NO_CONFIG

    def _claim(
        self, tid: TaskId, node: NodeId | None = None, queue: str = "", key: str | None = None
    ) -> None:
        claim = None
        if node is not None:
            claim = (node, queue)
            self.inflight[claim] += 1
        if key is not None:
            # An assignment in flight counts against its key's limit until it settles.
            self._key_claims[tid] = (queue, key)
            self.keys.add(queue, key)
        self._claims[tid] = claim

    def _decide_reaps(
        self, now: float, policy: LeaderPolicy, draws: Iterable[float]
    ) -> list[tuple[Slot, Record]]:
        draw = iter(draws)
        out: list[tuple[Slot, Record]] = []
        stalled: dict[TaskId, TaskError] = {}
        self._hold_wake = None
        for tid in list(self._suspects):
            slot = self.processing.get(tid)
            if slot is None or tid in self._claims:
                self._suspects.discard(tid)
                continue
            node = self.nodes.get(slot.record.node or NodeId(""))
            if node is None and now < policy.hold_lost_until:
                # etcd was away: a live node may not have registered again yet.
                self._hold_wake = policy.hold_lost_until
                continue
            if node is not None and slot.record.session in node.carries:
                pass  # its node has the outcome and reports it (watched again on change)
            elif node is None or node.session != slot.record.session:
                stalled[tid] = TaskError(
                    type="NodeLost",
                    message=f"node {slot.record.node} went away during attempt "
                    f"{slot.record.attempts}",
                )
            self._suspects.discard(tid)
        while self._deadlines and self._deadlines[0][0] <= now:
            _, create_rev, tid = heapq.heappop(self._deadlines)
            slot = self.processing.get(tid)
            if slot is None or slot.create_revision != create_rev or tid in self._claims:
                continue
            owner = self.nodes.get(slot.record.node or NodeId(""))
            if owner is None and now < policy.hold_lost_until:
                continue  # held as a suspect until the hold ends (above)
            if owner is not None and slot.record.session in owner.carries:
                continue  # ended: its outcome is on its way (reaped if its node says not)
            stalled.setdefault(
                tid,
                TaskError(
                    type="Stalled",
                    message=f"attempt {slot.record.attempts} on {slot.record.node} passed its "
                    f"deadline without a report",
                ),
            )
        for tid, error in stalled.items():
            slot = self.processing[tid]
            if not policy.requeue_stalled:
                error = attrs.evolve(error, retryable=False)
            # A lost node is not the task's fault: its first attempt goes back at once.
            # A later one waits its backoff, so that a task that kills its workers does
            # not take node after node down in quick succession. An attempt past its
            # deadline is a failure like a timeout.
            # Either way a lost node's task keeps its place in its queue.
            lost = error.type == "NodeLost"
            nxt = after_failure(
                slot.record,
                error=error,
                now=now,
                fraction=next(draw, 0.5),
                reason="stalled",
                backoff=not (lost and slot.record.attempts <= 1),
                keep_order=lost,
            )
            self._claim(tid)
            self._requeueing(tid, nxt)
            out.append((slot, nxt))
        return out

    def _decide_promotions(self, now: float) -> list[tuple[Slot, Record]]:
        out: list[tuple[Slot, Record]] = []
        while self._due and self._due[0][0] <= now:
            _, mod_rev, tid = heapq.heappop(self._due)
            slot = self.delayed.get(tid)
            if slot is None or slot.mod_revision != mod_rev or tid in self._claims:
                continue
            self._claim(tid)
            nxt = promoted(slot.record, now=now)
            self._requeueing(tid, nxt)
            out.append((slot, nxt))
        return out

    def _requeueing(self, tid: TaskId, record: Record) -> None:
        """A move of ``tid`` to ``record`` is in flight: if it comes back to pending at a
        place it kept, hold back what ranks after it until the view shows it."""
        if record.state is State.PENDING and record.order is not None:
            rank = (-record.options.priority, record.order)
            self._requeues[tid] = (record.options.queue, rank)

    def free_slots(self) -> dict[str, list[tuple[NodeId, int]]]:
        """Free capacity per queue: (node, free) for every node with room."""
        free: dict[str, list[tuple[NodeId, int]]] = {}
        for node_id, info in self.nodes.items():
            for queue, cap in info.capacity.items():
                room = cap - self.inflight.get((node_id, queue), 0)
                if room > 0:
                    free.setdefault(queue, []).append((node_id, room))
        return free

    def _decide_assignments(
        self, now: float, policy: LeaderPolicy, budget: int
    ) -> list[tuple[str, list[tuple[Slot, Record]]]]:
        """The assignments to make now, queue by queue."""
        out: list[tuple[str, list[tuple[Slot, Record]]]] = []
        for queue, rooms in self.free_slots().items():
            heap = self._queues.get(queue)
            if budget <= 0:
                break
            if not heap or self.queue_config(queue).paused:
                continue  # a paused queue keeps its tasks pending, in order
            moves = self._assign_queue(queue, heap, rooms, now, policy, budget)
            if moves:
                out.append((queue, moves))
                budget -= len(moves)
        return out

    def _assign_queue(
        self,
        queue: str,
        heap: list[tuple[int, int, int, TaskId]],
        rooms: list[tuple[NodeId, int]],
        now: float,
        policy: LeaderPolicy,
        budget: int,
    ) -> list[tuple[Slot, Record]]:
        out: list[tuple[Slot, Record]] = []
        config = self.queue_config(queue)
        if config.max_running is not None:
            # Cluster-wide: every node's tasks of the queue, and assignments in flight.
            running = sum(n for (_, q), n in self.inflight.items() if q == queue)
            budget = min(budget, config.max_running - running)
        key_limit = config.key_max_running
        qwin = None if config.rate is None else self._window(queue, None)
        if qwin is not None and config.rate is not None:
            budget = min(budget, qwin.room(now, config.rate))
        # Spread work: the node with the most room takes the next task.
        nodes = [(-room, node) for node, room in rooms]
        heapq.heapify(nodes)
        # A requeue in flight keeps its place: nothing ranked after it goes first.
        barrier = min((rank for q, rank in self._requeues.values() if q == queue), default=None)
        while heap and nodes and len(out) < budget:
            if barrier is not None and heap[0][:2] > barrier:
                break
            entry = heapq.heappop(heap)
            _, _, create_rev, tid = entry
            slot = self.pending.get(tid)
            if slot is None or slot.create_revision != create_rev or tid in self._claims:
                continue
            key = slot.record.options.concurrency_key
            if key is not None and key_limit is not None and self.keys.full(queue, key, key_limit):
                self.keys.park(queue, key, entry)  # back when a task of its key ends
                continue
            kwin = None
            if key is not None and config.key_rate is not None:
                kwin = self._window(queue, key)
                if not kwin.room(now, config.key_rate):
                    self.keys.park(queue, key, entry)  # back when its window has room
                    at = kwin.free_at(config.key_rate)
                    heapq.heappush(self._rate_wakes, (at, queue, key))
                    continue
            neg_room, node = heapq.heappop(nodes)
            info = self.nodes[node]
            self._claim(tid, node, queue, key)
            for window in (qwin, kwin):
                if window is not None:
                    window.record(now)
            record = assigned(
                slot.record,
                node=node,
                session=info.session,
                now=now,
                grace_s=policy.grace_s,
                order=entry[1],
            )
            out.append((slot, record))
            if neg_room + 1 < 0:
                heapq.heappush(nodes, (neg_room + 1, node))
        if (
            qwin is not None
            and config.rate is not None
            and heap
            and not qwin.room(now, config.rate)
        ):
            self._queue_rate_wakes[queue] = qwin.free_at(config.rate)
        return out

    def _wake_at(self) -> float | None:
        while self._due:
            _, mod_rev, tid = self._due[0]
            slot = self.delayed.get(tid)
            if slot is not None and slot.mod_revision == mod_rev and tid not in self._claims:
                break
            heapq.heappop(self._due)
        while self._deadlines:
            _, create_rev, tid = self._deadlines[0]
            slot = self.processing.get(tid)
            if slot is not None and slot.create_revision == create_rev and tid not in self._claims:
                break
            heapq.heappop(self._deadlines)
        times = [h[0][0] for h in (self._due, self._deadlines) if h]
        if self._rate_wakes:
            times.append(self._rate_wakes[0][0])
        times += [
            schedule.next_at
            for name, (_, schedule) in self.schedules.items()
            if not schedule.paused and name not in self._firing
        ]
        times += self._queue_rate_wakes.values()
        if self._hold_wake is not None:
            times.append(self._hold_wake)
        return min(times) if times else None

    def held_back(self) -> dict[str, str]:
        """The queues whose pending tasks wait for a reason of the queue's own, by
        queue: ``paused``, or ``rate_limited`` (its rate window is full). A queue with
        no pending task is not held back."""
        held: dict[str, str] = {}
        for queue, heap in self._queues.items():
            # The heap drops entries lazily: look for a live one (the first, mostly).
            if not any(self._live_pending(entry) for entry in heap):
                continue
            if self.queue_config(queue).paused:
                held[queue] = "paused"
            elif queue in self._queue_rate_wakes:
                held[queue] = "rate_limited"
        return held

    def _live_pending(self, entry: tuple[int, int, int, TaskId]) -> bool:
        _, _, create_rev, tid = entry  # (priority, place, create revision, task)
        slot = self.pending.get(tid)
        return slot is not None and slot.create_revision == create_rev

    def queue_figures(self) -> dict[str, QueueFigures]:
        """Per queue: its live tasks by state and when its oldest pending task entered
        pending (for metrics; one pass over the view)."""
        figures: dict[str, QueueFigures] = {}
        for state, slots in (
            (State.PENDING, self.pending),
            (State.DELAYED, self.delayed),
            (State.PROCESSING, self.processing),
        ):
            for slot in slots.values():
                queue = slot.record.options.queue
                row = figures.get(queue)
                if row is None:
                    row = figures[queue] = QueueFigures()
                row.depth[state.value] += 1
                if state is State.PENDING and (
                    row.oldest_pending_at is None or slot.record.since_at < row.oldest_pending_at
                ):
                    row.oldest_pending_at = slot.record.since_at
        return figures

    def depth(self) -> dict[str, int]:
        """How many tasks each live queue holds."""
        return {
            "pending": len(self.pending),
            "delayed": len(self.delayed),
            "processing": len(self.processing),
        }


@attrs.define
class QueueFigures:
    """One queue's live tasks by state, and its oldest pending task's ``since_at``."""

    depth: dict[str, int] = attrs.Factory(
        lambda: dict.fromkeys(("pending", "delayed", "processing"), 0)
    )
    oldest_pending_at: float | None = None


_NO_CONFIG = QueueConfig()


def _entry(slot: Slot) -> tuple[int, int, int, TaskId]:
    """A pending slot's entry in its queue's heap: by priority, then by its place."""
    record = slot.record
    order = place(record.order, slot.create_revision)
    return (-record.options.priority, order, slot.create_revision, slot.task_id)
