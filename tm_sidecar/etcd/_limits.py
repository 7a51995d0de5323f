"""What an etcd allows: the most operations it takes in one branch of a transaction
(``--max-txn-ops``, 128 by default), learned from its own answers.

etcd checks the length of each branch (compares, success, failure) before it runs a
transaction, and refuses one over its limit whole ("too many operations in txn
request"). A probe with no compares and its operations in the failure branch is free:
the (empty) success branch runs, the failure branch's reads never do, yet they count.
So a binary search over a few probes finds the limit exactly without writing anything.
"""

from __future__ import annotations

import logging

from .._errors import EtcdError
from ..core import MAX_TXN_OPS, TXN_OPS_CEILING, Range, Txn
from ._interface import Etcd
from ._retry import retrying

log = logging.getLogger("tm_sidecar.etcd")


async def _takes(etcd: Etcd, key: str, ops: int) -> bool:
    probe = Txn(failure=tuple(Range(key) for _ in range(ops)))
    try:
        await retrying(lambda: etcd.txn(probe), what="learn etcd's --max-txn-ops")
    except EtcdError:
        return False
    return True


async def learn_max_txn_ops(etcd: Etcd, key: str, ceiling: int = TXN_OPS_CEILING) -> int:
    """The most operations per transaction branch that etcd takes, up to ``ceiling``.

    ``key`` is a key the caller may read (a key of its namespace: a role limited to the
    namespace's prefix must be able to run the probe). If even etcd's default is refused
    (something else is wrong: permissions, say), the default is assumed and the batches
    that follow find out the rest.
    """
    if await _takes(etcd, key, ceiling):
        return ceiling
    low, high = 1, ceiling  # low is taken, high refused
    if not await _takes(etcd, key, low):
        log.warning("could not learn etcd's --max-txn-ops", extra={"assumed": MAX_TXN_OPS})
        return min(MAX_TXN_OPS, ceiling)
    # etcd's default first: most clusters run with it, and then two probes settle it.
    for guess in (MAX_TXN_OPS, MAX_TXN_OPS + 1):
        if low < guess < high:
            if await _takes(etcd, key, guess):
                low = guess
            else:
                high = guess
    while high - low > 1:
        middle = (low + high) // 2
        if await _takes(etcd, key, middle):
            low = middle
        else:
            high = middle
    return low
