"""What the leader clears away while it leads: payloads left without a state key, rate
windows whose starts have left them, unique-key guards whose window has passed. Each
delete compares the key's mod revision as read, so a key that changed meanwhile stays."""

from __future__ import annotations

import json

from .._errors import EtcdFull
from ..core import (
    MAX_TXN_OPS,
    Compare,
    Delete,
    Guard,
    Keyspace,
    KeyValue,
    RateWindow,
    Txn,
    orphan_payloads,
)
from ..etcd import Etcd


async def sweep_payloads(etcd: Etcd, ks: Keyspace, max_ops: int = MAX_TXN_OPS) -> int:
    """Delete the payloads of finished tasks whose records have expired; answers how many.

    A final record expires with its retention lease and its payload is left behind (see
    ``core.orphan_payloads``). Each delete compares the payload's mod revision as listed,
    so a payload taken again by a create of the same id (which rewrites it) is kept.
    When etcd is full it takes no transaction, and no create either: plain deletes then
    (freeing space is what a full etcd needs). ``max_ops`` deletes go in one transaction
    (what etcd takes: the leader's learned limit).
    """
    kvs, _ = await etcd.list_prefix(ks.prefix, keys_only=True, page=10_000)
    listed = {kv.key: kv.mod_revision for kv in kvs}
    keys = [ks.task(t) for t in orphan_payloads(ks, listed)]
    deleted = 0
    for start in range(0, len(keys), max_ops):
        chunk = keys[start : start + max_ops]
        try:
            batch = Txn(
                compare=tuple(Compare.modified_at(k, listed[k]) for k in chunk),
                success=tuple(Delete(k) for k in chunk),
            )
            if (await etcd.txn(batch)).succeeded:
                deleted += len(chunk)
                continue
            for k in chunk:  # one was taken again meanwhile: each alone
                one = Txn(compare=(Compare.modified_at(k, listed[k]),), success=(Delete(k),))
                deleted += (await etcd.txn(one)).succeeded
        except EtcdFull:
            for k in chunk:
                deleted += await etcd.delete(k)
    return deleted


async def sweep_rate_windows(etcd: Etcd, ks: Keyspace, now: float) -> int:
    """Delete the persisted rate windows that hold no start any more (a concurrency key
    not seen for a period); answers how many. Guarded by the mod revision as read."""
    kvs, _ = await etcd.list_prefix(ks.rates())
    deleted = 0
    for kv in kvs:
        try:
            period = float(json.loads(kv.value).get("period_s", 0.0))
            window = RateWindow.from_json(kv.value)
        except (ValueError, TypeError, AttributeError):
            continue
        window.prune(now, period)
        if window.starts:
            continue
        deleted += await _delete_unchanged(etcd, kv)
    return deleted


async def sweep_unique_guards(etcd: Etcd, ks: Keyspace, now: float) -> int:
    """Delete the guards of unique keys whose task finished longer than its
    ``unique_for_s`` ago (creates would take them over anyway); answers how many. Each
    delete compares the guard as read, so one taken over meanwhile stays."""
    kvs, _ = await etcd.list_prefix(ks.uniques())
    deleted = 0
    for kv in kvs:
        try:
            guard = Guard.from_kv(kv)
        except (ValueError, TypeError):
            continue
        if guard.until_at is None or guard.until_at > now:
            continue
        deleted += await _delete_unchanged(etcd, kv)
    return deleted


async def _delete_unchanged(etcd: Etcd, kv: KeyValue) -> bool:
    """Delete a key unless it changed since it was read as ``kv``; answers whether it went."""
    txn = Txn(compare=(Compare.modified_at(kv.key, kv.mod_revision),), success=(Delete(kv.key),))
    return (await etcd.txn(txn)).succeeded
