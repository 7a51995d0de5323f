"""The sidecar's own spans (``--otel``): for each task that carries a trace context,
the create's commit, the wait in the queue and the assignment, exported over OTLP as
the standard ``OTEL_*`` environment variables say (``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ...).

OpenTelemetry's SDK and OTLP exporter are an optional extra (``pip install
'tm-sidecar[otel]'``), imported only with ``--otel``. Spans are handed to a batch
processor, which exports from a thread of its own: the event loop never waits on it.
"""

from __future__ import annotations

from typing import Any

import trio

from .._hooks import Span

#: The spans' instrumentation scope.
SCOPE = "tm_sidecar"
#: Said when --otel is asked for without the extra.
MISSING = "--otel needs OpenTelemetry's SDK and OTLP exporter: pip install 'tm-sidecar[otel]'"


def otel_installed() -> bool:
    """Whether the ``otel`` extra is installed (checked without importing it)."""
    from importlib.util import find_spec

    try:
        return all(
            find_spec(name) is not None
            for name in ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http")
        )
    except ModuleNotFoundError:
        return False


class SidecarTracing:
    """Turns the sidecar's :class:`Span` values into OpenTelemetry spans.

    ``provider`` is an OpenTelemetry SDK ``TracerProvider``; :meth:`from_environment`
    builds the one ``--otel`` uses.
    """

    def __init__(self, provider: Any) -> None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.tracer = provider.get_tracer(SCOPE)
        self._propagator = TraceContextTextMapPropagator()

    @classmethod
    def from_environment(cls) -> SidecarTracing:
        """An OTLP (HTTP) exporter behind a batch processor, configured by ``OTEL_*``;
        the service is ``tm-sidecar`` unless ``OTEL_SERVICE_NAME`` says otherwise."""
        import os

        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        name = os.environ.get("OTEL_SERVICE_NAME") or "tm-sidecar"
        provider = TracerProvider(resource=Resource.create({"service.name": name}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        return cls(provider)

    def on_span(self, span: Span) -> None:
        """The ``on_span`` hook: record ``span`` with its times, as a child of the span
        that created its task."""
        carrier = {"traceparent": span.traceparent}
        if span.tracestate:
            carrier["tracestate"] = span.tracestate
        parent = self._propagator.extract(carrier)
        otel_span = self.tracer.start_span(
            span.name,
            context=parent,
            start_time=int(span.start_at * 1e9),
            attributes=span.attributes,
        )
        otel_span.end(end_time=int(span.end_at * 1e9))

    async def aclose(self) -> None:
        """Export what is left (bounded: the exporter's own timeouts), in a thread."""
        with trio.move_on_after(5, shield=True):
            await trio.to_thread.run_sync(self.provider.shutdown, abandon_on_cancel=True)
