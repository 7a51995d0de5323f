"""A producer whose sidecar cannot reach etcd hears ``etcd_unavailable`` within the
create deadline, never later (issue 12, the "etcd faults" target)."""

from __future__ import annotations

from pathlib import Path

import trio

from tests.cluster import Proxy
from tests.helpers import poll_until
from tests.procs import SidecarProcess
from tests.system.test_cluster_faults import _raw_create, raw_create_answer
from tm_sidecar.ops._embedded import EtcdProcess

DEADLINE_S = 1.0


async def test_a_create_cut_off_from_etcd_fails_within_its_deadline(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    proxy = Proxy(etcd_server.client_port)
    # Set by the environment, as an operator may: the sidecar's etcd calls keep their
    # own (longer) deadline, and a create would try twice.
    sc = SidecarProcess(
        "n1",
        proxy.endpoint,
        namespace,
        tmp_path / "n1.log",
        handler=None,
        env={"TM_CREATE_DEADLINE": str(DEADLINE_S)},
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.run)
            sc.start()
            await sc.wait_serving()
            took, outcome = await _raw_create(sc.socket_path, {"n": 0})
            assert outcome == "ok"
            # Silent, not refused: every call waits for an answer that never comes.
            proxy.cut()
            for n in range(2):
                took, answer = await raw_create_answer(sc.socket_path, {"n": n + 1})
                assert answer["error"]["code"] == "etcd_unavailable"
                # The create's own deadline ended it (not an etcd call's longer one, nor a
                # second try), and not before it had passed.
                assert "create_deadline_s" in answer["error"]["message"]
                assert took >= DEADLINE_S * 0.9, took
            proxy.heal()

            async def creates() -> bool:
                return (await _raw_create(sc.socket_path, {"n": 9}))[1] == "ok"

            await poll_until(creates, timeout_s=20)  # and back once etcd is
            nursery.cancel_scope.cancel()
    finally:
        sc.stop()
