"""Planners: each returns the etcd transaction that performs one move, guarded so that it
happens at most once and only from the state the caller saw."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import attrs

from ._keys import Keyspace, NodeId, State, TaskId
from ._model import Record, TaskSpec
from ._txn import MAX_TXN_OPS, Compare, Delete, Op, Put, Range, Request, Target, Touch, Txn
from ._unique import FREE, Takeover, guard_ops, guard_value


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


def plan_create(
    ks: Keyspace, spec: TaskSpec, record: Record, *, takeover: Takeover | None = None
) -> Txn:
    """Write the task once and put it in its first queue; fails if the id is taken.

    A task with a ``unique_key`` also takes that key's guard, which must be free (absent,
    or as ``takeover`` says: see _unique.py); its failure branch reads the task and the
    guard, to tell a repeated create from a key held by another task.
    """
    compare = [Compare.absent(ks.task(spec.id))]
    success: list[Request] = [
        Put(ks.task(spec.id), spec.to_json()),
        Put(ks.state(record.state, spec.id), record.to_json()),
    ]
    failure: tuple[Request, ...] = ()
    key = spec.options.unique_key
    if key is not None:
        guard = ks.unique(key)
        guards = (takeover or FREE).compares or (Compare.absent(guard),)
        compare.extend(guards)
        success.append(Put(guard, guard_value(spec.id)))
        failure = (Range(ks.task(spec.id)), Range(guard))
    return Txn(compare=tuple(compare), success=tuple(success), failure=failure)


def _terminal_ops(ks: Keyspace, task_id: TaskId, record: Record, lease: int) -> list[Request]:
    # A final record expires with the retention lease. The payload is not rewritten to
    # join it (etcd would store the whole value again, doubling a full queue's need for
    # space as it drains): the leader deletes payloads left without a state key.
    final = record.state in (State.COMPLETED, State.FAILED)
    key = ks.state(record.state, task_id, record.node)
    return [Put(key, record.to_json(), lease if final else 0), *guard_ops(ks, task_id, record)]


def move_ops(record: Record) -> int:
    """The writes a move to ``record`` takes in a transaction (for batch sizes)."""
    final = record.state in (State.COMPLETED, State.FAILED)
    return 2 + (1 if final and record.options.unique_key is not None else 0)


def plan_move(
    ks: Keyspace,
    slot: Slot,
    record: Record,
    *,
    lease: int = 0,
    fence: Fence | None = None,
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
        success=(Delete(slot.key), *_terminal_ops(ks, slot.task_id, record, lease)),
        failure=(Range(fence.key),) if fence is not None else (),
    )


def plan_cancel(ks: Keyspace, slot: Slot, record: Record, *, lease: int = 0) -> Txn:
    """Cancel a live task seen at ``slot`` (pending, delayed or processing): move it to
    the failed record ``record`` (see ``cancelled``) if that key is still the same
    incarnation. Anyone may cancel (a sidecar for a client, tmctl for an operator): the
    guard alone makes it safe. A running attempt's report then fails on its own guard,
    and its node cancels the handler when it sees the assignment key go."""
    guard = Compare.created_at(slot.key, slot.create_revision)
    return Txn(
        compare=(guard,),
        success=(Delete(slot.key), *_terminal_ops(ks, slot.task_id, record, lease)),
    )


def plan_retry(
    ks: Keyspace,
    slot: Slot,
    record: Record,
    *,
    guards: Sequence[Compare] = (),
    extra: Sequence[Request] = (),
) -> Txn:
    """Send a failed task seen at ``slot`` back to the live ``record`` (see ``retried``),
    if that record is unchanged and the task's payload still exists. The payload no
    longer expires (a final record of old versions leased it). ``guards`` and ``extra``
    take back its unique key's guard (see ``retake``)."""
    task = ks.task(slot.task_id)
    return Txn(
        compare=(
            Compare.modified_at(slot.key, slot.mod_revision),
            Compare(task, Target.VERSION, Op.GREATER, 0),
            *guards,
        ),
        success=(
            Delete(slot.key),
            Put(ks.state(record.state, slot.task_id), record.to_json()),
            Touch(task, 0),
            *extra,
        ),
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
#: Tasks per batched terminal move: a delete and a put.
REAP_BATCH = MAX_TXN_OPS // 2


def plan_batch(
    ks: Keyspace,
    fence: Fence,
    moves: Sequence[tuple[Slot, Record]],
    *,
    lease: int = 0,
    guards: Sequence[Compare] = (),
    extra: Sequence[Request] = (),
) -> Txn:
    """Several leader moves in one transaction, all or none.

    Each move compares its source key's mod revision, so that one changed behind the
    leader's back fails the batch; the failure branch reads the fence key so that the
    caller can tell a lost leadership from a stale view. ``guards`` are further compares
    (the settings of an assignment's queue), ``extra`` further writes (the leader's own
    bookkeeping, such as a rate limit's window).
    """
    compare: list[Compare] = [fence.compare()]
    success: list[Request] = []
    for slot, record in moves:
        compare.append(Compare.modified_at(slot.key, slot.mod_revision))
        success.append(Delete(slot.key))
        success.extend(_terminal_ops(ks, slot.task_id, record, lease))
    compare.extend(_session_guards(ks, moves))
    compare.extend(guards)
    success.extend(extra)
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


def orphan_payloads(ks: Keyspace, keys: Iterable[str]) -> list[TaskId]:
    """The tasks whose payload is left without a state key, from one listing of the
    namespace's keys (at one revision).

    Such a payload belongs to a finished task whose record has expired. Deleting it needs
    no guard: nothing gives a state key back to a task that has none (a create of the same
    id fails while the payload is there, and a retry needs a final record).
    """
    payloads: set[TaskId] = set()
    stated: set[TaskId] = set()
    for key in keys:
        parsed = ks.parse(key)
        if parsed is None or parsed.task_id is None:
            continue
        if parsed.kind == "task":
            payloads.add(parsed.task_id)
        elif parsed.kind == "state":
            stated.add(parsed.task_id)
    return sorted(payloads - stated)
