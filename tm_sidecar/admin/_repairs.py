"""Repairs of a namespace straight from etcd (retry failed tasks, cancel, purge), for
``tmctl`` and the dashboard. Each decision is the core's (``core.retried``,
``plan_retry``, ``retake``); this module reads and commits."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable

from ..core import (
    HeldBy,
    Keyspace,
    KeyValue,
    Record,
    Retake,
    Slot,
    State,
    TaskId,
    cancelled,
    plan_cancel,
    plan_retry,
    retake,
    retried,
)
from ..etcd import Etcd


async def retake_guard(etcd: Etcd, ks: Keyspace, task_id: TaskId, rec: Record) -> Retake | None:
    """A retried task with a unique key is live again: it takes its guard back in the
    same transaction, if no other task holds it (None: then it is not retried)."""
    key = rec.options.unique_key
    kv = await etcd.get(ks.unique(key)) if key is not None else None
    answer = retake(ks, task_id, rec, kv)
    if isinstance(answer, HeldBy):
        print(
            f"tmctl: task {task_id} not retried: its unique key {answer.key!r} is held by task "
            f"{answer.task_id} now",
            file=sys.stderr,
        )
        return None
    return answer


async def retry_failed(etcd: Etcd, ks: Keyspace, kvs: Iterable[KeyValue]) -> int:
    """Send these failed records back to pending with fresh attempts; answers how many
    moved (a record that changed meanwhile, whose task is gone, or whose unique key
    another task holds now, is left alone)."""
    moved = 0
    for kv in kvs:
        parsed = ks.parse(kv.key)
        if parsed is None or parsed.task_id is None:
            continue
        rec = Record.from_json(State.FAILED, kv.value)
        slot = Slot(parsed.task_id, kv.key, kv.create_revision, kv.mod_revision, rec)
        pending = retried(rec, now=time.time())
        guard = await retake_guard(etcd, ks, parsed.task_id, rec)
        if guard is None:
            continue
        txn = plan_retry(ks, slot, pending, guards=guard.compares, extra=guard.writes)
        if (await etcd.txn(txn)).succeeded:
            moved += 1
    return moved


async def cancel_record(
    etcd: Etcd, ks: Keyspace, kv: KeyValue, state: State, *, by: str = "tmctl"
) -> bool:
    """Cancel a pending, delayed or processing task: the same move a sidecar makes for a
    client's cancel (failed as ``Cancelled``; a running handler is cancelled on its
    node). No retention lease here (tmctl does not know the sidecars' setting): the
    record stays until purged. False if it moved meanwhile."""
    parsed = ks.parse(kv.key)
    if parsed is None or parsed.task_id is None:
        return False
    rec = Record.from_json(state, kv.value)
    slot = Slot(parsed.task_id, kv.key, kv.create_revision, kv.mod_revision, rec)
    record = cancelled(rec, now=time.time(), message=f"cancelled by an operator ({by})")
    return (await etcd.txn(plan_cancel(ks, slot, record))).succeeded


async def purge_records(etcd: Etcd, ks: Keyspace, kvs: Iterable[KeyValue]) -> int:
    """Delete these completed or failed records, then their payloads; answers how many.

    Plain deletes, not transactions: a full etcd refuses every transaction but still
    deletes. Safe without a compare: a final record never changes, and the payload goes
    only when this call removed the record (a record retried meanwhile is gone from
    here, and its task keeps its payload).
    """
    purged = 0
    for kv in kvs:
        parsed = ks.parse(kv.key)
        if parsed is None or parsed.task_id is None:
            continue
        if await etcd.delete(kv.key):
            await etcd.delete(ks.task(parsed.task_id))
            purged += 1
    return purged
