"""Task events, derived from the changes etcd's watch reports."""

from __future__ import annotations

import attrs

from ._keys import Keyspace, NodeId, State, TaskId
from ._model import JSON, TaskError, parse_record
from ._txn import WatchEvent

#: The events an application can subscribe to.
EVENT_KINDS = ("queued", "assigned", "started", "updated", "failed", "completed")


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
    """The task event a change of a state key means, if any."""
    if change.kind != "PUT":
        return None
    parsed = ks.parse(change.kv.key)
    if parsed is None or parsed.kind != "state" or parsed.task_id is None or parsed.state is None:
        return None
    record = parse_record(parsed.state, change.kv.value)
    tid, rev = parsed.task_id, change.kv.mod_revision
    state = parsed.state
    if state in (State.PENDING, State.DELAYED):
        if record.reason == "created":
            return TaskEvent(kind="queued", task_id=tid, revision=rev, attempt=record.attempts)
        if record.reason in ("retry", "stalled"):
            return TaskEvent(
                kind="failed",
                task_id=tid,
                revision=rev,
                attempt=record.attempts,
                error=record.error,
                will_retry=True,
            )
        return None
    if state is State.PROCESSING:
        prev = (
            parse_record(State.PROCESSING, change.prev.value)
            if change.prev is not None and change.prev.create_revision == change.kv.create_revision
            else None
        )
        common = {"task_id": tid, "revision": rev, "attempt": record.attempts, "node": record.node}
        if prev is None:
            return TaskEvent(kind="assigned", **common)  # type: ignore[arg-type]
        if record.started_at is not None and prev.started_at is None:
            return TaskEvent(kind="started", **common)  # type: ignore[arg-type]
        if record.progress != prev.progress:
            return TaskEvent(kind="updated", data=record.progress, **common)  # type: ignore[arg-type]
        return None
    if state is State.COMPLETED:
        return TaskEvent(
            kind="completed", task_id=tid, revision=rev, attempt=record.attempts, data=record.result
        )
    return TaskEvent(
        kind="failed",
        task_id=tid,
        revision=rev,
        attempt=record.attempts,
        error=record.error,
        will_retry=False,
    )
