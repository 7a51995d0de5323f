"""The queue state machine on the in-memory etcd: fast, many examples.

The in-memory etcd is checked against the real one by test_fake_vs_etcd.py.
"""

from __future__ import annotations

from hypothesis import settings

from proptests.backends import Backend, MemoryEtcd
from proptests.machine import QueueMachine
from tm_sidecar.core import State


class CoreQueue(QueueMachine):
    def make_backend(self) -> Backend:
        return MemoryEtcd()


TestCoreQueue = CoreQueue.TestCase
TestCoreQueue.settings = settings(settings.default)


def _checked(state: CoreQueue) -> None:
    state.capacity_holds()
    state.one_state_each_and_model_agrees()
    state.unique_keys_held_once()


def test_a_rate_change_counts_the_starts_before_it() -> None:
    """Hypothesis's counterexample, kept as a regression: 1 per 5 s, two starts 5 s
    apart, then 2 per 20 s; the leader had forgotten the first start and made a third
    at once (3 starts in 20 s)."""
    state = CoreQueue()
    try:
        state.elect()
        state.first_limits(max_running=None, per_key=None, rate=None)
        nodes_0 = state.first_node(capacity=1)
        state.first_schedule(every=None, missed="skip")
        _checked(state)
        state.kill_node(name=nodes_0)
        _checked(state)
        state.set_rates(key_rate=None, rate=(1, 5.0))
        _checked(state)
        nodes_1 = state.add_node(capacity=2)
        _checked(state)
        state.burst(key=None, later=1.0)
        _checked(state)
        state.set_rates(key_rate=None, rate=(2, 20.0))
        _checked(state)
        state.node_restarts_behind_the_leader(name=nodes_1)
        _checked(state)
        state.leader_rounds(interfere=False)
        _checked(state)
    finally:
        state.teardown()


def test_the_last_attempt_sends_the_task_to_the_failed_queue() -> None:
    """``max_attempts`` is a boundary the random programs reach only now and then: a
    task of two attempts fails twice, and the second failure is final (the mutation
    ``one-attempt-too-many`` is caught here in every run)."""
    state = CoreQueue()
    try:
        state.elect()
        state.first_limits(max_running=None, per_key=None, rate=None)
        state.first_node(capacity=1)
        state.first_schedule(every=None, missed="skip")
        state.create(
            priority=0, delay=None, max_attempts=2, timeout=None, max_snoozes=0, key=None, count=1
        )
        state.every_started_attempt_fails()  # the first attempt: retried after its backoff
        _checked(state)
        [task] = state.tasks.values()
        assert task.state is State.DELAYED
        state.tick(dt=12.0)  # past the longest backoff (8 s)
        state.every_started_attempt_fails()  # the leader promotes the task
        state.every_started_attempt_fails()  # and assigns it: the last attempt fails
        _checked(state)
        final = state.tasks[task.id]  # read again: the rules changed it
        assert final.attempts == 2
        assert final.state is State.FAILED
    finally:
        state.teardown()


def test_a_lost_nodes_task_keeps_its_place() -> None:
    """Property 9 at its boundary: a task whose node died goes back ahead of the tasks
    committed after it, even while the leader has not yet seen it back."""
    state = CoreQueue()
    try:
        state.elect()
        nodes_0 = state.first_node(capacity=1)
        state.create(0, None, 3, None, 0, None, count=3)
        state.leader_rounds(interfere=False)
        _checked(state)
        state.kill_node(name=nodes_0)
        state.add_node(capacity=1)
        state.leader_rounds(interfere=False)
        _checked(state)
    finally:
        state.teardown()


def test_a_handed_back_task_keeps_its_place() -> None:
    """Property 9 at its boundary: a task handed back goes before the tasks committed
    after it."""
    state = CoreQueue()
    try:
        state.elect()
        state.first_node(capacity=1)
        state.create(0, None, 3, None, 0, None, count=3)
        state.leader_rounds(interfere=False)
        for node in state.nodes.values():
            assert node.agent is not None
            state._agent_takes(node, len(node.feed))
        state.worker_reports(_Data(), "handback")
        state.leader_rounds(interfere=False)
        _checked(state)
    finally:
        state.teardown()


class _Data:
    """Stands in for Hypothesis's ``data()`` in a fixed example: every draw from a
    ``sampled_from`` takes its first element."""

    def draw(self, strategy: object, label: str = "") -> object:
        elements = getattr(strategy, "elements", None)
        assert elements, f"no fixed choice for {strategy!r} ({label})"
        return elements[0]


def test_a_higher_priority_goes_first() -> None:
    """Property 9 at its boundary: one free slot, a task of a higher priority committed
    after one of a lower."""
    state = CoreQueue()
    try:
        state.elect()
        state.create(0, None, 3, None, 0, None, count=1)
        state.create(2, None, 3, None, 0, None, count=1)
        state.first_node(capacity=1)
        state.leader_rounds(interfere=False)
        _checked(state)
    finally:
        state.teardown()
