"""The trace a log line belongs to: the trace id of the task whose attempt the current
Trio task runs (from the task's ``traceparent`` option), added to every log line the
attempt writes, so that a trace's spans and the sidecar's logs of it can be joined."""

from __future__ import annotations

import logging
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


def traced(trace_id: str | None) -> dict[str, str]:
    """``extra`` fields naming ``trace_id`` (none for an untraced task), for the log
    lines of an attempt written outside its own Trio task (a remote attempt's, driven
    from one task for all of them, has no context of its own to carry it)."""
    return {} if trace_id is None else {"trace_id": trace_id}
