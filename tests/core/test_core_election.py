"""The election's decisions, driven directly: the campaign transaction, what its answer
means, and whose turn it is from one listing of the candidates."""

from __future__ import annotations

import pytest

from tm_sidecar.core import (
    Compare,
    Fence,
    Keyspace,
    KeyValue,
    Lead,
    Put,
    Range,
    RangeResult,
    Txn,
    TxnResult,
    WaitFor,
    Withdrawn,
    interpret_campaign,
    leading,
    plan_campaign,
    predecessor,
)

KS = Keyspace(namespace="t")


def candidate(lease: int, create_revision: int) -> KeyValue:
    return KeyValue(KS.candidate(lease), "{}", create_revision, create_revision, 1, lease)


def test_a_campaign_puts_its_key_under_its_lease_if_absent_and_reads_it_otherwise() -> None:
    key = KS.candidate(0xAB)
    assert plan_campaign(KS, 0xAB, "n1") == Txn(
        compare=(Compare.absent(key),),
        success=(Put(key, '{"node":"n1","lease":"ab"}', 0xAB),),
        failure=(Range(key),),
    )


@pytest.mark.parametrize(
    ("result", "fence"),
    [
        # Put now: the key's create revision is the transaction's.
        (TxnResult(True, 40), Fence(KS.candidate(7), 40)),
        # There already (a campaign again under one lease): it keeps its place.
        (
            TxnResult(False, 40, (RangeResult((candidate(7, 12),), 1, False, 40),)),
            Fence(KS.candidate(7), 12),
        ),
        # Neither: the key went with its lease between the compare and the read.
        (TxnResult(False, 40, (RangeResult((), 0, False, 40),)), None),
        (TxnResult(False, 40), None),
    ],
)
def test_the_campaigns_answer(result: TxnResult, fence: Fence | None) -> None:
    assert interpret_campaign(KS, 7, result) == fence


ME = Fence(KS.candidate(5), 20)


@pytest.mark.parametrize(
    ("listing", "turn"),
    [
        ([candidate(5, 20)], Lead(ME)),
        ([candidate(5, 20), candidate(9, 30)], Lead(ME)),  # a later one waits for us
        # Only the immediate predecessor is watched, not the leader: no herd on a resign.
        (
            [candidate(1, 3), candidate(2, 11), candidate(5, 20), candidate(6, 25)],
            WaitFor(KS.candidate(2)),
        ),
        ([candidate(2, 11), candidate(1, 3), candidate(5, 20)], WaitFor(KS.candidate(2))),
        ([candidate(1, 3)], Withdrawn()),  # our key expired
        ([candidate(1, 3), candidate(5, 44)], Withdrawn()),  # another incarnation of it
        ([], Withdrawn()),
    ],
)
def test_whose_turn_it_is(listing: list[KeyValue], turn: object) -> None:
    assert predecessor(listing, ME) == turn


def test_the_leader_is_the_oldest_candidate() -> None:
    assert leading([]) is None
    assert leading([candidate(2, 11), candidate(1, 3), candidate(5, 20)]) == candidate(1, 3)
