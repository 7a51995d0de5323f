"""The leader's duties: keep a view of the queue, decide, commit fenced batches."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from contextlib import aclosing

import attrs
import trio

from ._errors import EtcdError, EtcdUnavailable, LeaseNotFound, NotLeader
from ._etcd import Changes, Etcd, Reset
from ._session import RetentionLeases, Session
from .core import Batch, Fence, Keyspace, LeaderPolicy, LeaderView, State, plan_batch

log = logging.getLogger("tm_sidecar.leader")


@attrs.frozen(kw_only=True)
class LeaderSettings:
    """How the leader works."""

    policy: LeaderPolicy = attrs.Factory(LeaderPolicy)
    compact_interval_s: float = 300.0


@attrs.define(eq=False)
class LeaderState:
    """What the running leader shows to the rest of the sidecar."""

    view: LeaderView | None = None
    assigned: int = 0
    promoted: int = 0
    reaped: int = 0
    conflicts: int = 0


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
) -> None:
    """Lead until cancelled; raises :class:`NotLeader` when leadership is lost."""
    rng = rng or random.Random()
    changed = trio.Event()
    ready = trio.Event()

    async def feed() -> None:
        nonlocal changed
        # Every key the leader needs sorts between delayed/ and task/: completed records
        # and payloads stay out of its view.
        stream = etcd.informer(ks.state_prefix(State.DELAYED), range_end=ks.prefix + "task")
        async with aclosing(stream) as _items:
            async for item in _items:
                if isinstance(item, Reset):
                    state.view = LeaderView.from_listing(ks, item.kvs, item.revision)
                    log.info(
                        "leader view listed revision=%d pending=%d delayed=%d processing=%d "
                        "nodes=%d",
                        item.revision,
                        len(state.view.pending),
                        len(state.view.delayed),
                        len(state.view.processing),
                        len(state.view.nodes),
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

    async def decide_loop() -> None:
        nonlocal changed
        await ready.wait()
        must_reach = 0
        draws = iter(rng.random, -1.0)
        while True:
            view = state.view
            assert view is not None
            if view.revision < must_reach:
                await changed.wait()
                changed = trio.Event()
                continue
            changed = trio.Event()
            decision = view.decide(clock(), settings.policy, draws)
            progressed = False
            for batch in decision.batches:
                if not session.trusted():
                    raise NotLeader("the session lease is no longer trusted")
                outcome = await _commit(etcd, ks, fence, retention, view, batch)
                if outcome is None:
                    continue
                if outcome > 0:
                    progressed = True
                    _count(state, batch)
                else:
                    state.conflicts += 1
                    must_reach = max(must_reach, -outcome)
            if progressed:
                continue  # there may be more to do at once
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
                current = await etcd.revision()
                if previous:
                    await etcd.compact(previous)
                    log.info("compacted etcd history up to revision %d", previous)
                previous = current
            except (EtcdUnavailable, EtcdError) as exc:
                log.warning("compaction failed: %s", exc)

    log.info("leading with fence=%s@%d", fence.key, fence.revision)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(feed)
            nursery.start_soon(step_down_on_time)
            if settings.compact_interval_s > 0:
                nursery.start_soon(compact)
            nursery.start_soon(decide_loop)
    finally:
        state.view = None


async def _commit(
    etcd: Etcd,
    ks: Keyspace,
    fence: Fence,
    retention: RetentionLeases,
    view: LeaderView,
    batch: Batch,
) -> int | None:
    """Commit a batch: its revision if it committed, minus the revision it saw if a task
    changed behind our back, None if the outcome is unknown."""
    lease = 0
    if any(record.state is State.FAILED for _, record in batch.moves):
        lease = await retention.current()
    try:
        result = await etcd.txn(plan_batch(ks, fence, batch.moves, lease=lease))
    except EtcdUnavailable as exc:
        # It may have committed: the compares make a repeat harmless, so forget the claims.
        view.settle(batch, committed_at=None)
        log.warning("%s batch of %d: outcome unknown (%s)", batch.kind, len(batch.moves), exc)
        await trio.sleep(0.1)
        return None
    except LeaseNotFound:
        view.settle(batch, committed_at=None)
        retention.forget()
        return None
    if result.succeeded:
        view.settle(batch, committed_at=result.revision)
        log.debug("%s batch of %d committed at %d", batch.kind, len(batch.moves), result.revision)
        return result.revision
    view.settle(batch, committed_at=None)
    fence_kvs = result.ranges[0].kvs if result.ranges else ()
    if not fence_kvs or fence_kvs[0].create_revision != fence.revision:
        raise NotLeader("the fence no longer holds: another leader took over")
    log.info(
        "%s batch of %d conflicted: waiting for the view to catch up", batch.kind, len(batch.moves)
    )
    return -result.revision


def _count(state: LeaderState, batch: Batch) -> None:
    n = len(batch.moves)
    if batch.kind == "assign":
        state.assigned += n
    elif batch.kind == "promote":
        state.promoted += n
    else:
        state.reaped += n
        for slot, record in batch.moves:
            log.warning(
                "reaped task=%s node=%s attempt=%d to=%s reason=%s",
                slot.task_id,
                slot.record.node,
                slot.record.attempts,
                record.state.value,
                record.error.type if record.error else "",
            )
