"""A full etcd is survivable (DESIGN.md 3.12): creates are refused with a clear, retryable
error before etcd's quota is reached, the tasks already accepted still finish, reads keep
working, and one documented command recovers.

Against a real etcd with a 16 MiB quota and 100 KB payloads, as an operator would see it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.helpers import poll_until, running_sidecars, wait_for
from tm_sidecar import EtcdFull, QueueFull, State, TaskContext
from tm_sidecar.core import Keyspace, Put, Range, Record, TaskId, TaskOptions, TaskSpec, Txn
from tm_sidecar.etcd import Etcd, EtcdConfig, connect
from tm_sidecar.ops._embedded import EtcdProcess

QUOTA = 16 * 1024 * 1024
PAYLOAD = "x" * 100_000


TMCTL = str(Path(sys.executable).parent / "tmctl")


@pytest.fixture
def small_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    """An etcd of its own whose database quota is 16 MiB (no auto-compaction)."""
    proc = EtcdProcess(
        data_dir=tmp_path_factory.mktemp("etcd-small"), quota_bytes=QUOTA, auto_compaction="0"
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


async def _alarms(etcd: Etcd) -> list[str]:
    return [alarm for _, alarm in await etcd.alarms()]


async def _fill(etcd: Etcd, ks: Keyspace) -> int:
    """Write finished tasks with big payloads straight to etcd (as a queue without a
    retention would keep them) until it raises its NOSPACE alarm."""
    n = 0
    while True:
        spec = TaskSpec(
            id=TaskId(f"filler-{n}"), payload=PAYLOAD, options=TaskOptions(), created_at=0.0
        )
        done = Record(state=State.COMPLETED, options=TaskOptions(), since_at=0.0, attempts=1)
        try:
            await etcd.txn(
                Txn(
                    success=(
                        Put(ks.task(spec.id), spec.to_json()),
                        Put(ks.state(State.COMPLETED, spec.id), done.to_json()),
                    )
                )
            )
        except EtcdFull:
            return n
        n += 1


async def test_creates_stop_before_the_quota_and_accepted_tasks_still_finish(
    small_etcd: EtcdProcess, namespace: str
) -> None:
    async with running_sidecars(
        small_etcd.endpoint, namespace, "n1", quota_bytes=QUOTA, compact_interval_s=0
    ) as (sc,):
        await wait_for(lambda: sc.admission.db_size > 0)
        accepted = []
        refused: QueueFull | None = None
        for _ in range(400):
            try:
                accepted.append((await sc.create({"blob": PAYLOAD})).id)
            except QueueFull as exc:
                refused = exc
                break
        assert refused is not None, "creates went on past the quota"
        assert "quota" in str(refused)
        assert "tmctl recover" in str(refused)
        assert refused.retryable
        assert 50 < len(accepted) < 200
        done = trio.Event()
        finished = 0

        async def handler(task: TaskContext) -> int:
            nonlocal finished
            finished += 1
            if finished == len(accepted):
                done.set()
            return len(task.payload["blob"])

        sc.register(handler, concurrency=8)
        for task_id in accepted:
            info = await sc.wait(task_id, timeout_s=60)
            assert info.state is State.COMPLETED
        assert await _alarms(sc.etcd) == []  # the headroom held: etcd never filled up


RESULT = "r" * 200_000


async def _settled(sc: Any, accepted: list[TaskId], timeout_s: float) -> dict[TaskId, State]:
    """Wait until every accepted task completed, or etcd raised an alarm (the caller's
    assertion then says so); answers each task's last state read."""
    states: dict[TaskId, State] = {}

    async def settled() -> bool:
        if await _alarms(sc.etcd):
            return True
        for task_id in accepted:
            if states.get(task_id) is not State.COMPLETED:
                states[task_id] = (await sc.get(task_id)).state
        return all(s is State.COMPLETED for s in states.values())

    await poll_until(settled, timeout_s=timeout_s)
    return states


async def test_room_is_kept_for_large_results_so_accepted_tasks_finish(
    small_etcd: EtcdProcess, namespace: str
) -> None:
    """Tiny payloads, 200 KB results (issue 21.8): the payloads alone never near the
    quota, so only the room kept for the results stops the creates in time."""
    async with running_sidecars(
        small_etcd.endpoint, namespace, "n1", quota_bytes=QUOTA, compact_interval_s=0
    ) as (sc,):
        await wait_for(lambda: sc.admission.db_size > 0)

        async def handler(task: TaskContext) -> str:
            return RESULT

        sc.register(handler, concurrency=4)
        # The room kept is the largest recent result: one result teaches it.
        first = await sc.create({"n": 0})
        assert (await sc.wait(first.id, timeout_s=30)).state is State.COMPLETED
        await wait_for(lambda: sc.admission.result_room > len(RESULT))
        accepted = [first.id]
        refused: QueueFull | None = None
        for n in range(1, 400):
            try:
                accepted.append((await sc.create({"n": n})).id)
            except QueueFull as exc:
                refused = exc
                break
        assert refused is not None, "creates went on past the room the results need"
        assert "for the outcome of each" in str(refused)
        states = await _settled(sc, accepted, timeout_s=60)
        assert await _alarms(sc.etcd) == []  # the room held: etcd never filled up
        assert set(states.values()) == {State.COMPLETED}
        assert sc.admission.db_size < QUOTA
        assert 10 < len(accepted) < 80  # 16 MiB * 0.8 / 200 KB is about 67
    # A sidecar started later keeps the same room before it sees a result of its own.
    async with running_sidecars(
        small_etcd.endpoint, namespace, "n2", quota_bytes=QUOTA, compact_interval_s=0
    ) as (later,):
        await wait_for(lambda: later.admission.result_room > len(RESULT))


async def test_with_the_result_limit_as_room_any_result_fits(
    small_etcd: EtcdProcess, namespace: str
) -> None:
    """Property 12 for any result within the limits (issue 21.8): with ``result_room`` at
    the result limit, a burst of creates before any result is seen is refused in time,
    and every accepted task then completes with a result at the limit. With the default
    (room for results like the latest ones: none yet), the burst went on for hundreds."""
    limit = 256 * 1024
    at_limit = "x" * (limit - 64)  # as large a result as the limit takes
    async with running_sidecars(
        small_etcd.endpoint,
        namespace,
        "n1",
        quota_bytes=QUOTA,
        compact_interval_s=0,
        result_room=limit,
    ) as (sc,):
        await wait_for(lambda: sc.admission.db_size > 0)
        accepted: list[TaskId] = []
        refused: QueueFull | None = None
        for n in range(400):
            try:
                accepted.append((await sc.create({"n": n})).id)
            except QueueFull as exc:
                refused = exc
                break
        assert refused is not None, "creates went on past the room results at the limit need"
        assert 10 < len(accepted) < 80  # 16 MiB * 0.8 / 256 KiB is about 51

        async def handler(task: TaskContext) -> str:
            return at_limit

        sc.register(handler, concurrency=4)
        states = await _settled(sc, accepted, timeout_s=90)
        assert await _alarms(sc.etcd) == []  # the room held: etcd never filled up
        assert set(states.values()) == {State.COMPLETED}


async def test_a_full_etcd_refuses_creates_retryably_keeps_reads_and_recovers(
    small_etcd: EtcdProcess, namespace: str
) -> None:
    ks = Keyspace(namespace=namespace)
    # No headroom of our own: the create below meets etcd's own refusal.
    async with running_sidecars(
        small_etcd.endpoint,
        namespace,
        "n1",
        quota_bytes=QUOTA,
        quota_fraction=1.0,
        compact_interval_s=0,
    ) as (sc,):
        ran = []

        async def handler(task: TaskContext) -> None:
            ran.append(task.id)

        sc.register(handler)
        finished = await sc.create({"n": 1})
        await sc.wait(finished.id, timeout_s=10)
        # Something else fills etcd up behind the queue's back.
        filler = connect(EtcdConfig(endpoints=(small_etcd.endpoint,)))
        try:
            await _fill(filler, ks)
        finally:
            await filler.aclose()
        assert await _alarms(sc.etcd) == ["NOSPACE"]
        with pytest.raises(EtcdFull, match="tmctl recover") as refused:
            await sc.create({"n": 2})
        assert refused.value.retryable
        assert refused.value.code == "etcd_full"
        # Reads are plain ranges: they work over quota.
        info = await sc.get(finished.id)
        assert info.state is State.COMPLETED
        # The documented recovery, as an operator runs it.
        recover = await trio.run_process(
            [
                TMCTL,
                "--etcd",
                small_etcd.endpoint,
                "--namespace",
                namespace,
                "--json",
                "recover",
                "--yes",
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert recover.returncode == 0, recover.stderr.decode()
        report = json.loads(recover.stdout)
        assert report["purged"] >= 100
        assert report["alarms_after"] == []
        assert report["db_size_in_use_after"] < report["db_size_in_use_before"]
        # The queue takes tasks again, and runs them.
        await wait_for(lambda: not sc.admission.nospace, timeout_s=10)
        again = await sc.create({"n": 3})
        info = await sc.wait(again.id, timeout_s=10)
        assert info.state is State.COMPLETED
        assert again.id in ran
        kept = await sc.etcd.range(Range(ks.task(finished.id)))
        assert kept.count == 0  # the purged completed task went with its payload


def test_tmctl_recover_asks_before_it_deletes(small_etcd: EtcdProcess) -> None:
    run = subprocess.run(
        [TMCTL, "--etcd", small_etcd.endpoint, "recover"],
        input="",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert run.returncode == 1
    assert "--yes" in run.stderr


async def test_the_leader_decides_again_once_space_is_freed(
    small_etcd: EtcdProcess, namespace: str
) -> None:
    """A reap refused while etcd is full happens once space is freed, though freeing it
    changes nothing the leader watches (tmctl recover deletes completed records)."""
    ks = Keyspace(namespace=namespace)
    async with running_sidecars(
        small_etcd.endpoint,
        namespace,
        "n1",
        "n2",
        quota_bytes=QUOTA,
        quota_fraction=1.0,
        compact_interval_s=0,
    ) as (leader, worker):
        started = trio.Event()

        async def hang(task: TaskContext) -> None:
            started.set()
            await trio.sleep_forever()

        worker.register(hang)
        spec = await leader.create({"n": 1})
        with trio.fail_after(10):
            await started.wait()
        filler = connect(EtcdConfig(endpoints=(small_etcd.endpoint,)))
        try:
            await _fill(filler, ks)
            # The worker's node goes away for good; the leader's reap of its task is
            # refused while etcd is full.
            worker.stop()

            async def node_gone() -> bool:
                return await filler.get(ks.node("n2")) is None

            await poll_until(node_gone, timeout_s=15)
            await poll_until(lambda: _conflicted(leader), timeout_s=15)
            recover = [TMCTL, "--etcd", small_etcd.endpoint, "--namespace", namespace]
            report = await trio.run_process(
                [*recover, "--json", "recover", "--yes"],
                capture_stdout=True,
                check=True,
            )
            assert json.loads(report.stdout)["alarms_after"] == []

            async def reaped() -> bool:
                kvs, _ = await filler.list_prefix(ks.state_prefix(State.PROCESSING))
                return not any(kv.key.endswith(spec.id) for kv in kvs)

            await poll_until(reaped, timeout_s=15)
        finally:
            await filler.aclose()


async def _conflicted(sidecar: Any) -> bool:
    return bool(sidecar.leader.conflicts)


def test_an_overloaded_etcd_is_not_a_full_one() -> None:
    """The gateway answers both with gRPC code 8 and HTTP 429: only a full etcd must
    refuse creates and send an operator to `tmctl recover`."""
    from tm_sidecar._errors import EtcdUnavailable
    from tm_sidecar.etcd._errors import translate_gateway

    full = {"code": 8, "message": "etcdserver: mvcc: database space exceeded"}
    busy = {"code": 8, "message": "etcdserver: too many requests"}
    assert isinstance(translate_gateway(429, full), EtcdFull)
    assert isinstance(translate_gateway(429, busy), EtcdUnavailable)


def test_the_typical_result_is_the_largest_of_the_latest() -> None:
    from tm_sidecar.node._admission import LargestRecent

    sizes = LargestRecent(window=3)
    assert sizes.largest == 0
    seen = []
    for size in (5, 1, 9, 2, 2, 3, 1, 1, 1, 7):
        sizes.see(size)
        seen.append(sizes.largest)
    assert seen == [5, 5, 9, 9, 9, 3, 3, 3, 1, 7]
