"""Tasks and their state records, and their JSON form in etcd.

Size: every record a key holds and its JSON (with the attempt history, the
queue place and the fields of a newer release kept), in one place so that the layout
is read in one file.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

import attrs

from ._keys import NodeId, State, TaskId, check_name

JSON = Any


def _finite_positive_or_none(
    _inst: object, attr: attrs.Attribute[Any], value: float | None
) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ValueError(f"{attr.name} must be a positive number of seconds, got {value!r}")


def _non_negative(_inst: object, attr: attrs.Attribute[Any], value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{attr.name} must be >= 0, got {value!r}")


@attrs.frozen(kw_only=True)
class Backoff:
    """Exponential backoff between attempts: ``min(cap, base * factor**(n-1))``, with jitter.

    ``jitter`` is the fraction of each delay that is random: 0.5 means a delay is drawn
    uniformly from [0.5 d, d].
    """

    base_s: float = attrs.field(default=1.0, validator=_non_negative)
    factor: float = attrs.field(default=2.0, validator=_non_negative)
    max_s: float = attrs.field(default=300.0, validator=_non_negative)
    jitter: float = attrs.field(
        default=0.5, validator=attrs.validators.and_(_non_negative, attrs.validators.le(1.0))
    )

    def to_json(self) -> dict[str, JSON]:
        """The JSON object stored in etcd."""
        return {
            "base_s": self.base_s,
            "factor": self.factor,
            "max_s": self.max_s,
            "jitter": self.jitter,
        }

    @classmethod
    def from_json(cls, obj: dict[str, JSON]) -> Backoff:
        """Read the JSON object stored in etcd."""
        return cls(
            **{k: float(obj[k]) for k in ("base_s", "factor", "max_s", "jitter") if k in obj}
        )


def unknown_fields(obj: dict[str, JSON], known: frozenset[str]) -> str:
    """The fields of ``obj`` this release does not know, as a compact JSON object ("" if
    none): a newer release's, kept so that rewriting the value does not drop them (a
    rolling upgrade runs old and new sidecars on one namespace)."""
    if obj.keys() <= known:
        return ""
    return dumps({k: v for k, v in obj.items() if k not in known})


def with_unknown(obj: dict[str, JSON], extra: str) -> dict[str, JSON]:
    """``obj`` with the unknown fields ``extra`` kept beside it (ours win on a clash)."""
    if not extra:
        return obj
    kept: dict[str, JSON] = json.loads(extra)
    kept.update(obj)
    return kept


MAX_PRIORITY = 1_000_000
#: Snoozes a task may take unless its options say otherwise.
DEFAULT_MAX_SNOOZES = 100


def _name_or_none(kind: str) -> Any:
    def check(_inst: object, _attr: attrs.Attribute[Any], value: str | None) -> None:
        if value is not None:
            check_name(kind, value)

    return check


#: W3C Trace Context's traceparent: version, trace id, parent span id, flags (an
#: all-zero trace or span id is invalid, and version ff is forbidden).
_TRACEPARENT = re.compile(
    r"(?!ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}"
)
#: W3C Trace Context allows a tracestate of up to 32 members; 512 characters keeps it
#: short in every record (a longer one may be truncated by the producer, as allowed).
MAX_TRACESTATE_CHARS = 512


def _traceparent_or_none(_inst: object, _attr: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None and not (isinstance(value, str) and _TRACEPARENT.fullmatch(value)):
        raise ValueError(
            f"traceparent must be a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>), "
            f"not {value!r:.80}"
        )


def _tracestate_or_none(_inst: object, _attr: attrs.Attribute[Any], value: str | None) -> None:
    if value is None:
        return
    if (
        not isinstance(value, str)
        or len(value) > MAX_TRACESTATE_CHARS
        or not value.isascii()
        or not value.isprintable()
    ):
        raise ValueError(
            f"tracestate must be printable ASCII of at most {MAX_TRACESTATE_CHARS} characters"
        )


@attrs.frozen(kw_only=True)
class TaskOptions:
    """How a task is run. Carried in every state record so that moves need not read the task."""

    queue: str = attrs.field(default="default", validator=lambda _i, _a, v: check_name("queue", v))
    priority: int = attrs.field(
        default=0,
        validator=[
            attrs.validators.instance_of(int),
            attrs.validators.ge(-MAX_PRIORITY),
            attrs.validators.le(MAX_PRIORITY),
        ],
    )
    max_attempts: int = attrs.field(
        default=3, validator=[attrs.validators.instance_of(int), attrs.validators.ge(1)]
    )
    timeout_s: float | None = attrs.field(default=None, validator=_finite_positive_or_none)
    backoff: Backoff = Backoff()
    #: While a task with this key is live (and ``unique_for_s`` after it finished), a
    #: create with the same key answers that task instead of making a new one.
    unique_key: str | None = attrs.field(default=None, validator=_name_or_none("unique_key"))
    unique_for_s: float | None = attrs.field(default=None, validator=_finite_positive_or_none)
    #: Tasks with one key share the queue's per-key limits (``key_max_running``, ...).
    concurrency_key: str | None = attrs.field(
        default=None, validator=_name_or_none("concurrency_key")
    )
    #: How often a handler may snooze the task before it fails (``SnoozeLimit``).
    max_snoozes: int = attrs.field(
        default=DEFAULT_MAX_SNOOZES,
        validator=[attrs.validators.instance_of(int), attrs.validators.ge(0)],
    )
    #: Options of a newer release, kept as read (see :func:`unknown_fields`).
    extra: str = ""

    #: The W3C trace context of the span that created the task (OpenTelemetry, when
    #: the producer has it): the worker's span links to it, and logs name its trace.
    traceparent: str | None = attrs.field(default=None, validator=_traceparent_or_none)
    tracestate: str | None = attrs.field(default=None, validator=_tracestate_or_none)

    def __attrs_post_init__(self) -> None:
        if self.tracestate is not None and self.traceparent is None:
            raise ValueError("tracestate needs a traceparent")
        if self.unique_for_s is not None and self.unique_key is None:
            raise ValueError("unique_for_s needs a unique_key")

    def to_json(self) -> dict[str, JSON]:
        """The JSON object stored in etcd."""
        obj: dict[str, JSON] = {
            "queue": self.queue,
            "priority": self.priority,
            "max_attempts": self.max_attempts,
            "backoff": self.backoff.to_json(),
        }
        if self.timeout_s is not None:
            obj["timeout_s"] = self.timeout_s
        for name in ("unique_key", "unique_for_s", "concurrency_key", "traceparent", "tracestate"):
            if getattr(self, name) is not None:
                obj[name] = getattr(self, name)
        if self.max_snoozes != DEFAULT_MAX_SNOOZES:
            obj["max_snoozes"] = self.max_snoozes
        return with_unknown(obj, self.extra)

    @classmethod
    def from_json(cls, obj: dict[str, JSON]) -> TaskOptions:
        """Read the JSON object stored in etcd."""
        return cls(
            queue=obj.get("queue", "default"),
            priority=int(obj.get("priority", 0)),
            max_attempts=int(obj.get("max_attempts", 3)),
            timeout_s=None if obj.get("timeout_s") is None else float(obj["timeout_s"]),
            backoff=Backoff.from_json(obj.get("backoff", {})),
            unique_key=obj.get("unique_key"),
            unique_for_s=None if obj.get("unique_for_s") is None else float(obj["unique_for_s"]),
            concurrency_key=obj.get("concurrency_key"),
            max_snoozes=int(obj.get("max_snoozes", DEFAULT_MAX_SNOOZES)),
            extra=unknown_fields(obj, OPTION_FIELDS),
            traceparent=obj.get("traceparent"),
            tracestate=obj.get("tracestate"),
        )

    @property
    def trace_id(self) -> str | None:
        """The trace this task belongs to (from its ``traceparent``), if it has one."""
        return None if self.traceparent is None else self.traceparent.split("-")[1]


#: The options this release reads (anything else in a record's options is kept as is).
OPTION_FIELDS = frozenset(
    {
        "queue",
        "priority",
        "max_attempts",
        "timeout_s",
        "backoff",
        "unique_key",
        "unique_for_s",
        "concurrency_key",
        "max_snoozes",
        "traceparent",
        "tracestate",
    }
)


@attrs.frozen(kw_only=True)
class TaskSpec:
    """A task as created: written once to ``task/<id>``."""

    id: TaskId
    payload: JSON
    options: TaskOptions = TaskOptions()
    created_at: float
    run_at: float | None = None

    def to_json(self) -> str:
        """The value stored in etcd."""
        obj: dict[str, JSON] = {
            "id": self.id,
            "payload": self.payload,
            "options": self.options.to_json(),
            "created_at": self.created_at,
        }
        if self.run_at is not None:
            obj["run_at"] = self.run_at
        return dumps(obj)

    @classmethod
    def from_json(cls, text: str) -> TaskSpec:
        """Read the value stored in etcd."""
        obj = json.loads(text)
        return cls(
            id=TaskId(obj["id"]),
            payload=obj.get("payload"),
            options=TaskOptions.from_json(obj.get("options", {})),
            created_at=float(obj["created_at"]),
            run_at=None if obj.get("run_at") is None else float(obj["run_at"]),
        )


@attrs.frozen(kw_only=True)
class TaskError:
    """Why an attempt failed."""

    type: str
    message: str
    traceback: str | None = None
    retryable: bool = True

    def to_json(self) -> dict[str, JSON]:
        """The JSON object stored in etcd."""
        obj: dict[str, JSON] = {
            "type": self.type,
            "message": self.message,
            "retryable": self.retryable,
        }
        if self.traceback:
            obj["traceback"] = self.traceback
        return obj

    @classmethod
    def from_json(cls, obj: dict[str, JSON]) -> TaskError:
        """Read the JSON object stored in etcd."""
        return cls(
            type=str(obj.get("type", "Error")),
            message=str(obj.get("message", "")),
            traceback=obj.get("traceback"),
            retryable=bool(obj.get("retryable", True)),
        )


#: Attempts a record's ``history`` keeps (the latest).
MAX_HISTORY = 10
#: An error message in the history is cut to this many characters (the last error keeps
#: its whole message and traceback in ``error``).
HISTORY_MESSAGE_CHARS = 200


@attrs.frozen(kw_only=True)
class AttemptEnd:
    """One ended attempt, as a record's ``history`` keeps it.

    ``outcome`` is ``completed``, ``failed`` (the attempt failed; the task may have
    been retried), ``handed back`` or ``snoozed``; ``error`` is the failure's type and
    message (no traceback; ``retryable`` only when false).
    """

    attempt: int
    node: NodeId | None = None
    started_at: float | None = None
    ended_at: float
    outcome: str
    error: TaskError | None = None

    def to_json(self) -> dict[str, JSON]:
        """The JSON object stored in etcd."""
        obj: dict[str, JSON] = {"attempt": self.attempt}
        if self.node is not None:
            obj["node"] = self.node
        if self.started_at is not None:
            obj["started_at"] = self.started_at
        obj["ended_at"] = self.ended_at
        obj["outcome"] = self.outcome
        if self.error is not None:
            obj["error"] = {"type": self.error.type, "message": self.error.message}
            if not self.error.retryable:
                obj["error"]["retryable"] = False
        return obj

    @classmethod
    def from_json(cls, obj: dict[str, JSON]) -> AttemptEnd:
        """Read the JSON object stored in etcd."""
        node, error = obj.get("node"), obj.get("error")
        return cls(
            attempt=int(obj.get("attempt", 0)),
            node=None if node is None else NodeId(str(node)),
            started_at=_opt_float(obj.get("started_at")),
            ended_at=float(obj.get("ended_at", 0.0)),
            outcome=str(obj.get("outcome", "")),
            error=None if error is None else TaskError.from_json(error),
        )


@attrs.frozen(kw_only=True)
class Record:
    """The value of a state key: where the task is, and what a move needs to know.

    ``attempts`` counts the attempts started so far (the live one included while
    processing). ``since_at`` is when the task entered this state (UTC epoch seconds).
    """

    state: State
    attempts: int = 0
    options: TaskOptions = TaskOptions()
    since_at: float
    due_at: float | None = None  # delayed
    node: NodeId | None = None  # processing
    session: int | None = None  # processing: the node's lease when assigned
    deadline_at: float | None = None  # processing, when the task has a timeout
    # When the worker started the attempt: in processing once announced, and in the
    # record the attempt's outcome writes.
    started_at: float | None = None
    progress: JSON = None  # processing
    result: JSON = None  # completed
    error: TaskError | None = None  # failed; the last error in pending/delayed after a retry
    # pending/delayed: "created", "promoted", "retry", "stalled", "handed back", "snoozed"
    reason: str | None = None
    # Hand-backs in a row that spent no attempt (pending and processing records).
    handbacks: int = 0
    snoozes: int = 0  # how often a handler snoozed the task so far
    #: pending, delayed, processing: the task's place in its queue (a revision), kept when
    #: it is requeued through no fault of its own (its node was lost, it was handed
    #: back); None: the create revision of its pending key.
    order: int | None = None
    #: The attempts that ended, oldest first, the latest ``MAX_HISTORY`` of them.
    history: tuple[AttemptEnd, ...] = ()
    #: Fields of a newer release, kept as read so that a move or a rewrite by this
    #: release carries them on (see :func:`unknown_fields`; every move passes it on).
    extra: str = ""

    def to_json(self) -> str:
        """The value stored in etcd (the state itself is the key's prefix)."""
        obj: dict[str, JSON] = {
            "attempts": self.attempts,
            "since_at": self.since_at,
            "options": self.options.to_json(),
        }
        for name in ("due_at", "node", "session", "deadline_at", "started_at", "reason"):
            value = getattr(self, name)
            if value is not None:
                obj[name] = value
        if self.state is State.PROCESSING and self.progress is not None:
            obj["progress"] = self.progress
        if self.state is State.COMPLETED:
            obj["result"] = self.result
        if self.error is not None:
            obj["error"] = self.error.to_json()
        if self.handbacks:
            obj["handbacks"] = self.handbacks
        if self.snoozes:
            obj["snoozes"] = self.snoozes
        if self.order is not None:
            obj["order"] = self.order
        if self.history:
            obj["history"] = [entry.to_json() for entry in self.history]
        return dumps(with_unknown(obj, self.extra))

    @classmethod
    def from_json(cls, state: State, text: str) -> Record:
        """Read the value of a state key (see :class:`Records` for a reader that
        remembers)."""
        return cls.from_obj(state, json.loads(text))

    @classmethod
    def from_obj(
        cls,
        state: State,
        obj: dict[str, JSON],
        options: Callable[[dict[str, JSON]], TaskOptions] = TaskOptions.from_json,
    ) -> Record:
        """Read the decoded value of a state key; ``options`` reads its options."""
        get = obj.get
        node, session, error, order = get("node"), get("session"), get("error"), get("order")
        return cls(
            state=state,
            attempts=int(get("attempts", 0)),
            options=options(get("options", {})),
            since_at=float(get("since_at", 0.0)),
            due_at=_opt_float(get("due_at")),
            node=None if node is None else NodeId(node),
            session=None if session is None else int(session),
            deadline_at=_opt_float(get("deadline_at")),
            started_at=_opt_float(get("started_at")),
            progress=get("progress"),
            result=get("result"),
            error=None if error is None else TaskError.from_json(error),
            reason=get("reason"),
            handbacks=int(get("handbacks", 0)),
            snoozes=int(get("snoozes", 0)),
            order=None if order is None else int(order),
            history=tuple(AttemptEnd.from_json(e) for e in get("history", ())),
            extra=unknown_fields(obj, RECORD_FIELDS),
        )


#: The fields of a state record this release reads: its attributes by name (the state is
#: the key's prefix); anything else is a newer release's, kept as is.
RECORD_FIELDS = frozenset(f.name for f in attrs.fields(Record)) - {"state", "extra"}


@attrs.frozen(kw_only=True)
class NodeInfo:
    """A live sidecar as registered under its session lease."""

    id: NodeId
    session: int
    capacity: dict[str, int] = attrs.Factory(dict)  # queue -> concurrent tasks
    host: str = ""
    pid: int = 0
    version: str = ""
    started_at: float = 0.0
    #: Earlier sessions of this process whose ended attempts it still has to report
    #: (their session was lost while etcd could not be reached): the leader leaves those
    #: assignments alone until they are reported.
    carries: tuple[int, ...] = ()

    def to_json(self) -> str:
        """The value stored in etcd."""
        obj: dict[str, JSON] = {
            "id": self.id,
            "session": self.session,
            "capacity": dict(sorted(self.capacity.items())),
            "host": self.host,
            "pid": self.pid,
            "version": self.version,
            "started_at": self.started_at,
        }
        if self.carries:
            obj["carries"] = list(self.carries)
        return dumps(obj)

    @classmethod
    def from_json(cls, text: str) -> NodeInfo:
        """Read the value stored in etcd."""
        obj = json.loads(text)
        return cls(
            id=NodeId(obj["id"]),
            session=int(obj["session"]),
            capacity={str(k): int(v) for k, v in obj.get("capacity", {}).items()},
            host=str(obj.get("host", "")),
            pid=int(obj.get("pid", 0)),
            version=str(obj.get("version", "")),
            started_at=float(obj.get("started_at", 0.0)),
            carries=tuple(int(s) for s in obj.get("carries", ())),
        )


def _opt_float(value: JSON) -> float | None:
    return None if value is None else float(value)


def dumps(obj: JSON) -> str:
    """Compact, stable JSON; refuses NaN and infinities, which are not JSON."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
