"""The leader's own ceiling: assignments per second its decisions sustain, apart from etcd.

The pure core's leader (``LeaderView``: its view of the namespace, its decisions, its
claims) runs over the in-memory etcd of the property tests (``proptests.backends``,
checked against the real etcd by ``proptests/test_fake_vs_etcd.py``), with simulated
nodes that complete every assignment at once. What the leader does per task is timed
alone: applying the watch's events to its view, deciding, planning each batch's
transaction and settling it. The in-memory etcd's work and the simulated nodes' are
timed apart, so ``assignments_per_s`` is the limit of one leader's Python, whatever
etcd and the nodes could do.
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING

from proptests.backends import MemoryEtcd
from tm_sidecar.core import (
    Delete,
    Fence,
    Keyspace,
    KeyValue,
    LeaderPolicy,
    LeaderView,
    NodeId,
    NodeInfo,
    Put,
    Record,
    Request,
    Slot,
    State,
    TaskId,
    TaskSpec,
    Txn,
    WatchEvent,
    initial_record,
    plan_create,
    plan_move,
    succeeded,
)

if TYPE_CHECKING:
    from bench.run import Env, Result

#: The simulated cluster: nodes, and each one's concurrency on the default queue.
NODES = 100
CAPACITY = 32
#: Tasks the leader assigns in the timed run; --quick takes a twentieth.
TASKS = 20_000


class RecordingEtcd(MemoryEtcd):
    """The in-memory etcd, keeping every change as the leader's watch would see it."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[WatchEvent] = []

    def _changes(self, op: Request) -> bool:
        # A single key's delete looks that key up (the base scans every key: fine for the
        # property tests' few, not for a backlog of thousands).
        if isinstance(op, Delete) and not op.prefix:
            return op.key in self.kvs
        return super()._changes(op)

    def _write(self, op: Request, revision: int) -> None:
        if isinstance(op, Delete) and not op.prefix:
            old = self.kvs.pop(op.key, None)
            if old is not None:
                if old.lease in self.leases:
                    self.leases[old.lease].discard(op.key)
                self.events.append(WatchEvent("DELETE", KeyValue(op.key, "", 0, revision, 0), old))
            return
        if isinstance(op, Delete):
            raise NotImplementedError("the leader ceiling deletes single keys only")
        prev = self.kvs.get(op.key)
        super()._write(op, revision)
        self.events.append(WatchEvent("PUT", self.kvs[op.key], prev))


def _seed(db: RecordingEtcd, ks: Keyspace, tasks: int) -> None:
    """``tasks`` pending tasks and ``NODES`` live nodes, as producers and sidecars leave them."""
    for i in range(tasks):
        spec = TaskSpec(id=TaskId(f"t{i:07d}"), payload={"i": i}, created_at=1.0)
        record = initial_record(Record(state=State.PENDING, since_at=1.0), now=1.0, run_at=None)
        db.txn(plan_create(ks, spec, record))
    for n in range(NODES):
        lease = db.lease_grant(60)
        info = NodeInfo(id=NodeId(f"n{n:03d}"), session=lease, capacity={"default": CAPACITY})
        db.txn(Txn(success=(Put(ks.node(info.id), info.to_json(), lease),)))


def leader_ceiling_run(tasks: int) -> Result:
    """Assign and complete ``tasks`` tasks over ``NODES`` simulated nodes; the leader's
    time apart from the in-memory etcd's and the nodes'."""
    ks = Keyspace(namespace="ceiling")
    db = RecordingEtcd()
    _seed(db, ks, tasks)
    lease = db.lease_grant(60)
    fence_key = ks.candidate(lease)
    fence = Fence(fence_key, db.txn(Txn(success=(Put(fence_key, "{}", lease),))).revision)
    kvs, revision = db.list(ks.prefix)
    db.events.clear()
    policy = LeaderPolicy()
    draws = random.Random(0)
    now = 10.0
    leader_s = other_s = 0.0
    assigned = decisions = batches = assign_batches = 0
    processing = ks.state_prefix(State.PROCESSING)

    clock = time.process_time
    t0 = clock()
    view = LeaderView.from_listing(ks, kvs, revision)
    leader_s += clock() - t0
    completed = 0
    while completed < tasks:
        # The leader: apply what its watch saw, decide, plan; etcd commits (timed apart).
        t0 = clock()
        seen, db.events = db.events, []
        for event in seen:
            view.apply(event)
        view.advance(db.revision)
        decision = view.decide(now, policy, iter(draws.random, -1.0))
        plans = [(batch, batch.plan(ks, fence)) for batch in decision.batches]
        leader_s += clock() - t0
        decisions += 1
        if not plans and not seen:
            raise RuntimeError(f"the leader stalled with {completed} of {tasks} completed")
        for batch, txn in plans:
            t1 = clock()
            result = db.txn(txn)
            t2 = clock()
            view.settle(batch, committed_at=result.revision if result.succeeded else None)
            leader_s += clock() - t2
            other_s += t2 - t1
            batches += 1
            if batch.kind == "assign" and result.succeeded:
                assigned += len(batch.moves)
                assign_batches += 1
        # The nodes: every new assignment completes at once, one report each.
        t1 = clock()
        for event in list(db.events):
            if event.kind != "PUT" or not event.kv.key.startswith(processing):
                continue
            parsed = ks.parse(event.kv.key)
            assert parsed is not None
            assert parsed.task_id is not None
            record = Record.from_json(State.PROCESSING, event.kv.value)
            slot = Slot(
                parsed.task_id,
                event.kv.key,
                event.kv.create_revision,
                event.kv.mod_revision,
                record,
            )
            if db.txn(plan_move(ks, slot, succeeded(record, result=None, now=now))).succeeded:
                completed += 1
        other_s += clock() - t1
        now += 0.001
    t0 = clock()
    for event in db.events:  # the last completions, as the watch tells them
        view.apply(event)
    view.advance(db.revision)
    leader_s += clock() - t0
    return {
        "nodes": NODES,
        "tasks": tasks,
        "assignments_per_s": round(assigned / leader_s, 1),
        "leader_cpu_us_per_task": round(leader_s / tasks * 1e6, 2),
        "memory_etcd_and_nodes_cpu_us_per_task": round(other_s / tasks * 1e6, 2),
        "decisions": decisions,
        "batches": batches,
        "tasks_per_assign_batch": round(assigned / max(assign_batches, 1), 1),
    }


async def leader_ceiling(env: Env) -> Result:
    """The scenario: :func:`leader_ceiling_run` at the run's scale (pure CPU, no I/O)."""
    return leader_ceiling_run(env.scale(TASKS))
