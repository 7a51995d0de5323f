"""Leader election, etcd's recipe (``client/v3/concurrency/election.go``).

Each candidate puts ``election/<lease-hex>`` under its session lease if absent; the
lowest create revision leads; every other candidate waits for the deletion of its
immediate predecessor only. The leader's key create revision is its fencing token.
"""

from __future__ import annotations

import logging
from contextlib import aclosing

import trio

from ._errors import EtcdFull, EtcdUnavailable, LeaseLost, LeaseNotFound
from ._session import Session
from .core import Compare, Delete, Fence, Keyspace, Put, Range, Txn, dumps
from .etcd import Etcd, retrying

log = logging.getLogger("tm_sidecar.election")


async def campaign(etcd: Etcd, ks: Keyspace, session: Session, node_id: str) -> Fence:
    """Wait until this session leads; answers its fence. Raises LeaseLost if the key goes."""
    key = ks.candidate(session.lease)
    value = dumps({"node": node_id, "lease": f"{session.lease:x}"})
    txn = Txn(
        compare=(Compare.absent(key),),
        success=(Put(key, value, session.lease),),
        failure=(Range(key),),
    )
    try:
        result = await retrying(lambda: etcd.txn(txn), what="campaign")
    except LeaseNotFound as exc:
        session.lost.set()
        raise LeaseLost(f"lease {session.lease:x} is gone") from exc
    if result.succeeded:
        my_revision = result.revision
    elif result.ranges and result.ranges[0].kvs:
        my_revision = result.ranges[0].kvs[0].create_revision
    else:
        raise LeaseLost("candidate key vanished while campaigning")
    log.info("candidate key=%s revision=%d", key, my_revision)
    while True:
        kvs, revision = await retrying(
            lambda: etcd.list_prefix(ks.election()), what="election list"
        )
        if not any(kv.key == key and kv.create_revision == my_revision for kv in kvs):
            raise LeaseLost("candidate key is gone: the session lease expired")
        earlier = [kv for kv in kvs if kv.create_revision < my_revision]
        if not earlier:
            return Fence(key, my_revision)
        predecessor = max(earlier, key=lambda kv: kv.create_revision)
        log.info("waiting for predecessor %s", predecessor.key)
        await _wait_deleted(etcd, predecessor.key, revision)


async def _wait_deleted(etcd: Etcd, key: str, seen_at: int) -> None:
    try:
        async with aclosing(etcd.watch_once(key, seen_at + 1, prefix=False)) as _items:
            async for changes in _items:
                if any(e.kind == "DELETE" for e in changes.events):
                    return
    except EtcdUnavailable as exc:
        # Look again from the top: the predecessor may be gone by now.
        log.warning("watch on predecessor failed: %s", exc)
        await trio.sleep(0.2)


async def resign(etcd: Etcd, fence: Fence, timeout_s: float = 2.0) -> None:
    """Give up leadership at once so that the next candidate takes over (bounded, shielded)."""
    with trio.move_on_after(timeout_s, shield=True):
        try:
            await etcd.txn(Txn(compare=(fence.compare(),), success=(Delete(fence.key),)))
            log.info("resigned leadership")
        except (EtcdUnavailable, EtcdFull) as exc:
            # The key goes with the session's lease (a revoke works even on a full etcd).
            log.warning("could not resign: %s", exc)


async def current_leader(etcd: Etcd, ks: Keyspace) -> tuple[str, int] | None:
    """The leading candidate's (value, create revision), or None."""
    kvs, _ = await etcd.list_prefix(ks.election())
    if not kvs:
        return None
    first = min(kvs, key=lambda kv: kv.create_revision)
    return first.value, first.create_revision
