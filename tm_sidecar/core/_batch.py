"""The leader's output: batches of moves, each one fenced transaction, and how to cut a
decision into batches that etcd takes (operations per transaction, request size)."""

from __future__ import annotations

import attrs

from ._flow import RateWindow
from ._keys import Keyspace, TaskId
from ._model import Record
from ._plan import Fence, Slot, move_ops, plan_batch
from ._txn import MAX_TXN_OPS, TXN_OPS_CEILING, Compare, Put, Request, Txn, TxnResult


@attrs.frozen
class Batch:
    """Moves to commit together in one fenced transaction."""

    kind: str  # "assign", "promote", "reap" or "fire"
    moves: tuple[tuple[Slot, Record], ...]
    #: Further compares: an assignment's queue settings are as the leader saw them.
    guards: tuple[Compare, ...] = ()
    #: Further writes of the leader's own (a rate limit's window, a firing's tasks).
    extra: tuple[Request, ...] = ()
    #: A firing: its schedule, and the slots it fires.
    schedule: str | None = None
    slots: tuple[float, ...] = ()

    @property
    def task_ids(self) -> tuple[TaskId, ...]:
        """The tasks this batch moves."""
        return tuple(slot.task_id for slot, _ in self.moves)

    def plan(self, ks: Keyspace, fence: Fence, *, lease: int = 0) -> Txn:
        """The fenced transaction that commits this batch."""
        return plan_batch(ks, fence, self.moves, lease=lease, guards=self.guards, extra=self.extra)


@attrs.frozen
class Committed:
    """The batch committed at ``revision``."""

    revision: int


@attrs.frozen
class Conflict:
    """A compare failed but the fence holds: the view was stale. Nothing was written;
    decide again once the view has reached ``revision``."""

    revision: int


@attrs.frozen
class Deposed:
    """The fence no longer holds: another leader took over (or the key went with its
    lease). Nothing was written; this leader must step down."""


BatchAnswer = Committed | Conflict | Deposed


def interpret_batch(fence: Fence, result: TxnResult) -> BatchAnswer:
    """What etcd's answer to a fenced transaction (``plan_batch``, ``plan_move`` with a
    fence) means. Its failure branch reads the fence key: gone or another incarnation
    means deposed, anything else a conflict."""
    if result.succeeded:
        return Committed(result.revision)
    fence_kvs = result.ranges[0].kvs if result.ranges else ()
    if not fence_kvs or fence_kvs[0].create_revision != fence.revision:
        return Deposed()
    return Conflict(result.revision)


@attrs.frozen
class Decision:
    """What to do now, and when to decide again at the latest (None: on the next change)."""

    batches: tuple[Batch, ...]
    wake_at: float | None


@attrs.frozen(kw_only=True)
class LeaderPolicy:
    """The leader's settings."""

    grace_s: float = 5.0
    requeue_stalled: bool = True
    max_batches: int = 16
    #: Until this time (UTC epoch seconds), the tasks of a node with no registration are
    #: not reaped: set after this sidecar lost its session while etcd was away, when
    #: every node's registration went with etcd's leases and live nodes are still
    #: registering again (with what they carry: ``NodeInfo.carries``).
    hold_lost_until: float = 0.0
    #: The most operations etcd takes in one branch of a transaction (its
    #: ``--max-txn-ops``, which the shell learns from etcd): batches grow to fill it.
    max_txn_ops: int = attrs.field(
        default=MAX_TXN_OPS,
        validator=[attrs.validators.ge(8), attrs.validators.le(TXN_OPS_CEILING)],
    )

    @property
    def assign_batch(self) -> int:
        """Tasks per assignment (or promotion) batch: each needs one compare and two
        writes (the fence and at most one session guard per task keep the compares
        under the limit too)."""
        return (self.max_txn_ops - 1) // 2

    @property
    def reap_batch(self) -> int:
        """Tasks per batched terminal move: a delete and a put."""
        return self.max_txn_ops // 2


def assign_batches(
    ks: Keyspace,
    assigns: list[tuple[Slot, Record]],
    guard: Compare,
    windows: dict[tuple[str, str | None], tuple[RateWindow, float]],
    max_ops: int = MAX_TXN_OPS,
) -> list[Batch]:
    """One queue's assignments in batches of at most ``max_ops`` operations, each
    compared with the queue's ``guard`` and writing the rate ``windows`` ((queue, key)
    -> (window, period)) its moves count in."""
    out: list[Batch] = []
    size = (max_ops - 1) // 2
    for chunk in chunk_moves(assigns, size, rated=bool(windows), max_ops=max_ops):
        keys = {record.options.concurrency_key for _, record in chunk}
        extra = tuple(
            Put(ks.rate(queue, key), window.to_json(period))
            for (queue, key), (window, period) in windows.items()
            if key is None or key in keys
        )
        out.append(Batch("assign", tuple(chunk), guards=(guard,), extra=extra))
    return out


#: etcd refuses requests over 1.5 MiB; batches stay well under, JSON and base64 included.
MAX_BATCH_BYTES = 512 * 1024


def chunk_moves(
    items: list[tuple[Slot, Record]],
    size: int,
    *,
    rated: bool = False,
    max_ops: int = MAX_TXN_OPS,
) -> list[list[tuple[Slot, Record]]]:
    """Consecutive batches of at most ``size`` moves, ``max_ops`` writes (and compares)
    and about MAX_BATCH_BYTES; ``rated`` keeps room for the rate windows' writes (the
    queue's, and one per move for its concurrency key's)."""
    out: list[list[tuple[Slot, Record]]] = []
    current: list[tuple[Slot, Record]] = []
    base = 1 if rated else 0
    weight, ops = 0, base
    # Compares: the fence, one per move, one per target node's session, one per queue's
    # settings: a batch over many nodes must stay within etcd's limit too.
    nodes: set[str] = set()
    queues: set[str] = set()
    for slot, record in items:
        cost = len(record.to_json().encode()) + 2 * len(slot.key) + 200
        n = move_ops(record) + base
        node = {record.node} if record.node is not None else set()
        compares = 1 + len(current) + 1 + len(nodes | node) + len(queues | {record.options.queue})
        if current and (
            len(current) >= size
            or weight + cost > MAX_BATCH_BYTES
            or ops + n > max_ops
            or compares > max_ops
        ):
            out.append(current)
            current, weight, ops = [], 0, base
            nodes, queues = set(), set()
        current.append((slot, record))
        weight += cost
        ops += n
        nodes |= node
        queues.add(record.options.queue)
    if current:
        out.append(current)
    return out
