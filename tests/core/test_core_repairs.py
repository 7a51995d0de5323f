"""tmctl's repairs, decided directly: a retry's record, its transaction, its unique key."""

from __future__ import annotations

from tm_sidecar.core import (
    Compare,
    Delete,
    HeldBy,
    Keyspace,
    KeyValue,
    Op,
    Put,
    Record,
    Retake,
    Slot,
    State,
    Target,
    TaskError,
    TaskId,
    TaskOptions,
    Touch,
    Txn,
    guard_value,
    plan_retry,
    retake,
    retried,
)

KS = Keyspace(namespace="t")
TID = TaskId("t1")
UNIQUE = TaskOptions(queue="q", max_attempts=2, unique_key="k")


def failed(options: TaskOptions = UNIQUE) -> Record:
    return Record(
        state=State.FAILED,
        attempts=2,
        options=options,
        since_at=50.0,
        started_at=40.0,
        error=TaskError(type="E", message="boom"),
        snoozes=3,
    )


def test_a_retried_task_is_pending_with_fresh_attempts_as_if_just_created() -> None:
    assert retried(failed(), now=100.0) == Record(
        state=State.PENDING, attempts=0, options=UNIQUE, since_at=100.0, reason="created"
    )


def test_a_retry_moves_an_unchanged_failed_record_of_a_task_that_still_exists() -> None:
    slot = Slot(TID, KS.state(State.FAILED, TID), 30, 33, failed())
    pending = retried(failed(), now=100.0)
    guards = (Compare.modified_at(KS.unique("k"), 0),)
    extra = (Put(KS.unique("k"), guard_value(TID)),)
    assert plan_retry(KS, slot, pending, guards=guards, extra=extra) == Txn(
        compare=(
            Compare.modified_at(slot.key, 33),
            Compare(KS.task(TID), Target.VERSION, Op.GREATER, 0),
            *guards,
        ),
        success=(
            Delete(slot.key),
            Put(KS.state(State.PENDING, TID), pending.to_json()),
            Touch(KS.task(TID), 0),
            *extra,
        ),
    )


def guard(holder: str, mod_revision: int = 12) -> KeyValue:
    return KeyValue(KS.unique("k"), guard_value(holder), 10, mod_revision, 1)


def test_a_retry_takes_its_unique_key_back_unless_another_task_holds_it() -> None:
    take = (Put(KS.unique("k"), guard_value(TID)),)
    # No key: nothing to take.
    assert retake(KS, TID, failed(TaskOptions(queue="q")), None) == Retake()
    # Free (released when it failed), or still naming it (kept for unique_for_s).
    assert retake(KS, TID, failed(), None) == Retake(
        (Compare.modified_at(KS.unique("k"), 0),), take
    )
    assert retake(KS, TID, failed(), guard("t1")) == Retake(
        (Compare.modified_at(KS.unique("k"), 12),), take
    )
    # Taken over by a later create: that task keeps it, the retry does not happen.
    assert retake(KS, TID, failed(), guard("t2")) == HeldBy("k", TaskId("t2"))
