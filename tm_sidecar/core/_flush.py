"""A flush of independent guarded transactions (an agent's reports) as one: merged, and,
when the merge is refused, split by which parts' guards held, from the keys the failed
transaction read. Pure: the shell (``etcd/_group.py``) sends what is planned here."""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from ._txn import MAX_TXN_OPS, KeyValue, Range, Txn, TxnResult, compare_holds


def merge_txns(txns: Sequence[Txn]) -> Txn:
    """Several guarded transactions as one: every compare, then every success op.

    It succeeds only if each part would have; failure branches are dropped (a caller that
    needs one part's answer commits that part alone).
    """
    return Txn(
        compare=tuple(c for t in txns for c in t.compare),
        success=tuple(op for t in txns for op in t.success),
    )


def merge_with_reads(txns: Sequence[Txn]) -> tuple[Txn, tuple[str, ...]]:
    """:func:`merge_txns`, whose failure branch reads every compared key (those keys, in
    order; none when there are more than a branch may hold), so that a merge that fails
    tells which of its parts would have held."""
    merged = merge_txns(txns)
    keys = tuple(dict.fromkeys(c.key for c in merged.compare))
    if len(keys) > MAX_TXN_OPS:
        return merged, ()
    return attrs.evolve(merged, failure=tuple(Range(k) for k in keys)), keys


@attrs.frozen
class Split:
    """A refused merge's parts, by index: those whose guards held (to merge again), those
    whose guards did not (refused: nothing of theirs was written), and those refused
    that have a failure branch of their own (to commit alone for its answer)."""

    held: tuple[int, ...]
    refused: tuple[int, ...]
    alone: tuple[int, ...]


def split_refused(txns: Sequence[Txn], keys: Sequence[str], result: TxnResult) -> Split:
    """Which parts of a merge of ``txns`` (made by :func:`merge_with_reads`, whose read
    ``keys`` it names) would have held, as its refused ``result`` read them."""
    seen: dict[str, KeyValue | None] = {
        k: (r.kvs[0] if r.kvs else None) for k, r in zip(keys, result.ranges, strict=True)
    }
    held: list[int] = []
    refused: list[int] = []
    alone: list[int] = []
    for i, txn in enumerate(txns):
        if all(compare_holds(c, seen[c.key]) for c in txn.compare):
            held.append(i)
        elif txn.failure:
            alone.append(i)
        else:
            refused.append(i)
    return Split(tuple(held), tuple(refused), tuple(alone))
