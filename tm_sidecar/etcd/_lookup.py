"""One task wherever it is: its payload and its state keys, read at one revision.

The sidecar's ``get`` (and so the SDK's, the socket's and the dashboard's task page)
and the reads ``tmctl`` and the dashboard's actions make straight from etcd find a task
the same way, here.
"""

from __future__ import annotations

import attrs
import trio

from .._errors import Compacted, EtcdUnavailable
from ..core import Keyspace, KeyValue, Range, RangeResult, State, TaskId
from ._interface import Etcd

#: Where a task's state key may be, in the order its keys are answered: the four states
#: keyed by the task alone, then the assignments (keyed by node, then task).
STATES = (State.PENDING, State.DELAYED, State.COMPLETED, State.FAILED, State.PROCESSING)
#: Reads begun again when etcd compacts the revision between them.
READS = 3


@attrs.frozen
class TaskKeys:
    """A task's keys as of ``revision``: its payload (None once it is gone) and its state
    keys in :data:`STATES` order (one, unless a record was written by hand)."""

    payload: KeyValue | None
    states: tuple[KeyValue, ...]
    revision: int


async def read_task_keys(etcd: Etcd, ks: Keyspace, task_id: TaskId) -> TaskKeys:
    """The task's payload and state keys, all as of one revision, so that a task moving
    meanwhile is seen in one place or the other, never in none or in two.

    Plain ranges, not a transaction: a full etcd refuses every transaction, reads too.
    The payload's read fixes the revision the others read at. Raises
    :class:`EtcdUnavailable` when etcd compacts that revision every time.
    """
    for _ in range(READS):
        first = await etcd.range(Range(ks.task(task_id)))
        at = first.revision
        reads = [Range(ks.state(s, task_id), revision=at) for s in STATES[:-1]]
        # Assignments are under their node: read them all, keep this task's.
        reads.append(Range(ks.state_prefix(State.PROCESSING), prefix=True, revision=at))
        answers = await _ranges(etcd, reads)
        if answers is None:
            continue  # compacted between the reads: read again at a newer revision
        states = tuple(kv for a in answers for kv in a.kvs if kv.key.rsplit("/", 1)[-1] == task_id)
        return TaskKeys(first.kvs[0] if first.kvs else None, states, at)
    raise EtcdUnavailable(f"could not read task {task_id} at one revision")


async def _ranges(etcd: Etcd, reads: list[Range]) -> list[RangeResult] | None:
    """Several ranges at once, answered in their order; None if their revision was
    compacted meanwhile."""
    answers: list[RangeResult | None] = [None] * len(reads)

    async def read(i: int) -> None:
        answers[i] = await etcd.range(reads[i])

    compacted = False
    try:
        async with trio.open_nursery() as nursery:
            for i in range(len(reads)):
                nursery.start_soon(read, i)
    except* Compacted:
        compacted = True
    return None if compacted else [a for a in answers if a is not None]


__all__ = ["STATES", "TaskKeys", "read_task_keys"]
