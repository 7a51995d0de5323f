"""The errors the sidecar reports, by their wire code (docs/protocol.md)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, ClassVar


class TaskManagerError(Exception):
    """The root of every error the SDK raises."""

    code: ClassVar[str] = "internal"
    retryable: ClassVar[bool] = False


class InvalidRequest(TaskManagerError):
    """The request cannot be done as asked."""

    code = "invalid_request"


class TaskNotFound(InvalidRequest):
    """No task has this id (or its record has expired)."""

    code = "task_not_found"


class PayloadTooLarge(InvalidRequest):
    """The payload is over the sidecar's limit."""

    code = "payload_too_large"


class QueueFull(TaskManagerError):
    """The namespace is at its configured limit, or etcd near its quota."""

    code = "queue_full"
    retryable = True


class Unavailable(TaskManagerError):
    """A passing failure: try again later."""

    code = "unavailable"
    retryable = True


class EtcdUnavailable(Unavailable):
    """The sidecar cannot reach etcd."""

    code = "etcd_unavailable"


class EtcdFull(Unavailable):
    """etcd's database is at its quota: no task can be created until an operator frees
    space (``tmctl recover``); retry later."""

    code = "etcd_full"


class NotLeader(Unavailable):
    """The sidecar is not the leader."""

    code = "not_leader"


class LeaseLost(TaskManagerError):
    """The sidecar lost its session."""

    code = "lease_lost"


class ProtocolViolation(TaskManagerError):
    """A frame broke the protocol."""

    code = "protocol_violation"


class EtcdError(TaskManagerError):
    """etcd refused a request."""

    code = "etcd_error"


class ConnectionLost(Unavailable):
    """The connection to the sidecar closed while a request was in flight."""

    code = "connection_lost"


class TaskFailed(TaskManagerError):
    """The task ended in the failed queue; ``error`` is what its last attempt reported."""

    code = "task_failed"

    def __init__(self, task_id: str, error: dict[str, Any] | None) -> None:
        self.task_id = task_id
        self.error = error or {}
        super().__init__(
            f"task {task_id} failed: {self.error.get('type')}: {self.error.get('message')}"
        )


class Permanent(Exception):
    """Raise (or raise from) this in a handler: the task fails without further retries."""


class Snooze(Exception):
    """Raise this in a handler to run the task again later: ``raise Snooze(30)`` puts it
    back to delayed for 30 seconds (a number, or a ``timedelta``), and this attempt does
    not count. A task may snooze ``max_snoozes`` times (100 unless its options say),
    then it fails (``SnoozeLimit``)."""

    def __init__(self, delay: float | timedelta) -> None:
        seconds = delay.total_seconds() if isinstance(delay, timedelta) else float(delay)
        super().__init__(f"snooze for {seconds:g} s")
        self.delay_s = seconds


_BY_CODE: dict[str, type[TaskManagerError]] = {
    cls.code: cls
    for cls in (
        TaskManagerError,
        InvalidRequest,
        TaskNotFound,
        PayloadTooLarge,
        QueueFull,
        Unavailable,
        EtcdUnavailable,
        EtcdFull,
        NotLeader,
        LeaseLost,
        ProtocolViolation,
        EtcdError,
        ConnectionLost,
    )
}
_BY_CODE["compacted"] = EtcdError
_BY_CODE["lease_not_found"] = EtcdError


def error_from_wire(error: dict[str, Any]) -> TaskManagerError:
    """The exception for an error frame: the same class the sidecar raised."""
    cls = _BY_CODE.get(str(error.get("code")), TaskManagerError)
    return cls(str(error.get("message", "")))
