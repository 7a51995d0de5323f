"""etcd's failures as tm-sidecar's exceptions, by gRPC status code, on both transports.

Over gRPC the code is the call's status; the JSON gateway puts the same code in its
error answer's ``code`` field. The code decides the family: connectivity
(:class:`EtcdUnavailable`), a full database (:class:`EtcdFull`) or a refusal
(:class:`EtcdError`). etcd's error detail (its ``rpctypes`` descriptions) is read only
where etcd puts several errors under one code: OUT_OF_RANGE (compacted or a future
revision), NOT_FOUND (a lease or a member), RESOURCE_EXHAUSTED (the NOSPACE alarm,
etcd's back-pressure, or a message over gRPC's size limit).
"""

from __future__ import annotations

import enum
from typing import Any

from .._errors import Compacted, EtcdError, EtcdFull, EtcdUnavailable, LeaseNotFound


class Code(enum.IntEnum):
    """gRPC's status codes (the numbers are gRPC's, on the wire of both transports)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


#: A call that may not have reached etcd, or whose answer was lost: its outcome is unknown.
_UNAVAILABLE = frozenset(
    {
        Code.UNAVAILABLE,
        Code.DEADLINE_EXCEEDED,
        # Raised by grpc-core itself for a broken connection (RST_STREAM, a cut frame).
        Code.INTERNAL,
        # A stream cancelled by the server (etcd stopping); our own cancels never get here.
        Code.CANCELLED,
    }
)


def code_needs_auth(code: int | None, details: str) -> bool:
    """Whether etcd refused the call's token: authenticate again, then retry once.

    UNAUTHENTICATED is an expired or unknown token; etcd 3.5 also refuses a token minted
    before a change to its users or roles ("revision of auth store is old") with
    INVALID_ARGUMENT, and its own client re-authenticates for both. The gateway answers
    an unknown token with INVALID_ARGUMENT and "invalid auth token".
    """
    if code == Code.UNAUTHENTICATED:
        return True
    return code == Code.INVALID_ARGUMENT and (
        "auth store is old" in details or "invalid auth token" in details
    )


def watch_refused(cancel_reason: str) -> bool:
    """Whether etcd cancelled a watch for its permissions, which is also how it answers
    a watch whose token it no longer knows (no status code: a watch is cancelled inside
    its stream with a reason in words, so only the words tell)."""
    return "permission denied" in cancel_reason.lower()


def translate_code(code: int | None, details: str, what: str = "") -> Exception:
    """The tm-sidecar exception for a failure with gRPC status ``code``."""
    message = f"{what}: {details}" if what else details
    if code in _UNAVAILABLE:
        return EtcdUnavailable(message)
    if code == Code.RESOURCE_EXHAUSTED:
        if "space exceeded" in details:
            return EtcdFull(message)
        if "too many requests" in details:
            return EtcdUnavailable(message)  # etcd's applier lags: back off and retry
        return EtcdError(message)  # a message over gRPC's size limit
    if code == Code.OUT_OF_RANGE and "compacted" in details:
        return Compacted(message)
    if code == Code.NOT_FOUND and "lease" in details:
        return LeaseNotFound(message)
    return EtcdError(message)


# -- over gRPC --


def status_of(exc: BaseException) -> tuple[int | None, str]:
    """The gRPC status code and detail of a failed call (None for anything else)."""
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    status: Any = code() if callable(code) else None
    number = status.value[0] if status is not None and hasattr(status, "value") else None
    return number, str(details() if callable(details) else exc)


def needs_auth(exc: BaseException) -> bool:
    """Whether a failed gRPC call was a refused token (see :func:`code_needs_auth`)."""
    return code_needs_auth(*status_of(exc))


def translate(exc: BaseException, what: str = "") -> Exception:
    """The tm-sidecar exception for a failed gRPC call."""
    code, details = status_of(exc)
    return translate_code(code, details, what)


# -- over the JSON gateway --


def gateway_status(body: Any) -> tuple[int | None, str]:
    """The gRPC status code and detail in an error answer of the gateway
    (``{"error": ..., "code": 14, "message": ...}``; a watch stream's error says
    ``grpc_code`` too); None when it carries no code."""
    if not isinstance(body, dict):
        return None, str(body)
    inner = body.get("error")
    if isinstance(inner, dict):  # a watch stream: {"error": {"grpc_code": .., "message": ..}}
        body = inner
    code = body.get("code", body.get("grpc_code"))
    details = str(body.get("message") or body.get("error") or "")
    return (int(code) if isinstance(code, int | str) and str(code).isdigit() else None), details


def translate_gateway(status: int, body: Any, what: str = "") -> Exception:
    """The tm-sidecar exception for an error answer of the gateway (HTTP ``status``)."""
    code, details = gateway_status(body)
    if code is None:
        # Not an answer of etcd's gateway (a proxy's page, a cut body): a server-side
        # failure is unavailability (the outcome is unknown), anything else a refusal.
        details = details or f"HTTP {status}"
        if status >= 500 or status in (408, 429):
            return EtcdUnavailable(f"{what}: {details}" if what else details)
        return EtcdError(f"{what}: {details}" if what else details)
    return translate_code(code, details, what)
