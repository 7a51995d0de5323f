"""The queue state machine: the real core (planners, policy, leader view) driven against an
etcd backend, checked after every step against a small model and the properties of
DESIGN.md section 3.

The model says only what must be true; it does not re-implement the core. Each task's
model entry records where the task must be and what it may do next; every committed
move is checked against it, and every step ends with the invariants.

Each node has an agent (the core's ``AttemptLedger``, deciding what to start) fed by a
watch of its assignments that behaves as etcd's may: it lags behind, a resumed watch
repeats events, and a re-list shows every live key again. Whatever it is fed, no
attempt may start twice.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import attrs
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

from proptests.backends import Backend
from tm_sidecar.core import (
    AttemptLedger,
    Backoff,
    Batch,
    Compare,
    Conflict,
    Decision,
    Deposed,
    Fence,
    GivenBack,
    Guard,
    Happened,
    Keyspace,
    KeyValue,
    LeaderPolicy,
    LeaderView,
    NodeId,
    NodeInfo,
    PrefetchWindow,
    Put,
    QueueConfig,
    Raised,
    RateLimit,
    Record,
    Returned,
    Schedule,
    Slot,
    SnoozeAsked,
    State,
    TaskError,
    TaskId,
    TaskOptions,
    TaskSpec,
    Txn,
    WatchEvent,
    attempt_outcome,
    cancelled,
    dumps,
    first_slot,
    initial_record,
    interpret_batch,
    merge_with_reads,
    plan_cancel,
    plan_create,
    plan_create_many,
    plan_move,
    plan_queue_config,
    plan_update,
    schedule_from_request,
    slot_task_id,
    split_refused,
    succeeded,
    takeover,
)

GRACE_S = 2.0
SCHEDULE_GRACE_S = 3.0
MAX_SNOOZES = 1
BACKOFF = Backoff(base_s=1.0, factor=2.0, max_s=8.0, jitter=0.5)
_namespaces = itertools.count()
SCHEDULE_OPTIONS = TaskOptions(backoff=BACKOFF, max_snoozes=1)


@attrs.define
class ModelTask:
    """What must be true of one task."""

    id: TaskId
    priority: int
    max_attempts: int
    timeout_s: float | None
    state: State
    due_at: float = 0.0  # never assigned before this
    attempts: int = 0
    node: str | None = None
    session: int | None = None
    deadline_at: float | None = None
    completions: int = 0
    cancelled: bool = False
    unique_key: str | None = None
    concurrency_key: str | None = None
    snoozes: int = 0
    max_snoozes: int = 1
    #: The place it keeps in its queue through a requeue that is not its fault (its
    #: node was lost, it was handed back): where it stood when last assigned. None: its
    #: pending key's create revision.
    order: int | None = None
    handbacks: int = 0  # hand-backs in a row


@attrs.define
class ModelSchedule:
    """A schedule as created, and the slots it has fired."""

    schedule: Schedule
    incarnation: int  # its key's create revision
    fired: list[float] = attrs.Factory(list)
    paused: bool = False
    resumed: bool = False  # slots of a pause never fire: "none lost" is not checked


@attrs.define
class ModelAgent:
    """One sidecar process's node agent: what it has been shown and what it runs."""

    session: int
    ledger: AttemptLedger = attrs.Factory(AttemptLedger)
    shown: int = 0  # how far into the node's watch feed it has read
    running: dict[TaskId, int] = attrs.Factory(dict)  # task -> attempt's create revision
    #: The node's SDK workers, each behind its prefetch window (concurrency 1 each, so
    #: that a delivery routed to a busy one must wait in its window).
    windows: list[PrefetchWindow] = attrs.Factory(list)
    #: Which window each running attempt's delivery went to.
    routed: dict[tuple[TaskId, int], PrefetchWindow] = attrs.Factory(dict)


@attrs.define
class ModelNode:
    """A sidecar: its session lease and capacity."""

    name: str
    session: int
    capacity: int
    alive: bool = True
    agent: ModelAgent | None = attrs.field(default=None, repr=False)
    #: Every change to the node's assignments, in revision order, as a watch sees them.
    feed: list[WatchEvent] = attrs.field(factory=list, repr=False)
    #: Starts per attempt (task, create revision), over every process this node has run.
    starts: Counter[tuple[TaskId, int]] = attrs.field(factory=Counter, repr=False)


class QueueMachine(RuleBasedStateMachine):
    """Subclasses set ``make_backend``."""

    def make_backend(self) -> Backend:
        raise NotImplementedError

    def __init__(self) -> None:
        super().__init__()
        self.db = self.make_backend()
        self.ks = Keyspace(namespace=f"pt{next(_namespaces)}-{random.getrandbits(32):x}")
        self.now = 1_000_000.0
        self.rng = random.Random(0)
        self.tasks: dict[TaskId, ModelTask] = {}
        self.nodes: dict[str, ModelNode] = {}
        self.created = 0
        self.fence: Fence | None = None
        self.view: LeaderView | None = None
        self.deposed: list[tuple[Fence, LeaderView]] = []
        self.listing: dict[str, KeyValue] = {}
        self.stale: list[tuple[Slot, Record]] = []
        self.policy = LeaderPolicy(grace_s=GRACE_S)
        self.assignments: dict[str, KeyValue] = {}  # processing keys as last recorded
        self.config = QueueConfig()  # the default queue's settings
        self.schedules: dict[str, ModelSchedule] = {}
        # Starts made while a rate (a per-key rate) was in force: when, and the key.
        self.starts: list[float] = []
        self.key_starts: list[tuple[float, str]] = []

    # -- helpers -----------------------------------------------------------------------

    def _new_fence(self) -> None:
        lease = self.db.lease_grant(60)
        key = self.ks.candidate(lease)
        result = self.db.txn(Txn(success=(Put(key, "{}", lease),)))
        self.fence = Fence(key, result.revision)
        self._leader_lease = lease
        kvs, revision = self.db.list(self.ks.prefix)
        self.listing = {kv.key: kv for kv in kvs}
        self.view = LeaderView.from_listing(self.ks, kvs, revision)

    def _sync_view(self) -> None:
        """Feed the leader the changes since its last look, as a watch would."""
        assert self.view is not None
        now, events, revision = self._changes_since(self.listing, self.ks.prefix)
        for event in events:
            self.view.apply(event)
        self.view.advance(revision)
        self.listing = now

    def _changes_since(
        self, seen: dict[str, KeyValue], prefix: str
    ) -> tuple[dict[str, KeyValue], list[WatchEvent], int]:
        """The keys under ``prefix`` now, and the changes since ``seen`` as a watch would
        tell them: in revision order, a transaction's deletes first."""
        kvs, revision = self.db.list(prefix)
        now = {kv.key: kv for kv in kvs}
        events = [
            WatchEvent("DELETE", KeyValue(k, "", 0, revision, 0), old)
            for k, old in seen.items()
            if k not in now
        ]
        events += [
            WatchEvent("PUT", kv, seen.get(k))
            for k, kv in now.items()
            if k not in seen or seen[k].mod_revision != kv.mod_revision
        ]
        events.sort(key=lambda e: (e.kv.mod_revision, e.kind != "DELETE"))
        return now, events, revision

    def _record_assignments(self) -> None:
        """Append the changes to processing keys since the last look to each node's feed,
        as etcd's watch would deliver them (called after every write that may touch one)."""
        now, events, _ = self._changes_since(
            self.assignments, self.ks.state_prefix(State.PROCESSING)
        )
        for event in events:
            parsed = self.ks.parse(event.kv.key)
            assert parsed is not None
            assert parsed.node is not None
            node = self.nodes.get(parsed.node)
            if node is not None:
                node.feed.append(event)
        self.assignments = now

    def _agent_considers(self, node: ModelNode, kv: KeyValue) -> None:
        """The agent's decision on one assignment it is shown (see _agent.py)."""
        agent = node.agent
        assert agent is not None
        parsed = self.ks.parse(kv.key)
        assert parsed is not None
        assert parsed.task_id is not None
        if Record.from_json(State.PROCESSING, kv.value).session != agent.session:
            return  # an earlier incarnation's: the leader reaps it
        if not agent.ledger.begin(parsed.task_id, kv.create_revision):
            return
        attempt = (parsed.task_id, kv.create_revision)
        node.starts[attempt] += 1
        assert node.starts[attempt] == 1, f"attempt {attempt} started twice on {node.name}"
        agent.running[parsed.task_id] = kv.create_revision
        if agent.windows:
            # Routed by a rule that does not look at room (the window must hold it back).
            window = agent.windows[self.rng.randrange(len(agent.windows))]
            agent.routed[attempt] = window
            window.offer(attempt)
            window.take()  # pushed, as far as there is room

    def _agent_attempt_ends(self, node: ModelNode, task_id: TaskId, create_revision: int) -> None:
        agent = node.agent
        if agent is not None and agent.running.get(task_id) == create_revision:
            del agent.running[task_id]
            agent.ledger.end(task_id, create_revision)
            window = agent.routed.pop((task_id, create_revision), None)
            if window is not None:
                window.finish((task_id, create_revision))
                window.take()  # its room goes to the next waiting delivery

    def _state_keys(self) -> dict[TaskId, list[tuple[State, KeyValue]]]:
        kvs, _ = self.db.list(self.ks.prefix)
        out: dict[TaskId, list[tuple[State, KeyValue]]] = {}
        for kv in kvs:
            parsed = self.ks.parse(kv.key)
            if parsed is not None and parsed.kind == "state" and parsed.task_id and parsed.state:
                out.setdefault(parsed.task_id, []).append((parsed.state, kv))
        return out

    def _live_assignments(self) -> list[Slot]:
        slots = []
        for tid, entries in self._state_keys().items():
            for state, kv in entries:
                if state is State.PROCESSING:
                    slots.append(
                        Slot(
                            tid,
                            kv.key,
                            kv.create_revision,
                            kv.mod_revision,
                            Record.from_json(state, kv.value),
                        )
                    )
        return sorted(slots, key=lambda s: s.key)

    def _check_move(self, slot: Slot, record: Record, kind: str) -> None:
        task = self.tasks[slot.task_id]
        if kind == "assign":
            assert task.state is State.PENDING, f"{task.id} assigned from {task.state}"
            assert not self.config.paused, f"{task.id} assigned from a paused queue"
            assert self.now >= task.due_at, (
                f"{task.id} assigned at {self.now} before due {task.due_at}"
            )
            node = self.nodes[record.node or ""]
            assert node.alive, f"{task.id} assigned to dead node {node.name}"
            assert record.session == node.session, (
                f"{task.id} assigned to session {record.session} of {node.name}, "
                f"whose current session is {node.session}"
            )
            assert task.completions == 0, f"{task.id} assigned again after it completed"
            task.state, task.node, task.session = State.PROCESSING, node.name, node.session
            task.attempts += 1
            if task.order is None:
                task.order = slot.create_revision
            task.deadline_at = (
                None if task.timeout_s is None else self.now + task.timeout_s + GRACE_S
            )
            assert record.attempts == task.attempts
        elif kind == "promote":
            assert task.state is State.DELAYED
            assert self.now >= task.due_at, (
                f"{task.id} promoted at {self.now} before due {task.due_at}"
            )
            task.state = State.PENDING
        else:
            assert task.state is State.PROCESSING
            lost = self._lost(task)
            late = task.deadline_at is not None and self.now >= task.deadline_at
            assert lost or late, f"{task.id} reaped while its attempt was live"
            self._after_attempt(task, record, retryable=True, keep_order=lost)

    def _lost(self, task: ModelTask) -> bool:
        """Whether the node running ``task`` is gone (dead, or restarted)."""
        owner = self.nodes.get(task.node or "")
        return owner is None or not owner.alive or owner.session != task.session

    def _after_attempt(
        self, task: ModelTask, record: Record, *, retryable: bool, keep_order: bool = False
    ) -> None:
        if not keep_order:
            task.order = None
        elif record.state is not State.FAILED:
            assert record.order == task.order, f"{task.id} lost its place: {record.order}"
        task.handbacks = 0
        exhausted = task.attempts >= task.max_attempts
        if not retryable or exhausted:
            assert record.state is State.FAILED, f"{task.id}: expected failed, got {record.state}"
        else:
            assert record.state in (State.DELAYED, State.PENDING), f"{task.id}: expected a retry"
            if record.state is State.DELAYED:
                assert record.due_at is not None
                assert record.due_at >= self.now
                task.due_at = record.due_at
        assert record.attempts == task.attempts
        task.state = record.state
        task.node = task.session = task.deadline_at = None

    # -- rules -------------------------------------------------------------------------

    nodes_b = Bundle("nodes")

    @initialize()
    def elect(self) -> None:
        self._new_fence()

    @initialize(
        max_running=st.sampled_from([None, 1, 2, 3]),
        per_key=st.sampled_from([None, 1]),
        rate=st.sampled_from([None, (1, 5.0), (2, 20.0), (2, 20.0, 3.0)]),
    )
    def first_limits(
        self, max_running: int | None, per_key: int | None, rate: tuple[float, ...] | None
    ) -> None:
        """Runs start with limits or without (set_limits, set_rates change them later)."""
        if max_running is not None or per_key is not None:
            self.set_limits(max_running, per_key)
        if rate is not None:
            self.set_rates(rate, None)

    @initialize(
        every=st.sampled_from([None, 5.0, 7.0]), missed=st.sampled_from(["skip", "one", "all"])
    )
    def first_schedule(self, every: float | None, missed: str) -> None:
        """Runs start with a schedule or without (add_schedule adds more)."""
        if every is not None:
            self.add_schedule(every, missed)

    @initialize(target=nodes_b, capacity=st.integers(1, 3))
    def first_node(self, capacity: int) -> str:
        """Most runs need a node: start with one (more come with add_node)."""
        return self._add_node(capacity)

    @rule(
        priority=st.integers(0, 2),
        delay=st.none() | st.floats(0, 30),
        max_attempts=st.integers(1, 3),
        timeout=st.sampled_from([None, 5.0, 20.0]),
        max_snoozes=st.integers(0, MAX_SNOOZES),
        key=st.sampled_from([None, "k0", "k0", "k1"]),
        count=st.integers(1, 3),
    )
    def create(
        self,
        priority: int,
        delay: float | None,
        max_attempts: int,
        timeout: float | None,
        max_snoozes: int,
        key: str | None,
        count: int = 1,
    ) -> None:
        """``count`` tasks alike, as a producer makes them."""
        for _ in range(count):
            self._create_one(priority, delay, max_attempts, timeout, max_snoozes, key)

    @rule(key=st.sampled_from([None, "k0"]), later=st.sampled_from([None, 0.6, 1.0]))
    def burst(self, key: str | None, later: float | None) -> None:
        """A producer sends three tasks at once and the leader gets to them: the common
        case where limits (concurrency, rates) hold back part of a decision. With
        ``later``, the leader looks again that fraction of the rate's period on."""
        self.create(0, None, 2, None, 0, key, count=3)
        self.leader_rounds(interfere=False)
        rate = self.config.rate or self.config.key_rate
        if later is not None and rate is not None:
            self.now += later * rate.period_s
            self.leader_rounds(interfere=False)

    def _create_one(
        self,
        priority: int,
        delay: float | None,
        max_attempts: int,
        timeout: float | None,
        max_snoozes: int,
        key: str | None,
    ) -> None:
        self.created += 1
        tid = TaskId(f"t{self.created:04d}")
        opts = TaskOptions(
            priority=priority,
            max_attempts=max_attempts,
            timeout_s=timeout,
            backoff=BACKOFF,
            max_snoozes=max_snoozes,
            concurrency_key=key,
        )
        run_at = None if delay is None else self.now + delay
        spec = TaskSpec(
            id=tid, payload={"n": self.created}, options=opts, created_at=self.now, run_at=run_at
        )
        record = initial_record(
            Record(state=State.PENDING, options=opts, since_at=self.now),
            now=self.now,
            run_at=run_at,
        )
        result = self.db.txn(plan_create(self.ks, spec, record))
        assert result.succeeded
        assert not self.db.txn(plan_create(self.ks, spec, record)).succeeded  # ids are taken once
        self.tasks[tid] = ModelTask(
            id=tid,
            priority=priority,
            max_attempts=max_attempts,
            timeout_s=timeout,
            state=record.state,
            due_at=run_at if record.state is State.DELAYED and run_at is not None else 0.0,
            max_snoozes=max_snoozes,
            concurrency_key=key,
        )

    @rule(
        count=st.integers(1, 7),
        taken=st.none() | st.integers(0, 6),
        delay=st.none() | st.floats(0, 30),
    )
    def create_many(self, count: int, taken: int | None, delay: float | None) -> None:
        """A bulk create as a sidecar commits it: its transactions in order (three tasks
        each here, to have several), each all or nothing, stopping at the first refused.
        With ``taken``, that item's id is an existing task's: its transaction must land
        not at all (no task of it without the others), and those before it whole."""
        existing = sorted(self.tasks)
        run_at = None if delay is None else self.now + delay
        items: list[tuple[TaskSpec, Record]] = []
        for index in range(count):
            self.created += 1
            tid = TaskId(f"t{self.created:04d}")
            if index == taken and existing:
                tid = existing[self.created % len(existing)]
            opts = TaskOptions(backoff=BACKOFF, max_snoozes=MAX_SNOOZES)
            spec = TaskSpec(
                id=tid,
                payload={"n": self.created},
                options=opts,
                created_at=self.now,
                run_at=run_at,
            )
            record = initial_record(
                Record(state=State.PENDING, options=opts, since_at=self.now),
                now=self.now,
                run_at=run_at,
            )
            items.append((spec, record))
        for chunk in plan_create_many(self.ks, items, max_ops=6):
            result = self.db.txn(chunk.txn)
            taken_ids = [spec.id for spec in chunk.specs if spec.id in self.tasks]
            if not result.succeeded:
                assert taken_ids, "a bulk create's transaction of free ids was refused"
                told = [
                    spec.id for spec, r in zip(chunk.specs, result.ranges, strict=True) if r.kvs
                ]
                assert told == taken_ids, "the refusal did not tell which ids are taken"
                break  # the sidecar stops here and tells which tasks exist
            assert not taken_ids, (
                f"a bulk create's transaction committed over the taken id(s) {taken_ids}: "
                "its other tasks landed without the create being refused"
            )
            for spec, record in zip(chunk.specs, chunk.records, strict=True):
                self.tasks[spec.id] = ModelTask(
                    id=spec.id,
                    priority=0,
                    max_attempts=spec.options.max_attempts,
                    timeout_s=None,
                    state=record.state,
                    due_at=run_at if record.state is State.DELAYED and run_at is not None else 0.0,
                    max_snoozes=MAX_SNOOZES,
                )

    def _unique_spec(self, key: str, window: float | None) -> tuple[TaskSpec, Record]:
        self.created += 1
        tid = TaskId(f"t{self.created:04d}")
        opts = TaskOptions(
            backoff=BACKOFF, unique_key=key, unique_for_s=window, max_snoozes=MAX_SNOOZES
        )
        spec = TaskSpec(id=tid, payload={"n": self.created}, options=opts, created_at=self.now)
        record = initial_record(
            Record(state=State.PENDING, options=opts, since_at=self.now), now=self.now, run_at=None
        )
        return spec, record

    def _created_unique(self, spec: TaskSpec, record: Record) -> None:
        self.tasks[spec.id] = ModelTask(
            id=spec.id,
            priority=0,
            max_attempts=spec.options.max_attempts,
            timeout_s=None,
            state=record.state,
            unique_key=spec.options.unique_key,
        )

    @rule(key=st.sampled_from(["u0", "u1"]), window=st.sampled_from([None, 4.0]))
    def create_unique(self, key: str, window: float | None) -> None:
        """A create with a unique key, as a sidecar makes it: take the guard, or read
        its holder and either answer it or take over from it."""
        spec, record = self._unique_spec(key, window)
        result = self.db.txn(plan_create(self.ks, spec, record))
        if result.succeeded:
            self._created_unique(spec, record)
            return
        (guard_kv,) = result.ranges[1].kvs
        guard = Guard.from_kv(guard_kv)
        entries = self._state_keys().get(guard.task_id)
        holder = (entries[0][0], entries[0][1]) if entries else None
        taking = takeover(self.ks, guard, holder, self.now)
        if taking is None:
            # Answered the holder: it must be live, or finished inside its window.
            held = self.tasks[guard.task_id]
            live = held.state in (State.PENDING, State.DELAYED, State.PROCESSING)
            assert live or (guard.until_at is not None and self.now < guard.until_at)
            return
        assert self.db.txn(plan_create(self.ks, spec, record, takeover=taking)).succeeded
        self._created_unique(spec, record)

    @rule(key=st.sampled_from(["u0", "u1"]))
    def unique_creates_race(self, key: str) -> None:
        """Two sidecars create with one key from the same read: one task at most."""
        first, first_rec = self._unique_spec(key, None)
        second, second_rec = self._unique_spec(key, None)
        guard_kvs = [kv for kv in self.db.list(self.ks.unique(key))[0] if kv.key.endswith(key)]
        taking = None
        if guard_kvs:
            guard = Guard.from_kv(guard_kvs[0])
            entries = self._state_keys().get(guard.task_id)
            holder = (entries[0][0], entries[0][1]) if entries else None
            taking = takeover(self.ks, guard, holder, self.now)
            if taking is None:
                return
        for spec, rec in ((first, first_rec), (second, second_rec)):
            if self.db.txn(plan_create(self.ks, spec, rec, takeover=taking)).succeeded:
                self._created_unique(spec, rec)

    @rule(target=nodes_b, capacity=st.integers(1, 3))
    def add_node(self, capacity: int) -> str:
        return self._add_node(capacity)

    def _add_node(self, capacity: int) -> str:
        name = f"n{len(self.nodes)}"
        lease = self.db.lease_grant(60)
        info = NodeInfo(id=NodeId(name), session=lease, capacity={"default": capacity})
        self.db.txn(Txn(success=(Put(self.ks.node(name), info.to_json(), lease),)))
        self.nodes[name] = ModelNode(name, lease, capacity, agent=self._new_agent(lease, capacity))
        return name

    @staticmethod
    def _new_agent(session: int, capacity: int, shown: int = 0) -> ModelAgent:
        windows = [PrefetchWindow(1) for _ in range(capacity)]
        return ModelAgent(session, shown=shown, windows=windows)

    @rule(name=consumes(nodes_b))
    def kill_node(self, name: str) -> None:
        node = self.nodes[name]
        self.db.lease_revoke(node.session)
        node.alive = False
        node.agent = None

    @rule(name=nodes_b)
    def restart_node(self, name: str) -> None:
        """Same node id, new session: its old assignments must not survive."""
        node = self.nodes[name]
        self.db.lease_revoke(node.session)
        lease = self.db.lease_grant(60)
        info = NodeInfo(id=NodeId(name), session=lease, capacity={"default": node.capacity})
        self.db.txn(Txn(success=(Put(self.ks.node(name), info.to_json(), lease),)))
        node.session = lease
        # A new process: a fresh agent, which lists before it watches.
        node.agent = self._new_agent(lease, node.capacity, shown=len(node.feed))
        self._agent_relists(node)

    @rule(dt=st.floats(0.1, 12))
    def tick(self, dt: float) -> None:
        self.now += dt

    @rule(interfere=st.booleans())
    def leader_rounds(self, interfere: bool) -> None:
        """Decide and commit until the leader has nothing left to do now.

        With ``interfere``, the first batch's first task is rewritten behind the leader's
        back (as an operator or a racing worker would): that batch must fail, and the
        leader must still get every task where it belongs.
        """
        assert self.view is not None
        assert self.fence is not None
        for _ in range(20):
            self._sync_view()
            decision = self.view.decide(self.now, self.policy, iter(self.rng.random, -1.0))
            if not decision.batches:
                break
            self._check_order(decision.batches)
            moving = [b for b in decision.batches if b.moves]
            if interfere and moving:
                interfere = False
                first, _ = moving[0].moves[0]
                current = self.listing[first.key]
                self.db.txn(Txn(success=(Put(first.key, current.value),)))
                result = self.db.txn(moving[0].plan(self.ks, self.fence))
                assert not result.succeeded, "a batch over a changed key committed"
                answer = interpret_batch(self.fence, result)
                assert isinstance(answer, Conflict), f"a stale view's batch read as {answer}"
                for batch in decision.batches:
                    self.view.settle(batch, committed_at=None)
                continue
            for batch in decision.batches:
                result = self.db.txn(batch.plan(self.ks, self.fence))
                assert result.succeeded, f"the live leader's {batch.kind} batch failed"
                self._committed(batch, result.revision)
            # As the real leader does after a commit: decide again at once, before the
            # watch has shown what it committed (its claims stand in meanwhile).
            again = self.view.decide(self.now, self.policy, iter(self.rng.random, -1.0))
            self._check_order(again.batches)
            for batch in again.batches:
                result = self.db.txn(batch.plan(self.ks, self.fence))
                assert result.succeeded, f"the live leader's {batch.kind} batch failed"
                self._committed(batch, result.revision)
        self._sync_view()
        self._check_quiescent()
        self._check_schedules()

    def _committed(self, batch: Batch, revision: int) -> None:
        assert self.view is not None
        self._record_assignments()
        for slot, record in batch.moves:
            if batch.kind == "reap":
                self.stale.append((slot, record))
            self._check_move(slot, record, batch.kind)
        if batch.kind == "assign":
            self._check_limits(batch)
        if batch.kind == "fire":
            self._fired(batch)
        self.view.settle(batch, committed_at=revision)

    # -- schedules -----------------------------------------------------------------------

    @rule(
        every=st.sampled_from([5.0, 7.0]),
        missed=st.sampled_from(["skip", "one", "all"]),
        grace=st.sampled_from([SCHEDULE_GRACE_S, 4 * SCHEDULE_GRACE_S]),
    )
    def add_schedule(self, every: float, missed: str, grace: float = SCHEDULE_GRACE_S) -> None:
        """A client adds an interval schedule (slots every ``every`` seconds from now).
        A grace longer than the interval lets several slots be due and on time at once."""
        name = f"s{len(self.schedules)}"
        fields = {
            "name": name,
            "every_s": every,
            "missed": missed,
            "grace_s": grace,
            "options": SCHEDULE_OPTIONS,
        }
        schedule = schedule_from_request(fields, now=self.now)
        key = self.ks.schedule(name)
        txn = Txn(compare=(Compare.absent(key),), success=(Put(key, schedule.to_json()),))
        result = self.db.txn(txn)
        assert result.succeeded
        self.schedules[name] = ModelSchedule(schedule, incarnation=result.revision)

    def _fired(self, batch: Batch) -> None:
        """A firing committed: each slot is one of the schedule's, fired for the first
        time, in order; its task is a new pending task."""
        model = self.schedules[batch.schedule or ""]
        assert not model.paused, f"paused schedule {batch.schedule} fired"
        policy = model.schedule.missed
        if policy != "all":
            # skip and one never fire a burst: missed slots coalesce or are dropped.
            assert len(batch.slots) <= 1, f"{policy} fired {len(batch.slots)} slots at once"
        if policy == "skip" and batch.slots:
            late = self.now - batch.slots[0]
            assert late <= model.schedule.grace_s, f"skip fired a slot {late} s late"
        every, anchor = model.schedule.every_s or 0.0, model.schedule.anchor_at
        for slot in batch.slots:
            assert slot not in model.fired, f"{batch.schedule} fired slot {slot} twice"
            k = round((slot - anchor) / every)
            assert k >= 1, f"{slot} is before the first slot"
            assert abs(anchor + k * every - slot) < 1e-6, f"{slot} is not a slot"
            assert slot <= self.now, f"slot {slot} fired early at {self.now}"
            assert not model.fired or slot > max(model.fired), "slots fired out of order"
            model.fired.append(slot)
            tid = slot_task_id(model.schedule, slot, model.incarnation)
            assert tid not in self.tasks
            self.tasks[tid] = ModelTask(
                id=tid, priority=0, max_attempts=3, timeout_s=None, state=State.PENDING
            )

    @rule()
    def schedule_paused_behind_the_leader(self) -> None:
        """A client pauses a schedule after the leader decided to fire it: the firing
        must not commit (nor undo the pause); then the client resumes it."""
        assert self.view is not None
        assert self.fence is not None
        self._sync_view()
        decision = self.view.decide(self.now, self.policy, iter(self.rng.random, -1.0))
        firing = next((b for b in decision.batches if b.kind == "fire"), None)
        if firing is not None:
            model = self.schedules[firing.schedule or ""]
            self._write_schedule(model, paused=True)
        for batch in decision.batches:
            result = self.db.txn(batch.plan(self.ks, self.fence))
            if result.succeeded:
                assert batch is not firing, "a firing committed over a pause"
                self._committed(batch, result.revision)
            else:
                assert batch is firing, f"a {batch.kind} batch failed"
                self.view.settle(batch, committed_at=None)
        if firing is not None:
            self._write_schedule(self.schedules[firing.schedule or ""], paused=False)

    def _write_schedule(self, model: ModelSchedule, *, paused: bool) -> None:
        key = self.ks.schedule(model.schedule.name)
        (kv,) = [k for k in self.db.list(key)[0] if k.key == key]
        current = Schedule.from_json(kv.value)
        changed = attrs.evolve(current, paused=paused)
        if not paused:
            changed = attrs.evolve(changed, next_at=first_slot(changed, self.now))
            model.resumed = True
        txn = Txn(
            compare=(Compare.modified_at(key, kv.mod_revision),),
            success=(Put(key, changed.to_json()),),
        )
        assert self.db.txn(txn).succeeded
        model.paused = paused

    def _check_schedules(self) -> None:
        """While a leader exists no slot is lost: with ``all``, every slot so far has
        fired; with ``one``, the latest; with ``skip``, the latest if it is on time."""
        for name, model in self.schedules.items():
            if model.resumed:
                continue
            every, anchor = model.schedule.every_s or 0.0, model.schedule.anchor_at
            slots = [anchor + k * every for k in range(1, int((self.now - anchor) / every) + 1)]
            slots = [s for s in slots if s <= self.now]
            if not slots:
                continue
            fired = set(model.fired)
            if model.schedule.missed == "all":
                assert set(slots) <= fired, f"{name} lost slots {sorted(set(slots) - fired)}"
            elif model.schedule.missed == "one" or self.now - slots[-1] <= model.schedule.grace_s:
                assert slots[-1] in fired, f"{name} did not fire its latest slot {slots[-1]}"

    @rule(name=nodes_b)
    def node_restarts_behind_the_leader(self, name: str) -> None:
        """The leader decides on a view that has not yet seen a node restart: an
        assignment to the node's old session must not commit (the new process would
        never run it, and its reap would cost the task an attempt)."""
        assert self.view is not None
        assert self.fence is not None
        self._sync_view()
        decision = self.view.decide(self.now, self.policy, iter(self.rng.random, -1.0))
        self.restart_node(name)
        refused = self._commit_until_refused(decision)
        if refused is not None:
            assert refused.kind == "assign", f"a {refused.kind} batch failed"
            assert any(record.node == name for _, record in refused.moves), (
                "an assignment to live sessions failed"
            )

    def _commit_until_refused(
        self, decision: Decision, on_commit: Callable[[Batch], None] | None = None
    ) -> Batch | None:
        """Commit a decision's batches in order, as the leader does after something
        changed behind it; answers the first batch etcd refused (it and the rest are
        settled as not committed), or None. ``on_commit`` checks each committed batch."""
        assert self.view is not None
        assert self.fence is not None
        for n, batch in enumerate(decision.batches):
            result = self.db.txn(batch.plan(self.ks, self.fence))
            if result.succeeded:
                if on_commit is not None:
                    on_commit(batch)
                self._committed(batch, result.revision)
                continue
            for rest in decision.batches[n:]:
                self.view.settle(rest, committed_at=None)
            return batch
        return None

    def _check_order(self, batches: tuple[Batch, ...]) -> None:
        """Within one queue, the leader takes the best pending tasks first: by priority,
        then by commit order, where a task requeued through no fault of its own (its
        node lost, handed back) keeps the place it had, even while the leader's view has
        not yet seen it back (property 9)."""
        assert self.view is not None
        chosen = [slot for b in batches if b.kind == "assign" for slot, _ in b.moves]
        if not chosen:
            return
        rank: dict[TaskId, tuple[int, int]] = {}
        for tid, entries in self._state_keys().items():
            task = self.tasks[tid]
            for state, kv in entries:
                if state is State.PENDING:
                    place = task.order if task.order is not None else kv.create_revision
                    rank[tid] = (-task.priority, place)
        # What this decision puts back in pending at a kept place counts as pending.
        for batch in batches:
            for slot, record in batch.moves:
                task = self.tasks[slot.task_id]
                keeps = (batch.kind == "reap" and self._lost(task)) or batch.kind == "promote"
                if record.state is State.PENDING and keeps and task.order is not None:
                    rank[slot.task_id] = (-task.priority, task.order)
        worst_chosen = max(rank[s.task_id] for s in chosen)
        left = [t for t in rank if t not in {s.task_id for s in chosen}]
        better_left = [t for t in left if rank[t] < worst_chosen and not self._held_back(t, chosen)]
        assert not better_left, f"{better_left} skipped for worse tasks"

    def _held_back(self, tid: TaskId, chosen: list[Slot]) -> bool:
        """A task that its key's limit held back, counting the tasks chosen with it."""
        key, limit = self.tasks[tid].concurrency_key, self.config.key_max_running
        if key is not None and self.config.key_rate is not None:
            return True  # (its key's rate window may be full)
        if key is None or limit is None:
            return False
        running = [t for t in self.tasks.values() if t.state is State.PROCESSING]
        running += [self.tasks[s.task_id] for s in chosen]
        return sum(t.concurrency_key == key for t in running) >= limit

    def _check_quiescent(self) -> None:
        """After the leader has done all it can: nothing due waits, no capacity idles."""
        free = sum(
            max(
                0,
                n.capacity
                - sum(
                    1
                    for t in self.tasks.values()
                    if t.state is State.PROCESSING and t.node == n.name and t.session == n.session
                ),
            )
            for n in self.nodes.values()
            if n.alive
        )
        pending = [
            t.id for t in self.tasks.values() if t.state is State.PENDING and self._may_run(t)
        ]
        assert not (pending and free), f"{pending} wait while {free} slots are free"
        due = [
            t.id for t in self.tasks.values() if t.state is State.DELAYED and t.due_at <= self.now
        ]
        assert not due, f"{due} are due but still delayed"
        for t in self.tasks.values():
            if t.state is State.PROCESSING:
                node = self.nodes[t.node or ""]
                assert node.alive, f"{t.id} still assigned to dead node {node.name}"
                assert node.session == t.session, f"{t.id} kept by a restarted node"
                assert t.deadline_at is None or self.now < t.deadline_at, (
                    f"{t.id} past its deadline"
                )

    def _started_attempts(self) -> list[Slot]:
        """The live assignments whose node's agent has started them."""
        out = []
        for slot in self._live_assignments():
            node = self.nodes.get(slot.record.node or "")
            agent = node.agent if node is not None else None
            if agent is not None and agent.running.get(slot.task_id) == slot.create_revision:
                out.append(slot)
        return out

    @rule(
        data=st.data(),
        outcome=st.sampled_from(
            ["success", "failure", "permanent", "progress", "snooze", "handback"]
        ),
    )
    def leader_assigns_and_a_worker_reports(self, data: st.DataObject, outcome: str) -> None:
        """The common path in one step: the leader does its rounds, every agent sees its
        assignments, and one started attempt reports."""
        self.leader_rounds(interfere=False)
        for node in self.nodes.values():
            if node.agent is not None:
                self._agent_takes(node, len(node.feed))
        if self._started_attempts():
            self.worker_reports(data, outcome)

    @precondition(lambda self: any(n.agent and n.agent.running for n in self.nodes.values()))
    @rule(
        data=st.data(),
        outcome=st.sampled_from(
            ["success", "failure", "permanent", "progress", "snooze", "handback"]
        ),
    )
    def worker_reports(self, data: st.DataObject, outcome: str) -> None:
        """An attempt its node's agent started reports progress or its outcome."""
        slots = self._started_attempts()
        if not slots:
            return  # every started attempt was withdrawn; its agent has not been told yet
        slot = data.draw(st.sampled_from(slots), label="assignment")
        task = self.tasks[slot.task_id]
        assert slot.record.attempts == task.attempts
        if outcome == "progress":
            result = self.db.txn(plan_update(slot, attrs.evolve(slot.record, progress={"p": 1})))
            assert result.succeeded
            self._record_assignments()
            return
        # What happened, as the agent tells it; the core decides what it writes.
        happened: Happened
        if outcome == "success":
            returned = {"ok": task.id}
            happened = Returned(returned, len(dumps(returned).encode()))
        elif outcome == "snooze":
            delay = data.draw(st.sampled_from([0.0, 3.0]), label="snooze_s")
            happened = SnoozeAsked(delay)
        elif outcome == "handback":
            happened = GivenBack()
        else:
            happened = Raised(TaskError(type="E", message="x", retryable=outcome == "failure"))
        self._report(slot, happened, outcome)

    @rule()
    def every_started_attempt_fails(self) -> None:
        """The leader's rounds, the agents take their assignments, and every started
        attempt fails (retryable): the short way to a task's last attempt, where
        ``max_attempts`` decides between a retry and the failed queue."""
        self.leader_rounds(interfere=False)
        for node in self.nodes.values():
            if node.agent is not None:
                self._agent_takes(node, len(node.feed))
        for slot in self._started_attempts():
            assert slot.record.attempts == self.tasks[slot.task_id].attempts
            self._report(slot, Raised(TaskError(type="E", message="x")), "failure")

    def _report(self, slot: Slot, happened: Happened, outcome: str) -> None:
        """The agent reports what happened; the core decides what it writes."""
        decided = attempt_outcome(
            slot.record, happened, now=self.now, draw=self.rng.random, max_result_bytes=1024
        )
        assert decided is not None
        nxt = decided
        result = self.db.txn(plan_move(self.ks, slot, nxt))
        assert result.succeeded, "a live attempt's report was rejected"
        delay = happened.delay_s if isinstance(happened, SnoozeAsked) else 0.0
        self._reported(slot, nxt, outcome, delay)

    def _reported(self, slot: Slot, nxt: Record, outcome: str, delay: float = 0.0) -> None:
        """The model after ``slot``'s attempt reported ``outcome``, committed as ``nxt``."""
        task = self.tasks[slot.task_id]
        self._record_assignments()
        # The attempt is over on its node (if the node's agent had started it).
        owner = self.nodes.get(slot.record.node or "")
        if owner is not None:
            self._agent_attempt_ends(owner, slot.task_id, slot.create_revision)
        self.stale.append((slot, nxt))
        if outcome == "success":
            task.completions += 1
            task.state = State.COMPLETED
            task.node = task.session = task.deadline_at = None
        elif outcome == "snooze":
            self._after_snooze(task, nxt, delay)
        elif outcome == "handback":
            self._after_handback(task, nxt)
        else:
            self._after_attempt(task, nxt, retryable=outcome == "failure")

    def _flush(self, txns: list[Txn]) -> list[bool]:
        """Commit ``txns`` as an agent's report flush does (etcd/_group.py): merged, and
        when refused, split by the guards its failure branch read; whether each took."""
        took = [False] * len(txns)
        together = list(range(len(txns)))
        while len(together) > 1:
            merged, keys = merge_with_reads([txns[i] for i in together])
            result = self.db.txn(merged)
            if result.succeeded:
                for i in together:
                    took[i] = True
                return took
            split = split_refused([txns[i] for i in together], keys, result)
            assert not split.alone, "reports have no failure branch of their own"
            together = [together[j] for j in split.held]
        for i in together:
            took[i] = self.db.txn(txns[i]).succeeded
        return took

    @precondition(lambda self: any(n.agent and n.agent.running for n in self.nodes.values()))
    @rule(data=st.data(), with_stale=st.booleans())
    def workers_report_a_batch(self, data: st.DataObject, with_stale: bool) -> None:
        """Several started attempts report in one flush (a ``report`` of many outcomes),
        perhaps with a late report of an attempt that has ended: each live one is
        taken, the late one changes nothing."""
        slots = self._started_attempts()
        if not slots:
            return
        chosen = data.draw(
            st.lists(st.sampled_from(slots), min_size=1, max_size=4, unique_by=lambda s: s.task_id),
            label="batch",
        )
        reports: list[tuple[Slot, Record, str]] = []
        for slot in chosen:
            task = self.tasks[slot.task_id]
            assert slot.record.attempts == task.attempts
            outcome = data.draw(st.sampled_from(["success", "failure"]), label="outcome")
            happened: Happened
            if outcome == "success":
                returned = {"ok": task.id}
                happened = Returned(returned, len(dumps(returned).encode()))
            else:
                happened = Raised(TaskError(type="E", message="x", retryable=True))
            nxt = attempt_outcome(
                slot.record, happened, now=self.now, draw=self.rng.random, max_result_bytes=1024
            )
            assert nxt is not None
            reports.append((slot, nxt, outcome))
        txns = [plan_move(self.ks, slot, nxt) for slot, nxt, _ in reports]
        ids = {slot.task_id for slot in chosen}
        late = [(s, r) for s, r in self.stale if s.task_id not in ids]
        if with_stale and late:
            # Last in the batch: a merge that kept only some guards would let it through.
            stale_slot, _ = data.draw(st.sampled_from(late), label="late report")
            txns.append(
                plan_move(
                    self.ks, stale_slot, succeeded(stale_slot.record, result="late", now=self.now)
                )
            )
        took = self._flush(txns)
        assert took[: len(reports)] == [True] * len(reports), "a live report in a batch was lost"
        assert not any(took[len(reports) :]), (
            "a late report in a batch was applied to another attempt"
        )
        for slot, nxt, outcome in reports:
            self._reported(slot, nxt, outcome)

    def _after_handback(self, task: ModelTask, record: Record) -> None:
        """A hand-back costs no attempt and keeps the task's place, three times in a
        row; the fourth counts as a failed attempt."""
        if task.handbacks >= 3:
            assert record.error is not None
            assert record.error.type == "HandedBack"
            self._after_attempt(task, record, retryable=True)
            return
        task.handbacks += 1
        task.attempts -= 1
        assert record.state is State.PENDING, f"{task.id}: handed back to {record.state}"
        assert record.attempts == task.attempts
        assert record.order == task.order, f"{task.id} handed back lost its place"
        task.state = State.PENDING
        task.node = task.session = task.deadline_at = None

    def _after_snooze(self, task: ModelTask, record: Record, delay: float) -> None:
        """A snooze costs no attempt, and a task may take ``max_snoozes`` of them."""
        if task.snoozes >= task.max_snoozes:
            assert record.state is State.FAILED, f"{task.id} snoozed past its limit"
            assert record.error is not None
            assert record.error.type == "SnoozeLimit"
        else:
            task.snoozes += 1
            task.attempts -= 1
            expected = State.DELAYED if delay > 0 else State.PENDING
            assert record.state is expected, f"{task.id}: snoozed to {record.state}"
            task.due_at = record.due_at or 0.0
            assert task.due_at == (self.now + delay if delay > 0 else 0.0)
        assert record.snoozes == task.snoozes
        task.order, task.handbacks = None, 0
        task.state = record.state
        task.node = task.session = task.deadline_at = None

    @precondition(lambda self: bool(self.stale))
    @rule(data=st.data())
    def stale_report(self, data: st.DataObject) -> None:
        """A report for an attempt that has ended, or a cancel of a state the task has
        left, must change nothing."""
        slot, _ = data.draw(st.sampled_from(self.stale), label="stale attempt")
        before = self._state_keys()
        late = succeeded(slot.record, result="late", now=self.now)
        assert not self.db.txn(plan_move(self.ks, slot, late)).succeeded, (
            "a stale report was accepted"
        )
        assert not self.db.txn(plan_update(slot, attrs.evolve(slot.record, progress=9))).succeeded
        stale_cancel = plan_cancel(self.ks, slot, cancelled(slot.record, now=self.now))
        assert not self.db.txn(stale_cancel).succeeded, "a cancel of a stale state was accepted"
        assert self._state_keys() == before

    def _current_slot(self, tid: TaskId) -> Slot:
        ((state, kv),) = self._state_keys()[tid]
        return Slot(
            tid, kv.key, kv.create_revision, kv.mod_revision, Record.from_json(state, kv.value)
        )

    def _live_ids(self) -> list[TaskId]:
        live = (State.PENDING, State.DELAYED, State.PROCESSING)
        return sorted(t.id for t in self.tasks.values() if t.state in live)

    def _cancel(self, tid: TaskId) -> None:
        slot = self._current_slot(tid)
        record = cancelled(slot.record, now=self.now)
        assert self.db.txn(plan_cancel(self.ks, slot, record)).succeeded, "a cancel failed"
        self._record_assignments()
        self.stale.append((slot, record))
        task = self.tasks[tid]
        assert task.state is slot.record.state
        task.state, task.cancelled = State.FAILED, True
        task.node = task.session = task.deadline_at = None

    @precondition(lambda self: bool(self._live_ids()))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        """A client or an operator cancels a live task: failed at once, for good."""
        self._cancel(data.draw(st.sampled_from(self._live_ids()), label="task"))

    def _may_run(self, task: ModelTask) -> bool:
        """Whether the queue's settings let ``task`` start now (capacity aside)."""
        config = self.config
        running = [t for t in self.tasks.values() if t.state is State.PROCESSING]
        if config.paused or config.rate is not None or config.key_rate is not None:
            # (with a rate, the leader may hold back more than the model counts: it
            # counts the starts of batches that then failed, which is the safe side)
            return False
        if config.max_running is not None and len(running) >= config.max_running:
            return False
        key, limit = task.concurrency_key, config.key_max_running
        if key is not None and limit is not None:
            return sum(t.concurrency_key == key for t in running) < limit
        return True

    def _write_config(self, config: QueueConfig) -> None:
        seen = self.db.list(self.ks.queue("default"))[0]
        kv = next((k for k in seen if k.key == self.ks.queue("default")), None)
        assert self.db.txn(plan_queue_config(self.ks, "default", config, kv)).succeeded
        self.config = config

    def _set_paused(self, paused: bool) -> None:
        self._write_config(attrs.evolve(self.config, paused=paused, updated_at=self.now))

    @rule(max_running=st.sampled_from([None, 1, 2, 3]), per_key=st.sampled_from([None, 1, 2]))
    def set_limits(self, max_running: int | None, per_key: int | None) -> None:
        """An operator sets (or lowers, or lifts) the queue's concurrency limits."""
        config = attrs.evolve(
            self.config, max_running=max_running, key_max_running=per_key, updated_at=self.now
        )
        self._write_config(config)

    @rule(
        rate=st.sampled_from([None, (1, 5.0), (2, 20.0), (2, 20.0, 3.0)]),
        key_rate=st.sampled_from([None, (1, 10.0)]),
    )
    def set_rates(self, rate: tuple[float, ...] | None, key_rate: tuple[int, float] | None) -> None:
        """An operator sets (or lifts) the queue's rate limits (one with a slack: its
        window is counted that much longer)."""
        config = attrs.evolve(
            self.config,
            rate=None
            if rate is None
            else RateLimit(limit=int(rate[0]), period_s=rate[1], slack_s=(*rate, 0.0)[2]),
            key_rate=None
            if key_rate is None
            else RateLimit(limit=key_rate[0], period_s=key_rate[1]),
            updated_at=self.now,
        )
        self._write_config(config)

    def _check_rates(self, batch: Batch) -> None:
        """No window of a rate's period holds more starts than its limit, whichever
        leader made them."""
        rate, key_rate = self.config.rate, self.config.key_rate
        for slot, _ in batch.moves:
            key = self.tasks[slot.task_id].concurrency_key
            if rate is not None:
                self.starts.append(self.now)
            if key_rate is not None and key is not None:
                self.key_starts.append((self.now, key))
        if rate is not None:
            # The window counted at assignment: the period and the slack of the delivery.
            recent = [t for t in self.starts if t > self.now - rate.window_s]
            assert len(recent) <= rate.limit, f"{len(recent)} starts in {rate.window_s} s"
        if key_rate is not None:
            per_key = Counter(k for t, k in self.key_starts if t > self.now - key_rate.period_s)
            assert all(n <= key_rate.limit for n in per_key.values()), (
                f"{per_key} starts per key in {key_rate.period_s} s"
            )

    def _check_limits(self, batch: Batch) -> None:
        """After an assignment batch: the queue and each key it assigned to are within
        their limits, counted across every node (and decided with claims in flight)."""
        self._check_rates(batch)
        running = [self.tasks[s.task_id] for s in self._live_assignments()]
        config = self.config
        if config.max_running is not None:
            assert len(running) <= config.max_running, (
                f"{len(running)} running over max_running {config.max_running}"
            )
        if config.key_max_running is not None:
            for key in {self.tasks[s.task_id].concurrency_key for s, _ in batch.moves} - {None}:
                count = sum(t.concurrency_key == key for t in running)
                assert count <= config.key_max_running, (
                    f"{count} of key {key} running over {config.key_max_running}"
                )

    @rule()
    def leader_decides_twice_before_the_watch(self) -> None:
        """The leader decides again before its watch shows its last batches: its claims
        must keep capacity and limits from being spent twice."""
        assert self.view is not None
        assert self.fence is not None
        self._sync_view()
        for _ in range(2):
            decision = self.view.decide(self.now, self.policy, iter(self.rng.random, -1.0))
            for batch in decision.batches:
                result = self.db.txn(batch.plan(self.ks, self.fence))
                assert result.succeeded, f"the live leader's {batch.kind} batch failed"
                self._committed(batch, result.revision)
        self._sync_view()

    @rule(paused=st.booleans())
    def pause_queue(self, paused: bool) -> None:
        """An operator pauses or resumes the queue."""
        self._set_paused(paused)

    @rule()
    def pause_behind_the_leader(self) -> None:
        """The queue is paused after the leader decided its assignments: none may commit."""
        assert self.view is not None
        assert self.fence is not None
        self._sync_view()
        decision = self.view.decide(self.now, self.policy, iter(self.rng.random, -1.0))
        self._set_paused(True)
        refused = self._commit_until_refused(decision)
        if refused is not None:
            assert refused.kind == "assign", f"a {refused.kind} batch failed"
        self._set_paused(False)  # and resumed (pause_queue leaves it paused for a while)

    @rule()
    def cancel_behind_the_leader(self) -> None:
        """A task is cancelled after the leader decided to move it: that move must not
        commit (a cancelled task is never run, nor retried)."""
        assert self.view is not None
        assert self.fence is not None
        self._sync_view()
        decision = self.view.decide(self.now, self.policy, iter(self.rng.random, -1.0))
        moving = [b for b in decision.batches if b.moves]
        if not moving:
            for batch in decision.batches:
                self.view.settle(batch, committed_at=None)
            return
        victim = moving[0].moves[0][0].task_id
        self._cancel(victim)

        def not_the_victim(batch: Batch) -> None:
            assert victim not in batch.task_ids, f"a move of cancelled {victim} committed"

        refused = self._commit_until_refused(decision, on_commit=not_the_victim)
        if refused is not None:
            assert victim in refused.task_ids, "a batch without the cancelled task failed"

    @rule()
    def change_leader(self) -> None:
        """The leader's lease is gone; another takes over with a new fence and a fresh list."""
        assert self.fence is not None
        assert self.view is not None
        self.deposed.append((self.fence, self.view))
        self.db.lease_revoke(self._leader_lease)
        self._new_fence()
        # The old leader has not noticed yet and acts on its view at once.
        self.deposed_leader_writes()

    @precondition(lambda self: bool(self.deposed))
    @rule()
    def deposed_leader_writes(self) -> None:
        """A deposed leader acting on its old view: every write is refused."""
        fence, view = self.deposed[-1]
        before = self._state_keys()
        decision = view.decide(self.now, self.policy, iter(self.rng.random, -1.0))
        for batch in decision.batches:
            result = self.db.txn(batch.plan(self.ks, fence))
            assert not result.succeeded, f"a deposed leader's {batch.kind} batch committed"
            answer = interpret_batch(fence, result)
            assert answer == Deposed(), f"a deposed leader's batch read as {answer}"
            view.settle(batch, committed_at=None)
        assert self._state_keys() == before

    # -- the node agents and their watches -----------------------------------------------

    def _agent_relists(self, node: ModelNode) -> None:
        """A listing of the node's assignments (at start, or after compaction)."""
        agent = node.agent
        assert agent is not None
        kvs, _ = self.db.list(self.ks.assignments(node.name))
        live = {kv.key: kv for kv in kvs}
        for task_id, create_revision in list(agent.running.items()):
            kv = live.get(self.ks.state(State.PROCESSING, task_id, node.name))
            if kv is None or kv.create_revision != create_revision:
                self._agent_attempt_ends(node, task_id, create_revision)  # withdrawn
        for kv in kvs:
            self._agent_considers(node, kv)
        agent.ledger.settle()
        agent.shown = len(node.feed)

    def _agent_takes(self, node: ModelNode, revisions: int) -> None:
        """Deliver the node's feed onwards, a revision (one watch response) at a time."""
        agent = node.agent
        assert agent is not None
        for _ in range(revisions):
            if agent.shown >= len(node.feed):
                break
            revision = node.feed[agent.shown].kv.mod_revision
            while agent.shown < len(node.feed) and node.feed[agent.shown].kv.mod_revision == (
                revision
            ):
                event = node.feed[agent.shown]
                agent.shown += 1
                parsed = self.ks.parse(event.kv.key)
                assert parsed is not None
                assert parsed.task_id is not None
                if event.kind == "PUT":
                    self._agent_considers(node, event.kv)
                elif event.prev is not None:
                    # Withdrawn: the handler is cancelled and the attempt ends.
                    self._agent_attempt_ends(node, parsed.task_id, event.prev.create_revision)
            agent.ledger.settle()

    @precondition(lambda self: any(n.agent is not None for n in self.nodes.values()))
    @rule(data=st.data(), revisions=st.integers(1, 4))
    def agent_is_shown(self, data: st.DataObject, revisions: int) -> None:
        """The watch delivers the next few revisions of the node's assignments, each as
        one response (a lagging watch is one that has not been shown them yet)."""
        name = data.draw(
            st.sampled_from([n.name for n in self.nodes.values() if n.agent is not None]),
            label="node",
        )
        self._agent_takes(self.nodes[name], revisions)

    @precondition(
        lambda self: any(n.agent is not None and n.agent.shown for n in self.nodes.values())
    )
    @rule(data=st.data(), back=st.integers(1, 6), revisions=st.integers(1, 4))
    def agent_watch_repeats(self, data: st.DataObject, back: int, revisions: int) -> None:
        """The watch resumes from an earlier revision and delivers events again."""
        name = data.draw(
            st.sampled_from(
                [n.name for n in self.nodes.values() if n.agent is not None and n.agent.shown]
            ),
            label="node",
        )
        agent = self.nodes[name].agent
        assert agent is not None
        agent.shown = max(0, agent.shown - back)
        self._agent_takes(self.nodes[name], revisions)

    @precondition(lambda self: any(n.agent is not None for n in self.nodes.values()))
    @rule(data=st.data())
    def agent_relists(self, data: st.DataObject) -> None:
        """The watch fell behind compaction: the agent lists its assignments again."""
        node = data.draw(
            st.sampled_from([n for n in self.nodes.values() if n.agent is not None]),
            label="node",
        )
        self._agent_relists(node)

    # -- invariants --------------------------------------------------------------------

    @invariant()
    def one_state_each_and_model_agrees(self) -> None:
        found = self._state_keys()
        assert set(found) == set(self.tasks), "a task was lost or appeared"
        for tid, entries in found.items():
            assert len(entries) == 1, f"{tid} is in {[s.value for s, _ in entries]} at once"
            state, kv = entries[0]
            task = self.tasks[tid]
            assert state is task.state, f"{tid} is {state.value}, the model says {task.state.value}"
            record = Record.from_json(state, kv.value)
            assert record.attempts == task.attempts, (
                f"{tid} counts {record.attempts} attempts, the model {task.attempts}"
            )
            assert record.attempts <= task.max_attempts, f"{tid} over its max_attempts"
            assert record.snoozes == task.snoozes <= task.max_snoozes, (
                f"{tid} counts {record.snoozes} snoozes, the model {task.snoozes}"
            )
            if state is State.COMPLETED:
                assert kv.version == 1, f"{tid}'s result was written {kv.version} times"
                assert task.completions == 1
            if task.cancelled:
                assert record.error is not None
                assert record.error.type == "Cancelled", f"{tid} was cancelled, not {record.error}"

    @invariant()
    def unique_keys_held_once(self) -> None:
        """Never two live tasks with one unique key, and each holds its key's guard."""
        live_states = (State.PENDING, State.DELAYED, State.PROCESSING)
        holders: dict[str, list[TaskId]] = {}
        for tid, entries in self._state_keys().items():
            key = self.tasks[tid].unique_key
            if key is not None and entries[0][0] in live_states:
                holders.setdefault(key, []).append(tid)
        guards = {kv.key: Guard.from_kv(kv) for kv in self.db.list(self.ks.uniques())[0]}
        for key, tids in holders.items():
            assert len(tids) == 1, f"live tasks {tids} share unique key {key}"
            guard = guards.get(self.ks.unique(key))
            assert guard is not None, f"{tids[0]} is live without its guard"
            assert guard.task_id == tids[0], f"{key}'s guard names {guard.task_id}, not {tids[0]}"
            assert guard.until_at is None

    @invariant()
    def prefetch_within_concurrency(self) -> None:
        """No worker holds more deliveries than its concurrency; none waits while its
        worker has room; every attempt running on a node is in one window, once."""
        for node in self.nodes.values():
            agent = node.agent
            if agent is None:
                continue
            for window in agent.windows:
                assert window.outstanding <= window.concurrency, (
                    f"{node.name}: a worker holds {window.outstanding} deliveries "
                    f"> its concurrency {window.concurrency}"
                )
                assert not window.waiting or window.outstanding == window.concurrency, (
                    f"{node.name}: a delivery waits while its worker has room"
                )
            held = sum(w.outstanding + w.waiting for w in agent.windows)
            assert held == len(agent.running) == len(agent.routed), (
                f"{node.name}: {held} deliveries for {len(agent.running)} running attempts"
            )

    @invariant()
    def capacity_holds(self) -> None:
        per_node: Counter[tuple[str, int | None]] = Counter()
        for slot in self._live_assignments():
            per_node[(slot.record.node or "", slot.record.session)] += 1
        for (name, session), count in per_node.items():
            node = self.nodes[name]
            if node.alive and node.session == session:
                assert count <= node.capacity, f"{name} holds {count} > {node.capacity}"

    def teardown(self) -> None:
        cleanup: Any = getattr(self.db, "call", None)
        if cleanup is not None:
            cleanup(
                "/kv/deleterange",
                {"key": _b64(self.ks.prefix), "range_end": _b64(self.ks.prefix[:-1] + "0")},
            )


def _b64(text: str) -> str:
    import base64

    return base64.b64encode(text.encode()).decode()
