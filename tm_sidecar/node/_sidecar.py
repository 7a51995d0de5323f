"""The sidecar: one per host. Holds the session, runs the node agent, leads when elected,
and offers the in-process API that the socket server wraps."""

from __future__ import annotations

import functools
import itertools
import logging
import os
import random
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import attrs
import trio

from .. import __version__
from .._errors import (
    Compacted,
    EtcdError,
    EtcdFull,
    EtcdUnavailable,
    InvalidRequest,
    LeaseLost,
    LeaseNotFound,
    NotLeader,
    PayloadTooLarge,
    QueueFull,
    TaskNotFound,
    Unavailable,
)
from .._hooks import Hooks
from ..core import (
    JSON,
    Compare,
    Guard,
    Keyspace,
    KeyValue,
    LeaderPolicy,
    NodeId,
    NodeInfo,
    Put,
    QueueConfig,
    Range,
    RangeResult,
    Record,
    Records,
    Schedule,
    Slot,
    State,
    Takeover,
    TaskEvent,
    TaskId,
    TaskOptions,
    TaskSpec,
    Txn,
    TxnResult,
    cancelled,
    check_name,
    dumps,
    first_slot,
    initial_record,
    make_task_id,
    plan_cancel,
    plan_create,
    plan_queue_config,
    schedule_from_request,
    with_limits,
)
from ..core import takeover as core_takeover
from ..etcd import Etcd, retrying
from ..etcd._feed import Feed
from ..etcd._group import GroupCommit, txn_group
from ..etcd._session import RetentionLeases, Session, close_session, open_session, run_keepalive
from ..leader._election import resign, stand, wait_to_lead
from ..leader._leading import LeaderSettings, LeaderState, run_leader
from ._agent import AgentState, Handler, Registration, Registry, run_agent
from ._hub import EventHub, Subscription

log = logging.getLogger("tm_sidecar")

FINAL_STATES = (State.COMPLETED, State.FAILED)
#: How often a cancel reads and tries again when the task moves under it.
CANCEL_TRIES = 10
#: How often a unique create reads the key's holder and tries again.
UNIQUE_TRIES = 10
_FULL = (
    "etcd's database is full (its NOSPACE alarm is raised): new tasks are refused until an "
    "operator frees space with `tmctl recover`; the tasks already accepted wait, nothing is lost"
)


@attrs.frozen(kw_only=True)
class SidecarSettings:
    """Everything a sidecar needs besides its etcd connection."""

    node_id: NodeId = attrs.field(
        factory=lambda: NodeId(socket.gethostname().split(".")[0] or "node")
    )
    namespace: str = "default"
    root: str = "/tm/"
    lease_ttl_s: int = attrs.field(default=5, validator=attrs.validators.ge(2))
    retention_s: float = 24 * 3600.0
    max_payload_bytes: int = 256 * 1024
    max_live_tasks: int = 1_000_000
    #: etcd's database quota, and the part of it new tasks may fill: the rest is
    #: headroom for the tasks already accepted (assignment, outcome, the payload's lease).
    quota_bytes: int = attrs.field(default=2 * 1024**3, validator=attrs.validators.gt(0))
    quota_fraction: float = attrs.field(
        default=0.8, validator=[attrs.validators.gt(0.0), attrs.validators.le(1.0)]
    )
    grace_s: float = 5.0
    requeue_stalled: bool = True
    compact_interval_s: float = 300.0
    #: A create that etcd has not committed within this long fails with
    #: ``etcd_unavailable`` (the task may exist or not: repeat it with its task id).
    create_deadline_s: float = attrs.field(default=3.0, validator=attrs.validators.gt(0.0))

    @property
    def keyspace(self) -> Keyspace:
        """The key layout of this namespace."""
        return Keyspace(namespace=self.namespace, root=self.root)


@attrs.frozen(kw_only=True)
class TaskInfo:
    """A task as it stands: its spec, and its state record (None if expired)."""

    spec: TaskSpec
    state: State | None
    record: Record | None
    revision: int
    #: The state key as read (its create revision names the incarnation), if any.
    kv: KeyValue | None = None

    @property
    def final(self) -> bool:
        """Whether the task has finished (completed or failed for good)."""
        return self.state in FINAL_STATES


@attrs.frozen
class Created:
    """What a create made: a new task, or (``existing``) the live task that holds the
    unique key asked for."""

    spec: TaskSpec
    existing: bool


@attrs.define(eq=False)
class Sidecar:
    """A running sidecar. ``await nursery.start(sidecar.run)``, then use the API."""

    etcd: Etcd
    settings: SidecarSettings = SidecarSettings()
    clock: Callable[[], float] = time.time
    rng: random.Random = attrs.Factory(random.Random)
    #: Parses the records the hub, the agent and the leader see: once for all three.
    records: Records = attrs.Factory(Records)
    ks: Keyspace = attrs.field(init=False)
    registry: Registry = attrs.field(init=False)
    feed: Feed = attrs.field(init=False)
    hub: EventHub = attrs.field(init=False)
    #: What the sidecar tells its observers (metrics).
    hooks: Hooks = attrs.Factory(Hooks)
    agent: AgentState = attrs.field(init=False)
    leader: LeaderState = attrs.field(init=False)
    retention: RetentionLeases = attrs.field(init=False)
    creates: GroupCommit[Txn, TxnResult] = attrs.field(init=False)
    session: Session | None = None
    is_leader: bool = False
    _registered: trio.Event = attrs.Factory(trio.Event)
    _node_dirty: trio.Event = attrs.Factory(trio.Event)
    _ids: itertools.count[int] = attrs.Factory(itertools.count)
    _live_tasks: int = 0
    _created: int = 0
    _db_size: int = 0
    _written: int = 0  # bytes created since _db_size was read
    _nospace: bool = False  # etcd's NOSPACE alarm is raised
    _started_at: float = 0.0
    _stopping: trio.CancelScope | None = None
    role_changed: trio.Event = attrs.Factory(trio.Event)
    depths: dict[str, int] = attrs.Factory(dict)
    node_count: int = 0
    #: Every queue's settings, as last read (for metrics and status).
    queue_configs: dict[str, QueueConfig] = attrs.Factory(dict)
    #: What this sidecar did for its clients, by kind (cancelled, ...), for metrics.
    counters: Counter[str] = attrs.Factory(Counter)

    def __attrs_post_init__(self) -> None:
        self.ks = self.settings.keyspace
        self.agent = AgentState(hooks=self.hooks)
        self.leader = LeaderState(hooks=self.hooks)
        # The event is replaced at each registration: look it up when capacity changes.
        self.registry = Registry(on_change=lambda: self._node_dirty.set())
        # One watch for the whole sidecar: the hub, the agent and the leader tap it.
        self.feed = Feed(self.etcd, self.ks)
        self.hub = EventHub(self.etcd, self.ks, self.feed, records=self.records)
        self.retention = RetentionLeases(self.etcd, self.settings.retention_s)
        # Creates from every client go to etcd together: a task is two keys and a compare.
        self.creates = txn_group(self.etcd, ops_per_item=2, name="create")
        # Copies of tasks created here are dropped when they finish (ids can come back).
        self.hub.subscribe(None, deliver=self._finished)
        self._started_at = self.clock()

    @property
    def node_id(self) -> NodeId:
        """This sidecar's node id."""
        return self.settings.node_id

    # -- running ---------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[Sidecar] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run until cancelled; ready once registered with a live session, with each
        service started in the order they depend on each other: the event hub and the
        create batcher, the admission counts; then per session the keep-alive, the
        registration, the agent (once it holds its assignments) and the election (once
        its candidate key is in place)."""
        with trio.CancelScope() as self._stopping:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.feed.run)
                await nursery.start(self.hub.run)
                await nursery.start(self.creates.run)
                await nursery.start(self._run_limits)
                first = True
                while True:
                    session = await open_session(self.etcd, self.settings.lease_ttl_s)
                    self.session = session
                    try:
                        async with trio.open_nursery() as epoch:
                            await epoch.start(run_keepalive, self.etcd, session)
                            await self._register(session)
                            await epoch.start(self._run_registration, session)
                            await epoch.start(
                                functools.partial(
                                    run_agent,
                                    self.etcd,
                                    self.ks,
                                    self.node_id,
                                    session,
                                    self.registry,
                                    self.retention,
                                    self.agent,
                                    one_watch=self.feed,
                                    records=self.records,
                                )
                            )
                            await epoch.start(self._run_election, session)
                            if first:
                                first = False
                                log.info(
                                    "sidecar ready node=%s namespace=%s",
                                    self.node_id,
                                    self.settings.namespace,
                                )
                                task_status.started(self)
                    except* LeaseLost as group:
                        log.error("session lost (%s): starting a new one", group.exceptions[0])
                    finally:
                        self._registered = trio.Event()
                        await close_session(self.etcd, session)

    def stop(self) -> None:
        """Cancel :meth:`run` (the cleanup is shielded and bounded); attempts still
        running are handed back: pending at once, without counting."""
        self.agent.handing_back = True
        if self._stopping is not None:
            self._stopping.cancel()

    async def drain(self, timeout_s: float) -> bool:
        """Take no new tasks and wait up to ``timeout_s`` for running ones; True if idle.

        What still runs when the sidecar then stops is handed back without counting.
        """
        self.registry.accepting = False
        self.agent.handing_back = True
        self._node_dirty.set()
        with trio.move_on_after(timeout_s):
            await self.agent.idle.wait()
            return True
        return not self.agent.running

    async def _register(self, session: Session) -> None:
        info = NodeInfo(
            id=self.node_id,
            session=session.lease,
            capacity=self.registry.capacity(),
            host=socket.gethostname(),
            pid=os.getpid(),
            version=__version__,
            started_at=self._started_at,
        )
        self._node_dirty = trio.Event()
        try:
            await retrying(
                lambda: self.etcd.put(
                    self.ks.node(self.node_id), info.to_json(), lease=session.lease
                ),
                what="node registration",
            )
        except LeaseNotFound as exc:
            session.lost.set()
            raise LeaseLost(f"lease {session.lease:x} is gone") from exc
        self._registered.set()

    async def _run_registration(
        self, session: Session, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Register the node again whenever its capacity changes."""
        task_status.started()
        while True:
            await self._node_dirty.wait()
            await self._register(session)

    async def _run_election(
        self, session: Session, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Stand for election, lead when elected, and stand again after each term;
        started once the candidate key is in place."""
        settings = LeaderSettings(
            policy=LeaderPolicy(
                grace_s=self.settings.grace_s, requeue_stalled=self.settings.requeue_stalled
            ),
            compact_interval_s=self.settings.compact_interval_s,
        )
        candidacy = await stand(self.etcd, self.ks, session, self.node_id)
        task_status.started()
        while True:
            fence = await wait_to_lead(self.etcd, self.ks, candidacy)
            if not session.trusted():
                await trio.sleep(0.1)
                candidacy = await stand(self.etcd, self.ks, session, self.node_id)
                continue
            self._set_role(True)
            log.info("became leader node=%s", self.node_id)
            try:
                async with trio.open_nursery() as term:
                    await term.start(
                        functools.partial(
                            run_leader,
                            self.etcd,
                            self.ks,
                            fence,
                            session,
                            self.retention,
                            settings,
                            self.leader,
                            clock=self.clock,
                            rng=self.rng,
                            one_watch=self.feed,
                            records=self.records,
                        )
                    )
                    log.info("leading: the view is listed")
            except* NotLeader as group:
                log.warning("stepped down: %s", _first(group))
            except* (EtcdError, Unavailable, ValueError, KeyError) as group:
                # A refusal by etcd or a bad record: step down rather than take the node
                # with us; another candidate (or we, later) will lead.
                log.error("leader failed, stepping down: %r", _first(group))
                await trio.sleep(1.0)
            finally:
                self._set_role(False)
                await resign(self.etcd, fence)
            if session.lost.is_set():
                raise LeaseLost("lease lost while leading")
            await session_trusted(session)
            candidacy = await stand(self.etcd, self.ks, session, self.node_id)

    def _set_role(self, leader: bool) -> None:
        if leader != self.is_leader:
            self.is_leader = leader
            self.role_changed.set()
            self.role_changed = trio.Event()

    async def _run_limits(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep the live-task count and etcd's size fresh for the admission checks;
        started once they have been read (or tried) the first time."""
        starting = True
        while True:
            created_before = self._created
            try:
                for s in State:
                    r = Range(self.ks.state_prefix(s), prefix=True, count_only=True)
                    self.depths[s.value] = (await self.etcd.range(r)).count
                nodes = Range(self.ks.nodes(), prefix=True, count_only=True)
                self.node_count = (await self.etcd.range(nodes)).count
                self.queue_configs = await self.queues()
                # Creates that raced the count may be missing from it: count them again
                # (an over-count only makes the limit stricter for a second).
                self._live_tasks = sum(
                    self.depths[s.value] for s in (State.PENDING, State.DELAYED, State.PROCESSING)
                ) + (self._created - created_before)
                written_before = self._written
                status = await self.etcd.status()
                # The space in use (freed pages are reused), not the file's size, which
                # shrinks only when an operator defragments.
                self._db_size = int(status.get("dbSizeInUse") or status.get("dbSize") or 0)
                self._written -= written_before
                self._nospace = any("NOSPACE" in str(e) for e in status.get("errors") or ())
            except Unavailable as exc:
                log.debug("limit refresh failed: %s", exc)
            if starting:
                starting = False
                task_status.started()
            await trio.sleep(1.0)

    # -- the API ---------------------------------------------------------------------

    def _finished(self, event: TaskEvent) -> None:
        if is_final(event):
            self.agent.recent.forget(event.task_id)

    def new_task_id(self) -> TaskId:
        """A fresh, time-ordered task id."""
        return make_task_id(int(self.clock() * 1000), next(self._ids), self.rng.getrandbits(32))

    async def create(
        self,
        payload: JSON,
        *,
        options: TaskOptions | None = None,
        run_at: float | None = None,
        task_id: TaskId | None = None,
    ) -> TaskSpec:
        """Create and commit a task; once this returns, the task is durable in etcd.

        Raises :class:`PayloadTooLarge`, :class:`QueueFull` or :class:`InvalidRequest`
        for what cannot be accepted, and :class:`EtcdUnavailable` when etcd cannot be
        reached within ``create_deadline_s`` (the task may then exist or not: repeat the
        call with the same ``task_id`` to be sure, it is idempotent). With a
        ``unique_key`` whose task is live, answers that task (see :meth:`create_task`).
        """
        created = await self.create_task(payload, options=options, run_at=run_at, task_id=task_id)
        return created.spec

    async def create_task(
        self,
        payload: JSON,
        *,
        options: TaskOptions | None = None,
        run_at: float | None = None,
        task_id: TaskId | None = None,
    ) -> Created:
        """:meth:`create`, saying whether the task is new or, for a ``unique_key`` held
        by a live task (or one inside its ``unique_for_s`` window), that existing task.

        Raises :class:`EtcdUnavailable` once ``create_deadline_s`` has passed without an
        answer from etcd, however many tries that took.
        """
        deadline = self.settings.create_deadline_s
        with trio.move_on_after(deadline):
            return await self._create_task(payload, options, run_at, task_id)
        raise EtcdUnavailable(
            f"etcd did not commit the create within {deadline} s (create_deadline_s): "
            "the task may exist or not, repeat the create with its task_id to be sure"
        )

    async def _create_task(
        self,
        payload: JSON,
        options: TaskOptions | None,
        run_at: float | None,
        task_id: TaskId | None,
    ) -> Created:
        options = options or TaskOptions()
        if run_at is not None and not (isinstance(run_at, int | float) and run_at == run_at):
            raise InvalidRequest("run_at must be a UTC epoch time in seconds")
        try:
            encoded = dumps(payload)
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"the payload is not JSON: {exc}") from exc
        if len(encoded.encode()) > self.settings.max_payload_bytes:
            raise PayloadTooLarge(
                f"payload of {len(encoded.encode())} bytes is over the limit of "
                f"{self.settings.max_payload_bytes} bytes (max_payload_bytes)"
            )
        if self._live_tasks >= self.settings.max_live_tasks:
            raise QueueFull(
                f"namespace {self.settings.namespace!r} holds {self._live_tasks} live tasks, "
                f"the limit is {self.settings.max_live_tasks} (max_live_tasks)"
            )
        self._admit_size()
        now = self.clock()
        spec = TaskSpec(
            id=task_id or self.new_task_id(),
            payload=payload,
            options=options,
            created_at=now,
            run_at=run_at,
        )
        record = initial_record(
            Record(state=State.PENDING, options=options, since_at=now), now=now, run_at=run_at
        )
        if options.unique_key is not None:
            return await self._create_unique(spec, record, encoded)
        txn = plan_create(self.ks, spec, record)
        try:
            try:
                result = await self.creates.submit(txn)
            except EtcdUnavailable:
                # Once more: a repeat is safe, and tells whether the first one committed.
                result = await self.creates.submit(txn)
        except EtcdFull as exc:
            self._nospace = True
            raise EtcdFull(_FULL) from exc
        self._written += sum(len(op.key) + len(getattr(op, "value", "")) for op in txn.success)
        if not result.succeeded:
            return Created(await self._taken(spec, payload, txn, encoded), existing=False)
        self._created_one(spec, encoded)
        return Created(spec, existing=False)

    def _created_one(self, spec: TaskSpec, encoded: str) -> None:
        self._live_tasks += 1
        self._created += 1
        self.agent.recent.add(spec, encoded)

    async def _taken(
        self, spec: TaskSpec, payload: JSON, create: Txn | None, encoded: str
    ) -> TaskSpec:
        """The create of ``spec`` found its id taken: a repeat of the same create, an
        expired task's payload (taken again with ``create``'s writes, when given), or
        another task."""
        existing, found, _ = await self._read(spec.id)
        if existing is not None and not found and create is not None:
            # An expired task's payload, not yet swept: the id is free again. Take it
            # if that payload is still the one read, which no state had at that
            # revision (nothing gives a state to such a task but a create, and a
            # create rewrites the payload).
            retake = Txn(
                compare=(Compare.modified_at(existing.key, existing.mod_revision),),
                success=create.success,
            )
            if (await self.creates.submit(retake)).succeeded:
                self._created_one(spec, encoded)
                return spec
            existing, found, _ = await self._read(spec.id)
        if existing is None or TaskSpec.from_json(existing.value).payload != payload:
            raise InvalidRequest(f"task id {spec.id} is taken")
        return TaskSpec.from_json(existing.value)

    async def _create_unique(self, spec: TaskSpec, record: Record, encoded: str) -> Created:
        """Create a task that takes its unique key's guard, or answer the key's holder.

        Not batched with other creates: the failure branch tells who holds the key.
        """
        takeover: Takeover | None = None
        for _ in range(UNIQUE_TRIES):
            txn = plan_create(self.ks, spec, record, takeover=takeover)
            try:
                result = await retrying(lambda: self.etcd.txn(txn), what="unique create")  # noqa: B023
            except EtcdFull as exc:
                self._nospace = True
                raise EtcdFull(_FULL) from exc
            if result.succeeded:
                self._written += sum(
                    len(op.key) + len(getattr(op, "value", "")) for op in txn.success
                )
                self._created_one(spec, encoded)
                return Created(spec, existing=False)
            mine, guard_kvs = result.ranges[0].kvs, result.ranges[1].kvs
            if mine:
                # (An expired task's leftover payload under a unique key waits for the
                # sweep: taking it again would bypass the key's guard.)
                same = await self._taken(spec, spec.payload, None, encoded)
                return Created(same, existing=False)  # this very create, repeated
            if not guard_kvs:
                takeover = None  # released meanwhile: it is free
                continue
            guard = Guard.from_kv(guard_kvs[0])
            try:
                holder = await self.get(guard.task_id)
            except TaskNotFound:
                holder = None
            at = None
            if holder is not None and holder.state is not None and holder.kv is not None:
                at = (holder.state, holder.kv)
            takeover = core_takeover(self.ks, guard, at, self.clock())
            if takeover is None:
                self.counters["unique_existing"] += 1
                if holder is None:  # finished inside its window, and its record expired
                    holder_spec = TaskSpec(id=guard.task_id, payload=None, created_at=0.0)
                    return Created(holder_spec, existing=True)
                return Created(holder.spec, existing=True)
        raise Unavailable(f"unique key {spec.options.unique_key} is contended: try again")

    def _admit_size(self) -> None:
        """Refuse a new task when etcd is full, or when it would leave too little room for
        the tasks already accepted to finish."""
        if self._nospace:
            raise EtcdFull(_FULL)
        used = self._db_size + self._written
        allowed = self.settings.quota_bytes * self.settings.quota_fraction
        if used >= allowed:
            raise QueueFull(
                f"etcd's database holds about {used} bytes of its {self.settings.quota_bytes}-"
                f"byte quota; new tasks may fill {self.settings.quota_fraction:.0%} of it "
                "(quota_fraction), the rest is kept for the tasks already accepted: "
                "free space with `tmctl recover`, or raise etcd's quota (etcd_quota)"
            )

    def register(
        self, handler: Handler, *, queue: str = "default", concurrency: int = 1
    ) -> Registration:
        """Run tasks of ``queue`` on ``handler``, up to ``concurrency`` at once."""
        return self.registry.register(queue, handler, concurrency)

    def subscribe(
        self,
        task_id: TaskId | None = None,
        deliver: Callable[[TaskEvent], None] | None = None,
        *,
        on_gap: Callable[[dict[str, Any]], None] | None = None,
    ) -> Subscription:
        """Events of one task, or of all; they start with the next change. With
        ``deliver``, the hub calls it with each event (it must not block) instead; with
        ``on_gap``, the hub tells it when it missed events itself (a ``gap``)."""
        return self.hub.subscribe(task_id, deliver, on_gap=on_gap)

    def _info(self, spec: TaskSpec, kvs: list[KeyValue], revision: int) -> TaskInfo:
        for kv in kvs:
            parsed = self.ks.parse(kv.key)
            if parsed is not None and parsed.state is not None and parsed.task_id == spec.id:
                return TaskInfo(
                    spec=spec,
                    state=parsed.state,
                    record=Record.from_json(parsed.state, kv.value),
                    revision=revision,
                    kv=kv,
                )
        return TaskInfo(spec=spec, state=None, record=None, revision=revision)

    async def get(self, task_id: TaskId) -> TaskInfo:
        """The task and where it stands (linearizable reads of its own keys, at one
        revision, so that a task moving meanwhile is seen in one place or the other)."""
        existing, found, at = await self._read(task_id)
        if existing is None:
            raise TaskNotFound(f"no task {task_id} (it may have expired)")
        if not found:
            # A payload with no state key left: the task finished and its record expired.
            raise TaskNotFound(f"no task {task_id} (it has expired)")
        return self._info(TaskSpec.from_json(existing.value), found, at)

    async def _read(self, task_id: TaskId) -> tuple[KeyValue | None, list[KeyValue], int]:
        """The task's payload key and its state keys, all as of one revision (the third).

        Plain ranges, not a transaction: a full etcd refuses every transaction, reads too.
        The first read fixes the revision the others read at.
        """
        for _ in range(3):
            first = await self.etcd.range(Range(self.ks.task(task_id)))
            if not first.kvs:
                return None, [], first.revision
            at = first.revision
            states = (State.PENDING, State.DELAYED, State.COMPLETED, State.FAILED)
            reads = [Range(self.ks.state(state, task_id), revision=at) for state in states]
            # Assignments are under their node: read them all, keep this task's.
            reads.append(Range(self.ks.state_prefix(State.PROCESSING), prefix=True, revision=at))
            answers = await self._ranges(reads)
            if answers is None:
                continue  # compacted between the reads: read again at a newer revision
            found = [kv for a in answers for kv in a.kvs if kv.key.rsplit("/", 1)[-1] == task_id]
            return first.kvs[0], found, at
        raise EtcdUnavailable(f"could not read task {task_id} at one revision")

    async def _ranges(self, reads: list[Range]) -> list[RangeResult] | None:
        """Several ranges at once; None if their revision was compacted meanwhile."""
        answers: list[RangeResult] = []

        async def read(r: Range) -> None:
            answers.append(await self.etcd.range(r))

        compacted = False
        try:
            async with trio.open_nursery() as nursery:
                for r in reads:
                    nursery.start_soon(read, r)
        except* Compacted:
            compacted = True
        return None if compacted else answers

    async def wait(self, task_id: TaskId, timeout_s: float | None = None) -> TaskInfo:
        """Wait until the task is completed or failed for good; answers how it ended."""
        with self.hub.subscribe(task_id, gaps=True) as sub:
            info = await self.get(task_id)
            if info.final:
                return info
            with trio.fail_after(timeout_s) if timeout_s is not None else trio.CancelScope():
                async for event in sub:
                    if is_final(event):
                        return await self.get(task_id)
                    if event.kind == "gap":
                        # The hub missed events: the outcome may be among them.
                        info = await self.get(task_id)
                        if info.final:
                            return info
        raise Unavailable("event stream ended")  # pragma: no cover - the hub runs until stopped

    async def cancel(self, task_id: TaskId, *, message: str = "cancelled") -> tuple[bool, TaskInfo]:
        """Cancel a task: answers (whether this call cancelled it, the task afterwards).

        A pending or delayed task fails at once with ``Cancelled``, for good; a running
        one too, and its node cancels the handler when it sees its assignment go. A task
        that has finished is left as it is (``False``, and how it ended). Raises
        :class:`TaskNotFound` for an unknown or expired task.
        """
        for _ in range(CANCEL_TRIES):
            info = await self.get(task_id)
            if info.final or info.kv is None or info.record is None or info.state is None:
                return False, info
            kv = info.kv
            slot = Slot(task_id, kv.key, kv.create_revision, kv.mod_revision, info.record)
            record = cancelled(info.record, now=self.clock(), message=message)
            try:
                txn = plan_cancel(self.ks, slot, record, lease=await self.retention.current())
                result = await self.etcd.txn(txn)
            except LeaseNotFound:
                self.retention.forget()
                continue
            if result.succeeded:
                self.counters["cancelled"] += 1
                log.info("cancelled task=%s (was %s)", task_id, info.state.value)
                return True, await self.get(task_id)
            # It moved meanwhile (assigned, promoted, finished): look again.
        raise Unavailable(f"task {task_id} kept moving: could not cancel it, try again")

    # -- queues --

    async def queues(self) -> dict[str, QueueConfig]:
        """Every queue that has settings (paused, limits), by name."""
        kvs, _ = await self.etcd.list_prefix(self.ks.queues())
        out = {}
        for kv in kvs:
            parsed = self.ks.parse(kv.key)
            if parsed is not None and parsed.name is not None:
                out[parsed.name] = QueueConfig.from_json(kv.value)
        return out

    async def update_queue(
        self, queue: str, change: Callable[[QueueConfig], QueueConfig]
    ) -> QueueConfig:
        """Change a queue's settings (read, ``change``, write if unchanged meanwhile)."""
        return await update_queue(self.etcd, self.ks, queue, change, now=self.clock())

    async def pause_queue(self, queue: str) -> QueueConfig:
        """The leader assigns nothing more from ``queue`` (creates still land, running
        tasks finish) until :meth:`resume_queue`."""
        config = await self.update_queue(queue, lambda c: attrs.evolve(c, paused=True))
        log.info("queue %s paused", queue)
        return config

    async def resume_queue(self, queue: str) -> QueueConfig:
        """Assign from ``queue`` again."""
        config = await self.update_queue(queue, lambda c: attrs.evolve(c, paused=False))
        log.info("queue %s resumed", queue)
        return config

    async def set_limits(self, queue: str, changes: dict[str, JSON]) -> QueueConfig:
        """Set (or, with None, lift) a queue's cluster-wide limits: ``max_running``,
        ``key_max_running``, ``rate`` and ``key_rate`` ({limit, period_s}). Raises
        :class:`InvalidRequest` for a bad name or value."""
        try:
            with_limits(QueueConfig(), changes)  # checked before anything is read
        except (ValueError, TypeError) as exc:
            raise InvalidRequest(str(exc)) from exc
        config = await self.update_queue(queue, lambda c: with_limits(c, changes))
        log.info("queue %s limits %s", queue, config.to_json())
        return config

    # -- schedules --

    async def schedule(self, fields: dict[str, Any]) -> Schedule:
        """Create or replace a schedule (``name``, ``payload``, ``options``, ``cron`` or
        ``every_s``, ``timezone``, ``missed``, ``max_catch_up``, ``grace_s``). Its next
        slot is the first after now; a replaced one keeps its count of fired slots.
        Raises :class:`InvalidRequest` for a bad one."""
        now = self.clock()
        try:
            new = schedule_from_request(fields, now=now)
        except (ValueError, TypeError, KeyError) as exc:
            raise InvalidRequest(f"bad schedule: {exc}") from exc

        def replace(old: Schedule | None) -> Schedule:
            if old is None:
                return new
            return attrs.evolve(
                new, fired=old.fired, last_slot_at=old.last_slot_at, last_task_id=old.last_task_id
            )

        schedule = await update_schedule(self.etcd, self.ks, new.name, replace)
        assert schedule is not None
        log.info("schedule %s set: next slot at %.3f", schedule.name, schedule.next_at)
        return schedule

    async def schedules(self) -> list[Schedule]:
        """Every schedule of the namespace."""
        kvs, _ = await self.etcd.list_prefix(self.ks.schedules())
        return [Schedule.from_json(kv.value) for kv in kvs]

    async def pause_schedule(self, name: str, paused: bool = True) -> Schedule:
        """Fire nothing more until resumed; resuming starts with the first slot after
        now (the slots of the pause are not missed ones: none of them fires)."""
        change = pausing(name, paused, now=self.clock())
        schedule = await update_schedule(self.etcd, self.ks, name, change)
        assert schedule is not None
        return schedule

    async def delete_schedule(self, name: str) -> bool:
        """Delete a schedule (the tasks it made stay); False if there was none."""
        return bool(await self.etcd.delete(self.ks.schedule(check_name("schedule", name))))

    def status(self) -> dict[str, Any]:
        """What this sidecar is doing, for logs and status lines."""
        view = self.leader.view
        return {
            "node": self.node_id,
            "leader": self.is_leader,
            "running": len(self.agent.running),
            "completed": self.agent.completed,
            "capacity": self.registry.capacity(),
            "depth": view.depth() if view is not None else None,
        }


async def update_queue(
    etcd: Etcd,
    ks: Keyspace,
    queue: str,
    change: Callable[[QueueConfig], QueueConfig],
    *,
    now: float,
) -> QueueConfig:
    """Read a queue's settings, change them, and write them back if nobody else did
    meanwhile (else read again). Shared by the sidecar and tmctl."""
    check_name("queue", queue)
    while True:
        seen = await etcd.get(ks.queue(queue))
        current = QueueConfig.from_json(seen.value) if seen is not None else QueueConfig()
        config = attrs.evolve(change(current), updated_at=now)
        if (await etcd.txn(plan_queue_config(ks, queue, config, seen))).succeeded:
            return config


def pausing(name: str, paused: bool, *, now: float) -> Callable[[Schedule | None], Schedule]:
    """The change that pauses a schedule, or resumes it from its first slot after now
    (the slots of a pause are not missed ones: none of them fires)."""

    def change(old: Schedule | None) -> Schedule:
        if old is None:
            raise InvalidRequest(f"no schedule {name!r}")
        if paused:
            return attrs.evolve(old, paused=True)
        resumed = attrs.evolve(old, paused=False)
        return attrs.evolve(resumed, next_at=first_slot(resumed, now))

    return change


async def update_schedule(
    etcd: Etcd,
    ks: Keyspace,
    name: str,
    change: Callable[[Schedule | None], Schedule],
) -> Schedule | None:
    """Read a schedule (None: there is none), change it, and write it back if nobody
    (the leader firing it, say) wrote it meanwhile; else read again."""
    check_name("schedule", name)
    key = ks.schedule(name)
    while True:
        seen = await etcd.get(key)
        schedule = change(Schedule.from_json(seen.value) if seen is not None else None)
        txn = Txn(
            compare=(Compare.modified_at(key, seen.mod_revision if seen is not None else 0),),
            success=(Put(key, schedule.to_json()),),
        )
        if (await etcd.txn(txn)).succeeded:
            return schedule


def is_final(event: TaskEvent) -> bool:
    """Whether the event is the task's last: completed, or failed for good."""
    return event.kind == "completed" or (event.kind == "failed" and not event.will_retry)


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first exception in a (nested) group: what a log line should tell."""
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first


async def session_trusted(session: Session) -> None:
    """Wait until the session is trusted again (a keep-alive got through)."""
    while not session.trusted():
        if session.lost.is_set():
            raise LeaseLost("lease lost")
        await trio.sleep(0.1)
