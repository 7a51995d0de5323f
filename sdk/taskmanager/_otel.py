"""OpenTelemetry traces, when the application has the OpenTelemetry API installed
(``pip install 'taskmanager-sdk[otel]'``); without it nothing here imports it and
nothing changes.

A create records a producer span and carries its W3C trace context in the task's
options (``traceparent``, ``tracestate``: stored in the task's record, shown by
``tmctl show``). A worker runs each attempt's handler in a consumer span whose parent
is that context, so the producer's request, every attempt (retries included) and
whatever the handler traces are one trace; the span has the task's id, queue, attempt
and node as attributes and the outcome as its status. A task created without a context
(by a producer without OpenTelemetry, or with no span recording) runs in a span of a
trace of its own, if the worker traces.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

#: The tracer's name (the instrumentation scope).
SCOPE = "taskmanager"
#: ``messaging.system`` on every span.
SYSTEM = "tm-sidecar"


@functools.cache
def _api() -> Any:
    """The OpenTelemetry API modules (a namespace), or None when it is not installed.

    Imported on first use, once: an application without it never pays for the attempt
    more than once, and one with it gets its global tracer provider as configured by
    then (the API's proxy tracer follows a provider set later, too).
    """
    try:
        from opentelemetry import propagate, trace
    except ImportError:
        return None
    return _Api(trace, propagate)


class _Api:
    def __init__(self, trace: Any, propagate: Any) -> None:
        self.trace, self.propagate = trace, propagate
        self.tracer = trace.get_tracer(SCOPE)


@contextlib.contextmanager
def producer_span(task_id: str, options: dict[str, Any]) -> Iterator[None]:
    """Record the create of a task as a producer span, and put its context in the
    task's ``options`` (unless they carry one already: a task created on behalf of
    another trace keeps it)."""
    api = _api()
    if api is None:
        yield
        return
    queue = str(options.get("queue", "default"))
    attributes = {
        "messaging.system": SYSTEM,
        "messaging.operation.type": "create",
        "messaging.destination.name": queue,
        "messaging.message.id": task_id,
    }
    with api.tracer.start_as_current_span(
        f"create {queue}", kind=api.trace.SpanKind.PRODUCER, attributes=attributes
    ):
        if "traceparent" not in options:
            carrier: dict[str, str] = {}
            api.propagate.inject(carrier)  # nothing for a span that does not record
            if "traceparent" in carrier:
                options["traceparent"] = carrier["traceparent"]
                if carrier.get("tracestate"):
                    options["tracestate"] = carrier["tracestate"][:512]
        yield


class AttemptSpan:
    """The consumer span of one attempt (a no-op without OpenTelemetry)."""

    def __init__(self, span: Any, api: Any) -> None:
        self._span, self._api = span, api

    def outcome(self, op: str, fields: dict[str, Any]) -> None:
        """Set the span's status from the attempt's outcome: ``complete`` OK, ``fail``
        an error (its type and message), others (snooze) unset."""
        if self._span is None:
            return
        status = self._api.trace.Status
        codes = self._api.trace.StatusCode
        self._span.set_attribute("tm.outcome", op)
        if op == "complete":
            self._span.set_status(status(codes.OK))
        elif op == "fail":
            error = fields.get("error") or {}
            self._span.set_attribute("error.type", str(error.get("type", "Error")))
            self._span.set_status(
                status(codes.ERROR, f"{error.get('type', 'Error')}: {error.get('message', '')}")
            )

    def ended_without_outcome(self) -> None:
        """The attempt was cancelled (a timeout, the task cancelled, a lost connection)."""
        if self._span is not None:
            status = self._api.trace.Status
            self._span.set_status(status(self._api.trace.StatusCode.ERROR, "cancelled"))


@contextlib.contextmanager
def consumer_span(
    task_id: str, attempt: int, options: dict[str, Any], node: str | None
) -> Iterator[AttemptSpan]:
    """Run an attempt in a consumer span, the child of the task's trace context (the
    current span while the handler runs, so that its own spans join the trace)."""
    api = _api()
    if api is None:
        yield AttemptSpan(None, None)
        return
    queue = str(options.get("queue", "default"))
    carrier = {k: str(options[k]) for k in ("traceparent", "tracestate") if options.get(k)}
    parent = api.propagate.extract(carrier) if carrier else None
    attributes: dict[str, Any] = {
        "messaging.system": SYSTEM,
        "messaging.operation.type": "process",
        "messaging.destination.name": queue,
        "messaging.message.id": task_id,
        "tm.task.id": task_id,
        "tm.task.queue": queue,
        "tm.task.attempt": attempt,
    }
    if node is not None:
        attributes["tm.node"] = node
    with api.tracer.start_as_current_span(
        f"process {queue}",
        context=parent,
        kind=api.trace.SpanKind.CONSUMER,
        attributes=attributes,
        record_exception=False,  # the outcome says how it ended
        set_status_on_exception=False,
    ) as span:
        yield AttemptSpan(span, api)
