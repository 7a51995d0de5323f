"""The election recipe's shell (tm_sidecar/leader/_election.py) on a real etcd: standing,
waiting for a turn, and resigning when etcd cannot answer."""

from __future__ import annotations

import os
import signal

import trio

from tests.helpers import stop_process
from tm_sidecar import EtcdConfig, LeaseLost
from tm_sidecar.core import Keyspace
from tm_sidecar.etcd import close_session, connect, open_session
from tm_sidecar.leader import current_leader, resign, stand, wait_to_lead
from tm_sidecar.leader._election import RESIGN_TIMEOUT_S
from tm_sidecar.ops._embedded import EtcdProcess


async def test_the_first_candidate_leads_and_a_resignation_hands_over(
    own_etcd: EtcdProcess,
) -> None:
    etcd = connect(EtcdConfig(endpoints=(own_etcd.endpoint,), timeout_s=3.0))
    ks = Keyspace("election-test")
    first, second = await open_session(etcd, 5), await open_session(etcd, 5)
    try:
        fence = await wait_to_lead(etcd, ks, await stand(etcd, ks, first, "a"))
        waiting = await stand(etcd, ks, second, "b")
        leader = await current_leader(etcd, ks)
        assert leader is not None
        assert leader[1] == fence.revision
        await resign(etcd, fence)
        with trio.fail_after(5):
            taken = await wait_to_lead(etcd, ks, waiting)
        assert taken.revision == waiting.revision != fence.revision
    finally:
        await close_session(etcd, first)
        await close_session(etcd, second)
        await etcd.aclose()


async def test_a_resignation_etcd_cannot_answer_gives_up_soon(own_etcd: EtcdProcess) -> None:
    """A leader steps down when it can no longer trust its lease, which is when etcd is
    slow to answer (its raft leader just died, say). The resignation must not hold the
    sidecar for a whole request deadline: it stands again as soon as its lease is trusted
    again (on its own key, if the delete did not commit). Before the bound, the
    step-down waited for the write deadline (1 s; 2 s before that), and the fault test's
    stall after a raft-leader kill was about that much longer."""
    etcd = connect(EtcdConfig(endpoints=(own_etcd.endpoint,), timeout_s=5.0))
    ks = Keyspace("resign-test")
    session = await open_session(etcd, 30)
    fence = await wait_to_lead(etcd, ks, await stand(etcd, ks, session, "a"))
    pid = own_etcd.pid
    assert pid is not None
    await stop_process(pid)
    try:
        started = trio.current_time()
        outcome = await resign(etcd, fence)  # shielded: it ends by its own bound
        took = trio.current_time() - started
        # Its own bound ended it, not the write deadline (1 s) that bounded it before (which
        # would answer "refused"); and it did wait for etcd that long.
        assert outcome == "gave_up"
        assert took >= RESIGN_TIMEOUT_S * 0.9
    finally:
        os.kill(pid, signal.SIGCONT)
    # The same session stands again (on its key, or on a new one if the delete committed
    # once etcd went on) and leads: nothing was lost by giving up early. The abandoned
    # delete may land after the new stand took the old key over (it compares that key's
    # create revision, still the same): the candidate key is then gone while the
    # session lives, and standing once more is the recovery.
    with trio.fail_after(10):
        while True:
            try:
                again = await wait_to_lead(etcd, ks, await stand(etcd, ks, session, "a"))
                break
            except LeaseLost:
                assert await etcd.lease_ttl(session.lease) > 0, "the session itself was lost"
    assert again.key == fence.key
    await close_session(etcd, session)
    await etcd.aclose()
