"""The sidecar: one per host. Builds its services and starts them in the order they
depend on each other, and offers the in-process API that the socket server and the
dashboard wrap; each part of that API is its own module (``_creates``, ``_reads``,
``_queues``, ``_admission``, ``_membership``), and ``Sidecar``'s methods hand over.

The values of the API (``_values``) and the queue and schedule updates shared with
tmctl (``_queues``) are re-exported here, since other parts import them from here.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import attrs
import trio

from .._hooks import Hooks
from ..core import (
    JSON,
    Keyspace,
    NodeId,
    NodeInfo,
    QueueConfig,
    Records,
    Schedule,
    TaskEvent,
    TaskId,
    TaskOptions,
    TaskSpec,
    Txn,
    TxnResult,
    etcd_version_warning,
)
from ..etcd import Etcd
from ..etcd._feed import Feed
from ..etcd._group import GroupCommit, txn_group
from ..etcd._session import RetentionLeases, Session
from ..leader._leading import LeaderState
from ._admission import Admission
from ._agent_state import AgentState
from ._bulk import BulkCreates
from ._creates import Creates
from ._handlers import Handler
from ._hub import EventHub, Subscription
from ._membership import Membership
from ._queues import QueueOps, pausing, update_queue, update_schedule
from ._reads import TaskReads
from ._registry import Registration, Registry
from ._remote import RemoteHandler
from ._values import FINAL_STATES, Created, NewTask, SidecarSettings, TaskInfo, is_final

__all__ = [
    "FINAL_STATES",
    "Created",
    "NewTask",
    "Sidecar",
    "SidecarSettings",
    "TaskInfo",
    "is_final",
    "pausing",
    "update_queue",
    "update_schedule",
]

log = logging.getLogger("tm_sidecar")


@attrs.define(eq=False)
class Sidecar:
    """A running sidecar. ``await nursery.start(sidecar.run)``, then use the API."""

    etcd: Etcd
    settings: SidecarSettings = attrs.Factory(SidecarSettings)
    clock: Callable[[], float] = time.time
    rng: random.Random = attrs.Factory(random.Random)
    #: Parses the records the hub, the agent and the leader see: once for all three.
    records: Records = attrs.Factory(Records)
    #: What the sidecar tells its observers (metrics).
    hooks: Hooks = attrs.Factory(Hooks)
    #: What this sidecar did for its clients, by kind (cancelled, ...), for metrics.
    counters: Counter[str] = attrs.Factory(Counter)
    registry: Registry = attrs.field(init=False)
    feed: Feed = attrs.field(init=False)
    hub: EventHub = attrs.field(init=False)
    agent: AgentState = attrs.field(init=False)
    leader: LeaderState = attrs.field(init=False)
    retention: RetentionLeases = attrs.field(init=False)
    #: The batcher every client's creates go through.
    creates: GroupCommit[Txn, TxnResult] = attrs.field(init=False)
    admission: Admission = attrs.field(init=False)
    membership: Membership = attrs.field(init=False)
    reads: TaskReads = attrs.field(init=False)
    creator: Creates = attrs.field(init=False)
    #: Bulk creates (``create_many``), with the creator's checks and counts.
    bulk: BulkCreates = attrs.field(init=False)
    queue_ops: QueueOps = attrs.field(init=False)
    _stopping: trio.CancelScope | None = None

    def __attrs_post_init__(self) -> None:
        ks = self.ks
        self.agent = AgentState(hooks=self.hooks)
        self.leader = LeaderState(hooks=self.hooks)
        self.registry = Registry(on_change=lambda: self.membership.capacity_changed())
        # One watch for the whole sidecar: the hub, the agent and the leader tap it.
        self.feed = Feed(self.etcd, ks)
        self.hub = EventHub(self.etcd, ks, self.feed, records=self.records)
        self.retention = RetentionLeases(self.etcd, self.settings.retention_s)
        # Creates from every client go to etcd together: a task is two keys and a compare.
        self.creates = txn_group(self.etcd, ops_per_item=2, name="create")
        self.admission = Admission(self.etcd, ks, self.settings, feed=self.feed)
        self.membership = Membership(
            etcd=self.etcd,
            settings=self.settings,
            registry=self.registry,
            retention=self.retention,
            feed=self.feed,
            records=self.records,
            agent=self.agent,
            leader=self.leader,
            clock=self.clock,
            rng=self.rng,
        )
        self.reads = TaskReads(
            self.etcd, ks, self.hub, self.retention, self.counters, clock=self.clock
        )
        self.creator = Creates(
            etcd=self.etcd,
            ks=ks,
            group=self.creates,
            admission=self.admission,
            reads=self.reads,
            recent=self.agent.recent,
            counters=self.counters,
            deadline_s=self.settings.create_deadline_s,
            clock=self.clock,
            rng=self.rng,
            hooks=self.hooks,
        )
        self.bulk = BulkCreates(self.creator)
        self.queue_ops = QueueOps(self.etcd, ks, clock=self.clock)
        # Copies of tasks created here are dropped when they finish (ids can come back).
        self.hub.subscribe(None, deliver=self._finished)

    @property
    def ks(self) -> Keyspace:
        """The key layout of this sidecar's namespace."""
        return self.settings.keyspace

    @property
    def node_id(self) -> NodeId:
        """This sidecar's node id."""
        return self.settings.node_id

    @property
    def session(self) -> Session | None:
        """The session of the current epoch."""
        return self.membership.session

    @property
    def is_leader(self) -> bool:
        """Whether this sidecar leads now."""
        return self.membership.is_leader

    @property
    def role_changed(self) -> trio.Event:
        """Set when :attr:`is_leader` changes (look it up again after each wait)."""
        return self.membership.role_changed

    @property
    def depths(self) -> dict[str, int]:
        """Tasks by state, as last counted."""
        return self.admission.depths

    @property
    def node_count(self) -> int:
        """Live sidecars registered in the namespace, as last counted."""
        return self.admission.node_count

    @property
    def queue_configs(self) -> dict[str, QueueConfig]:
        """Every queue's settings, as last read (for metrics and status)."""
        return self.admission.queue_configs

    # -- running ---------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[Sidecar] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run until cancelled; ready once registered with a live session, with each
        service started in the order they depend on each other: the one watch, the
        event hub, the create batcher, the admission counts, then the session epochs
        (see :class:`Membership`)."""
        with trio.CancelScope() as self._stopping:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.feed.run)
                await nursery.start(self.hub.run)
                await nursery.start(self.creates.run)
                await nursery.start(self.admission.run)
                await nursery.start(self.membership.run)
                log.info(
                    "sidecar ready",
                    extra={"node": self.node_id, "namespace": self.settings.namespace},
                )
                task_status.started(self)

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
        self.membership.capacity_changed()
        with trio.move_on_after(timeout_s):
            await self.agent.idle.wait()
            return True
        return not self.agent.running

    def _finished(self, event: TaskEvent) -> None:
        if is_final(event):
            self.agent.recent.forget(event.task_id)

    # -- the API: tasks (see _creates.py and _reads.py) ------------------------------

    def new_task_id(self) -> TaskId:
        """A fresh, time-ordered task id."""
        return self.creator.new_task_id()

    async def create(
        self,
        payload: JSON,
        *,
        options: TaskOptions | None = None,
        run_at: float | None = None,
        task_id: TaskId | None = None,
    ) -> TaskSpec:
        """Create and commit a task (see :meth:`create_task`); answers its spec."""
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
        """Create and commit a task; once this returns, the task is durable in etcd.

        Raises :class:`PayloadTooLarge`, :class:`QueueFull` or :class:`InvalidRequest`
        for what cannot be accepted, and :class:`EtcdUnavailable` when etcd cannot be
        reached within ``create_deadline_s`` (the task may then exist or not: repeat the
        call with the same ``task_id`` to be sure, it is idempotent). With a
        ``unique_key`` held by a live task (or one inside its ``unique_for_s`` window),
        answers that existing task.
        """
        return await self.creator.create_task(
            payload, options=options, run_at=run_at, task_id=task_id
        )

    async def create_many(self, items: list[NewTask]) -> list[TaskSpec]:
        """Create many tasks in as few etcd transactions as it takes, each all or nothing,
        and answer their specs in order (see :meth:`BulkCreates.create_many`)."""
        return await self.bulk.create_many(items)

    def register(
        self,
        handler: Handler,
        *,
        queue: str = "default",
        concurrency: int = 1,
        remote: RemoteHandler | None = None,
    ) -> Registration:
        """Run tasks of ``queue`` on ``handler``, up to ``concurrency`` at once; with
        ``remote``, a handler elsewhere, driven without a task per attempt."""
        return self.registry.register(queue, handler, concurrency, remote)

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

    async def get(self, task_id: TaskId) -> TaskInfo:
        """The task and where it stands, read at one revision; raises
        :class:`TaskNotFound` for an unknown or expired task."""
        return await self.reads.get(task_id)

    async def wait(self, task_id: TaskId, timeout_s: float | None = None) -> TaskInfo:
        """Wait until the task is completed or failed for good; answers how it ended."""
        return await self.reads.wait(task_id, timeout_s)

    async def cancel(self, task_id: TaskId, *, message: str = "cancelled") -> tuple[bool, TaskInfo]:
        """Cancel a task: answers (whether this call cancelled it, the task afterwards);
        see :meth:`TaskReads.cancel`."""
        return await self.reads.cancel(task_id, message=message)

    # -- the API: queues and schedules (see _queues.py) ------------------------------

    async def queues(self) -> dict[str, QueueConfig]:
        """Every queue that has settings (paused, limits), by name."""
        return await self.queue_ops.queues()

    async def update_queue(
        self, queue: str, change: Callable[[QueueConfig], QueueConfig]
    ) -> QueueConfig:
        """Change a queue's settings (read, ``change``, write if unchanged meanwhile)."""
        return await self.queue_ops.update_queue(queue, change)

    async def pause_queue(self, queue: str) -> QueueConfig:
        """The leader assigns nothing more from ``queue`` (creates still land, running
        tasks finish) until :meth:`resume_queue`."""
        return await self.queue_ops.pause_queue(queue)

    async def resume_queue(self, queue: str) -> QueueConfig:
        """Assign from ``queue`` again."""
        return await self.queue_ops.resume_queue(queue)

    async def set_limits(self, queue: str, changes: dict[str, JSON]) -> QueueConfig:
        """Set (or, with None, lift) a queue's cluster-wide limits; see
        :meth:`QueueOps.set_limits`."""
        return await self.queue_ops.set_limits(queue, changes)

    async def schedule(self, fields: dict[str, Any]) -> Schedule:
        """Create or replace a schedule; see :meth:`QueueOps.schedule`."""
        return await self.queue_ops.schedule(fields)

    async def schedules(self) -> list[Schedule]:
        """Every schedule of the namespace."""
        return await self.queue_ops.schedules()

    async def pause_schedule(self, name: str, paused: bool = True) -> Schedule:
        """Fire nothing more until resumed; resuming starts with the first slot after
        now (the slots of the pause are not missed ones: none of them fires)."""
        return await self.queue_ops.pause_schedule(name, paused)

    async def delete_schedule(self, name: str) -> bool:
        """Delete a schedule (the tasks it made stay); False if there was none."""
        return await self.queue_ops.delete_schedule(name)

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
            # Another sidecar with this node id holds the registration (no work here).
            "registration_taken_by": _holder(self.membership.taken_by),
            "etcd_version": self.admission.etcd_version,
            "etcd_version_warning": etcd_version_warning(self.admission.etcd_version),
        }


def _holder(info: NodeInfo | None) -> str | None:
    return None if info is None else f"{info.host or '?'} pid {info.pid or '?'}"
