"""Manager-level events across a sidecar restart: resumed from the last revision seen,
or an explicit gap when etcd compacted what was missed (issue 11 item 10).

Its own module: it compacts its etcd.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import trio
from taskmanager import TaskManager

from tests.helpers import Observed, wait_for
from tests.procs import SidecarProcess, create_tasks
from tests.server.test_protocol import Raw
from tm_sidecar import EtcdConfig
from tm_sidecar.core import Keyspace
from tm_sidecar.etcd import connect
from tm_sidecar.ops._embedded import EtcdProcess


async def _outage(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path, *, compact: bool
) -> tuple[list[str], Observed[dict[str, Any]], Observed[dict[str, Any]]]:
    """A monitor on sidecar ``b`` while tasks flow through ``a``; ``b`` is killed and
    started again mid-stream. Returns every task id, and what the monitor heard."""
    a = SidecarProcess("a", etcd_server.endpoint, namespace, tmp_path / "a.log")
    b = SidecarProcess("b", etcd_server.endpoint, namespace, tmp_path / "b.log", handler=None)
    completed: Observed[dict[str, Any]] = Observed()
    gaps: Observed[dict[str, Any]] = Observed()
    ids: list[str] = []
    etcd = connect(EtcdConfig(endpoints=(etcd_server.endpoint,)))
    try:
        for sc in (a, b):
            sc.start()
            await sc.wait_serving()
        async with (
            TaskManager(str(a.socket_path)) as producer,
            TaskManager(str(b.socket_path)) as monitor,
        ):
            monitor.on("completed", completed.add)
            monitor.on("gap", gaps.add)
            await monitor.wait_subscribed()
            stop = trio.Event()

            async def flow() -> None:
                # Tasks go on flowing through ``a`` the whole time.
                while not stop.is_set():
                    task = await (await producer.create({"work_s": 0})).commit()
                    ids.append(task.id)
                    await task.result(timeout=20)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(flow)
                await completed.wait_until(lambda c: len(c) >= 3)
                b.kill()
                # Events the monitor cannot hear while its sidecar is down.
                outage = [await (await producer.create({"work_s": 0})).commit() for _ in range(5)]
                ids.extend(t.id for t in outage)
                for task in outage:
                    await task.result(timeout=20)
                if compact:
                    await etcd.compact(await etcd.revision())
                b.start()
                await b.wait_serving()
                flowed = len(ids)
                await wait_for(lambda: len(ids) >= flowed + 3)  # more, after the restart
                stop.set()
            if compact:
                await gaps.wait_until(bool, timeout_s=20)
            else:
                await completed.wait_until(
                    lambda c: {e["task_id"] for e in c} >= set(ids), timeout_s=20
                )
    finally:
        for sc in (a, b):
            sc.stop()
        await etcd.aclose()
    return ids, completed, gaps


async def test_manager_events_resume_after_a_sidecar_restart_with_none_missing(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    ids, completed, gaps = await _outage(etcd_server, namespace, tmp_path, compact=False)
    heard = Counter(e["task_id"] for e in completed.items)
    assert set(heard) >= set(ids)
    assert max(heard.values()) == 1  # and none told twice
    revisions = [e["revision"] for e in completed.items]
    assert revisions == sorted(revisions)
    assert gaps.items == []


async def test_a_compacted_outage_is_told_as_a_gap_naming_the_tasks_to_read_again(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    ids, completed, gaps = await _outage(etcd_server, namespace, tmp_path, compact=True)
    (gap,) = gaps.items
    assert gap["reason"] == "compacted"
    missed = set(ids) - {e["task_id"] for e in completed.items}
    assert missed  # the outage's five at least
    assert missed <= set(gap["task_ids"])
    assert gap["from_revision"] < gap["to_revision"]


async def test_a_long_replay_waits_for_the_client_instead_of_dropping_it(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    sc = SidecarProcess("n1", etcd_server.endpoint, namespace, tmp_path / "n1.log", handler=None)
    etcd = connect(EtcdConfig(endpoints=(etcd_server.endpoint,)))
    try:
        sc.start()
        await sc.wait_serving()

        def subscribe(from_revision: int | None = None) -> tuple[Raw, int]:
            raw = Raw(sc.socket_path)
            assert raw.call("hello", version=1)["ok"]
            fields = {} if from_revision is None else {"from_revision": from_revision}
            answer = raw.call("subscribe", **fields)
            assert answer["ok"], answer
            return raw, int(answer["result"]["revision"])

        first, since = await trio.to_thread.run_sync(subscribe)
        first.close()
        # More events than a client's outbox holds (1,000 frames), in a few revisions.
        ids = await create_tasks(etcd, Keyspace(namespace=namespace), 1500)

        def replay() -> list[dict[str, Any]]:
            raw, _ = subscribe(since)
            events = [f["event"] for f in raw.pushed if f.get("push") == "event"]
            try:
                while len(events) < len(ids):
                    frame = raw.frame()
                    assert frame is not None, f"dropped after {len(events)} events"
                    if frame.get("push") == "event":
                        events.append(frame["event"])
                assert raw.call("ping")["result"] == "pong"
            finally:
                raw.close()
            return events

        events = await trio.to_thread.run_sync(replay)
    finally:
        sc.stop()
        await etcd.aclose()
    assert [e["task_id"] for e in events] == ids
    assert {e["event"] for e in events} == {"queued"}
