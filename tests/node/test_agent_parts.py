"""Small parts of the node agent, driven directly."""

from __future__ import annotations

import json

from tm_sidecar.core import TaskId, TaskOptions, TaskSpec
from tm_sidecar.node._agent_state import RecentTasks


def spec(i: int) -> TaskSpec:
    return TaskSpec(id=TaskId(f"t{i}"), payload=i, options=TaskOptions(), created_at=0.0)


def test_recent_tasks_are_taken_once() -> None:
    recent = RecentTasks()
    recent.add(spec(1), "1")
    taken = recent.take(TaskId("t1"))
    assert taken is not None
    assert taken.payload == 1
    assert recent.take(TaskId("t1")) is None  # a retry reads the task from etcd


def test_each_taker_gets_its_own_payload_and_finished_tasks_are_forgotten() -> None:
    recent = RecentTasks()
    payload = {"i": 0}
    recent.add(
        TaskSpec(id=TaskId("a"), payload=payload, options=TaskOptions(), created_at=0), '{"i":0}'
    )
    payload["i"] = 2  # the caller reuses its object
    taken = recent.take(TaskId("a"))
    assert taken is not None
    assert taken.payload == {"i": 0}
    recent.add(spec(5), "5")
    recent.forget(TaskId("t5"))
    assert recent.take(TaskId("t5")) is None


def test_recent_tasks_keep_to_their_bounds_dropping_the_oldest() -> None:
    recent = RecentTasks(max_items=3, max_bytes=800)
    for i in range(5):
        recent.add(spec(i), json.dumps("x" * 8))
    assert [recent.take(TaskId(f"t{i}")) is not None for i in range(5)] == [
        False,
        False,
        True,
        True,
        True,
    ]
    by_bytes = RecentTasks(max_items=100, max_bytes=800)
    for i in range(10):
        by_bytes.add(spec(i), json.dumps("x" * 98))
    kept = [by_bytes.take(TaskId(f"t{i}")) is not None for i in range(10)]
    assert kept == [False, False] + [True] * 8
    by_bytes.add(spec(9), json.dumps("x" * 99))  # over an eighth of the budget: not kept
    assert by_bytes.take(TaskId("t9")) is None
