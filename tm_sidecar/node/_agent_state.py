"""What the agent knows between attempts: ``AgentState`` (the attempts running here,
the ledger that keeps any from starting twice, the counts), ``Running`` (one attempt),
and ``RecentTasks`` (the tasks created here, so that their attempts need no read)."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable

import attrs
import trio

from .._hooks import Hooks
from ..core import AttemptLedger, Record, Slot, TaskId, TaskSpec
from ..etcd._group import GroupStats


@attrs.define(eq=False)
class Running:
    """One attempt running here: a local one runs in a task under ``scope``; a remote
    one (an SDK worker's) has no task, and ``withdraw`` stops it."""

    create_revision: int
    scope: trio.CancelScope | None = None
    withdraw: Callable[[], None] | None = None
    reporting: bool = False

    def cancel(self) -> None:
        """Stop the attempt: its assignment was withdrawn."""
        if self.scope is not None:
            self.scope.cancel()
        elif self.withdraw is not None:
            self.withdraw()


#: About what one remembered task costs beside its payload (the spec without its
#: payload, its id, the table's entry), so that the byte bound holds for small payloads.
ENTRY_BYTES = 400


@attrs.define(eq=False)
class RecentTasks:
    """Tasks this sidecar created and that have not finished, so that an attempt of one
    that runs here needs no read: a task record never changes once written.

    Bounded by count and by bytes (each task's encoded payload plus what an entry costs
    here, ``ENTRY_BYTES``), and forgotten when the task finishes (its id may then be used
    again). Once full, a new task is not remembered rather than an older one dropped:
    tasks run roughly in creation order, so the older ones run first, and dropping them
    (as this did before) made a drain of a backlog larger than the bound read back every
    payload it had dropped, the ones it needed first. The payload is kept encoded, so
    that each taker gets its own copy.
    """

    max_items: int = 100_000
    max_bytes: int = 32 * 1024 * 1024
    _specs: OrderedDict[TaskId, tuple[TaskSpec, str]] = attrs.Factory(OrderedDict)
    _bytes: int = 0

    def add(self, spec: TaskSpec, encoded_payload: str) -> None:
        """Remember ``spec``, whose payload encodes as ``encoded_payload``."""
        size = len(encoded_payload) + ENTRY_BYTES
        if size > self.max_bytes // 8:
            return
        self.forget(spec.id)
        if len(self._specs) >= self.max_items or self._bytes + size > self.max_bytes:
            return
        self._specs[spec.id] = (attrs.evolve(spec, payload=None), encoded_payload)
        self._bytes += size

    def take(self, task_id: TaskId) -> TaskSpec | None:
        """The spec of ``task_id`` if remembered (and forget it: a retry reads it)."""
        found = self._specs.pop(task_id, None)
        if found is None:
            return None
        spec, encoded = found
        self._bytes -= len(encoded) + ENTRY_BYTES
        return attrs.evolve(spec, payload=json.loads(encoded))

    def take_encoded(self, task_id: TaskId) -> tuple[TaskSpec, str] | None:
        """The spec of ``task_id`` (its payload left out) and its payload as JSON text,
        if remembered (and forget it), for a taker that sends the payload on as it is."""
        found = self._specs.pop(task_id, None)
        if found is None:
            return None
        self._bytes -= len(found[1])
        return found

    def forget(self, task_id: TaskId) -> None:
        """Drop ``task_id`` if remembered (it finished)."""
        found = self._specs.pop(task_id, None)
        if found is not None:
            self._bytes -= len(found[1]) + ENTRY_BYTES


@attrs.define(eq=False)
class AgentState:
    """The assignments running here."""

    running: dict[TaskId, Running] = attrs.Factory(dict)
    #: Every attempt started here, so that none starts twice (see core/_attempts.py).
    attempts: AttemptLedger = attrs.Factory(AttemptLedger)
    recent: RecentTasks = attrs.Factory(RecentTasks)
    report_batches: GroupStats = attrs.Factory(GroupStats)
    read_batches: GroupStats = attrs.Factory(GroupStats)
    idle: trio.Event = attrs.Factory(trio.Event)
    completed: int = 0
    failed: int = 0
    snoozed: int = 0
    stale: int = 0
    #: Set by a graceful stop (a drain, ``Sidecar.stop``): attempts cut short by it are
    #: handed back without counting. Without it (a lost session, say), they count.
    handing_back: bool = False
    #: Told each attempt's start and outcome (metrics); given at construction.
    hooks: Hooks = attrs.field(factory=Hooks, kw_only=True)
    #: Outcomes of attempts that ended here but could not be reported before their
    #: session was lost (etcd away): the next session's agent reports them, and the
    #: node's registration names their sessions meanwhile (``NodeInfo.carries``), so
    #: that the leader does not run them again.
    carried: dict[TaskId, tuple[Slot, Record]] = attrs.Factory(dict)
    #: Set (and replaced) whenever ``carried`` changes.
    carried_changed: trio.Event = attrs.Factory(trio.Event)

    def carry(self, slot: Slot, outcome: Record) -> None:
        """Keep an ended attempt's outcome for the next session to report."""
        self.carried[slot.task_id] = (slot, outcome)
        self._carried_changed()

    def carried_done(self, task_id: TaskId) -> None:
        """A carried outcome was reported (or refused as stale): forget it."""
        if self.carried.pop(task_id, None) is not None:
            self._carried_changed()

    def carried_sessions(self) -> tuple[int, ...]:
        """The sessions whose outcomes this node still carries."""
        return tuple(sorted({slot.record.session or 0 for slot, _ in self.carried.values()}))

    def _carried_changed(self) -> None:
        self.carried_changed.set()
        self.carried_changed = trio.Event()

    def _changed(self) -> None:
        if not self.running:
            self.idle.set()
        elif self.idle.is_set():
            self.idle = trio.Event()
