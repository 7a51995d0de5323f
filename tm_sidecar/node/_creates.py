"""Creates: a new task's checks (through ``Admission``), its id, and its commit, batched
with other clients' creates; a repeat of a create, an id taken again after its task
expired, and a create under a unique key that a live task holds. Bulk creates are
``_bulk.py``'s."""

from __future__ import annotations

import itertools
import random
import time
from collections import Counter
from collections.abc import Callable

import attrs
import trio

from .._errors import EtcdFull, EtcdUnavailable, InvalidRequest, TaskNotFound, Unavailable
from .._hooks import Hooks
from ..core import (
    JSON,
    Compare,
    Guard,
    Keyspace,
    Record,
    State,
    Takeover,
    TaskId,
    TaskOptions,
    TaskSpec,
    Txn,
    TxnResult,
    dumps,
    initial_record,
    make_task_id,
    plan_create,
)
from ..core import takeover as core_takeover
from ..etcd import Etcd, retrying
from ..etcd._group import GroupCommit
from ._admission import Admission
from ._agent_state import RecentTasks
from ._reads import TaskReads
from ._values import Created

#: How often a unique create reads the key's holder and tries again.
UNIQUE_TRIES = 10


@attrs.define(eq=False, kw_only=True)
class Creates:
    """Makes tasks: checks, commits, answers what a create made."""

    etcd: Etcd
    ks: Keyspace
    #: Creates from every client go to etcd together: a task is two keys and a compare.
    group: GroupCommit[Txn, TxnResult]
    admission: Admission
    reads: TaskReads
    #: Tasks created here, so that their attempts here need no read.
    recent: RecentTasks
    #: What this sidecar did for its clients, by kind (``unique_existing``), for metrics.
    counters: Counter[str]
    #: Give up on etcd after this long (``create_deadline_s``).
    deadline_s: float
    clock: Callable[[], float] = time.time
    rng: random.Random = attrs.Factory(random.Random)
    #: Told of the commit's span for a traced task (``--otel``).
    hooks: Hooks = attrs.Factory(Hooks)
    _ids: itertools.count[int] = attrs.Factory(itertools.count)

    def new_task_id(self) -> TaskId:
        """A fresh, time-ordered task id."""
        return make_task_id(int(self.clock() * 1000), next(self._ids), self.rng.getrandbits(32))

    async def create_task(
        self,
        payload: JSON,
        *,
        options: TaskOptions | None = None,
        run_at: float | None = None,
        task_id: TaskId | None = None,
    ) -> Created:
        """Create and commit a task; once this returns, the task is durable in etcd.
        Answers whether the task is new or, for a ``unique_key`` held by a live task (or
        one inside its ``unique_for_s`` window), that existing task.

        Raises :class:`PayloadTooLarge`, :class:`QueueFull` or :class:`InvalidRequest`
        for what cannot be accepted, and :class:`EtcdUnavailable` once the deadline has
        passed without an answer from etcd, however many tries that took (the task may
        then exist or not: repeat the call with the same ``task_id``, it is idempotent).
        """
        with trio.move_on_after(self.deadline_s):
            return await self._create_task(payload, options, run_at, task_id)
        raise EtcdUnavailable(
            f"etcd did not commit the create within {self.deadline_s} s (create_deadline_s): "
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
        self.admission.admit(len(encoded.encode()))
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
                result = await self.group.submit(txn)
            except EtcdUnavailable:
                # Once more: a repeat is safe, and tells whether the first one committed.
                result = await self.group.submit(txn)
        except EtcdFull as exc:
            raise self.admission.full() from exc
        self.admission.wrote(txn)
        if not result.succeeded:
            return Created(await self._taken(spec, payload, txn, encoded), existing=False)
        self.hooks.span("tm.create.commit", options, now, self.clock(), {"tm.task.id": spec.id})
        self.created_one(spec, encoded)
        return Created(spec, existing=False)

    def created_one(self, spec: TaskSpec, encoded: str) -> None:
        """Count a task created here, and remember it (its payload ``encoded``)."""
        self.admission.created()
        self.recent.add(spec, encoded)

    async def _taken(
        self, spec: TaskSpec, payload: JSON, create: Txn | None, encoded: str
    ) -> TaskSpec:
        """The create of ``spec`` found its id taken: a repeat of the same create, an
        expired task's payload (taken again with ``create``'s writes, when given), or
        another task."""
        existing, found, _ = await self.reads.read(spec.id)
        if existing is not None and not found and create is not None:
            # An expired task's payload, not yet swept: the id is free again. Take it
            # if that payload is still the one read, which no state had at that
            # revision (nothing gives a state to such a task but a create, and a
            # create rewrites the payload).
            retake = Txn(
                compare=(Compare.modified_at(existing.key, existing.mod_revision),),
                success=create.success,
            )
            if (await self.group.submit(retake)).succeeded:
                self.created_one(spec, encoded)
                return spec
            existing, found, _ = await self.reads.read(spec.id)
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
                raise self.admission.full() from exc
            if result.succeeded:
                self.admission.wrote(txn)
                self.created_one(spec, encoded)
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
                holder = await self.reads.get(guard.task_id)
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
