"""The sidecar's own spans (``--otel``, tm_sidecar/ops/_otel.py), checked with the real
OpenTelemetry SDK's in-memory exporter: a traced task's create commit, wait in the
queue and assignment are spans of its trace, children of the span that created it; an
untraced task makes none. And the sidecar's log lines of a traced attempt carry its
trace id."""

from __future__ import annotations

import io
import logging

import trio
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.helpers import wait_for
from tm_sidecar import Etcd, Sidecar, SidecarSettings, State, TaskContext, TaskOptions
from tm_sidecar._hooks import Hooks
from tm_sidecar.core import NodeId
from tm_sidecar.ops._log import setup_logging
from tm_sidecar.ops._otel import SidecarTracing, otel_installed

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


async def test_a_traced_task_has_the_sidecars_spans_in_its_trace(
    etcd: Etcd, namespace: str
) -> None:
    assert otel_installed()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = SidecarTracing(provider)
    settings = SidecarSettings(node_id=NodeId("n1"), namespace=namespace, lease_ttl_s=2)
    sidecar = Sidecar(etcd, settings, hooks=Hooks(on_span=tracing.on_span))
    log = io.StringIO()
    setup_logging("debug")
    logging.getLogger().handlers[0].stream = log  # type: ignore[attr-defined]
    sidecar_logs = logging.getLogger("tm_sidecar")
    level = sidecar_logs.level
    sidecar_logs.setLevel(logging.DEBUG)  # "outcome reported" is a debug line

    async def handler(task: TaskContext) -> str:
        return "done"

    traced = TaskOptions(traceparent=f"00-{TRACE}-{PARENT}-01", tracestate="k=v")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(sidecar.run)
            await wait_for(lambda: sidecar.is_leader)
            sidecar.register(handler)
            spec = await sidecar.create({"x": 1}, options=traced)
            plain = await sidecar.create({"x": 2})
            for task_id in (spec.id, plain.id):
                assert (await sidecar.wait(task_id, timeout_s=10)).state is State.COMPLETED
            await wait_for(lambda: len(exporter.get_finished_spans()) >= 3)
            nursery.cancel_scope.cancel()
    finally:
        logging.getLogger().handlers.clear()
        sidecar_logs.setLevel(level)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert sorted(spans) == ["tm.assignment", "tm.create.commit", "tm.queue.wait"]
    for span in spans.values():
        assert span.context is not None
        assert f"{span.context.trace_id:032x}" == TRACE
        assert span.parent is not None
        assert f"{span.parent.span_id:016x}" == PARENT
        assert span.attributes is not None
        assert span.attributes["tm.task.id"] == spec.id
        assert span.start_time is not None
        assert span.end_time is not None
        assert span.start_time <= span.end_time
    assignment = spans["tm.assignment"].attributes
    assert assignment is not None
    assert assignment["tm.node"] == "n1"
    assert assignment["tm.task.attempt"] == 1
    # The wait ends where the assignment begins.
    assert spans["tm.queue.wait"].end_time == spans["tm.assignment"].start_time
    # The attempt's log lines name the trace (the untraced task's do not).
    lines = log.getvalue().splitlines()
    reported = [line for line in lines if 'msg="outcome reported"' in line]
    assert len(reported) == 2
    assert [line for line in reported if f"trace_id={TRACE}" in line] == [
        line for line in reported if f"task={spec.id}" in line
    ]
