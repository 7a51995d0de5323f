"""The session (tm_sidecar/etcd/_session.py) on a real etcd: a lease kept alive by hand,
trusted only while it is surely alive, and lost loudly."""

from __future__ import annotations

import os
import signal

import pytest
import trio

from tests.helpers import stop_process, wait_for
from tm_sidecar import EtcdConfig, LeaseLost
from tm_sidecar.etcd import close_session, connect, open_session, run_keepalive
from tm_sidecar.ops._embedded import EtcdProcess


async def test_the_keepalive_keeps_the_lease_past_its_ttl(etcd_server: EtcdProcess) -> None:
    etcd = connect(EtcdConfig(endpoints=(etcd_server.endpoint,), timeout_s=3.0))
    session = await open_session(etcd, 2)
    first = session.trusted_until
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(run_keepalive, etcd, session)
            # Renewed past the first grant's whole TTL: the lease lives on.
            await wait_for(lambda: session.trusted_until > first + 2.0, timeout_s=10)
            assert session.trusted()
            assert await etcd.lease_ttl(session.lease) > 0
            nursery.cancel_scope.cancel()
    finally:
        await close_session(etcd, session)
        await etcd.aclose()
    assert session.lost.is_set()


async def test_a_lease_revoked_behind_its_back_is_lost_at_the_next_renewal(
    etcd_server: EtcdProcess,
) -> None:
    etcd = connect(EtcdConfig(endpoints=(etcd_server.endpoint,), timeout_s=3.0))
    session = await open_session(etcd, 2)
    try:
        await etcd.lease_revoke(session.lease)
        with trio.fail_after(5), pytest.raises(LeaseLost):
            await run_keepalive(etcd, session)
        assert session.lost.is_set()
        assert not session.trusted()
    finally:
        await etcd.aclose()


async def test_an_unanswering_etcd_ends_the_trust_before_the_lease_can_expire(
    own_etcd: EtcdProcess,
) -> None:
    etcd = connect(EtcdConfig(endpoints=(own_etcd.endpoint,), timeout_s=1.0))
    session = await open_session(etcd, 3)
    pid = own_etcd.pid
    assert pid is not None
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(run_keepalive, etcd, session)
            await stop_process(pid)
            stopped_at = trio.current_time()
            with trio.fail_after(5):
                await session.wait_untrusted()
            # Untrusted a margin (TTL/3) before the lease could expire, counted from the
            # last renewal that etcd answered, which was before etcd stopped.
            assert trio.current_time() < stopped_at + session.ttl_s
            assert not session.lost.is_set()  # not lost yet: only no longer trusted
            nursery.cancel_scope.cancel()
    finally:
        os.kill(pid, signal.SIGCONT)
        await etcd.aclose()
