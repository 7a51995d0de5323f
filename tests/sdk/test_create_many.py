"""Bulk creates (``create_many``) end to end: the SDK, a real sidecar, a real etcd."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from taskmanager import BlockingTaskManager, TaskManager, WorkerTask
from taskmanager.protocol import (
    MAX_CREATE_MANY,
    InvalidRequest,
    PayloadTooLarge,
    TaskNotFound,
)

from tests.procs import sidecars
from tm_sidecar.core import MAX_CREATE_MANY as SIDECAR_MAX
from tm_sidecar.core import MAX_TXN_OPS
from tm_sidecar.ops._embedded import EtcdProcess

#: Tasks in one transaction of a bulk create today (two writes each); the figure the
#: tests below lean on is only that a call of many more tasks takes several.
PER_TXN = MAX_TXN_OPS // 2


async def _exists(manager: TaskManager, task_id: str) -> bool:
    try:
        await manager.get(task_id)
    except TaskNotFound:
        return False
    return True


async def test_many_tasks_in_one_call_run_with_their_options_and_ids_in_order(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    count = 3 * PER_TXN + 5  # four transactions
    async with (
        sidecars(etcd_server, namespace, tmp_path, "n1") as (sc,),
        TaskManager(str(sc.socket_path)) as manager,
    ):
        ids = await manager.create_many(
            [{"n": i} for i in range(count)], queue="bulk", priority=2, timeout_s=30
        )
        assert len(ids) == count
        assert len(set(ids)) == count
        first, last = await manager.get(ids[0]), await manager.get(ids[-1])
        assert first["payload"] == {"n": 0}
        assert last["payload"] == {"n": count - 1}
        assert first["options"]["queue"] == "bulk"
        assert last["options"]["priority"] == 2

        seen: list[int] = []

        async def handler(task: WorkerTask) -> int:
            seen.append(task.data["n"])
            return int(task.data["n"])

        await manager.process(handler, queue="bulk", concurrency=8)
        results = [await manager.result(task_id, timeout=60) for task_id in ids]
        assert results == list(range(count))
        assert sorted(seen) == list(range(count))


async def test_a_repeat_with_the_same_ids_creates_nothing_twice(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    async with (
        sidecars(etcd_server, namespace, tmp_path, "n1") as (sc,),
        TaskManager(str(sc.socket_path)) as manager,
    ):
        ids = await manager.create_many(["a", "b", "c"], delay=3600)
        again = await manager.create_many(["a", "b", "c"], task_ids=ids, delay=3600)
        assert again == ids
        states = {(await manager.get(i))["state"] for i in ids}
        assert states == {"delayed"}
        # A repeat with another payload under one of the ids is refused.
        with pytest.raises(InvalidRequest, match="taken"):
            await manager.create_many(["a", "B", "c"], task_ids=ids)


async def test_an_id_taken_by_another_task_stops_at_its_transaction(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    """The transactions before land, the one holding the taken id lands not at all, and
    the error tells which: the documented partial answer."""
    count = 1500  # several transactions, whatever etcd's --max-txn-ops (up to 1,000 tasks)
    taken_at = count - 10  # not in the first transaction
    async with (
        sidecars(etcd_server, namespace, tmp_path, "n1") as (sc,),
        TaskManager(str(sc.socket_path)) as manager,
    ):
        other = await (await manager.create("someone else's", task_id="taken-1")).commit()
        ids = [f"bulk-{i}" for i in range(count)]
        ids[taken_at] = other.id
        with pytest.raises(InvalidRequest, match=rf"tasks\[{taken_at}\].*taken") as caught:
            await manager.create_many(list(range(count)), task_ids=ids, delay=3600)
        details = caught.value.details
        assert details is not None
        assert details["task_ids"] == ids
        committed = details["committed"]
        # A transaction boundary before the taken id: the ones before it landed whole,
        # the taken id's transaction (and any after it) not at all.
        assert 0 < committed <= taken_at
        for i in (0, committed - 1):
            assert await _exists(manager, ids[i])
        for i in {committed, taken_at - 1, taken_at + 1, count - 1} - {taken_at}:
            if i >= committed:
                assert not await _exists(manager, ids[i]), i
        assert (await manager.get(other.id))["payload"] == "someone else's"
        # Finishing the call: without the taken id, the same ids go through.
        ids[taken_at] = "bulk-again"
        assert await manager.create_many(list(range(count)), task_ids=ids) == ids


#: One malformed item (the fourth), what it is refused with, and how the refusal names it.
MALFORMED: list[tuple[Any, type[Exception], str]] = [
    ({"payload": 1, "options": {"priority": "high"}}, InvalidRequest, r"tasks\[3\]"),
    ({"payload": 1, "task_id": ""}, InvalidRequest, r"tasks\[3\]"),
    ({"options": {}}, InvalidRequest, r"tasks\[3\] must be an object with a payload"),
    ({"payload": 1, "run_at": "soon"}, InvalidRequest, r"tasks\[3\]: run_at"),
    ({"payload": 1, "options": {"unique_key": "k"}}, InvalidRequest, "unique_key"),
    ({"payload": "x" * 300_000}, PayloadTooLarge, r"tasks\[3\]"),
    ({"payload": 1, "task_id": "ok-0"}, InvalidRequest, r"tasks\[3\]: task id ok-0 is given twice"),
    ("not a task", InvalidRequest, r"tasks\[3\]"),
]


async def test_one_malformed_item_refuses_the_call_and_creates_nothing(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    async with (
        sidecars(etcd_server, namespace, tmp_path, "n1") as (sc,),
        TaskManager(str(sc.socket_path)) as manager,
    ):
        for bad, error, message in MALFORMED:
            tasks: list[Any] = [{"payload": i, "task_id": f"ok-{i}"} for i in range(6)]
            tasks[3] = bad
            with pytest.raises(error, match=message):
                await manager._request("create_many", {"tasks": tasks})
            for i in (0, 1, 2, 4, 5):
                assert not await _exists(manager, f"ok-{i}"), (bad, i)


async def test_too_many_or_too_large_is_refused_clearly(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    assert MAX_CREATE_MANY == SIDECAR_MAX
    async with (
        sidecars(etcd_server, namespace, tmp_path, "n1") as (sc,),
        TaskManager(str(sc.socket_path)) as manager,
    ):
        # The SDK refuses before sending; the sidecar refuses too, for any client.
        with pytest.raises(InvalidRequest, match="at most 10000"):
            await manager.create_many([0] * (MAX_CREATE_MANY + 1))
        too_many = [{"payload": 0, "task_id": f"m{i}"} for i in range(MAX_CREATE_MANY + 1)]
        with pytest.raises(InvalidRequest, match="at most 10000"):
            await manager._request("create_many", {"tasks": too_many})
        assert not await _exists(manager, "m0")
        with pytest.raises(PayloadTooLarge, match="max_frame"):
            await manager.create_many(["x" * 1000] * 2000, task_ids=[f"l{i}" for i in range(2000)])
        assert not await _exists(manager, "l0")
        with pytest.raises(InvalidRequest, match="at least one"):
            await manager.create_many([])
        with pytest.raises(InvalidRequest, match="unique_key"):
            await manager.create_many([1], unique_key="k")
        # The connection is still good.
        assert len(await manager.create_many([1, 2])) == 2


async def test_the_blocking_facade_creates_many(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    async with sidecars(etcd_server, namespace, tmp_path, "n1") as (sc,):

        def blocking_producer() -> list[str]:
            with BlockingTaskManager(str(sc.socket_path)) as tm:
                ids = tm.create_many([{"x": 1}, {"x": 2}], priority=1)
                assert tm.get(ids[1])["payload"] == {"x": 2}
                return ids

        ids = await trio.to_thread.run_sync(blocking_producer)
        assert len(ids) == 2
