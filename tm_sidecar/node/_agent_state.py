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
from ..core import AttemptLedger, TaskId, TaskSpec
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


@attrs.define(eq=False)
class RecentTasks:
    """Tasks this sidecar created and that have not finished, so that an attempt of one
    that runs here needs no read: a task record never changes once written.

    Bounded by count and by payload bytes (the oldest go first), and forgotten when the
    task finishes (its id may then be used again). The payload is kept encoded, so that
    each taker gets its own copy.
    """

    max_items: int = 10_000
    max_bytes: int = 16 * 1024 * 1024
    _specs: OrderedDict[TaskId, tuple[TaskSpec, str]] = attrs.Factory(OrderedDict)
    _bytes: int = 0

    def add(self, spec: TaskSpec, encoded_payload: str) -> None:
        """Remember ``spec``, whose payload encodes as ``encoded_payload``."""
        size = len(encoded_payload)
        if size > self.max_bytes // 8:
            return
        self.forget(spec.id)
        self._specs[spec.id] = (attrs.evolve(spec, payload=None), encoded_payload)
        self._bytes += size
        while len(self._specs) > self.max_items or self._bytes > self.max_bytes:
            _, (_, dropped) = self._specs.popitem(last=False)
            self._bytes -= len(dropped)

    def take(self, task_id: TaskId) -> TaskSpec | None:
        """The spec of ``task_id`` if remembered (and forget it: a retry reads it)."""
        found = self._specs.pop(task_id, None)
        if found is None:
            return None
        spec, encoded = found
        self._bytes -= len(encoded)
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
            self._bytes -= len(found[1])


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

    def _changed(self) -> None:
        if not self.running:
            self.idle.set()
        elif self.idle.is_set():
            self.idle = trio.Event()
