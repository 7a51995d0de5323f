"""gRPC failures as tm-sidecar's exceptions, by status code.

The code decides the family: connectivity (:class:`EtcdUnavailable`), a full database
(:class:`EtcdFull`) or a refusal (:class:`EtcdError`). etcd's error detail (its
``rpctypes`` descriptions) is read only where etcd puts several errors under one code:
OUT_OF_RANGE (compacted or a future revision), NOT_FOUND (a lease or a member),
RESOURCE_EXHAUSTED (the NOSPACE alarm, etcd's back-pressure, or a message over gRPC's
size limit).
"""

from __future__ import annotations

from typing import Any

import grpc

from .._errors import Compacted, EtcdError, EtcdFull, EtcdUnavailable, LeaseNotFound

#: A call that may not have reached etcd, or whose answer was lost: its outcome is unknown.
_UNAVAILABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        # Raised by grpc-core itself for a broken connection (RST_STREAM, a cut frame).
        grpc.StatusCode.INTERNAL,
        # A stream cancelled by the server (etcd stopping); our own cancels never get here.
        grpc.StatusCode.CANCELLED,
    }
)


def status_of(exc: BaseException) -> tuple[Any, str]:
    """The gRPC status code and detail of a failed call (None for anything else)."""
    code = getattr(exc, "code", None)
    details = getattr(exc, "details", None)
    return (code() if callable(code) else None), str(details() if callable(details) else exc)


def needs_auth(exc: BaseException) -> bool:
    """Whether etcd refused the call's token: authenticate again, then retry once.

    UNAUTHENTICATED is an expired or unknown token; etcd 3.5 also refuses a token minted
    before a change to its users or roles ("revision of auth store is old") with
    INVALID_ARGUMENT, and its own client re-authenticates for both.
    """
    code, details = status_of(exc)
    if code is grpc.StatusCode.UNAUTHENTICATED:
        return True
    return code is grpc.StatusCode.INVALID_ARGUMENT and "auth store is old" in details


def translate(exc: BaseException, what: str = "") -> Exception:
    """The tm-sidecar exception for a failed gRPC call."""
    code, details = status_of(exc)
    message = f"{what}: {details}" if what else details
    if code in _UNAVAILABLE:
        return EtcdUnavailable(message)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        if "space exceeded" in details:
            return EtcdFull(message)
        if "too many requests" in details:
            return EtcdUnavailable(message)  # etcd's applier lags: back off and retry
        return EtcdError(message)  # a message over gRPC's size limit
    if code is grpc.StatusCode.OUT_OF_RANGE and "compacted" in details:
        return Compacted(message)
    if code is grpc.StatusCode.NOT_FOUND and "lease" in details:
        return LeaseNotFound(message)
    return EtcdError(message)
