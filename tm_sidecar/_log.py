"""Structured logs: one line per event, as logfmt (default) or JSON."""

from __future__ import annotations

import json
import logging
import sys
import time


class _Formatter(logging.Formatter):
    def __init__(self, fmt: str) -> None:
        super().__init__()
        self.fmt = fmt

    def format(self, record: logging.LogRecord) -> str:
        ts = (
            time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z"
        )
        message = record.getMessage()
        if record.exc_info:
            message += " " + self.formatException(record.exc_info).replace("\n", "\\n")
        fields = {
            "ts": ts,
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": message,
        }
        if self.fmt == "json":
            return json.dumps(fields, separators=(",", ":"))
        return " ".join(f"{k}={_quote(v)}" for k, v in fields.items())


def _quote(value: str) -> str:
    if value and all(c.isalnum() or c in "-_.:/@" for c in value):
        return value
    return json.dumps(value)


def setup_logging(level: str = "info", fmt: str = "logfmt") -> None:
    """Send tm_sidecar's logs to stderr, one line per event."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
