"""Several tm-sidecar processes on one etcd: crashes, a paused leader, an etcd restart.

Each test audits every state change through its own watch: a task never enters a state
while it is in another (one state, one assignment), and each result is written once.
"""

from __future__ import annotations

import signal
from pathlib import Path

import trio

from tests.helpers import poll_until
from tests.procs import Auditor, SidecarProcess, create_tasks, leader_node, wait_registered
from tm_sidecar import Etcd, EtcdConfig, EtcdUnavailable
from tm_sidecar.core import Keyspace, Range, State
from tm_sidecar.etcd import connect
from tm_sidecar.ops._embedded import EtcdProcess

TTL = 2


def _procs(endpoint: str, namespace: str, tmp_path: Path, names: list[str]) -> list[SidecarProcess]:
    return [
        SidecarProcess(n, endpoint, namespace, tmp_path / f"{n}.log", lease_ttl_s=TTL)
        for n in names
    ]


async def _queue_depths(etcd: Etcd, ks: Keyspace) -> dict[str, int]:
    return {
        s.value: (await etcd.range(Range(ks.state_prefix(s), prefix=True, count_only=True))).count
        for s in State
    }


async def test_three_sidecars_survive_killing_the_leader_and_a_worker(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    ks = Keyspace(namespace=namespace)
    etcd = connect(EtcdConfig(endpoints=(etcd_server.endpoint,)))
    procs = _procs(etcd_server.endpoint, namespace, tmp_path, ["a", "b", "c"])
    try:
        procs[0].start()
        await wait_registered(etcd, ks, ["a"])
        for p in procs[1:]:
            p.start()
        await wait_registered(etcd, ks, ["a", "b", "c"])
        assert await leader_node(etcd, ks) == "a"
        auditor = Auditor(ks)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(auditor.run, etcd, await etcd.revision() + 1)
            ids = await create_tasks(etcd, ks, 1000, work_s=0.02)
            with trio.fail_after(60):
                while sum(auditor.completed_puts.values()) < 250:
                    await auditor.changed.wait()
            procs[0].kill()  # the leader
            procs[1].kill()  # and a worker, with tasks in flight
            killed_at = trio.current_time()
            kill_revision = await etcd.revision()
            await auditor.wait_completed(ids, timeout_s=120)
            nursery.cancel_scope.cancel()
        first_new_assignment = min(t for t, rev in auditor.assign_times if rev > kill_revision)
        takeover_s = first_new_assignment - killed_at
        print(f"\nassignments resumed {takeover_s:.2f} s after SIGKILL of the leader (TTL {TTL} s)")
        assert takeover_s <= TTL + 1.0
        assert auditor.violations == []
        assert all(auditor.completed_puts[t] == 1 for t in ids)  # each result written once
        assert sum(auditor.completed_puts.values()) == 1000
        depths = await _queue_depths(etcd, ks)
        assert depths == {
            "pending": 0,
            "delayed": 0,
            "processing": 0,
            "completed": 1000,
            "failed": 0,
        }
        assert await leader_node(etcd, ks) == "c"
        assert "became leader" in procs[2].log()
    finally:
        for p in procs:
            p.stop()
        await etcd.aclose()


async def test_a_paused_leader_is_fenced_and_steps_down(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    ks = Keyspace(namespace=namespace)
    etcd = connect(EtcdConfig(endpoints=(etcd_server.endpoint,)))
    procs = _procs(etcd_server.endpoint, namespace, tmp_path, ["a", "b"])
    try:
        procs[0].start()
        await wait_registered(etcd, ks, ["a"])
        procs[1].start()
        await wait_registered(etcd, ks, ["a", "b"])
        assert await leader_node(etcd, ks) == "a"
        auditor = Auditor(ks)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(auditor.run, etcd, await etcd.revision() + 1)
            ids = await create_tasks(etcd, ks, 300, work_s=0.05)
            with trio.fail_after(60):
                while sum(auditor.completed_puts.values()) < 30:
                    await auditor.changed.wait()
            procs[0].signal(signal.SIGSTOP)
            # b takes over once a's lease has expired.

            async def b_leads() -> bool:
                return await leader_node(etcd, ks) == "b"

            await poll_until(b_leads, timeout_s=TTL + 5)
            procs[0].signal(signal.SIGCONT)
            await auditor.wait_completed(ids, timeout_s=120)
            nursery.cancel_scope.cancel()
        assert auditor.violations == []
        assert all(auditor.completed_puts[t] == 1 for t in ids)
        log_a = procs[0].log()
        assert "stepped down" in log_a or "session lost" in log_a
        assert await leader_node(etcd, ks) == "b"
    finally:
        for p in procs:
            p.stop()
        await etcd.aclose()


async def test_sidecars_ride_out_an_etcd_restart(
    own_etcd: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    ks = Keyspace(namespace=namespace)
    etcd = connect(EtcdConfig(endpoints=(own_etcd.endpoint,), timeout_s=2.0))
    procs = _procs(own_etcd.endpoint, namespace, tmp_path, ["a", "b"])
    try:
        for p in procs:
            p.start()
        await wait_registered(etcd, ks, ["a", "b"])
        ids = await create_tasks(etcd, ks, 300, work_s=0.02)
        await trio.to_thread.run_sync(own_etcd.kill)
        await trio.to_thread.run_sync(own_etcd.start)
        with trio.fail_after(90):
            while True:
                try:
                    depths = await _queue_depths(etcd, ks)
                except EtcdUnavailable:
                    depths = {}
                if depths.get("completed") == len(ids):
                    break
                await trio.sleep(0.2)
        assert depths["failed"] == 0
        assert depths["processing"] == depths["pending"] == depths["delayed"] == 0
        for p in procs:
            assert p.proc is not None
            assert p.proc.poll() is None, p.log()[-3000:]
    finally:
        for p in procs:
            assert p.stop() == 0
        await etcd.aclose()
