"""The tm-sidecar socket protocol (docs/protocol.md), without I/O: both ends use this.

The SDK's client and the sidecar's socket server share it, so that the framing, the
size limits, the version, the event kinds and the error codes are written once:

- :func:`encode_frame` and :func:`decode_frame`: one JSON object to one line and back;
- :class:`LineFramer`: bytes in, whole lines out, never more than ``max_frame`` bytes
  of a line held (a longer line is :class:`FrameTooLarge`, not unbounded memory);
- :data:`PROTOCOL_VERSION`, :data:`DEFAULT_MAX_FRAME`, :data:`EVENT_KINDS`;
- the one error hierarchy (:class:`TaskManagerError` and its kin), split by whose
  fault it is, with its wire codes: :data:`WIRE_ERRORS` is what the sidecar answers
  with, :func:`error_to_wire` and :func:`error_from_wire` cross the wire;
- :func:`backoff_s`: the one backoff both ends wait between failures (the SDK before
  connecting again, the sidecar before calling etcd again), each with its own bounds.

Nothing here reads or writes a socket, starts a task or keeps state between calls
beyond a framer's own buffer: it is plain Python, the same under Trio, asyncio or none.

Size: the whole protocol without I/O in one module, so that both ends and every
client author read it in one place; its error table alone is a third of it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

__all__ = [
    "CLIENT_ERRORS",
    "DEFAULT_MAX_FRAME",
    "EVENT_KINDS",
    "MAX_CREATE_MANY",
    "PROTOCOL_VERSION",
    "WIRE_ERRORS",
    "Compacted",
    "ConnectionLost",
    "EtcdError",
    "EtcdFull",
    "EtcdUnavailable",
    "FrameError",
    "FrameTooLarge",
    "InvalidRequest",
    "LeaseLost",
    "LeaseNotFound",
    "LineFramer",
    "MalformedFrame",
    "NotLeader",
    "PayloadTooLarge",
    "PermissionDenied",
    "ProtocolViolation",
    "QueueFull",
    "TaskFailed",
    "TaskManagerError",
    "TaskNotFound",
    "Unavailable",
    "WaitTimeout",
    "backoff_s",
    "decode_frame",
    "encode_frame",
    "error_from_wire",
    "error_to_wire",
]

#: The version ``hello`` names; a sidecar refuses any other.
PROTOCOL_VERSION = 1
#: The largest frame in bytes, its newline not counted, until ``hello`` tells the
#: sidecar's own (``max_frame``); the sidecar's default.
DEFAULT_MAX_FRAME = 1024 * 1024
#: The kinds of task event the sidecar pushes, in the order a task goes through them
#: (docs/protocol.md, "Events").
EVENT_KINDS = ("queued", "assigned", "started", "updated", "failed", "completed")
#: The most tasks one ``create_many`` request carries (the sidecar refuses more).
MAX_CREATE_MANY = 10_000


# -- errors -------------------------------------------------------------------------------
#
# Split by whose fault it is: the caller's (InvalidRequest and its kin), a passing
# unavailability worth retrying (Unavailable), a fatal loss (LeaseLost), a peer breaking
# the protocol (ProtocolViolation), etcd refusing (EtcdError), or a bug in the sidecar
# (the root's own code, ``internal``).


class TaskManagerError(Exception):
    """The root of every tm-sidecar error. Raised as itself (code ``internal``), it is a
    bug in the sidecar: the request may or may not have taken effect; please report it."""

    code: ClassVar[str] = "internal"
    retryable: ClassVar[bool] = False
    #: What the error leaves behind, when a request did part of its work: for a
    #: ``create_many``, ``task_ids`` (every item's, in order) and ``committed`` (how many
    #: of the first exist). On the wire as the error object's ``details``.
    details: dict[str, Any] | None = None


class InvalidRequest(TaskManagerError):
    """The caller asked for something that cannot be done as asked."""

    code = "invalid_request"


class TaskNotFound(InvalidRequest):
    """No task has this id (or its record has expired)."""

    code = "task_not_found"


class PayloadTooLarge(InvalidRequest):
    """The task's payload (or a request's frame) is over the configured limit."""

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


class PermissionDenied(TaskManagerError):
    """This client may not use the sidecar: its uid is not in ``--allow-uid``, or the
    operating system refused it the socket (EACCES: the socket's mode and group, or a
    directory on its path). Trying again is refused again until an operator changes that."""

    code = "permission_denied"


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


class ConnectionLost(Unavailable):
    """The connection to the sidecar closed while a request was in flight (the SDK's
    own: never on the wire)."""

    code = "connection_lost"


class WaitTimeout(Unavailable, TimeoutError):
    """A wait for a task's outcome ran out of its timeout; the task goes on (the SDK's
    own: never on the wire, where a ``wait`` that times out answers ``unavailable``).
    It is also Python's ``TimeoutError``."""

    code = "wait_timeout"


class TaskFailed(TaskManagerError):
    """The task ended in the failed queue; ``error`` is what its last attempt reported
    (the SDK's own: never on the wire)."""

    code = "task_failed"

    def __init__(self, task_id: str, error: dict[str, Any] | None) -> None:
        self.task_id = task_id
        self.error = error or {}
        super().__init__(
            f"task {task_id} failed: {self.error.get('type')}: {self.error.get('message')}"
        )


def _table(*classes: type[TaskManagerError]) -> dict[str, type[TaskManagerError]]:
    table: dict[str, type[TaskManagerError]] = {}
    for cls in classes:
        if cls.code in table:  # pragma: no cover - a slip caught at import
            raise AssertionError(f"{cls.__name__} and {table[cls.code].__name__}: one code")
        table[cls.code] = cls
    return table


WIRE_ERRORS: Mapping[str, type[TaskManagerError]] = _table(
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
    PermissionDenied,
    EtcdError,
    LeaseNotFound,
    Compacted,
)
"""The errors a sidecar answers with, by wire code (docs/protocol.md, "Error codes")."""

CLIENT_ERRORS: Mapping[str, type[TaskManagerError]] = _table(
    ConnectionLost, TaskFailed, WaitTimeout
)
"""The errors an SDK raises of its own, by code: never sent on the wire."""


def error_to_wire(exc: TaskManagerError) -> dict[str, Any]:
    """An error reply's ``error`` object. A class outside :data:`WIRE_ERRORS` (an SDK's
    own, or a subclass without a code of its own) goes as its nearest base in it."""
    code = next(_CODE_OF[cls] for cls in type(exc).__mro__ if cls in _CODE_OF)
    wire = {"code": code, "message": str(exc), "retryable": WIRE_ERRORS[code].retryable}
    if exc.details is not None:
        wire["details"] = exc.details
    return wire


#: The reverse of WIRE_ERRORS, for error_to_wire's walk up a class's bases.
_CODE_OF: Mapping[type, str] = {cls: code for code, cls in WIRE_ERRORS.items()}


def error_from_wire(error: Mapping[str, Any]) -> TaskManagerError:
    """The exception for an error reply's ``error`` object: the class the sidecar raised
    (the root, :class:`TaskManagerError`, for a code this SDK does not know)."""
    cls = WIRE_ERRORS.get(str(error.get("code")), TaskManagerError)
    exc = cls(str(error.get("message", "")))
    details = error.get("details")
    if isinstance(details, dict):
        exc.details = details
    return exc


# -- frames -------------------------------------------------------------------------------


class FrameError(ValueError):
    """Bytes that break the framing (docs/protocol.md, "Transport and framing"): the
    stream cannot be read further, and its connection is closed."""


class FrameTooLarge(FrameError):
    """A frame over ``max_frame`` bytes (its newline not counted)."""

    def __init__(self, message: str, size: int, limit: int) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


class MalformedFrame(FrameError):
    """A line that is not UTF-8 JSON, or JSON that is not an object."""


#: Built once: ``json.dumps`` with arguments builds an encoder per call, a third of the
#: cost of a small frame.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def encode_frame(frame: Mapping[str, Any], max_frame: int | None = None) -> bytes:
    """One frame as the line to send, its newline included: compact UTF-8 JSON.

    Raises :class:`FrameTooLarge` over ``max_frame`` bytes (if given), and ``ValueError``
    for what JSON cannot carry (NaN and the infinities among it).
    """
    try:
        text = _ENCODER.encode(frame)
    except TypeError as exc:
        raise ValueError(str(exc)) from exc
    line = text.encode()
    if max_frame is not None and len(line) > max_frame:
        raise FrameTooLarge(
            f"a frame of {len(line)} bytes is over max_frame ({max_frame} bytes)",
            len(line),
            max_frame,
        )
    return line + b"\n"


def decode_frame(line: bytes) -> dict[str, Any] | None:
    """One line (its newline removed) as a frame; ``None`` for a blank line, which the
    protocol ignores. Raises :class:`MalformedFrame` for anything but a JSON object."""
    if not line.strip():
        return None
    try:
        frame = json.loads(line)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MalformedFrame(f"a frame is not JSON ({exc})") from exc
    if not isinstance(frame, dict):
        raise MalformedFrame(f"a frame is not a JSON object ({type(frame).__name__})")
    return frame


class LineFramer:
    """Splits a byte stream into lines of at most ``max_frame`` bytes.

    ``for line in framer.feed(chunk): ...`` gives each line that ``chunk`` completed
    (without its newline), in order. A line over the limit raises :class:`FrameTooLarge`
    when iteration reaches it, or at once for an unfinished line already over it: at most
    ``max_frame`` bytes plus one chunk are ever held. After that error the stream is
    broken; the framer is not to be fed again. Lines not yet iterated stay buffered for
    the next ``feed``.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        if max_frame < 1:
            raise ValueError(f"max_frame must be positive, not {max_frame}")
        self.max_frame = max_frame
        self._buffer = bytearray()
        # How far the buffer is known to hold no newline: a long line arriving in many
        # chunks is searched once, not once per chunk.
        self._scanned = 0

    @property
    def buffered(self) -> int:
        """How many bytes are held, of lines not yet complete or not yet iterated."""
        return len(self._buffer)

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Take ``data``; iterate the answer for the lines now complete."""
        self._buffer += data
        return self._lines()

    def _lines(self) -> Iterator[bytes]:
        buffer, limit = self._buffer, self.max_frame
        start = 0
        drained = False
        try:
            while True:
                newline = buffer.find(b"\n", max(start, self._scanned))
                if newline < 0:
                    break
                if newline - start > limit:
                    raise self._too_large(newline - start)
                line = bytes(buffer[start:newline])
                start = newline + 1
                yield line
            drained = True
        finally:
            # Consumed lines are dropped in one move, not one per line.
            del buffer[:start]
            self._scanned = len(buffer) if drained else 0
        if len(buffer) > limit:
            raise self._too_large(len(buffer), unfinished=True)

    def _too_large(self, size: int, unfinished: bool = False) -> FrameTooLarge:
        what = f"over {size} bytes without ending the frame" if unfinished else f"{size} bytes"
        return FrameTooLarge(
            f"a frame of {what}, over max_frame ({self.max_frame} bytes)", size, self.max_frame
        )


def backoff_s(failures: int, *, first_s: float, cap_s: float, draw: float = 1.0) -> float:
    """Seconds to wait after ``failures`` failures in a row: ``first_s`` doubling to
    ``cap_s``. ``draw`` (from 0 to 1; a caller's random number, so that this stays
    pure) takes up to half off, so that clients that failed together do not all come
    back at the same instant; 1, the default, takes nothing off."""
    full = min(cap_s, first_s * 2.0 ** min(max(failures, 0), 30))
    return float(full * (0.5 + min(max(draw, 0.0), 1.0) / 2))
