"""Attempt history (issue 20 item 7): every ended attempt's node, times, outcome and
error stay in the task's record across retries, and every reader shows them."""

from __future__ import annotations

from tests.helpers import running_sidecars
from tm_sidecar import Backoff, State, TaskContext, TaskOptions
from tm_sidecar.ops._embedded import EtcdProcess
from tm_sidecar.ops._tmctl_format import show_table
from tm_sidecar.server._tasks import task_json
from tm_sidecar.web._data import merge_attempts

FAST = Backoff(base_s=0.05, factor=1, jitter=0)


async def test_every_attempt_is_kept_across_retries_and_shown(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    async with running_sidecars(etcd_server.endpoint, namespace, "n1") as (sc,):

        async def handler(task: TaskContext) -> str:
            if task.attempt < 3:
                raise RuntimeError(f"boom {task.attempt}")
            return "done"

        sc.register(handler)
        spec = await sc.create({}, options=TaskOptions(max_attempts=3, backoff=FAST))
        info = await sc.wait(spec.id, timeout_s=15)
    assert info.state is State.COMPLETED
    record = info.record
    assert record is not None
    history = [
        (e.attempt, e.node, e.outcome, e.error.message if e.error else None) for e in record.history
    ]
    assert history == [
        (1, "n1", "failed", "boom 1"),
        (2, "n1", "failed", "boom 2"),
        (3, "n1", "completed", None),
    ]
    assert all(e.started_at is not None and e.started_at <= e.ended_at for e in record.history)
    assert record.node == "n1"
    # The protocol's get, tmctl show and the task page show them.
    got = task_json(info)
    assert [(h["attempt"], h["outcome"]) for h in got["history"]] == [
        (1, "failed"),
        (2, "failed"),
        (3, "completed"),
    ]
    rows = {label: value for label, value in show_table(spec.id, info.state, info.spec, record)}
    assert "on n1" in rows["attempt 1"]
    assert "RuntimeError: boom 1" in rows["attempt 1"]
    assert "completed" in rows["attempt 3"]
    page = merge_attempts(record, info.state, [])  # a sidecar that saw none of it
    assert [(a.number, a.node, a.outcome) for a in page] == [
        (1, "n1", "failed"),
        (2, "n1", "failed"),
        (3, "n1", "completed"),
    ]
    assert page[0].error is not None
    assert page[0].error.message == "boom 1"


async def test_a_failed_record_names_the_node_of_its_last_attempt(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    async with running_sidecars(etcd_server.endpoint, namespace, "n1") as (sc,):

        async def handler(task: TaskContext) -> None:
            raise RuntimeError("no")

        sc.register(handler)
        spec = await sc.create({}, options=TaskOptions(max_attempts=1))
        info = await sc.wait(spec.id, timeout_s=15)
    assert info.state is State.FAILED
    assert info.record is not None
    assert info.record.node == "n1"
    assert task_json(info)["node"] == "n1"
