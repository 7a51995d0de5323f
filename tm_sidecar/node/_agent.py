"""The node agent's run loop: follows this node's assignments (from the sidecar's one
watch, or a watch of its own) and starts an attempt for each (``_attempt.py``).

The handler types (``_handlers.py``), the registry (``_registry.py``) and the agent's
state (``_agent_state.py``) are their own modules; their names are re-exported here
because other parts (the socket server, the command line) import them from
``node._agent``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence
from contextlib import aclosing

import trio

from ..core import Keyspace, KeyValue, NodeId, Range, Records, Slot, State, TaskId, Txn
from ..etcd import Changes, Etcd, Reset
from ..etcd._feed import Feed
from ..etcd._group import GroupCommit, txn_group
from ..etcd._session import RetentionLeases, Session
from ._agent_state import AgentState, RecentTasks, Running
from ._attempt import AgentIO, AttemptEnv, report_carried, run_attempt
from ._handlers import (
    HandedBack,
    Handler,
    HandlerFailed,
    Permanent,
    Snooze,
    TaskContext,
)
from ._registry import Registration, Registry
from ._remote import SPEC_READ_BATCH, RemoteAttempt, RemoteAttempts, RemoteHandler

__all__ = [
    "AgentState",
    "HandedBack",
    "Handler",
    "HandlerFailed",
    "Permanent",
    "RecentTasks",
    "Registration",
    "Registry",
    "RemoteAttempt",
    "RemoteHandler",
    "Snooze",
    "TaskContext",
    "run_agent",
]

log = logging.getLogger("tm_sidecar.agent")

#: Outcomes waiting for a flush at most; an attempt with one more waits for room
#: (backpressure, as a batch completer has), so that a stalled etcd holds the
#: attempts, not an unbounded queue of their reports.
MAX_WAITING_REPORTS = 5000


async def _report_carried(env: AttemptEnv, nursery: trio.Nursery) -> None:
    """Report every outcome the node carries, as it is carried (each attempt once)."""
    state = env.state
    started: set[tuple[TaskId, int]] = set()
    while True:
        changed = state.carried_changed
        for slot, outcome in list(state.carried.values()):
            key = (slot.task_id, slot.create_revision)
            if key not in started:
                started.add(key)
                nursery.start_soon(report_carried, env, slot, outcome)
        await changed.wait()


async def run_agent(
    etcd: Etcd,
    ks: Keyspace,
    node_id: NodeId,
    session: Session,
    registry: Registry,
    retention: RetentionLeases,
    state: AgentState,
    *,
    clock: Callable[[], float] = time.time,
    rng: random.Random | None = None,
    max_result_bytes: int = 256 * 1024,
    one_watch: Feed | None = None,
    records: Records | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run this node's assignments until cancelled; they come from ``one_watch``, the
    sidecar's one watch, when given (else from a watch of its own). ``records`` parses
    what it sees (the sidecar's, shared with its leader and hub). Started once it has
    listed the assignments it holds and started their attempts."""
    records = records or Records()
    rng = rng or random.Random()
    state._changed()
    # Under load many attempts read their task and report at once: each kind of request
    # goes to etcd in batches (see _group.py); alone, each goes at once.
    reports = txn_group(
        etcd,
        ops_per_item=3,
        name="report",
        max_waiting=MAX_WAITING_REPORTS,
        stats=state.report_batches,
    )

    async def read(keys: Sequence[str]) -> list[KeyValue | None]:
        answer = await etcd.txn(Txn(success=tuple(Range(k) for k in keys)))
        return [r.kvs[0] if r.kvs else None for r in answer.ranges]

    specs: GroupCommit[str, KeyValue | None] = GroupCommit(
        read,
        max_items=SPEC_READ_BATCH,
        keys=lambda key: (key,),
        name="task read",
        stats=state.read_batches,
    )
    io = AgentIO(etcd, reports, specs)
    env = AttemptEnv(
        io=io,
        ks=ks,
        registry=registry,
        retention=retention,
        state=state,
        clock=clock,
        rng=rng,
        max_result_bytes=max_result_bytes,
    )

    remote = RemoteAttempts(env, records)

    async with trio.open_nursery() as nursery:
        await nursery.start(reports.run)
        await nursery.start(specs.run)
        await nursery.start(remote.run)
        nursery.start_soon(io.announcer.run, io)
        # Outcomes an earlier session could not report (etcd was away) go first, and
        # those carried later too: the agent of a session that has just been lost may
        # still be handing its ended attempts over when this one starts.
        nursery.start_soon(_report_carried, env, nursery)

        def consider(kv: KeyValue) -> None:
            parsed = ks.parse(kv.key)
            if parsed is None or parsed.task_id is None:
                return
            record = records.parse(State.PROCESSING, kv.value)
            if record.session != session.lease:
                return  # an earlier incarnation's: the leader reaps it
            if not state.attempts.begin(parsed.task_id, kv.create_revision):
                return  # started here already: a rewrite of it, a repeat, or a re-list
            slot = Slot(parsed.task_id, kv.key, kv.create_revision, kv.mod_revision, record)
            reg = registry.pick(record.options.queue)
            if reg is not None and reg.remote is not None:
                # An SDK worker's: driven by the remote attempts, no task of its own.
                running = Running(kv.create_revision)
                state.running[parsed.task_id] = running
                state._changed()
                remote.start(slot, running, reg)
                return
            running = Running(kv.create_revision, trio.CancelScope())
            state.running[parsed.task_id] = running
            state._changed()
            nursery.start_soon(run_attempt, env, slot, running)

        def vanished(task_id: TaskId, create_revision: int) -> None:
            known = state.running.get(task_id)
            if (
                known is not None
                and known.create_revision == create_revision
                and not known.reporting
            ):
                log.warning("assignment withdrawn: cancelling its handler", extra={"task": task_id})
                known.cancel()

        serving = False
        assignments = (
            one_watch.informer(ks.assignments(node_id), track_prev=True)
            if one_watch is not None
            else etcd.informer(ks.assignments(node_id))
        )
        async with aclosing(assignments) as _items:
            async for item in _items:
                if isinstance(item, Reset):
                    live = {kv.key: kv for kv in item.kvs}
                    for task_id, running in list(state.running.items()):
                        key = ks.state(State.PROCESSING, task_id, node_id)
                        if key not in live or live[key].create_revision != running.create_revision:
                            vanished(task_id, running.create_revision)
                    for kv in item.kvs:
                        consider(kv)
                    if not serving:
                        serving = True
                        task_status.started()
                elif isinstance(item, Changes):
                    for event in item.events:
                        if event.kind == "PUT":
                            consider(event.kv)
                        elif event.prev is not None:
                            parsed = ks.parse(event.kv.key)
                            if parsed is not None and parsed.task_id is not None:
                                vanished(parsed.task_id, event.prev.create_revision)
                state.attempts.settle()
