"""tm-sidecar: a reliable distributed task queue on etcd, one Trio sidecar per host."""

__version__ = "0.1.0"

from ._errors import (
    Compacted,
    EtcdError,
    EtcdFull,
    EtcdUnavailable,
    InvalidRequest,
    LeaseLost,
    NotLeader,
    PayloadTooLarge,
    ProtocolViolation,
    QueueFull,
    TaskManagerError,
    TaskNotFound,
    Unavailable,
)
from .core import Backoff, State, TaskError, TaskEvent, TaskOptions, TaskSpec
from .etcd import Etcd, EtcdConfig, connect
from .node._agent import Handler, Permanent, Registration, Snooze, TaskContext
from .node._sidecar import Sidecar, SidecarSettings, TaskInfo

__all__ = [
    "Backoff",
    "Compacted",
    "Etcd",
    "EtcdConfig",
    "EtcdError",
    "EtcdFull",
    "EtcdUnavailable",
    "Handler",
    "InvalidRequest",
    "LeaseLost",
    "NotLeader",
    "PayloadTooLarge",
    "Permanent",
    "ProtocolViolation",
    "QueueFull",
    "Registration",
    "Sidecar",
    "SidecarSettings",
    "Snooze",
    "State",
    "TaskContext",
    "TaskError",
    "TaskEvent",
    "TaskInfo",
    "TaskManagerError",
    "TaskNotFound",
    "TaskOptions",
    "TaskSpec",
    "Unavailable",
    "__version__",
    "connect",
]
