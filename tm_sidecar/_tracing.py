"""The trace a log line belongs to: the trace id of the task whose attempt the current
Trio task runs (from the task's ``traceparent`` option), added to every log line the
attempt writes, so that a trace's spans and the sidecar's logs of it can be joined."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextvars import ContextVar

#: Set by an attempt's Trio task for its task's trace; Trio tasks the attempt starts
#: inherit it, others never see it.
TRACE_ID: ContextVar[str | None] = ContextVar("tm_trace_id", default=None)


class TraceFilter(logging.Filter):
    """Adds ``trace_id`` to the records logged inside a traced attempt."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Always keeps the record; adds the trace id, unless the call gave one."""
        trace_id = TRACE_ID.get()
        if trace_id is not None and not hasattr(record, "trace_id"):
            record.trace_id = trace_id
        return True


@contextlib.contextmanager
def in_trace(trace_id: str | None) -> Iterator[None]:
    """Log lines written inside name ``trace_id`` (none for an untraced task): for the
    lines of an attempt written outside its own Trio task (a remote attempt's, driven
    from one task for all of them, has no context of its own to carry it)."""
    token = TRACE_ID.set(trace_id)
    try:
        yield
    finally:
        TRACE_ID.reset(token)
