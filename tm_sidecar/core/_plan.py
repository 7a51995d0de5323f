"""Planners: each returns the etcd transaction that performs one move, guarded so that it
happens at most once and only from the state the caller saw."""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from ._keys import Keyspace, NodeId, State, TaskId
from ._model import Record, TaskSpec
from ._txn import MAX_TXN_OPS, Compare, Delete, Put, Range, Request, Touch, Txn


@attrs.frozen
class Fence:
    """The leader's fencing token: its candidate key and that key's create revision.

    Every leader transaction compares it, so the writes of a deposed leader fail.
    """

    key: str
    revision: int

    def compare(self) -> Compare:
        """The guard every leader transaction carries."""
        return Compare.created_at(self.key, self.revision)


@attrs.frozen
class Slot:
    """A state key as seen: which task, which key, which incarnation, what value."""

    task_id: TaskId
    key: str
    create_revision: int
    mod_revision: int
    record: Record


def plan_create(ks: Keyspace, spec: TaskSpec, record: Record) -> Txn:
    """Write the task once and put it in its first queue; fails if the id is taken."""
    return Txn(
        compare=(Compare.absent(ks.task(spec.id)),),
        success=(
            Put(ks.task(spec.id), spec.to_json()),
            Put(ks.state(record.state, spec.id), record.to_json()),
        ),
    )


def _terminal_ops(
    ks: Keyspace, task_id: TaskId, record: Record, lease: int, touch: bool
) -> list[Request]:
    final = record.state in (State.COMPLETED, State.FAILED)
    key = ks.state(record.state, task_id, record.node)
    ops: list[Request] = [Put(key, record.to_json(), lease if final else 0)]
    if final and lease and touch:
        # The payload expires with the outcome; ignore_value keeps it written once.
        ops.append(Touch(ks.task(task_id), lease))
    return ops


def plan_move(
    ks: Keyspace,
    slot: Slot,
    record: Record,
    *,
    lease: int = 0,
    fence: Fence | None = None,
    touch: bool = True,
) -> Txn:
    """Move one task from the state key ``slot`` to ``record``, if that key is unchanged.

    Workers' reports compare the assignment's create revision (the attempt); the leader's
    moves also compare its fence.
    """
    compare = [Compare.created_at(slot.key, slot.create_revision)]
    if fence is not None:
        compare.insert(0, fence.compare())
    return Txn(
        compare=tuple(compare),
        success=(Delete(slot.key), *_terminal_ops(ks, slot.task_id, record, lease, touch)),
        failure=(Range(fence.key),) if fence is not None else (),
    )


def plan_update(slot: Slot, record: Record) -> Txn:
    """Rewrite a processing record in place (started, progress), if the attempt is live."""
    return Txn(
        compare=(Compare.created_at(slot.key, slot.create_revision),),
        success=(Put(slot.key, record.to_json()),),
    )


#: Tasks per batched leader transaction: each needs one compare and two writes (the
#: fence and at most one session guard per task keep the compares under the limit too).
ASSIGN_BATCH = (MAX_TXN_OPS - 1) // 2
#: Tasks per batched terminal move: a delete, a put and a lease touch.
REAP_BATCH = MAX_TXN_OPS // 3


def plan_batch(
    ks: Keyspace,
    fence: Fence,
    moves: Sequence[tuple[Slot, Record]],
    *,
    lease: int = 0,
    touch: bool = True,
) -> Txn:
    """Several leader moves in one transaction, all or none.

    Each move compares its source key's mod revision, so that one changed behind the
    leader's back fails the batch; the failure branch reads the fence key so that the
    caller can tell a lost leadership from a stale view. ``touch`` attaches the payload of
    a finished task to the retention lease (off when that key may be gone).
    """
    compare: list[Compare] = [fence.compare()]
    success: list[Request] = []
    for slot, record in moves:
        compare.append(Compare.modified_at(slot.key, slot.mod_revision))
        success.append(Delete(slot.key))
        success.extend(_terminal_ops(ks, slot.task_id, record, lease, touch))
    compare.extend(_session_guards(ks, moves))
    return Txn(compare=tuple(compare), success=tuple(success), failure=(Range(fence.key),))


def _session_guards(ks: Keyspace, moves: Sequence[tuple[Slot, Record]]) -> list[Compare]:
    """An assignment goes only to a node's current session: its registration must still
    be attached to the session's lease. A leader whose view has not yet seen a node
    restart (a new lease) thus cannot hand work to the dead session, where the new one
    would never run it and the reap would cost the task an attempt."""
    sessions = {
        (record.node, record.session)
        for _, record in moves
        if record.state is State.PROCESSING and record.node is not None
    }
    return [Compare.leased(ks.node(node), session or 0) for node, session in sorted(sessions)]


def assignment_key(ks: Keyspace, task_id: TaskId, node: NodeId) -> str:
    """The processing key of a task assigned to ``node``."""
    return ks.state(State.PROCESSING, task_id, node)
