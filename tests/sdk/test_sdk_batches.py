"""The Python SDK's worker on the batched frames (docs/protocol.md, "Batches"): a burst
comes in ``tasks`` pushes and its outcomes and progress go in ``report`` frames."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio
from taskmanager import TaskManager, WorkerTask

from tests.procs import sidecars
from tm_sidecar.ops._embedded import EtcdProcess


async def test_a_burst_comes_in_few_pushes_and_goes_back_in_few_reports(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    n = 40
    async with sidecars(etcd_server, namespace, tmp_path, "n1") as (sc,):
        async with TaskManager(str(sc.socket_path)) as producer:
            tasks = []
            for i in range(n):
                task = await producer.create({"i": i})
                task.options["queue"] = "burst"
                await task.commit()
                tasks.append(task)
            async with TaskManager(str(sc.socket_path)) as manager:
                wire = manager._connection._wire
                ops: list[str] = []
                items: list[int] = []
                pushes: list[str] = []
                send_request, send_items = wire.send_request, wire.send_items
                on_push = wire._on_push

                async def spy_request(op: str, fields: dict[str, Any], **kw: Any) -> Any:
                    ops.append(op)
                    return await send_request(op, fields, **kw)

                async def spy_items(op: str, key: str, encoded: list[bytes]) -> Any:
                    ops.append(op)
                    items.append(len(encoded))
                    return await send_items(op, key, encoded)

                async def spy_push(frame: dict[str, Any]) -> None:
                    pushes.append(frame["push"])
                    await on_push(frame)

                wire.send_request = spy_request  # type: ignore[method-assign]
                wire.send_items = spy_items  # type: ignore[method-assign,assignment]
                wire._on_push = spy_push
                all_started = trio.Event()
                started = 0

                async def handler(task: WorkerTask) -> int:
                    nonlocal started
                    started += 1
                    if started == n:
                        all_started.set()
                    await all_started.wait()  # all end together: their outcomes can share
                    assert await task.update({"at": task.data["i"]})
                    return int(task.data["i"]) * 2

                await manager.process(handler, queue="burst", concurrency=n)
                results = [await t.result(timeout=30) for t in tasks]
        assert results == [i * 2 for i in range(n)]
        # Deliveries only in tasks pushes; outcomes and progress only in reports.
        assert "task" not in pushes
        assert "tasks" in pushes
        assert pushes.count("tasks") < n
        assert not {"complete", "progress", "fail"} & set(ops), ops
        assert sum(items) == 2 * n
        assert len(items) < 2 * n
        assert max(items) > 1
