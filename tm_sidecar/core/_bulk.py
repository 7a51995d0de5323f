"""A bulk create: many tasks in as few transactions as etcd takes, each all or nothing.

Each transaction is the creates of consecutive tasks merged: every id's absence is
compared, so that one taken id refuses the whole transaction (none of its tasks land),
and its failure branch reads every id, so that the caller learns in the same round trip
which ids were taken (a repeat of the same create, or another task's).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import attrs

from ._batch import MAX_BATCH_BYTES
from ._keys import Keyspace, TaskId
from ._model import Record, TaskSpec
from ._plan import plan_create
from ._txn import MAX_TXN_OPS, Range, Txn

#: The most tasks one bulk create takes (the protocol's ``create_many``).
MAX_CREATE_MANY = 10_000


@attrs.frozen
class CreateChunk:
    """Tasks ``start`` to ``start + len(specs)`` of a bulk create, in one transaction."""

    start: int
    specs: tuple[TaskSpec, ...]
    #: Each task's first record, as ``txn`` writes it.
    records: tuple[Record, ...]
    txn: Txn

    @property
    def task_ids(self) -> tuple[TaskId, ...]:
        """The ids this transaction creates, in order."""
        return tuple(spec.id for spec in self.specs)


def _txn_size(txn: Txn) -> int:
    return sum(len(op.key) + len(getattr(op, "value", "")) for op in txn.success)


def plan_create_many(
    ks: Keyspace,
    items: Sequence[tuple[TaskSpec, Record]],
    *,
    start: int = 0,
    max_ops: int = MAX_TXN_OPS,
    max_bytes: int = MAX_BATCH_BYTES,
) -> list[CreateChunk]:
    """The transactions that create ``items`` (task, first record), in order: each as
    many consecutive tasks as fit in ``max_ops`` operations per branch and about
    ``max_bytes``. ``start`` numbers the first item (for a part of a larger call).

    Tasks with a unique key are not taken here (their create reads the key's holder:
    see ``plan_create``); a caller refuses them first.
    """
    return list(iter_create_chunks(ks, items, start=start, max_ops=max_ops, max_bytes=max_bytes))


def iter_create_chunks(
    ks: Keyspace,
    items: Sequence[tuple[TaskSpec, Record]],
    *,
    start: int = 0,
    max_ops: int = MAX_TXN_OPS,
    max_bytes: int = MAX_BATCH_BYTES,
) -> Iterator[CreateChunk]:
    """:func:`plan_create_many`, one transaction at a time (so that a caller may plan
    the next while etcd commits the last)."""
    current: list[tuple[TaskSpec, Record, Txn]] = []
    ops = weight = 0
    first = start
    for index, (spec, record) in enumerate(items, start):
        if spec.options.unique_key is not None:
            raise ValueError(f"task {spec.id} has a unique key: it is created alone")
        one = plan_create(ks, spec, record)
        n = max(len(one.success), len(one.compare))
        size = _txn_size(one)
        # Every branch within max_ops (the compares and the failure's reads are one a
        # task, the writes two today), and the request within max_bytes.
        full = ops + n > max_ops or len(current) + 1 > max_ops or weight + size > max_bytes
        if current and full:
            yield _chunk(ks, first, current)
            current, ops, weight, first = [], 0, 0, index
        current.append((spec, record, one))
        ops += n
        weight += size
    if current:
        yield _chunk(ks, first, current)


def _chunk(ks: Keyspace, start: int, parts: list[tuple[TaskSpec, Record, Txn]]) -> CreateChunk:
    txns = [txn for _, _, txn in parts]
    merged = Txn(
        compare=tuple(c for txn in txns for c in txn.compare),
        success=tuple(op for txn in txns for op in txn.success),
        failure=tuple(Range(ks.task(spec.id)) for spec, _, _ in parts),
    )
    specs = tuple(spec for spec, _, _ in parts)
    return CreateChunk(start, specs, tuple(record for _, record, _ in parts), merged)
