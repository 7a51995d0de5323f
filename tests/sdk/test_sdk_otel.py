"""OpenTelemetry traces in the Python SDK, checked with the real OpenTelemetry SDK and its
in-memory exporter: one trace from a producer's span to the handler's spans across a
retry, the context in the task's record (``get``, ``tmctl show``) and the trace id in
the sidecar's log lines of the attempts; and a worker without OpenTelemetry installed
runs traced tasks."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from taskmanager import InvalidRequest, TaskManager, WorkerTask

from tests.procs import ROOT, sidecars
from tm_sidecar.ops._embedded import EtcdProcess

EXPORTER = InMemorySpanExporter()


def _provider() -> None:
    """The process's tracer provider: set once (OpenTelemetry allows one), exporting to
    EXPORTER."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
        trace.set_tracer_provider(provider)


def _spans(name_prefix: str, trace_id: int) -> list[ReadableSpan]:
    return [
        s
        for s in EXPORTER.get_finished_spans()
        if s.name.startswith(name_prefix)
        and s.context is not None
        and s.context.trace_id == trace_id
    ]


async def test_one_trace_from_the_producer_to_the_handler_across_a_retry(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    _provider()
    tracer = trace.get_tracer("tests")
    debug = ("--log-level", "debug")  # "outcome reported" is a debug line
    async with sidecars(etcd_server, namespace, tmp_path, "n1", extra=debug) as (sc,):
        manager = TaskManager(str(sc.socket_path))
        try:

            async def handler(task: WorkerTask) -> Any:
                with tracer.start_as_current_span("charge card"):
                    if task.attempt == 1:
                        raise RuntimeError("gateway timeout")
                    return {"ok": task.attempt}

            await manager.process(handler, queue="orders")
            with tracer.start_as_current_span("POST /orders") as request:
                task = await manager.create({"order": 7})
                task.with_queue("orders").with_retries(2, base_s=0.05, jitter=0)
                await task.commit()
            assert await task.result(timeout=20) == {"ok": 2}
            record = await manager.get(task.id)
        finally:
            await manager.shutdown(timeout=10)
        show = await trio.run_process(
            [
                sys.executable,
                "-c",
                "from tm_sidecar.ops._tmctl import main; main()",
                "--etcd",
                etcd_server.endpoint,
                "--namespace",
                namespace,
                "show",
                task.id,
            ],
            capture_stdout=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        log = sc.log()
    trace_id = request.get_span_context().trace_id
    hex_id = f"{trace_id:032x}"
    (create,) = _spans("create orders", trace_id)
    assert create.kind is SpanKind.PRODUCER
    assert create.parent is not None
    assert create.parent.span_id == request.get_span_context().span_id
    assert create.attributes is not None
    assert create.attributes["messaging.message.id"] == task.id
    # The context went with the task: stored in its record, shown by tmctl.
    parent_id = f"{create.context.span_id:016x}" if create.context else ""
    assert record["options"]["traceparent"].startswith(f"00-{hex_id}-{parent_id}-")
    shown = [line.split() for line in show.stdout.decode().splitlines()]
    assert ["trace", hex_id, "(traceparent", record["options"]["traceparent"] + ")"] in shown
    attempts = sorted(_spans("process orders", trace_id), key=lambda s: s.start_time or 0)
    assert [s.attributes["tm.task.attempt"] for s in attempts if s.attributes] == [1, 2]
    for span in attempts:
        assert span.kind is SpanKind.CONSUMER
        assert span.parent is not None
        assert span.parent.span_id == create.context.span_id
        assert span.attributes is not None
        assert span.attributes["tm.task.id"] == task.id
        assert span.attributes["tm.task.queue"] == "orders"
        assert span.attributes["tm.node"] == "n1"
    assert attempts[0].status.status_code is StatusCode.ERROR
    assert "RuntimeError" in (attempts[0].status.description or "")
    assert attempts[1].status.status_code is StatusCode.OK
    # The handler's own spans are children of its attempt's.
    charges = _spans("charge card", trace_id)
    assert len(charges) == 2
    assert {c.parent.span_id for c in charges if c.parent} == {
        a.context.span_id for a in attempts if a.context
    }
    # The sidecar's log lines of the attempts name the trace.
    traced = [line for line in log.splitlines() if f"trace_id={hex_id}" in line]
    assert len([line for line in traced if 'msg="outcome reported"' in line]) == 2


#: A worker whose Python cannot import OpenTelemetry (as if not installed).
WORKER_WITHOUT_OTEL = """
import sys
sys.modules["opentelemetry"] = None  # any import of it fails, as when not installed
import anyio
from taskmanager import TaskManager

async def main():
    manager = TaskManager(sys.argv[1])
    done = anyio.Event()

    async def handler(task):
        done.set()
        return {"traceparent": task.options.get("traceparent")}

    await manager.process(handler)
    print("ready", flush=True)
    await done.wait()
    await manager.shutdown(timeout=10)
    loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry") and sys.modules[m])
    print("loaded", loaded, flush=True)

anyio.run(main)
"""


async def test_a_worker_without_opentelemetry_runs_traced_tasks(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    _provider()
    tracer = trace.get_tracer("tests")
    async with sidecars(etcd_server, namespace, tmp_path, "n1") as (sc,):
        manager = TaskManager(str(sc.socket_path))
        try:
            async with trio.open_nursery() as nursery:
                worker = await nursery.start(_worker_without_otel, sc.socket_path)
                with tracer.start_as_current_span("POST /jobs"):
                    task = await manager.submit({"x": 1})
                result = await task.result(timeout=20)
                assert result["traceparent"] is not None
                assert result["traceparent"].startswith("00-")
                out = await worker.receive()
                assert out == "loaded []"
            # A context that is not W3C's is refused, named.
            with pytest.raises(InvalidRequest, match="traceparent must be a W3C traceparent"):
                await manager.submit({}, traceparent="00-not-a-trace")
        finally:
            await manager.shutdown(timeout=10)


async def _worker_without_otel(
    socket: Path, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED
) -> None:
    send, receive = trio.open_memory_channel[str](4)
    async with trio.open_nursery() as nursery:
        run = functools.partial(
            trio.run_process,
            [sys.executable, "-c", WORKER_WITHOUT_OTEL, str(socket)],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            check=True,
        )
        proc = await nursery.start(run)
        assert proc.stdout is not None
        buffer = b""
        started = False
        async for chunk in proc.stdout:
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if line == b"ready" and not started:
                    started = True
                    task_status.started(receive)
                elif line.startswith(b"loaded"):
                    await send.send(line.decode())
