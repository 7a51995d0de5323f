"""Creates: a new task's checks (through ``Admission``), its id, and its commit, batched
with other clients' creates; a repeat of a create, an id taken again after its task
expired, and a create under a unique key that a live task holds. A bulk create
(``create_many``) commits its tasks in as few transactions as etcd takes, in order, each
all or nothing."""

from __future__ import annotations

import itertools
import random
import time
from collections import Counter
from collections.abc import Callable

import attrs
import trio

from .._errors import (
    EtcdFull,
    EtcdUnavailable,
    InvalidRequest,
    TaskManagerError,
    TaskNotFound,
    Unavailable,
)
from ..core import (
    JSON,
    MAX_CREATE_MANY,
    Compare,
    CreateChunk,
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
    iter_create_chunks,
    make_task_id,
    plan_create,
    plan_create_many,
)
from ..core import takeover as core_takeover
from ..etcd import Etcd, retrying
from ..etcd._group import GroupCommit
from ._admission import Admission
from ._agent_state import RecentTasks
from ._reads import TaskReads
from ._values import Created, NewTask

#: How often a unique create reads the key's holder and tries again.
UNIQUE_TRIES = 10
#: How often one transaction of a bulk create is tried again without the tasks found
#: created already (repeats of the same create) before the call gives up.
BULK_TRIES = 3


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
        self._created_one(spec, encoded)
        return Created(spec, existing=False)

    def _created_one(self, spec: TaskSpec, encoded: str) -> None:
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
                self._created_one(spec, encoded)
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

    # -- bulk creates -------------------------------------------------------------------

    async def create_many(self, items: list[NewTask]) -> list[TaskSpec]:
        """Create ``items`` and answer their specs, in order; once this returns, every
        one is durable in etcd.

        Every item is checked first (one bad item refuses the call: nothing is created).
        The tasks then go to etcd in as few transactions as it takes, in order, each all
        or nothing. A task whose id exists with the same payload is a repeat of this
        create, and answered as created. If a transaction fails (an id taken by another
        task, etcd full, or unavailable past ``create_deadline_s``), the error raised
        carries ``details``: every task's id (``task_ids``) and how many of the first
        are created (``committed``); none after them are, except that when etcd was
        unavailable the failed transaction's own tasks may exist: repeat the call with
        the ``task_ids`` to be sure (it is idempotent).
        """
        if not items:
            raise InvalidRequest("create_many needs at least one task")
        if len(items) > MAX_CREATE_MANY:
            raise InvalidRequest(
                f"create_many takes at most {MAX_CREATE_MANY} tasks in one call, not {len(items)}"
            )
        specs, records, encoded = self._check_many(items)
        ids = [spec.id for spec in specs]
        positions = {task_id: index for index, task_id in enumerate(ids)}
        chunks = iter_create_chunks(self.ks, list(zip(specs, records, strict=True)))
        # One transaction in flight at a time (so that the tasks that exist are always a
        # prefix of the call's), the next one planned meanwhile.
        send, receive = trio.open_memory_channel[CreateChunk](1)
        failure: TaskManagerError | None = None

        async def plan() -> None:
            async with send:
                for chunk in chunks:
                    await send.send(chunk)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(plan)
            async with receive:
                async for chunk in receive:
                    try:
                        await self._commit_chunk(chunk, encoded, positions)
                    except TaskManagerError as exc:
                        exc.details = {"task_ids": list(ids), "committed": chunk.start}
                        failure = exc
                        nursery.cancel_scope.cancel()
                        break
        if failure is not None:
            raise failure
        return specs

    def _check_many(
        self, items: list[NewTask]
    ) -> tuple[list[TaskSpec], list[Record], dict[TaskId, str]]:
        now = self.clock()
        specs: list[TaskSpec] = []
        records: list[Record] = []
        encoded: dict[TaskId, str] = {}
        sizes: list[int] = []
        for index, item in enumerate(items):
            run_at = item.run_at
            if run_at is not None and not (isinstance(run_at, int | float) and run_at == run_at):
                raise InvalidRequest(f"tasks[{index}]: run_at must be a UTC epoch time in seconds")
            if item.options.unique_key is not None:
                raise InvalidRequest(
                    f"tasks[{index}]: a bulk create takes no unique_key (a unique task is "
                    "created alone, with create)"
                )
            try:
                text = dumps(item.payload)
            except (TypeError, ValueError) as exc:
                raise InvalidRequest(f"tasks[{index}]: the payload is not JSON: {exc}") from exc
            spec = TaskSpec(
                id=item.task_id or self.new_task_id(),
                payload=item.payload,
                options=item.options,
                created_at=now,
                run_at=run_at,
            )
            if spec.id in encoded:
                raise InvalidRequest(f"tasks[{index}]: task id {spec.id} is given twice")
            encoded[spec.id] = text
            sizes.append(len(text.encode()))
            specs.append(spec)
            records.append(
                initial_record(
                    Record(state=State.PENDING, options=item.options, since_at=now),
                    now=now,
                    run_at=run_at,
                )
            )
        self.admission.admit_many(sizes)
        return specs, records, encoded

    async def _commit_chunk(
        self, chunk: CreateChunk, encoded: dict[TaskId, str], positions: dict[TaskId, int]
    ) -> None:
        """Commit one transaction of a bulk create; a repeat of tasks already created is
        told apart from an id taken by another task by the failure branch's reads."""
        for _ in range(BULK_TRIES):
            result: TxnResult | None = None
            with trio.move_on_after(self.deadline_s):
                try:
                    result = await retrying(
                        lambda: self.etcd.txn(chunk.txn),  # noqa: B023
                        what="bulk create",
                    )
                except EtcdFull as exc:
                    raise self.admission.full() from exc
            if result is None:
                raise EtcdUnavailable(
                    f"etcd did not commit tasks {chunk.start} to "
                    f"{chunk.start + len(chunk.specs) - 1} of the bulk create within "
                    f"{self.deadline_s} s (create_deadline_s): they may exist or not, repeat "
                    "the create_many with its task_ids to be sure"
                )
            if result.succeeded:
                self.admission.wrote(chunk.txn)
                for spec in chunk.specs:
                    self._created_one(spec, encoded[spec.id])
                return
            rest: list[tuple[TaskSpec, Record]] = []
            for spec, record, answer in zip(chunk.specs, chunk.records, result.ranges, strict=True):
                if not answer.kvs:
                    rest.append((spec, record))
                    continue
                if TaskSpec.from_json(answer.kvs[0].value).payload != spec.payload:
                    raise InvalidRequest(
                        f"tasks[{positions[spec.id]}]: task id {spec.id} is taken by another task"
                    )
                # The same create, repeated (its first answer was lost): created.
            if not rest:
                return
            chunk = plan_create_many(self.ks, rest, start=chunk.start)[0]
        raise Unavailable(
            f"tasks {chunk.start} on of the bulk create: their ids kept being taken meanwhile"
        )
