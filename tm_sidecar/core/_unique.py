"""Unique tasks: at most one live task per unique key, atomically.

A task created with ``unique_key`` K takes the guard key ``unique/K`` in its create
transaction, which compares the guard as the creator saw it (absent, or a guard whose
holder has finished). While the holder is live, the guard names it; its final move
(completed, failed, cancelled) releases the guard in the same transaction: deletes it,
or, with ``unique_for_s``, rewrites it with ``until_at`` so that creates keep answering
the finished holder until then. So a live task always holds its key's guard, and two
live tasks never share a key.

A create that finds the guard taken reads the holder and asks :func:`takeover`: the
holder is live (or inside its window), and the create answers it; or it has finished,
and the create retries with compares that the guard and the holder's final record are
still as read (a holder that an operator sends back to pending with ``tmctl retry``
takes its guard again in that same transaction, or the retry is refused).
"""

from __future__ import annotations

import json

import attrs

from ._keys import Keyspace, State, TaskId
from ._model import Record, dumps
from ._txn import Compare, Delete, KeyValue, Put, Request


def guard_value(task_id: str, until_at: float | None = None) -> str:
    """A guard's value: its holder, and after the holder finished, how long it holds."""
    obj: dict[str, object] = {"task_id": task_id}
    if until_at is not None:
        obj["until_at"] = until_at
    return dumps(obj)


@attrs.frozen
class Guard:
    """A unique key's guard as read."""

    key: str
    task_id: TaskId
    until_at: float | None
    mod_revision: int

    @classmethod
    def from_kv(cls, kv: KeyValue) -> Guard:
        """Read a guard key (ValueError if it is not one)."""
        obj = json.loads(kv.value)
        if not isinstance(obj, dict) or not isinstance(obj.get("task_id"), str):
            raise ValueError(f"{kv.key} is not a unique guard")
        until = obj.get("until_at")
        until_at = None if until is None else float(until)
        return cls(kv.key, TaskId(obj["task_id"]), until_at, kv.mod_revision)


@attrs.frozen
class Takeover:
    """The compares under which a create may take a unique key's guard."""

    compares: tuple[Compare, ...]


#: A create may take a guard that nobody holds: it must still be absent.
FREE = Takeover(())


def guard_ops(ks: Keyspace, task_id: TaskId, record: Record) -> list[Request]:
    """What a move to ``record`` does to its task's unique guard, if it has a key: a
    final move releases it (or keeps it until ``unique_for_s`` after now)."""
    key = record.options.unique_key
    if key is None or record.state not in (State.COMPLETED, State.FAILED):
        return []
    window = record.options.unique_for_s
    if window is None:
        return [Delete(ks.unique(key))]
    return [Put(ks.unique(key), guard_value(task_id, record.since_at + window))]


def takeover(
    ks: Keyspace,
    guard: Guard,
    holder: tuple[State, KeyValue] | None,
    now: float,
) -> Takeover | None:
    """Whether a create may take a guard held by ``guard.task_id``, whose state key is
    ``holder`` (None: the holder has none left, its record expired).

    None: the holder holds the key (it is live, or finished less than its window ago),
    and the create answers the holder. Else the compares for taking it: the guard is
    unchanged, and the holder's final record is the one read (or absent).
    """
    state = holder[0] if holder is not None else None
    if state in (State.PENDING, State.DELAYED, State.PROCESSING):
        return None
    if guard.until_at is not None and now < guard.until_at:
        return None
    compares = [Compare.modified_at(guard.key, guard.mod_revision)]
    if holder is not None:
        compares.append(Compare.created_at(holder[1].key, holder[1].create_revision))
    else:
        # No state key: nothing can give the holder one again but a retry of a failed
        # record, and there is none.
        compares.append(Compare.absent(ks.state(State.FAILED, guard.task_id)))
    return Takeover(tuple(compares))


@attrs.frozen
class Retake:
    """How a retried task takes its unique key's guard back: the compares (the guard is
    as read) and the writes (it names the task again). Empty for a task without a key."""

    compares: tuple[Compare, ...] = ()
    writes: tuple[Request, ...] = ()


@attrs.frozen
class HeldBy:
    """Another task holds the unique key now: the retry must not happen."""

    key: str
    task_id: TaskId


def retake(
    ks: Keyspace, task_id: TaskId, record: Record, guard: KeyValue | None
) -> Retake | HeldBy:
    """Whether a failed task (``record``) may be retried as far as its unique key goes,
    given that key's guard as read (None: absent). A retried task is live again, so it
    holds its key again, unless another task took the key meanwhile."""
    key = record.options.unique_key
    if key is None:
        return Retake()
    if guard is not None:
        holder = Guard.from_kv(guard).task_id
        if holder != task_id:
            return HeldBy(key, holder)
    seen = Compare.modified_at(ks.unique(key), guard.mod_revision if guard else 0)
    return Retake((seen,), (Put(ks.unique(key), guard_value(task_id)),))
