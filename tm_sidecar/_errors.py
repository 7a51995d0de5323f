"""The sidecar's exceptions: the one hierarchy of :mod:`taskmanager.protocol`, which the
SDK raises too, re-exported for the sidecar's modules. No table of codes lives here: the
wire codes are ``taskmanager.protocol.WIRE_ERRORS``.
"""

from __future__ import annotations

from taskmanager.protocol import (
    Compacted,
    EtcdError,
    EtcdFull,
    EtcdUnavailable,
    InvalidRequest,
    LeaseLost,
    LeaseNotFound,
    NotLeader,
    PayloadTooLarge,
    PermissionDenied,
    ProtocolViolation,
    QueueFull,
    TaskManagerError,
    TaskNotFound,
    Unavailable,
)

__all__ = [
    "Compacted",
    "EtcdError",
    "EtcdFull",
    "EtcdUnavailable",
    "InvalidRequest",
    "LeaseLost",
    "LeaseNotFound",
    "NotLeader",
    "PayloadTooLarge",
    "PermissionDenied",
    "ProtocolViolation",
    "QueueFull",
    "TaskManagerError",
    "TaskNotFound",
    "Unavailable",
]
