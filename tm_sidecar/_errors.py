"""The exceptions of tm-sidecar, each with a stable wire code.

Split by whose fault it is: the caller's (``InvalidRequest`` and its kin), a passing
unavailability worth retrying (``Unavailable``), a fatal loss (``LeaseLost``), or a peer
breaking the protocol (``ProtocolViolation``).
"""

from __future__ import annotations

from typing import ClassVar


class TaskManagerError(Exception):
    """The root of every tm-sidecar error."""

    code: ClassVar[str] = "internal"
    retryable: ClassVar[bool] = False


class InvalidRequest(TaskManagerError):
    """The caller asked for something that cannot be done as asked."""

    code = "invalid_request"


class TaskNotFound(InvalidRequest):
    """No task has this id (or its record has expired)."""

    code = "task_not_found"


class PayloadTooLarge(InvalidRequest):
    """The task's payload is over the configured limit."""

    code = "payload_too_large"


class QueueFull(TaskManagerError):
    """The namespace holds as many live tasks as configured, or etcd is near its quota."""

    code = "queue_full"
    retryable = True


class Unavailable(TaskManagerError):
    """A passing failure: try again later."""

    code = "unavailable"
    retryable = True


class EtcdUnavailable(Unavailable):
    """etcd could not be reached or did not answer in time."""

    code = "etcd_unavailable"


class EtcdFull(Unavailable):
    """etcd's database has reached its quota (the NOSPACE alarm): it takes no writes until
    an operator frees space (``tmctl recover``). Reads, watches and keep-alives go on;
    retry later."""

    code = "etcd_full"


class NotLeader(Unavailable):
    """This sidecar is not (or no longer) the leader."""

    code = "not_leader"


class LeaseLost(TaskManagerError):
    """The session lease expired: everything attached to it is gone."""

    code = "lease_lost"


class ProtocolViolation(TaskManagerError):
    """A peer broke the protocol."""

    code = "protocol_violation"


class EtcdError(TaskManagerError):
    """etcd refused a request (not a connectivity problem): a bug or a misconfiguration."""

    code = "etcd_error"


class LeaseNotFound(EtcdError):
    """The lease named in a request does not exist (it expired or was revoked)."""

    code = "lease_not_found"


class Compacted(EtcdError):
    """The revision asked for has been compacted away."""

    code = "compacted"

    def __init__(self, message: str, compact_revision: int = 0) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


ERRORS: dict[str, type[TaskManagerError]] = {
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
        LeaseNotFound,
        Compacted,
    )
}
