"""Bulk creates (``create_many``): many tasks checked at once, then committed in order
in as few etcd transactions as etcd takes (``core/_bulk.py`` plans them), each all or
nothing, one at a time so that the tasks that exist are always a prefix of the call's
(the next one is planned while etcd commits the last)."""

from __future__ import annotations

from collections.abc import Iterator

import attrs
import trio

from .._errors import EtcdFull, EtcdUnavailable, InvalidRequest, TaskManagerError, Unavailable
from ..core import (
    MAX_CREATE_MANY,
    MAX_TXN_OPS,
    CreateChunk,
    Record,
    State,
    TaskId,
    TaskOptions,
    TaskSpec,
    Txn,
    TxnResult,
    dumps,
    initial_record,
    iter_create_chunks,
    plan_create_many,
)
from ..etcd import retrying
from ._creates import Creates
from ._values import NewTask

#: How often one transaction of a bulk create is tried again without the tasks found
#: created already (repeats of the same create) before the call gives up.
BULK_TRIES = 3


@attrs.define(eq=False)
class _Sent:
    """One bulk-create transaction in flight: its answer, once ``done`` (None: none)."""

    done: trio.Event = attrs.Factory(trio.Event)
    result: TxnResult | None = None


class _ChunkFailed(Exception):
    """A bulk create's transaction failed for good with ``error``."""

    def __init__(self, chunk: CreateChunk, error: TaskManagerError) -> None:
        super().__init__(str(error))
        self.chunk = chunk
        self.error = error


@attrs.define(eq=False)
class BulkCreates:
    """Makes many tasks in one call, with what single creates use (their ``Creates``)."""

    creates: Creates
    #: Operations per transaction branch etcd takes (``--max-txn-ops``; its default).
    max_ops: int = MAX_TXN_OPS

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
        unavailable that transaction's own tasks may exist: repeat the call with the
        ``task_ids`` to be sure (it is idempotent).
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
        chunks = iter_create_chunks(
            self.creates.ks, list(zip(specs, records, strict=True)), max_ops=self.max_ops
        )
        failed: tuple[CreateChunk, TaskManagerError] | None = None
        async with trio.open_nursery() as nursery:
            try:
                await self._commit_chunks(chunks, nursery, encoded, positions)
            except _ChunkFailed as exc:
                failed = exc.chunk, exc.error
                nursery.cancel_scope.cancel()
        if failed is not None:
            chunk, error = failed
            error.details = {"task_ids": list(ids), "committed": chunk.start}
            raise error
        return specs

    async def _commit_chunks(
        self,
        chunks: Iterator[CreateChunk],
        nursery: trio.Nursery,
        encoded: dict[TaskId, str],
        positions: dict[TaskId, int],
    ) -> None:
        """Commit the transactions in order, one in flight (several, which etcd may apply
        in any order, would not keep the tasks that exist a prefix of the call's), each
        next one planned (the iterator) while the one before is in flight."""
        in_flight: tuple[CreateChunk, _Sent] | None = None
        for chunk in chunks:
            if in_flight is not None:
                await self._settle(*in_flight, encoded, positions)
            sent = _Sent()
            nursery.start_soon(self._send, chunk.txn, sent)
            await trio.lowlevel.checkpoint()  # the send is under way before the next is planned
            in_flight = chunk, sent
        if in_flight is not None:
            await self._settle(*in_flight, encoded, positions)

    async def _send(self, txn: Txn, sent: _Sent) -> None:
        try:
            sent.result = await self.creates.etcd.txn(txn)
        except TaskManagerError:
            pass  # unknown: the transaction is committed again alone when settled
        finally:
            sent.done.set()

    async def _settle(
        self,
        chunk: CreateChunk,
        sent: _Sent,
        encoded: dict[TaskId, str],
        positions: dict[TaskId, int],
    ) -> None:
        await sent.done.wait()
        if sent.result is not None and sent.result.succeeded:
            self._landed(chunk, encoded)
            return
        # Refused (an id taken, or repeated) or no answer: again, where the failure
        # branch tells which.
        try:
            await self._commit_chunk(chunk, encoded, positions)
        except TaskManagerError as exc:
            raise _ChunkFailed(chunk, exc) from None

    def _landed(self, chunk: CreateChunk, encoded: dict[TaskId, str]) -> None:
        self.creates.admission.wrote(chunk.txn)
        for spec in chunk.specs:
            self.creates.created_one(spec, encoded[spec.id])

    def _check_many(
        self, items: list[NewTask]
    ) -> tuple[list[TaskSpec], list[Record], dict[TaskId, str]]:
        now = self.creates.clock()
        specs: list[TaskSpec] = []
        records: list[Record] = []
        encoded: dict[TaskId, str] = {}
        sizes: list[int] = []
        alike: dict[tuple[TaskOptions, float | None], Record] = {}
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
                id=item.task_id or self.creates.new_task_id(),
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
            # Records are values: tasks alike (most, in a bulk create) share one.
            record = alike.get((item.options, run_at))
            if record is None:
                record = initial_record(
                    Record(state=State.PENDING, options=item.options, since_at=now),
                    now=now,
                    run_at=run_at,
                )
                alike[item.options, run_at] = record
            records.append(record)
        self.creates.admission.admit_many(sizes)
        return specs, records, encoded

    async def _commit_chunk(
        self, chunk: CreateChunk, encoded: dict[TaskId, str], positions: dict[TaskId, int]
    ) -> None:
        """Commit one transaction of a bulk create; a repeat of tasks already created is
        told apart from an id taken by another task by the failure branch's reads."""
        for _ in range(BULK_TRIES):
            result: TxnResult | None = None
            with trio.move_on_after(self.creates.deadline_s):
                try:
                    result = await retrying(
                        lambda: self.creates.etcd.txn(chunk.txn),  # noqa: B023
                        what="bulk create",
                    )
                except EtcdFull as exc:
                    raise self.creates.admission.full() from exc
            if result is None:
                raise EtcdUnavailable(
                    f"etcd did not commit tasks {chunk.start} to "
                    f"{chunk.start + len(chunk.specs) - 1} of the bulk create within "
                    f"{self.creates.deadline_s} s (create_deadline_s): they may exist or not, "
                    "repeat the create_many with its task_ids to be sure"
                )
            if result.succeeded:
                self._landed(chunk, encoded)
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
            chunk = plan_create_many(
                self.creates.ks, rest, start=chunk.start, max_ops=self.max_ops
            )[0]
        raise Unavailable(
            f"tasks {chunk.start} on of the bulk create: their ids kept being taken meanwhile"
        )
