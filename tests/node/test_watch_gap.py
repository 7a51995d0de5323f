"""The sidecar's one watch falls behind etcd's compaction while a creator waits: the
event hub lists again and says so (issue 12 item 2).

Its own module: it compacts its etcd.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
from taskmanager import TaskManager, WorkerTask

from tests.cluster import Proxy
from tests.helpers import Observed
from tests.procs import SidecarProcess
from tm_sidecar import EtcdConfig
from tm_sidecar.core import Keyspace
from tm_sidecar.etcd import connect
from tm_sidecar.ops._embedded import EtcdProcess

#: Well under the SDK's own re-read of a waited-for task (RESYNC_S, 30 s): the result
#: must come from the gap, not from that.
RESULT_WITHIN_S = 12.0


async def test_a_creator_gets_its_result_and_subscribers_the_gap_when_the_watch_is_compacted(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    etcd = connect(EtcdConfig(endpoints=(etcd_server.endpoint,)))
    ks = Keyspace(namespace=namespace)
    proxy = Proxy(etcd_server.client_port)
    # ``worker`` runs the task; ``creator``, which reaches etcd through the proxy, has
    # no worker: its watch alone tells it how the task ends.
    worker = SidecarProcess(
        "worker", etcd_server.endpoint, namespace, tmp_path / "worker.log", handler=None
    )
    creator = SidecarProcess(
        "creator", proxy.endpoint, namespace, tmp_path / "creator.log", handler=None
    )
    gaps: Observed[dict[str, Any]] = Observed()
    release = trio.Event()
    started = trio.Event()

    async def handler(task: WorkerTask) -> Any:
        started.set()
        await release.wait()
        return {"done": task.data}

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.run)
            for sc in (worker, creator):
                sc.start()
                await sc.wait_serving()
            async with (
                TaskManager(str(worker.socket_path)) as runs,
                TaskManager(str(creator.socket_path)) as creates,
            ):
                await runs.process(handler, concurrency=1)
                creates.on("gap", gaps.add)
                await creates.wait_subscribed()
                task = await (await creates.create({"n": 1})).commit()
                with trio.fail_after(20):
                    await started.wait()

                # The creator's sidecar loses etcd; meanwhile the task completes and
                # etcd compacts the history its watch would resume from.
                proxy.drop()
                release.set()
                assert await runs.result(task.id, timeout=20) == {"done": {"n": 1}}
                await etcd.put(ks.prefix + "aaa/after", "x")  # in the watched range
                await etcd.compact(await etcd.revision())
                proxy.heal()

                with trio.fail_after(RESULT_WITHIN_S):
                    assert await task.result() == {"done": {"n": 1}}
                await gaps.wait_until(bool, timeout_s=RESULT_WITHIN_S)
            nursery.cancel_scope.cancel()
    finally:
        for sc in (worker, creator):
            sc.stop()
        await etcd.aclose()
    gap = gaps.items[0]
    assert gap["reason"] == "watch_reset"
    assert task.id in gap["task_ids"]
    assert gap["to_revision"] > gap["from_revision"]
    assert "event watch started again" in creator.log()
