"""The leader's duties: keep a view of the queue, decide, commit fenced batches.

Size: one term's loops (the view's feed, the decisions, the sweeps, etcd's limit learned
again after a refusal) share the term's state in one closure, and committing a batch
with its fallbacks (an answer lost, a batch refused whole) is what the decisions call.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from contextlib import aclosing

import attrs
import trio

from .._errors import EtcdError, EtcdFull, EtcdUnavailable, LeaseNotFound, NotLeader
from .._hooks import Hooks
from .._repeats import Repeats
from ..core import (
    MAX_TXN_OPS,
    TXN_OPS_CEILING,
    Batch,
    Committed,
    Deposed,
    Fence,
    Keyspace,
    LeaderPolicy,
    LeaderView,
    Range,
    Records,
    State,
    Txn,
    interpret_batch,
)
from ..etcd import Changes, Etcd, Reset, learn_max_txn_ops, retrying
from ..etcd._feed import Feed
from ..etcd._session import RetentionLeases, Session
from ._layout import stamp_layout
from ._sweeps import sweep_payloads, sweep_rate_windows, sweep_unique_guards
from ._tally import HeldTime, reaped

log = logging.getLogger("tm_sidecar.leader")
#: A dead node's tasks are reaped one by one: one line per node a few seconds, counted.
_REAPED = Repeats(log, "reaped")


@attrs.frozen(kw_only=True)
class LeaderSettings:
    """How the leader works."""

    policy: LeaderPolicy = attrs.Factory(LeaderPolicy)
    #: How often the leader sweeps (expired payloads, rate windows, unique guards) and,
    #: with ``compact``, compacts etcd's history; 0: never.
    compact_interval_s: float = 300.0
    #: Whether the sweep also compacts etcd's history (the whole cluster's: on for the
    #: embedded etcd, off by default on a shared one, whose role may not allow it).
    compact: bool = True
    #: The largest transactions the leader tries: its batches grow to the smaller of
    #: this and what etcd takes (``--max-txn-ops``, learned as each term begins).
    max_txn_ops: int = TXN_OPS_CEILING


@attrs.define(eq=False)
class LeaderState:
    """What the running leader shows to the rest of the sidecar."""

    view: LeaderView | None = None
    assigned: int = 0
    promoted: int = 0
    reaped: int = 0
    conflicts: int = 0
    fired: int = 0  # schedule slots fired
    #: Operations per transaction branch the leader's batches hold at most (what etcd
    #: takes, learned as the term began; 0 while not leading).
    max_txn_ops: int = 0
    #: Batches etcd refused whole (committed again move by move); each makes the
    #: leader learn etcd's limit again, in case it changed.
    refused: int = 0
    #: Queues held back (paused, rate-limited) and for how long, while leading here.
    held: HeldTime = attrs.Factory(HeldTime)
    #: Told each fired slot's lateness (metrics); given at construction.
    hooks: Hooks = attrs.field(factory=Hooks, kw_only=True)


async def run_leader(
    etcd: Etcd,
    ks: Keyspace,
    fence: Fence,
    session: Session,
    retention: RetentionLeases,
    settings: LeaderSettings,
    state: LeaderState,
    *,
    clock: Callable[[], float] = time.time,
    rng: random.Random | None = None,
    one_watch: Feed | None = None,
    records: Records | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Lead until cancelled; raises :class:`NotLeader` when leadership is lost.
    Started once its view of the queue is listed (it decides from then on).

    The view follows ``one_watch``, the sidecar's one watch, when given (else a watch of
    its own). ``records`` parses what the leader sees (the sidecar's, shared with its
    agent and hub; the listing uses it from a worker thread).
    """
    rng = rng or random.Random()
    shared = records or Records()
    changed = trio.Event()
    ready = trio.Event()

    async def feed() -> None:
        nonlocal changed
        # Every key the leader needs sorts between delayed/ and task/: completed records
        # and payloads stay out of its view.
        # Parsing a large backlog takes seconds of CPU: the listing goes to a view in a
        # worker thread, page by page while the next page comes, so that keep-alives (and
        # everything else) go on meanwhile.
        stream = (
            one_watch.informer(
                ks.state_prefix(State.DELAYED),
                range_end=ks.prefix + "task",
                loader=lambda: LeaderView(ks, records=shared),
                page=5000,
                progress=True,
            )
            if one_watch is not None
            else etcd.informer(
                ks.state_prefix(State.DELAYED),
                range_end=ks.prefix + "task",
                prev_kv=False,
                loader=lambda: LeaderView(ks, records=shared),
                page=5000,
            )
        )
        async with aclosing(stream) as _items:
            async for item in _items:
                if isinstance(item, Reset):
                    state.view = item.loaded.listed(item.revision)
                    log.info(
                        "leader view listed",
                        extra={
                            "revision": item.revision,
                            "pending": len(state.view.pending),
                            "delayed": len(state.view.delayed),
                            "processing": len(state.view.processing),
                            "nodes": len(state.view.nodes),
                        },
                    )
                    ready.set()
                elif isinstance(item, Changes) and state.view is not None:
                    for event in item.events:
                        state.view.apply(event)
                    state.view.advance(item.revision)
                changed.set()

    async def step_down_on_time() -> None:
        await session.wait_untrusted()
        raise NotLeader("the session lease was not renewed in time: stepping down")

    async def learn_policy() -> LeaderPolicy:
        ops = await learn_max_txn_ops(etcd, ks.layout(), settings.max_txn_ops)
        if ops != state.max_txn_ops:
            log.info("etcd's limit of operations per transaction", extra={"max_txn_ops": ops})
        state.max_txn_ops = ops
        return attrs.evolve(settings.policy, max_txn_ops=ops)

    async def decide_loop() -> None:
        nonlocal changed
        await ready.wait()
        policy = first_policy
        refused = state.refused
        must_reach = 0
        last_view: LeaderView | None = None
        last_commit = 0
        draws = iter(rng.random, -1.0)
        while True:
            view = state.view
            assert view is not None
            if view is not last_view:
                # A fresh listing may predate batches we committed since: wait for those.
                must_reach = max(must_reach, last_commit)
                last_view = view
            if view.revision < must_reach:
                # The revision may belong to a key outside the watched range: wait a
                # little, not for ever; a stale view costs at most a failed compare.
                with trio.move_on_after(CATCH_UP_S) as waited:
                    await changed.wait()
                changed = trio.Event()
                if waited.cancelled_caught:
                    must_reach = 0
                continue
            changed = trio.Event()
            if state.refused != refused:
                # A batch was refused whole: etcd's limit may have changed (another
                # member, a restart with other flags). Learn it again.
                refused = state.refused
                policy = await learn_policy()
            now = clock()
            decision = view.decide(now, policy, draws)
            state.held.update(view.held_back(), now)
            progressed = retry = False
            for n, batch in enumerate(decision.batches):
                if not session.trusted():
                    raise NotLeader("the session lease is no longer trusted")
                committed, revision = await _commit(
                    etcd, ks, fence, retention, view, batch, state=state
                )
                if committed:
                    progressed = True
                    last_commit = max(last_commit, revision)
                    _count(state, batch)
                    if batch.kind == "fire":
                        _fired(state, batch, clock())
                    continue
                # Stop here, so that later batches cannot overtake this one's tasks.
                state.conflicts += 1
                must_reach = max(must_reach, revision)
                retry = revision == DECIDE_AGAIN
                for rest in decision.batches[n + 1 :]:
                    view.settle(rest, committed_at=None)
                break
            if progressed or retry:
                continue  # there may be more to do at once
            if must_reach > view.revision:
                continue
            if decision.wake_at is None:
                await changed.wait()
            else:
                delay = max(0.0, decision.wake_at - clock())
                with trio.move_on_after(delay):
                    await changed.wait()

    async def compact() -> None:
        previous = 0
        while True:
            await trio.sleep(settings.compact_interval_s)
            try:
                swept = await sweep_payloads(etcd, ks, state.max_txn_ops or MAX_TXN_OPS)
                if swept:
                    log.info("deleted the payloads of expired tasks", extra={"count": swept})
                await sweep_rate_windows(etcd, ks, clock())
                released = await sweep_unique_guards(etcd, ks, clock())
                if released:
                    log.info(
                        "deleted unique keys whose window has passed", extra={"count": released}
                    )
                if settings.compact:
                    current = await etcd.revision(ks.prefix)
                    if previous:
                        await etcd.compact(previous)
                        log.info("compacted etcd history", extra={"revision": previous})
                    previous = current
                log.debug("leader sweep done", extra={"compact": settings.compact})
            except (EtcdUnavailable, EtcdFull, EtcdError) as exc:
                log.warning("compaction failed", extra={"error": str(exc)})

    log.info("leading with fence", extra={"key": fence.key, "revision": fence.revision})
    try:
        async with trio.open_nursery() as nursery:
            # Steps down on time even while etcd keeps the two reads below waiting.
            nursery.start_soon(step_down_on_time)
            # Before anything is decided: a namespace of a newer layout is refused
            # (LayoutRefused ends the sidecar), one of an older release gets its key.
            await stamp_layout(etcd, ks, fence)
            # Batches as large as etcd takes: its limit, learned as the term begins.
            first_policy = await learn_policy()
            nursery.start_soon(feed)
            if settings.compact_interval_s > 0:
                nursery.start_soon(compact)
            await ready.wait()
            task_status.started()
            nursery.start_soon(decide_loop)
    finally:
        state.view = None
        state.max_txn_ops = 0
        state.held.update({}, clock())  # held time counts while leading here


async def _commit(
    etcd: Etcd,
    ks: Keyspace,
    fence: Fence,
    retention: RetentionLeases,
    view: LeaderView,
    batch: Batch,
    *,
    state: LeaderState | None = None,
) -> tuple[bool, int]:
    """Commit a batch; answers (committed, revision).

    Not committed: the revision the view should reach before deciding again. Raises
    :class:`NotLeader` when the fence no longer holds. A batch etcd refuses whole is
    counted in ``state.refused``.
    """
    try:
        lease = 0
        if any(record.state is State.FAILED for _, record in batch.moves):
            lease = await retention.current()
        result = await etcd.txn(batch.plan(ks, fence, lease=lease))
    except EtcdUnavailable as exc:
        log.warning(
            "batch outcome unknown",
            extra={"batch": batch.kind, "count": len(batch.moves), "error": str(exc)},
        )
        return False, await _settle_unknown(etcd, ks, view, batch)
    except LeaseNotFound:
        view.settle(batch, committed_at=None)
        retention.forget()
        return False, 0
    except EtcdFull as exc:
        # Refused whole, nothing written: wait for an operator to free space rather than
        # asking again at once (the session's keep-alives still work meanwhile).
        log.error(
            "batch refused: etcd is full",
            extra={"batch": batch.kind, "count": len(batch.moves), "error": str(exc)},
        )
        view.settle(batch, committed_at=None)
        await trio.sleep(ETCD_FULL_PAUSE_S)
        # Decide again now: freeing space (tmctl recover) may change nothing we watch.
        return False, DECIDE_AGAIN
    except EtcdError as exc:
        # Refused whole (too large, a payload deleted by hand): commit the moves one by one.
        log.warning(
            "batch refused: committing one by one",
            extra={"batch": batch.kind, "count": len(batch.moves), "error": str(exc)},
        )
        if state is not None:
            state.refused += 1
        view.settle(batch, committed_at=None)
        await _commit_singly(etcd, ks, fence, retention, batch)
        return False, await etcd.revision(ks.prefix)
    answer = interpret_batch(fence, result)
    if isinstance(answer, Committed):
        view.settle(batch, committed_at=answer.revision)
        log.debug(
            "batch committed",
            extra={"batch": batch.kind, "count": len(batch.moves), "revision": answer.revision},
        )
        return True, answer.revision
    view.settle(batch, committed_at=None)
    if isinstance(answer, Deposed):
        raise NotLeader(DEPOSED)
    log.info(
        "batch conflicted: waiting for the view to catch up",
        extra={"batch": batch.kind, "count": len(batch.moves)},
    )
    return False, answer.revision


async def _settle_unknown(etcd: Etcd, ks: Keyspace, view: LeaderView, batch: Batch) -> int:
    """Find out whether a batch whose answer was lost committed, and settle its claims.

    A batch is atomic: its first move tells. If that move's target exists, the batch
    committed at the target's mod revision, and the claims hold until the watch shows it.
    A firing (no moves) tells by its schedule key: changed since the leader saw it.
    """
    if not batch.moves:
        key = ks.schedule(batch.schedule or "")
        seen = next((c.value for c in batch.guards if c.key == key), 0)
        kv = await retrying(lambda: etcd.get(key), what="look up a firing of unknown outcome")
        if kv is not None and kv.mod_revision != seen:
            view.settle(batch, committed_at=kv.mod_revision)
            return kv.mod_revision
        view.settle(batch, committed_at=None)
        return 0
    slot, record = batch.moves[0]
    target = ks.state(record.state, slot.task_id, record.node)
    probe = Txn(success=(Range(slot.key), Range(target)))
    result = await retrying(lambda: etcd.txn(probe), what="look up a batch of unknown outcome")
    source, landed = result.ranges[0].kvs, result.ranges[1].kvs
    if landed and not (source and source[0].mod_revision == slot.mod_revision):
        view.settle(batch, committed_at=landed[0].mod_revision)
        return landed[0].mod_revision
    view.settle(batch, committed_at=None)
    return 0


async def _commit_singly(
    etcd: Etcd, ks: Keyspace, fence: Fence, retention: RetentionLeases, batch: Batch
) -> None:
    for move in batch.moves:
        lease = await retention.current() if move[1].state is State.FAILED else 0
        try:
            single = attrs.evolve(batch, moves=(move,))
            result = await etcd.txn(single.plan(ks, fence, lease=lease))
        except EtcdError as exc:
            log.error(
                "move refused by etcd",
                extra={"batch": batch.kind, "task": move[0].task_id, "error": str(exc)},
            )
            continue
        if isinstance(interpret_batch(fence, result), Deposed):
            raise NotLeader(DEPOSED)


#: How long the leader waits for its watch to show a revision before deciding anyway.
CATCH_UP_S = 1.0
#: How long the leader waits before trying again when etcd is full.
ETCD_FULL_PAUSE_S = 1.0
#: The revision _commit answers for "not committed, decide again at once".
DECIDE_AGAIN = -1
DEPOSED = "the fence no longer holds: another leader took over"


def _fired(state: LeaderState, batch: Batch, now: float) -> None:
    state.fired += len(batch.slots)
    for slot in batch.slots:
        # To the millisecond, as a clock comparison can tell (and never in e-notation).
        log.info(
            "schedule fired",
            extra={
                "schedule": batch.schedule,
                "slot_at": round(slot, 3),
                "late_s": round(now - slot, 3),
            },
        )
        state.hooks.on_fire(max(0.0, now - slot))


def _count(state: LeaderState, batch: Batch) -> None:
    n = len(batch.moves)
    if batch.kind == "assign":
        state.assigned += n
    elif batch.kind == "promote":
        state.promoted += n
    elif batch.kind == "fire":
        pass
    else:
        state.reaped += n
        for slot, record in batch.moves:
            state.hooks.on_outcome(reaped(record))
            _REAPED.note(
                slot.record.node,
                task=slot.task_id,
                node=slot.record.node,
                attempt=slot.record.attempts,
                to=record.state.value,
                reason=record.error.type if record.error else None,
            )
