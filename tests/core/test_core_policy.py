"""The retry policy and the task model: pure functions, driven directly."""

from __future__ import annotations

import json

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tm_sidecar.core import (
    Backoff,
    Keyspace,
    NodeId,
    Record,
    State,
    TaskError,
    TaskId,
    TaskOptions,
    TaskSpec,
    after_failure,
    assigned,
    backoff_delay_s,
    handed_back,
    initial_record,
    make_task_id,
    promoted,
    succeeded,
)
from tm_sidecar.core._policy import MAX_FREE_HANDBACKS

backoffs = st.builds(
    Backoff,
    base_s=st.floats(0, 100),
    factor=st.floats(0, 10),
    max_s=st.floats(0, 3600),
    jitter=st.floats(0, 1),
)


@given(backoffs, st.integers(1, 10_000), st.floats(0, 1, exclude_max=True))
def test_backoff_is_capped_and_jitter_only_shortens(
    b: Backoff, attempts: int, fraction: float
) -> None:
    delay = backoff_delay_s(b, attempts, fraction)
    full = backoff_delay_s(b, attempts, 0.0)
    assert 0 <= delay <= full <= b.max_s
    assert delay >= (1 - b.jitter) * full - 1e-9


@given(st.integers(1, 50))
def test_backoff_grows_until_the_cap(attempts: int) -> None:
    b = Backoff(base_s=1, factor=2, max_s=60, jitter=0)
    assert backoff_delay_s(b, attempts, 0.5) == min(60, 2 ** (attempts - 1))
    assert backoff_delay_s(b, attempts + 1, 0.5) >= backoff_delay_s(b, attempts, 0.5)


def _processing(attempts: int, max_attempts: int) -> Record:
    opts = TaskOptions(
        max_attempts=max_attempts, backoff=Backoff(base_s=2, factor=2, max_s=10, jitter=0)
    )
    return Record(
        state=State.PROCESSING, attempts=attempts, options=opts, since_at=0.0, node=NodeId("n")
    )


ERR = TaskError(type="Boom", message="boom")


@pytest.mark.parametrize(
    ("attempts", "max_attempts", "error", "state", "due_at"),
    [
        (1, 3, ERR, State.DELAYED, 102.0),  # first failure: wait base_s
        (2, 3, ERR, State.DELAYED, 104.0),  # second: base_s * factor
        (3, 3, ERR, State.FAILED, None),  # attempts exhausted
        (1, 1, ERR, State.FAILED, None),  # no retries at all
        (1, 3, TaskError(type="X", message="", retryable=False), State.FAILED, None),
    ],
)
def test_after_failure_table(
    attempts: int, max_attempts: int, error: TaskError, state: State, due_at: float | None
) -> None:
    nxt = after_failure(_processing(attempts, max_attempts), error=error, now=100.0, fraction=0.3)
    assert (nxt.state, nxt.due_at, nxt.attempts, nxt.error) == (state, due_at, attempts, error)
    # A failed record names the node of its last attempt; a retry waits on no node.
    assert nxt.node == ("n" if state is State.FAILED else None)
    assert nxt.session is None
    assert [(e.attempt, e.node, e.outcome, e.error) for e in nxt.history] == [
        (attempts, "n", "failed", error)
    ]


def test_zero_backoff_goes_straight_back_to_pending() -> None:
    rec = Record(
        state=State.PROCESSING,
        attempts=1,
        options=TaskOptions(backoff=Backoff(base_s=0)),
        since_at=0.0,
    )
    nxt = after_failure(rec, error=ERR, now=5.0, fraction=0.9)
    assert (nxt.state, nxt.reason, nxt.error) == (State.PENDING, "retry", ERR)


@pytest.mark.parametrize("attempts", [1, 2, 3])
def test_a_hand_back_spends_no_attempt(attempts: int) -> None:
    # A graceful stop (a worker's shutdown, a sidecar's drain) that runs out of time gives
    # the attempt back: pending at once, no backoff, and the attempt is not counted, even
    # the last one allowed: a single-attempt task survives a deploy.
    run = attrs.evolve(_processing(attempts, max_attempts=attempts), started_at=1.0)
    back = handed_back(run, now=100.0)
    assert (back.state, back.attempts, back.since_at, back.due_at) == (
        State.PENDING,
        attempts - 1,
        100.0,
        None,
    )
    assert (back.node, back.session, back.error, back.started_at) == (None, None, None, None)
    assert back.reason == "handed back"
    assert back.options == run.options
    again = assigned(back, node=NodeId("m"), session=8, now=101.0, grace_s=1.0)
    assert again.attempts == attempts  # the next attempt has the same number


def test_hand_backs_in_a_row_are_free_only_so_often() -> None:
    # A task that never finishes (and has no timeout) must not come back for ever: after
    # MAX_FREE_HANDBACKS free hand-backs in a row, the next one counts as an attempt.
    run = _processing(1, max_attempts=1)
    for n in range(1, MAX_FREE_HANDBACKS + 1):
        back = handed_back(run, now=float(n))
        assert (back.state, back.attempts, back.handbacks) == (State.PENDING, 0, n)
        assert Record.from_json(State.PENDING, back.to_json()) == back  # kept in etcd
        run = assigned(back, node=NodeId("m"), session=8, now=float(n), grace_s=1.0)
        assert run.handbacks == n
    last = handed_back(run, now=9.0)
    assert last.state is State.FAILED
    assert last.error is not None
    assert last.error.type == "HandedBack"
    assert last.attempts == 1


def test_a_life_in_records() -> None:
    opts = TaskOptions(timeout_s=10, max_attempts=2)
    first = initial_record(
        Record(state=State.PENDING, options=opts, since_at=0), now=50.0, run_at=60.0
    )
    assert (first.state, first.due_at, first.reason) == (State.DELAYED, 60.0, "created")
    due = promoted(first, now=60.0)
    assert (due.state, due.due_at, due.reason) == (State.PENDING, None, "promoted")
    run = assigned(due, node=NodeId("a"), session=7, now=61.0, grace_s=5.0)
    assert (run.state, run.attempts, run.deadline_at, run.session) == (State.PROCESSING, 1, 76.0, 7)
    done = succeeded(run, result={"x": 1}, now=62.0)
    assert (done.state, done.result, done.attempts) == (State.COMPLETED, {"x": 1}, 1)
    past = initial_record(
        Record(state=State.PENDING, options=opts, since_at=0), now=50.0, run_at=10.0
    )
    assert past.state is State.PENDING


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
options = st.builds(
    TaskOptions,
    queue=st.from_regex(r"\A[a-z][a-z0-9_.-]{0,20}\Z"),
    priority=st.integers(-1000, 1000),
    max_attempts=st.integers(1, 100),
    timeout_s=st.none() | st.floats(0.001, 1e6),
    backoff=backoffs,
)


@given(json_values, options, st.none() | st.floats(0, 4e9))
def test_spec_round_trips_through_json(
    payload: object, opts: TaskOptions, run_at: float | None
) -> None:
    spec = TaskSpec(id=TaskId("t1"), payload=payload, options=opts, created_at=1.5, run_at=run_at)
    text = spec.to_json()
    json.loads(text)  # plain JSON a person can read
    assert TaskSpec.from_json(text) == spec


@given(st.sampled_from(list(State)), options, st.integers(0, 100), json_values)
def test_record_round_trips_through_json(
    state: State, opts: TaskOptions, attempts: int, data: object
) -> None:
    rec = Record(
        state=state,
        attempts=attempts,
        options=opts,
        since_at=3.0,
        progress=data if state is State.PROCESSING else None,
        result=data if state is State.COMPLETED else None,
        error=ERR if state is State.FAILED else None,
        node=NodeId("n1") if state is State.PROCESSING else None,
    )
    assert Record.from_json(state, rec.to_json()) == rec


def test_keys_are_readable_and_parse_back() -> None:
    ks = Keyspace(namespace="billing")
    tid = make_task_id(0x01A2230865B6, 37, 0xDEADBEEF)
    assert tid == "01a2230865b6-0025deadbeef"
    assert ks.task(tid) == f"/tm/billing/task/{tid}"
    assert ks.state(State.PROCESSING, tid, NodeId("web-1")) == f"/tm/billing/processing/web-1/{tid}"
    parsed = ks.parse(ks.state(State.PROCESSING, tid, NodeId("web-1")))
    assert parsed is not None
    assert (parsed.task_id, parsed.state, parsed.node) == (
        tid,
        State.PROCESSING,
        "web-1",
    )
    assert ks.parse("/tm/other/pending/x") is None
    assert ks.candidate(0xABC) == "/tm/billing/election/abc"


@given(st.integers(0, 2**48 - 1), st.integers(0, 2**48 - 1))
def test_task_ids_sort_by_time(a: int, b: int) -> None:
    ia, ib = make_task_id(a, 0, 5), make_task_id(b, 0, 5)
    assert (ia < ib) == (a < b)


@pytest.mark.parametrize("bad", ["", "a/b", "-x", "x" * 200, "a b", "é"])
def test_bad_names_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid"):
        Keyspace(namespace=bad)
    with pytest.raises(ValueError, match="invalid"):
        TaskOptions(queue=bad)


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        TaskOptions(max_attempts=0)
    with pytest.raises(ValueError, match="timeout_s"):
        TaskOptions(timeout_s=-1)
    with pytest.raises(ValueError, match="timeout_s"):
        TaskOptions(timeout_s=float("nan"))
