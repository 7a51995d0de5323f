"""Task events, derived from the changes etcd's watch reports."""

from __future__ import annotations

import functools

import attrs

from ._keys import Keyspace, NodeId, State, TaskId
from ._model import JSON, TaskError
from ._records import Records
from ._txn import WatchEvent


@attrs.frozen(kw_only=True)
class TaskEvent:
    """Something that happened to a task, at an etcd revision."""

    kind: str
    task_id: TaskId
    revision: int
    attempt: int
    node: NodeId | None = None
    data: JSON = None  # the result (completed) or the progress (updated)
    error: TaskError | None = None
    will_retry: bool = False

    def to_json(self) -> dict[str, JSON]:
        """A JSON object, as the socket protocol sends it."""
        obj: dict[str, JSON] = {
            "event": self.kind,
            "task_id": self.task_id,
            "revision": self.revision,
            "attempt": self.attempt,
        }
        if self.node is not None:
            obj["node"] = self.node
        if self.kind in ("completed", "updated"):
            obj["data"] = self.data
        if self.error is not None:
            obj["error"] = self.error.to_json()
        if self.kind == "failed":
            obj["will_retry"] = self.will_retry
        return obj


def event_from_change(ks: Keyspace, change: WatchEvent) -> TaskEvent | None:
    """The main task event a change of a state key means, if any (no memory: a start told
    together with an outcome is not repeated; see :class:`EventDeriver` for that)."""
    events = EventDeriver(ks).derive(change)
    return events[-1] if events else None


@attrs.define
class EventDeriver:
    """Turns the puts of state keys into task events, in order.

    A worker announces a start by rewriting its processing record with ``started_at``,
    but only once the attempt has run a little while: a quick attempt's start is told
    with its outcome (whose record carries ``started_at``), which saves a write per task.
    This remembers which attempts have had their start told, so that it is told once.
    Deletions carry no events; previous values are not needed.
    """

    ks: Keyspace
    #: Parses the records it sees (the shell's, shared with the leader and the agent).
    records: Records = attrs.field(factory=Records, kw_only=True, repr=False)
    _started: dict[TaskId, int] = attrs.Factory(dict)

    def reset(self) -> None:
        """Forget what was told (after missing changes): a start may be told twice."""
        self._started.clear()

    def derive(self, change: WatchEvent) -> list[TaskEvent]:
        """The events one change means (none, one, or a start and then an outcome)."""
        if change.kind != "PUT":
            return []
        parsed = self.ks.parse(change.kv.key)
        if parsed is None or parsed.kind != "state" or parsed.task_id is None:
            return []
        state = parsed.state
        if state is None:
            return []
        record = self.records.parse(state, change.kv.value)
        tid = parsed.task_id
        event = functools.partial(
            TaskEvent, task_id=tid, revision=change.kv.mod_revision, attempt=record.attempts
        )
        if state is State.PROCESSING:
            if record.started_at is None:
                self._started.pop(tid, None)
                return [event(kind="assigned", node=record.node)]
            out = self._start(tid, record.attempts, event(kind="started", node=record.node))
            if record.progress is not None:
                out.append(event(kind="updated", node=record.node, data=record.progress))
            return out
        if state in (State.PENDING, State.DELAYED):
            if record.reason == "created":
                return [event(kind="queued")]
            if record.reason not in ("retry", "stalled"):
                return []  # promoted, or put back by hand
        # An outcome: completed, failed for good, or failed to be retried.
        out = []
        if record.started_at is not None:
            out = self._start(tid, record.attempts, event(kind="started"))
        self._started.pop(tid, None)
        if state is State.COMPLETED:
            out.append(event(kind="completed", data=record.result))
        else:
            out.append(
                event(kind="failed", error=record.error, will_retry=state is not State.FAILED)
            )
        return out

    def _start(self, tid: TaskId, attempt: int, started: TaskEvent) -> list[TaskEvent]:
        if self._started.get(tid) == attempt:
            return []
        self._started[tid] = attempt
        return [started]
