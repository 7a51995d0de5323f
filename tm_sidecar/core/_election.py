"""Leader election, etcd's recipe (``client/v3/concurrency/election.go``), as decisions.

Each candidate puts ``election/<lease-hex>`` under its session lease if absent; the
lowest create revision leads; every other candidate waits for the deletion of its
immediate predecessor only. The leader's key create revision is its fencing token. The
shell executes the transaction and the waits; what they mean is decided here.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from ._keys import Keyspace
from ._model import dumps
from ._plan import Fence
from ._txn import Compare, KeyValue, Put, Range, Txn, TxnResult


def plan_campaign(ks: Keyspace, lease: int, node_id: str) -> Txn:
    """Put this session's candidate key if absent; otherwise read it (a campaign again
    under the same lease finds its key and keeps its place)."""
    key = ks.candidate(lease)
    value = dumps({"node": node_id, "lease": f"{lease:x}"})
    return Txn(
        compare=(Compare.absent(key),),
        success=(Put(key, value, lease),),
        failure=(Range(key),),
    )


def interpret_campaign(ks: Keyspace, lease: int, result: TxnResult) -> Fence | None:
    """The candidacy a :func:`plan_campaign` transaction answered: the key and its create
    revision (the fence it will lead with); None when the key vanished meanwhile (its
    lease expired)."""
    key = ks.candidate(lease)
    if result.succeeded:
        return Fence(key, result.revision)
    if result.ranges and result.ranges[0].kvs:
        return Fence(key, result.ranges[0].kvs[0].create_revision)
    return None


@attrs.frozen
class Lead:
    """No candidate came before: lead with this fence."""

    fence: Fence


@attrs.frozen
class WaitFor:
    """Wait for the deletion of the immediate predecessor's key, then look again."""

    key: str


@attrs.frozen
class Withdrawn:
    """The candidate key is gone (its session lease expired): the campaign is over."""


Turn = Lead | WaitFor | Withdrawn


def predecessor(candidates: Iterable[KeyValue], me: Fence) -> Turn:
    """Whose turn it is, from one listing of the candidates: this one's (it has the lowest
    create revision), its immediate predecessor's (the latest before it: waiting on that
    key alone spares the herd a wake-up per resignation), or nobody's (it is gone)."""
    listed = list(candidates)
    if not any(kv.key == me.key and kv.create_revision == me.revision for kv in listed):
        return Withdrawn()
    earlier = [kv for kv in listed if kv.create_revision < me.revision]
    if not earlier:
        return Lead(me)
    return WaitFor(max(earlier, key=lambda kv: kv.create_revision).key)


def leading(candidates: Iterable[KeyValue]) -> KeyValue | None:
    """The leading candidate (lowest create revision), or None."""
    return min(candidates, key=lambda kv: kv.create_revision, default=None)
