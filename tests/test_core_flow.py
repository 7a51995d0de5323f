"""Flow control in the pure core, table-driven: the leader's decisions with paused queues,
limits and schedules, at given times."""

from __future__ import annotations

from tests.test_core_leader import KS, POLICY, Feed
from tm_sidecar.core import Compare, Fence, QueueConfig, TaskId

FENCE = Fence(KS.candidate(1), 1)


def assigned(feed: Feed, now: float = 0.0) -> list[str]:
    """Decide at ``now``, commit every assignment, answer the tasks assigned (in order)."""
    out: list[str] = []
    for batch in feed.view.decide(now, POLICY).batches:
        if batch.kind == "assign":
            out += [str(t) for t in batch.task_ids]
        feed.commit(batch)
    return out


def test_a_paused_queue_keeps_its_tasks_and_resumes_in_order() -> None:
    feed = Feed()
    feed.node("n1", {"default": 4, "mail": 4})
    for tid in ("a", "b"):
        feed.task(tid)
    feed.task("m", queue="mail")
    feed.put(KS.queue("default"), QueueConfig(paused=True).to_json())
    assert assigned(feed) == ["m"]  # other queues go on
    assert set(feed.view.pending) == {TaskId("a"), TaskId("b")}
    feed.put(KS.queue("default"), QueueConfig(paused=False).to_json())
    assert assigned(feed) == ["a", "b"]


def test_an_assignment_batch_is_guarded_by_its_queue_settings() -> None:
    feed = Feed()
    feed.node("n1", {"default": 4})
    feed.task("a")
    (batch,) = feed.view.decide(0.0, POLICY).batches
    assert batch.guards == (Compare.modified_at(KS.queue("default"), 0),)
    feed.view.settle(batch, committed_at=None)
    kv = feed.put(KS.queue("default"), QueueConfig().to_json())
    (batch,) = feed.view.decide(0.0, POLICY).batches
    assert batch.guards == (Compare.modified_at(KS.queue("default"), kv.mod_revision),)
    assert batch.plan(KS, FENCE, lease=0).compare[-1] == batch.guards[0]
