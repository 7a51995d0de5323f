"""A fenced batch's answer, read directly: committed, a conflict, or deposed."""

from __future__ import annotations

import pytest

from tm_sidecar.core import (
    Committed,
    Conflict,
    Deposed,
    Fence,
    Keyspace,
    KeyValue,
    RangeResult,
    TxnResult,
    interpret_batch,
)

KS = Keyspace(namespace="t")
FENCE = Fence(KS.candidate(5), 20)


def fence_read(*kvs: KeyValue) -> tuple[RangeResult, ...]:
    return (RangeResult(kvs, len(kvs), False, 90),)


@pytest.mark.parametrize(
    ("result", "answer"),
    [
        (TxnResult(True, 90), Committed(90)),
        # The fence holds: another compare failed, the view was stale.
        (
            TxnResult(False, 90, fence_read(KeyValue(FENCE.key, "{}", 20, 20, 1, 5))),
            Conflict(90),
        ),
        # The fence key is gone (resigned, expired) or is another incarnation.
        (TxnResult(False, 90, fence_read()), Deposed()),
        (TxnResult(False, 90, fence_read(KeyValue(FENCE.key, "{}", 61, 61, 1, 5))), Deposed()),
        (TxnResult(False, 90), Deposed()),
    ],
)
def test_a_batchs_answer(result: TxnResult, answer: object) -> None:
    assert interpret_batch(FENCE, result) == answer
