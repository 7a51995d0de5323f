"""Structured logs: one line per event, as logfmt (default) or JSON, each field its own key.

A line has ``ts``, ``level``, ``logger`` and ``msg``, then the event's fields, then
``exc`` (a traceback) if there is one. The fields are what the call passes as
``extra``::

    log.info("task started", extra={"task": task_id, "attempt": 2, "queue": "mail"})

gives ``ts=... level=info logger=tm_sidecar.agent msg="task started" task=01J... attempt=2
queue=mail`` (or the same keys in a JSON object). The message is a constant sentence,
so that lines of one kind group together; the values go in fields. %-style messages
(``log.info("took %.1f s", t)``) still work: they are formatted into ``msg``; tm_sidecar's
own calls do not use them (``tests/test_log.py`` walks every call and holds it to the rule).

``extra`` may not use the names of ``logging.LogRecord``'s own attributes (``name``,
``msg``, ``args``, ``module``, ``process``, ``thread``, ``filename``, ...): logging
refuses them with a KeyError. A field named like one of the line's own keys (``ts``,
``level``, ``logger``, ``msg``, ``exc``) is written with a leading underscore.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterator
from typing import Any

from .._tracing import TraceFilter

#: The keys every line starts with, in this order.
BASE_KEYS = ("ts", "level", "logger", "msg")
#: What a LogRecord carries by itself; any other attribute came from ``extra``.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}
_KEY_CHARS = re.compile(r"[^A-Za-z0-9_.\-]")
#: Characters a logfmt value may carry without quotes.
_BARE = re.compile(r"[A-Za-z0-9_.:/@+,\-]+")


def record_fields(record: logging.LogRecord) -> Iterator[tuple[str, Any]]:
    """The fields of one record in line order: the base keys, the event's, ``exc``."""
    yield (
        "ts",
        (
            time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z"
        ),
    )
    yield "level", record.levelname.lower()
    yield "logger", record.name
    yield "msg", record.getMessage()
    for key, value in vars(record).items():
        if key in _RECORD_ATTRS or key.startswith("_"):
            continue
        key = _KEY_CHARS.sub("_", key) or "_"
        yield ("_" + key if key in BASE_KEYS or key == "exc" else key), value


class StructuredFormatter(logging.Formatter):
    """One line per record: logfmt or JSON, each field a key of its own."""

    def __init__(self, fmt: str = "logfmt") -> None:
        super().__init__()
        if fmt not in ("logfmt", "json"):
            raise ValueError(f"log format {fmt!r}: expected logfmt or json")
        self.fmt = fmt

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line."""
        fields = dict(record_fields(record))
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            fields["stack"] = self.formatStack(record.stack_info)
        if self.fmt == "json":
            return json.dumps(fields, separators=(",", ":"), default=str, ensure_ascii=False)
        return " ".join(f"{key}={logfmt_value(value)}" for key, value in fields.items())


def logfmt_value(value: Any) -> str:
    """One value as logfmt writes it: bare when it is safe, else a JSON string (so a
    newline is ``\\n``); a list or a mapping as compact JSON in a string; None as
    nothing."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value) if isinstance(value, float) else str(value)
    if isinstance(value, dict | list | tuple):
        text = json.dumps(value, separators=(",", ":"), default=str, ensure_ascii=False)
    else:
        text = str(value)
    if _BARE.fullmatch(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def setup_logging(level: str = "info", fmt: str = "logfmt") -> None:
    """Send tm_sidecar's logs to stderr, one line per event."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(StructuredFormatter(fmt))
    handler.addFilter(TraceFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


__all__ = ["StructuredFormatter", "logfmt_value", "setup_logging"]
