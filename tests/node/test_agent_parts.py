"""Small parts of the node agent, driven directly."""

from __future__ import annotations

import json

from tm_sidecar.core import TaskId, TaskOptions, TaskSpec
from tm_sidecar.node._agent_state import ENTRY_BYTES, RecentTasks


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


def test_recent_tasks_keep_to_their_bounds_keeping_the_oldest() -> None:
    """Full, it remembers no more rather than drop older tasks: those run first (a drain
    of a backlog larger than the bound read back the payloads it needed first)."""
    recent = RecentTasks(max_items=3, max_bytes=10_000)
    for i in range(5):
        recent.add(spec(i), json.dumps("x" * 8))
    kept = [recent.take(TaskId(f"t{i}")) is not None for i in range(5)]
    assert kept == [True, True, True, False, False]
    # Bytes count what each entry costs beside its payload: 8 of 500 bytes in 4,000.
    by_bytes = RecentTasks(max_items=100, max_bytes=4000)
    payload = json.dumps("x" * (500 - ENTRY_BYTES - 2))
    for i in range(10):
        by_bytes.add(spec(i), payload)
    kept = [by_bytes.take(TaskId(f"t{i}")) is not None for i in range(10)]
    assert kept == [True] * 8 + [False] * 2
    # Taken (or finished), a task makes room again.
    by_bytes.add(spec(10), payload)
    assert by_bytes.take(TaskId("t10")) is not None
    # Over an eighth of the budget: never kept.
    by_bytes.add(spec(11), json.dumps("x" * (501 - ENTRY_BYTES - 2)))
    assert by_bytes.take(TaskId("t11")) is None


def test_by_default_a_backlog_of_twenty_thousand_small_tasks_is_remembered() -> None:
    """The benchmark's drain (20,000 no-op tasks) fits: the bound was 10,000."""
    recent = RecentTasks()
    for i in range(20_000):
        recent.add(spec(i), json.dumps({"i": i}))
    assert all(recent.take(TaskId(f"t{i}")) is not None for i in (0, 9_999, 10_000, 19_999))
