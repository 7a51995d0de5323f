"""Leader election, etcd's recipe (``client/v3/concurrency/election.go``).

Each candidate puts ``election/<lease-hex>`` under its session lease if absent; the
lowest create revision leads; every other candidate waits for the deletion of its
immediate predecessor only. The leader's key create revision is its fencing token.
"""

from __future__ import annotations

import logging
from contextlib import aclosing
from typing import Literal

import trio

from .._errors import EtcdFull, EtcdUnavailable, LeaseLost, LeaseNotFound
from ..core import (
    Delete,
    Fence,
    Keyspace,
    Lead,
    Txn,
    Withdrawn,
    interpret_campaign,
    leading,
    plan_campaign,
    predecessor,
)
from ..etcd import Etcd, retrying
from ..etcd._session import Session

log = logging.getLogger("tm_sidecar.election")


async def campaign(etcd: Etcd, ks: Keyspace, session: Session, node_id: str) -> Fence:
    """Wait until this session leads; answers its fence. Raises LeaseLost if the key goes."""
    candidacy = await stand(etcd, ks, session, node_id)
    return await wait_to_lead(etcd, ks, candidacy)


async def stand(etcd: Etcd, ks: Keyspace, session: Session, node_id: str) -> Fence:
    """Put this session's candidate key (or find it); answers the candidacy: the key and
    the fence it would lead with. Raises LeaseLost if the lease or the key is gone."""
    txn = plan_campaign(ks, session.lease, node_id)
    try:
        result = await retrying(lambda: etcd.txn(txn), what="campaign")
    except LeaseNotFound as exc:
        session.lost.set()
        raise LeaseLost(f"lease {session.lease:x} is gone") from exc
    candidacy = interpret_campaign(ks, session.lease, result)
    if candidacy is None:
        raise LeaseLost("candidate key vanished while campaigning")
    log.info("candidate", extra={"key": candidacy.key, "revision": candidacy.revision})
    return candidacy


async def wait_to_lead(etcd: Etcd, ks: Keyspace, candidacy: Fence) -> Fence:
    """Wait until ``candidacy`` leads; answers its fence. Raises LeaseLost if the key goes."""
    while True:
        kvs, revision = await retrying(
            lambda: etcd.list_prefix(ks.election()), what="election list"
        )
        turn = predecessor(kvs, candidacy)
        if isinstance(turn, Lead):
            return turn.fence
        if isinstance(turn, Withdrawn):
            raise LeaseLost("candidate key is gone: the session lease expired")
        log.info("waiting for the predecessor", extra={"key": turn.key})
        await _wait_deleted(etcd, turn.key, revision)


async def _wait_deleted(etcd: Etcd, key: str, seen_at: int) -> None:
    try:
        async with aclosing(etcd.watch_once(key, seen_at + 1, prefix=False)) as _items:
            async for changes in _items:
                if any(e.kind == "DELETE" for e in changes.events):
                    return
    except EtcdUnavailable as exc:
        # Look again from the top: the predecessor may be gone by now.
        log.warning("watch on the predecessor failed", extra={"error": str(exc)})
        await trio.sleep(0.2)


#: How long a resignation waits for etcd. A healthy etcd deletes the key in milliseconds;
#: one that does not answer by then is electing a raft leader or gone, and waiting longer
#: only holds the step-down (the fault test's stall after a raft-leader kill). An
#: unanswered resignation costs nothing: the key goes with the session's lease, and this
#: session stands on it again once its lease is trusted.
RESIGN_TIMEOUT_S = 0.25


#: How a resignation ended: the key deleted (or already not ours), etcd refused or
#: could not be reached within its own deadline, or ``resign``'s bound passed first.
Resigned = Literal["resigned", "refused", "gave_up"]


async def resign(etcd: Etcd, fence: Fence, timeout_s: float = RESIGN_TIMEOUT_S) -> Resigned:
    """Give up leadership at once so that the next candidate takes over (bounded, shielded)."""
    with trio.move_on_after(timeout_s, shield=True):
        try:
            await etcd.txn(Txn(compare=(fence.compare(),), success=(Delete(fence.key),)))
            log.info("resigned leadership")
            return "resigned"
        except (EtcdUnavailable, EtcdFull) as exc:
            # The key goes with the session's lease (a revoke works even on a full etcd).
            log.warning("could not resign", extra={"error": str(exc)})
            return "refused"
    return "gave_up"


async def current_leader(etcd: Etcd, ks: Keyspace) -> tuple[str, int] | None:
    """The leading candidate's (value, create revision), or None."""
    kvs, _ = await etcd.list_prefix(ks.election())
    first = leading(kvs)
    return None if first is None else (first.value, first.create_revision)
