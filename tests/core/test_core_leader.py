"""The leader's decisions, driven directly: given this view and this time, these moves."""

from __future__ import annotations

import attrs

from tm_sidecar.core import (
    Batch,
    Keyspace,
    KeyValue,
    LeaderPolicy,
    LeaderView,
    NodeId,
    NodeInfo,
    Record,
    State,
    TaskId,
    TaskOptions,
    WatchEvent,
    handed_back,
    initial_record,
)

KS = Keyspace(namespace="t")
POLICY = LeaderPolicy(grace_s=5.0)


@attrs.define
class Feed:
    """Builds the changes etcd would report, with increasing revisions."""

    view: LeaderView = attrs.Factory(lambda: LeaderView.from_listing(KS, (), 1))
    revision: int = 1
    live: dict[str, KeyValue] = attrs.Factory(dict)

    def put(self, key: str, value: str) -> KeyValue:
        self.revision += 1
        old = self.live.get(key)
        kv = KeyValue(
            key,
            value,
            old.create_revision if old else self.revision,
            self.revision,
            (old.version if old else 0) + 1,
        )
        self.live[key] = kv
        self.view.apply(WatchEvent("PUT", kv, old))
        return kv

    def delete(self, key: str) -> None:
        self.revision += 1
        old = self.live.pop(key)
        self.view.apply(WatchEvent("DELETE", KeyValue(key, "", 0, self.revision, 0), old))

    def node(self, name: str, capacity: dict[str, int], session: int = 1) -> None:
        self.put(
            KS.node(name), NodeInfo(id=NodeId(name), session=session, capacity=capacity).to_json()
        )

    def task(
        self, tid: str, *, now: float = 0.0, run_at: float | None = None, **opts: object
    ) -> None:
        rec = initial_record(
            Record(state=State.PENDING, options=TaskOptions(**opts), since_at=now),  # type: ignore[arg-type]
            now=now,
            run_at=run_at,
        )
        self.put(KS.state(rec.state, TaskId(tid)), rec.to_json())

    def commit(self, batch: Batch) -> None:
        """Apply a batch as etcd would, in one revision."""
        self.revision += 1
        for slot, record in batch.moves:
            old = self.live.pop(slot.key)
            self.view.apply(WatchEvent("DELETE", KeyValue(slot.key, "", 0, self.revision, 0), old))
            key = KS.state(record.state, slot.task_id, record.node)
            kv = KeyValue(key, record.to_json(), self.revision, self.revision, 1)
            self.live[key] = kv
            self.view.apply(WatchEvent("PUT", kv, None))
        self.view.settle(batch, committed_at=self.revision)


def assigned_ids(batches: tuple[Batch, ...]) -> list[tuple[str, str]]:
    return [(s.task_id, r.node or "") for b in batches if b.kind == "assign" for s, r in b.moves]


def test_fifo_within_priority_and_higher_priority_first() -> None:
    f = Feed()
    f.task("a")
    f.task("b", priority=5)
    f.task("c")
    f.task("d", priority=5)
    f.node("n1", {"default": 10})
    d = f.view.decide(0.0, POLICY)
    assert [t for t, _ in assigned_ids(d.batches)] == ["b", "d", "a", "c"]


def test_capacity_is_never_exceeded_and_work_is_spread() -> None:
    f = Feed()
    for i in range(10):
        f.task(f"t{i}")
    f.node("n1", {"default": 2})
    f.node("n2", {"default": 1})
    d = f.view.decide(0.0, POLICY)
    nodes = [n for _, n in assigned_ids(d.batches)]
    assert sorted(nodes) == ["n1", "n1", "n2"]
    # Claims count against capacity until the watch shows the outcome.
    assert f.view.decide(0.0, POLICY).batches == ()
    for b in d.batches:
        f.commit(b)
    assert f.view.decide(0.0, POLICY).batches == ()
    # A finished task frees one slot on its node.
    done = next(k for k in f.live if "/processing/n1/" in k)
    f.delete(done)
    again = assigned_ids(f.view.decide(0.0, POLICY).batches)
    assert [n for _, n in again] == ["n1"]


def test_queues_are_separate() -> None:
    f = Feed()
    f.task("mail", queue="mail")
    f.task("img", queue="img")
    f.node("n1", {"mail": 5})
    assert assigned_ids(f.view.decide(0.0, POLICY).batches) == [("mail", "n1")]


def test_delayed_task_is_promoted_at_its_due_time_not_before() -> None:
    f = Feed()
    f.task("later", now=0.0, run_at=100.0)
    f.node("n1", {"default": 1})
    early = f.view.decide(99.999, POLICY)
    assert early.batches == ()
    assert early.wake_at == 100.0
    due = f.view.decide(100.0, POLICY)
    assert [(b.kind, b.task_ids) for b in due.batches] == [("promote", ("later",))]
    f.commit(due.batches[0])
    assert assigned_ids(f.view.decide(100.0, POLICY).batches) == [("later", "n1")]


def test_failed_batch_releases_its_claims() -> None:
    f = Feed()
    f.task("a")
    f.node("n1", {"default": 1})
    d = f.view.decide(0.0, POLICY)
    assert f.view.claimed(TaskId("a"))
    f.view.settle(d.batches[0], committed_at=None)
    assert not f.view.claimed(TaskId("a"))
    assert assigned_ids(f.view.decide(0.0, POLICY).batches) == [("a", "n1")]


def test_tasks_of_a_lost_node_are_reaped_and_retried() -> None:
    f = Feed()
    f.task("a", max_attempts=3)
    f.task("b", max_attempts=1)
    f.node("n1", {"default": 5})
    for b in f.view.decide(0.0, POLICY).batches:
        f.commit(b)
    assert len(f.view.processing) == 2
    f.delete(KS.node("n1"))
    d = f.view.decide(1.0, POLICY)
    assert [b.kind for b in d.batches] == ["reap"]
    outcome = {
        s.task_id: (r.state, r.attempts, r.error.type if r.error else None)
        for s, r in d.batches[0].moves
    }
    # Back at once (a lost node is not the task's fault), or failed when out of attempts.
    assert outcome == {"a": (State.PENDING, 1, "NodeLost"), "b": (State.FAILED, 1, "NodeLost")}
    # A second lost node in a row: the task waits its backoff (it may be what kills them).
    f.commit(d.batches[0])
    f.node("n2", {"default": 5})
    for b in f.view.decide(2.0, POLICY).batches:
        f.commit(b)
    f.delete(KS.node("n2"))
    ((_, again),) = f.view.decide(3.0, POLICY).batches[0].moves
    assert (again.state, again.attempts) == (State.DELAYED, 2)


def test_a_lost_nodes_task_keeps_its_place_in_the_queue() -> None:
    f = Feed()
    for tid in ("a", "b", "c"):
        f.task(tid)
    f.node("n1", {"default": 1})
    (first,) = f.view.decide(0.0, POLICY).batches
    f.commit(first)
    f.delete(KS.node("n1"))
    f.node("n2", {"default": 1})
    # The reap and the next decision come together: b, committed after a, must not
    # take n2 while a is on its way back to pending.
    d = f.view.decide(1.0, POLICY)
    assert [(b.kind, b.task_ids) for b in d.batches] == [("reap", ("a",))]
    f.commit(d.batches[0])
    assert assigned_ids(f.view.decide(1.0, POLICY).batches) == [("a", "n2")]


def test_a_task_handed_back_keeps_its_place_in_the_queue() -> None:
    f = Feed()
    for tid in ("a", "b"):
        f.task(tid)
    f.node("n1", {"default": 1})
    (first,) = f.view.decide(0.0, POLICY).batches
    f.commit(first)
    ((slot, _),) = first.moves
    key = KS.state(State.PROCESSING, TaskId("a"), "n1")
    running = Record.from_json(State.PROCESSING, f.live[key].value)
    assert running.order == slot.create_revision
    f.delete(key)  # the worker's hand-back: processing to pending, at a later revision
    f.put(KS.state(State.PENDING, TaskId("a")), handed_back(running, now=1.0).to_json())
    assert assigned_ids(f.view.decide(1.0, POLICY).batches) == [("a", "n1")]


def test_after_an_etcd_outage_absent_nodes_get_a_hold_before_their_tasks_are_reaped() -> None:
    f = Feed()
    f.task("a")
    f.node("n1", {"default": 1}, session=1)
    for b in f.view.decide(0.0, POLICY).batches:
        f.commit(b)
    f.delete(KS.node("n1"))  # its lease went with etcd's outage
    held = attrs.evolve(POLICY, hold_lost_until=10.0)
    d = f.view.decide(5.0, held)
    assert d.batches == ()
    assert d.wake_at == 10.0
    # n1 comes back, carrying the outcome of its old session: still left alone.
    f.put(
        KS.node("n1"),
        NodeInfo(id=NodeId("n1"), session=2, capacity={"default": 1}, carries=(1,)).to_json(),
    )
    assert f.view.decide(11.0, held).batches == ()
    # Reported, or given up: n1 registers without it, and the task is reaped.
    f.node("n1", {"default": 1}, session=2)
    d = f.view.decide(12.0, held)
    assert [(b.kind, b.task_ids) for b in d.batches] == [("reap", ("a",))]


def test_an_absent_nodes_tasks_are_reaped_once_the_hold_ends() -> None:
    f = Feed()
    f.task("a")
    f.node("n1", {"default": 1}, session=1)
    for b in f.view.decide(0.0, POLICY).batches:
        f.commit(b)
    f.delete(KS.node("n1"))
    held = attrs.evolve(POLICY, hold_lost_until=10.0)
    assert f.view.decide(9.0, held).batches == ()
    d = f.view.decide(10.0, held)
    assert [(b.kind, b.task_ids) for b in d.batches] == [("reap", ("a",))]


def test_a_restarted_node_does_not_keep_its_old_assignments() -> None:
    f = Feed()
    f.task("a")
    f.node("n1", {"default": 1}, session=1)
    for b in f.view.decide(0.0, POLICY).batches:
        f.commit(b)
    assert f.view.decide(0.0, POLICY).batches == ()
    f.node("n1", {"default": 1}, session=2)  # same node id, new session
    d = f.view.decide(0.0, POLICY)
    assert [(b.kind, b.task_ids) for b in d.batches] == [("reap", ("a",))]


def test_an_attempt_past_its_deadline_is_reaped() -> None:
    f = Feed()
    f.task("slow", timeout_s=10, max_attempts=1)
    f.task("again", timeout_s=10, max_attempts=2)
    f.node("n1", {"default": 2})
    for b in f.view.decide(0.0, POLICY).batches:
        f.commit(b)
    d = f.view.decide(1.0, POLICY)
    assert d.batches == ()
    assert d.wake_at == 15.0
    d = f.view.decide(15.0, POLICY)
    outcome = {s.task_id: (r.state, r.error and r.error.type) for s, r in d.batches[0].moves}
    # A late attempt fails like a timeout: retried after its backoff.
    assert outcome == {"slow": (State.FAILED, "Stalled"), "again": (State.DELAYED, "Stalled")}


def test_stalled_tasks_fail_when_requeue_is_off() -> None:
    f = Feed()
    f.task("a", max_attempts=5)
    f.node("n1", {"default": 1})
    for b in f.view.decide(0.0, POLICY).batches:
        f.commit(b)
    f.delete(KS.node("n1"))
    d = f.view.decide(0.0, LeaderPolicy(requeue_stalled=False))
    ((_, record),) = d.batches[0].moves
    assert record.state is State.FAILED


def test_large_backlogs_are_batched_within_etcd_limits() -> None:
    f = Feed()
    for i in range(500):
        f.task(f"t{i:04d}")
    f.node("n1", {"default": 1000})
    d = f.view.decide(0.0, POLICY)
    assert all(len(b.moves) <= 63 for b in d.batches)
    ids = [t for t, _ in assigned_ids(d.batches)]
    assert ids == sorted(ids)  # FIFO across batches
    assert len(ids) == len(set(ids))  # no task twice


def test_a_malformed_value_is_ignored_and_shown_not_fatal() -> None:
    ks = Keyspace(namespace="m")
    pending = initial_record(
        Record(state=State.PENDING, options=TaskOptions(), since_at=0), now=0, run_at=None
    )
    good = KeyValue(ks.state(State.PENDING, TaskId("a")), pending.to_json(), 5, 5, 1)
    view = LeaderView.from_listing(ks, [good], 5)
    assert set(view.pending) == {"a"}
    view.apply(WatchEvent("PUT", KeyValue(good.key, "not json", 5, 6, 2), None))
    view.apply(WatchEvent("PUT", KeyValue(ks.node("n9"), "{}", 7, 7, 1), None))
    assert view.pending == {}
    assert view.malformed == {good.key, ks.node("n9")}
    view.apply(WatchEvent("DELETE", KeyValue(good.key, "", 0, 8, 0), None))
    assert view.malformed == {ks.node("n9")}


def test_an_assignment_batch_over_many_nodes_keeps_within_etcds_compare_limit() -> None:
    from tm_sidecar.core import MAX_TXN_OPS, Compare, Fence, Slot, plan_batch
    from tm_sidecar.core._batch import chunk_moves

    ks = Keyspace(namespace="wide")
    moves = []
    for i in range(100):
        options = TaskOptions(queue=f"q{i % 3}")
        pending = initial_record(
            Record(state=State.PENDING, options=options, since_at=0), now=0, run_at=None
        )
        slot = Slot(TaskId(f"t{i}"), ks.state(State.PENDING, f"t{i}"), i + 1, i + 1, pending)
        target = attrs.evolve(
            pending, state=State.PROCESSING, node=NodeId(f"n{i}"), session=1000 + i, attempts=1
        )
        moves.append((slot, target))
    for chunk in chunk_moves(moves, 63):
        # The leader adds a compare of each assigned queue's settings.
        queues = sorted({record.options.queue for _, record in chunk})
        guards = [Compare.modified_at(f"/queues/{q}", 0) for q in queues]
        txn = plan_batch(ks, Fence("/f", 1), chunk, guards=guards)  # raises past the limit
        assert len(txn.compare) <= MAX_TXN_OPS


def test_queue_figures_and_what_holds_a_queue_back() -> None:
    from tm_sidecar.core import QueueConfig

    f = Feed()
    f.task("m1", queue="mail", now=5.0)
    f.task("m2", queue="mail", now=3.0)
    f.task("s1", queue="slow", now=1.0)
    f.put(KS.queue("slow"), QueueConfig(paused=True).to_json())
    f.node("n1", {"mail": 1, "slow": 1})
    for batch in f.view.decide(10.0, POLICY).batches:
        f.commit(batch)
    figures = f.view.queue_figures()
    assert figures["mail"].depth == {"pending": 1, "delayed": 0, "processing": 1}
    assert figures["slow"].depth == {"pending": 1, "delayed": 0, "processing": 0}
    assert figures["slow"].oldest_pending_at == 1.0
    # m1 was committed first, so it runs; m2 waits, in pending since 3.0.
    assert figures["mail"].oldest_pending_at == 3.0
    assert f.view.held_back() == {"slow": "paused"}
    f.delete(KS.state(State.PENDING, TaskId("s1")))  # cancelled, say: nothing waits
    assert f.view.held_back() == {}
