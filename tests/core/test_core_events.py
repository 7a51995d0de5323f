"""Task events from watch changes: pure, driven directly."""

from __future__ import annotations

import attrs

from tm_sidecar.core import (
    EventDeriver,
    Keyspace,
    KeyValue,
    NodeId,
    Record,
    State,
    TaskError,
    TaskId,
    TaskOptions,
    WatchEvent,
    after_failure,
    assigned,
    handed_back,
    initial_record,
    succeeded,
)

KS = Keyspace(namespace="ev")
TID = TaskId("t1")
NODE = NodeId("n1")
_rev = iter(range(1, 10_000))


def put(record: Record) -> WatchEvent:
    key = KS.state(record.state, TID, record.node)
    rev = next(_rev)
    return WatchEvent("PUT", KeyValue(key, record.to_json(), rev, rev, 1), None)


def kinds(deriver: EventDeriver, record: Record) -> list[str]:
    return [e.kind for e in deriver.derive(put(record))]


def first_attempt() -> Record:
    created = initial_record(
        Record(state=State.PENDING, options=TaskOptions(max_attempts=2), since_at=0.0),
        now=0.0,
        run_at=None,
    )
    return assigned(created, node=NODE, session=7, now=1.0, grace_s=5.0)


def test_a_quick_attempt_tells_its_start_with_its_outcome() -> None:
    d = EventDeriver(KS)
    run = first_attempt()
    assert kinds(d, run) == ["assigned"]
    done = succeeded(attrs.evolve(run, started_at=1.5), result=42, now=2.0)
    events = d.derive(put(done))
    assert [e.kind for e in events] == ["started", "completed"]
    assert events[1].data == 42
    assert events[0].attempt == events[1].attempt == 1


def test_an_announced_start_is_told_once() -> None:
    d = EventDeriver(KS)
    run = first_attempt()
    kinds(d, run)
    started = attrs.evolve(run, started_at=1.5)
    assert kinds(d, started) == ["started"]
    assert kinds(d, attrs.evolve(started, progress={"pct": 50})) == ["updated"]
    assert kinds(d, succeeded(started, result=None, now=2.0)) == ["completed"]


def test_progress_before_the_announcement_tells_the_start_first() -> None:
    d = EventDeriver(KS)
    run = first_attempt()
    kinds(d, run)
    assert kinds(d, attrs.evolve(run, started_at=1.5, progress=1)) == ["started", "updated"]


def test_a_retry_and_the_next_attempt_each_tell_their_start() -> None:
    d = EventDeriver(KS)
    run = first_attempt()
    kinds(d, run)
    error = TaskError(type="Boom", message="no")
    retry = after_failure(attrs.evolve(run, started_at=1.5), error=error, now=2.0, fraction=0.0)
    events = d.derive(put(retry))
    assert [e.kind for e in events] == ["started", "failed"]
    assert events[1].will_retry
    second = assigned(retry, node=NODE, session=7, now=3.0, grace_s=5.0)
    assert kinds(d, second) == ["assigned"]
    final = after_failure(attrs.evolve(second, started_at=3.5), error=error, now=4.0, fraction=0)
    events = d.derive(put(final))
    assert [(e.kind, e.attempt) for e in events] == [("started", 2), ("failed", 2)]
    assert not events[1].will_retry


def test_an_attempt_that_never_started_tells_no_start() -> None:
    d = EventDeriver(KS)
    run = first_attempt()
    kinds(d, run)
    error = TaskError(type="NoHandler", message="none here")
    assert kinds(d, after_failure(run, error=error, now=2.0, fraction=0.0)) == ["failed"]


def test_creation_is_queued_and_deletions_and_promotions_are_silent() -> None:
    d = EventDeriver(KS)
    created = initial_record(Record(state=State.PENDING, since_at=0.0), now=0.0, run_at=5.0)
    assert kinds(d, created) == ["queued"]
    promoted = attrs.evolve(created, state=State.PENDING, reason="promoted", due_at=None)
    assert kinds(d, promoted) == []
    gone = put(created)
    assert d.derive(WatchEvent("DELETE", gone.kv, None)) == []


def test_a_hand_back_is_silent_and_the_rerun_tells_its_start_again() -> None:
    # The attempt did not fail: no failed event. The same attempt number runs again,
    # and its start is told again.
    d = EventDeriver(KS)
    run = first_attempt()
    kinds(d, run)
    assert kinds(d, attrs.evolve(run, started_at=1.5)) == ["started"]
    back = handed_back(run, now=2.0)
    assert kinds(d, back) == []
    again = assigned(back, node=NODE, session=8, now=3.0, grace_s=5.0)
    assert kinds(d, again) == ["assigned"]
    events = d.derive(put(succeeded(attrs.evolve(again, started_at=3.5), result=1, now=4.0)))
    assert [(e.kind, e.attempt) for e in events] == [("started", 1), ("completed", 1)]
