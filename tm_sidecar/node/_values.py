"""The values the sidecar's API speaks: its settings (``SidecarSettings``), a task as it
stands (``TaskInfo``), what a create made (``Created``), a bulk create's task
(``NewTask``), and which events and states are a task's last."""

from __future__ import annotations

import socket

import attrs

from ..core import (
    JSON,
    Keyspace,
    KeyValue,
    NodeId,
    Record,
    State,
    TaskEvent,
    TaskId,
    TaskOptions,
    TaskSpec,
)

FINAL_STATES = (State.COMPLETED, State.FAILED)


@attrs.frozen(kw_only=True)
class SidecarSettings:
    """Everything a sidecar needs besides its etcd connection."""

    node_id: NodeId = attrs.field(
        factory=lambda: NodeId(socket.gethostname().split(".")[0] or "node")
    )
    namespace: str = "default"
    root: str = "/tm/"
    lease_ttl_s: int = attrs.field(default=5, validator=attrs.validators.ge(2))
    retention_s: float = 24 * 3600.0
    max_payload_bytes: int = 256 * 1024
    max_live_tasks: int = 1_000_000
    #: etcd's database quota, and the part of it new tasks may fill: the rest is
    #: headroom for the tasks already accepted (assignment, outcome, the payload's lease).
    quota_bytes: int = attrs.field(default=2 * 1024**3, validator=attrs.validators.gt(0))
    quota_fraction: float = attrs.field(
        default=0.8, validator=[attrs.validators.gt(0.0), attrs.validators.le(1.0)]
    )
    #: Room kept for each accepted task's outcome at least (0: as the latest results
    #: need; the result limit: any result fits, see Admission.result_room).
    result_room: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    grace_s: float = 5.0
    requeue_stalled: bool = True
    compact_interval_s: float = 300.0
    #: Whether the leader compacts etcd's history (``--compact``; see LeaderSettings).
    compact: bool = True
    #: A create that etcd has not committed within this long fails with
    #: ``etcd_unavailable`` (the task may exist or not: repeat it with its task id).
    create_deadline_s: float = attrs.field(default=3.0, validator=attrs.validators.gt(0.0))

    @property
    def keyspace(self) -> Keyspace:
        """The key layout of this namespace."""
        return Keyspace(namespace=self.namespace, root=self.root)


@attrs.frozen(kw_only=True)
class TaskInfo:
    """A task as it stands: its spec, and its state record (None if expired)."""

    spec: TaskSpec
    state: State | None
    record: Record | None
    revision: int
    #: The state key as read (its create revision names the incarnation), if any.
    kv: KeyValue | None = None

    @property
    def final(self) -> bool:
        """Whether the task has finished (completed or failed for good)."""
        return self.state in FINAL_STATES


@attrs.frozen
class Created:
    """What a create made: a new task, or (``existing``) the live task that holds the
    unique key asked for."""

    spec: TaskSpec
    existing: bool


@attrs.frozen
class NewTask:
    """One task of a bulk create, as asked: its payload, options, due time and id."""

    payload: JSON
    options: TaskOptions = attrs.Factory(TaskOptions)
    run_at: float | None = None
    task_id: TaskId | None = None


def is_final(event: TaskEvent) -> bool:
    """Whether the event is the task's last: completed, or failed for good."""
    return event.kind == "completed" or (event.kind == "failed" and not event.will_retry)
