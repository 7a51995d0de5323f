"""``tm-sidecar --otel`` end to end: a sidecar process sends its spans of a traced task
over OTLP/HTTP to the endpoint ``OTEL_EXPORTER_OTLP_ENDPOINT`` names (here a small
receiver in the test), under ``OTEL_SERVICE_NAME``."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from taskmanager import TaskManager

from tests.helpers import wait_for
from tests.procs import SidecarProcess
from tm_sidecar.ops._embedded import EtcdProcess

TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"


class _Receiver(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP trace receiver: keeps each export request."""

    received: list[ExportTraceServiceRequest]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/v1/traces":
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            self.received.append(request)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[tuple[int, list[ExportTraceServiceRequest]]]:
    received: list[ExportTraceServiceRequest] = []
    handler = type("Receiver", (_Receiver,), {"received": received})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], received
    finally:
        server.shutdown()
        server.server_close()


def _spans(received: list[ExportTraceServiceRequest]) -> dict[str, tuple[str, str, str]]:
    """Span name: (service name, trace id, parent span id), as hex."""
    out = {}
    for request in received:
        for resource in request.resource_spans:
            service = next(
                (
                    a.value.string_value
                    for a in resource.resource.attributes
                    if a.key == "service.name"
                ),
                "",
            )
            for scope in resource.scope_spans:
                for span in scope.spans:
                    out[span.name] = (service, span.trace_id.hex(), span.parent_span_id.hex())
    return out


async def test_the_sidecar_exports_its_spans_over_otlp(
    etcd_server: EtcdProcess,
    namespace: str,
    tmp_path: Path,
    receiver: tuple[int, list[ExportTraceServiceRequest]],
) -> None:
    port, received = receiver
    sc = SidecarProcess(
        "n1",
        etcd_server.endpoint,
        namespace,
        tmp_path / "n1.log",
        handler="tests.proc_handlers:work",
        extra=("--otel",),
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            "OTEL_SERVICE_NAME": "sidecar-under-test",
            "OTEL_BSP_SCHEDULE_DELAY": "100",  # ms: export soon
        },
    )
    try:
        sc.start()
        await sc.wait_serving()
        manager = TaskManager(str(sc.socket_path))
        try:
            task = await manager.submit({"i": 1}, traceparent=f"00-{TRACE}-{PARENT}-01")
            assert (await task.result(timeout=20))["i"] == 1
        finally:
            await manager.shutdown(timeout=10)
        await wait_for(lambda: len(_spans(received)) >= 3, timeout_s=20, poll_s=0.05)
    finally:
        sc.stop()
    spans = _spans(received)
    assert sorted(spans) == ["tm.assignment", "tm.create.commit", "tm.queue.wait"]
    assert set(spans.values()) == {("sidecar-under-test", TRACE, PARENT)}
