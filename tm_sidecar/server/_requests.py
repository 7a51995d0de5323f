"""Reading a request: what is wrong with it is the caller's fault, said so explicitly.

Each reader takes a field of a frame and returns it as the sidecar's own value, or
raises :class:`~taskmanager.protocol.InvalidRequest` with what is wrong. Validation
happens here, where the request is read, so that any other exception an op raises is
the sidecar's bug (answered ``internal`` by the server), never the caller's.
"""

from __future__ import annotations

import math
from typing import Any

from taskmanager.protocol import InvalidRequest

from ..core import (
    DEFAULT_MAX_SNOOZES,
    JSON,
    OPTION_FIELDS,
    Backoff,
    TaskId,
    TaskOptions,
    check_name,
    dumps,
)

#: A schedule's fields besides its name, payload and task options.
SCHEDULE_FIELDS = ("cron", "every_s", "timezone", "missed", "max_catch_up", "grace_s", "paused")

#: The options a request may give: those the core reads (one list, the core's).
_OPTION_NAMES = OPTION_FIELDS


def read_options(obj: JSON) -> TaskOptions:
    """A task's ``options`` object as :class:`TaskOptions`."""
    if not isinstance(obj, dict):
        raise InvalidRequest("options must be an object")
    unknown = set(obj) - _OPTION_NAMES
    if unknown:
        raise InvalidRequest(f"unknown options: {sorted(unknown)}")
    backoff = obj.get("backoff") or {}
    if not isinstance(backoff, dict):
        raise InvalidRequest("backoff must be an object")
    try:
        priority = obj.get("priority", 0)
        attempts = obj.get("max_attempts", 3)
        snoozes = obj.get("max_snoozes", DEFAULT_MAX_SNOOZES)
        if not all(isinstance(n, int) for n in (priority, attempts, snoozes)):
            raise InvalidRequest("priority, max_attempts and max_snoozes are whole numbers")
        for name in ("unique_key", "concurrency_key", "traceparent", "tracestate"):
            if obj.get(name) is not None and not isinstance(obj[name], str):
                raise InvalidRequest(f"{name} must be a string")
        timeout = obj.get("timeout_s")
        window = obj.get("unique_for_s")
        return TaskOptions(
            queue=obj.get("queue", "default"),
            priority=priority,
            max_attempts=attempts,
            timeout_s=None if timeout is None else float(timeout),
            backoff=Backoff.from_json(backoff),
            unique_key=obj.get("unique_key"),
            unique_for_s=None if window is None else float(window),
            concurrency_key=obj.get("concurrency_key"),
            max_snoozes=snoozes,
            traceparent=obj.get("traceparent"),
            tracestate=obj.get("tracestate"),
        )
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidRequest(str(exc)) from exc


def read_name(kind: str, value: object) -> str:
    """``value`` as a key-safe name (a task id, a queue, a schedule), else InvalidRequest."""
    if not isinstance(value, str):
        raise InvalidRequest(f"{kind} must be a string, not {value!r:.100}")
    try:
        return check_name(kind, value)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


def read_queue(frame: dict[str, Any]) -> str:
    """The frame's ``queue`` (``default`` if it names none)."""
    return read_name("queue", frame.get("queue", "default"))


def read_task_id(frame: dict[str, Any]) -> TaskId:
    """The frame's ``task_id``, which it must have."""
    if "task_id" not in frame:
        raise InvalidRequest(f"{frame.get('op')} needs a task_id")
    return TaskId(read_name("task id", frame["task_id"]))


def read_whole(frame: dict[str, Any], field: str) -> int:
    """A field that names something by number (a delivery, a worker, a subscription)."""
    value = frame.get(field)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequest(f"{frame.get('op')} needs {field}, a whole number")
    return value


def is_finite(value: object) -> bool:
    """A finite number (not a bool, and not an integer too large for a float)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def check_numbers_fit(value: JSON) -> None:
    """Settings are numbers a float can hold: JSON allows integers of any length, and
    the checks after this one compare them with floats."""
    if isinstance(value, dict):
        for item in value.values():
            check_numbers_fit(item)
    elif isinstance(value, list):
        for item in value:
            check_numbers_fit(item)
    elif isinstance(value, int) and not isinstance(value, bool) and not is_finite(value):
        raise InvalidRequest("a number is too large (the most is about 1.8e308)")


def read_json(value: JSON, field: str) -> JSON:
    """``value`` if it is JSON as the sidecar writes it (NaN and the infinities, which
    Python's parser takes, are not)."""
    try:
        dumps(value)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"{field} is not JSON: {exc}") from None
    return value
