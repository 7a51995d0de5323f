"""Prometheus metrics over HTTP (``--metrics 127.0.0.1:9464``), in the text format.

prometheus-client renders the format and keeps the histograms; the endpoint itself is a
few lines of Trio, so that scraping never touches a thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import trio
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .._hooks import Hooks
from ..core import etcd_version_warning
from ..node._sidecar import Sidecar

log = logging.getLogger("tm_sidecar.metrics")


class _Snapshot(Collector):
    """Values read from the sidecar at scrape time."""

    def __init__(self, sidecar: Sidecar, clients: Callable[[], int]) -> None:
        self.sidecar = sidecar
        self.clients = clients

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        sc = self.sidecar
        depth = GaugeMetricFamily(
            "tm_queue_depth", "Tasks in each state (namespace-wide).", labels=["state"]
        )
        for state, count in sorted(sc.depths.items()):
            depth.add_metric([state], count)
        yield depth
        outcomes = CounterMetricFamily(
            "tm_node_outcomes",
            "Attempts this node reported, by where they sent the task.",
            labels=["outcome"],
        )
        outcomes.add_metric(["completed"], sc.agent.completed)
        outcomes.add_metric(["failed_or_retried"], sc.agent.failed)
        outcomes.add_metric(["snoozed"], sc.agent.snoozed)
        outcomes.add_metric(["stale_rejected"], sc.agent.stale)
        yield outcomes
        yield GaugeMetricFamily("tm_leader", "1 while this sidecar leads.", value=int(sc.is_leader))
        yield GaugeMetricFamily(
            "tm_nodes", "Live sidecars registered in the namespace.", value=sc.node_count
        )
        yield GaugeMetricFamily(
            "tm_running", "Attempts running on this node.", value=len(sc.agent.running)
        )
        yield GaugeMetricFamily("tm_socket_clients", "Connected SDK clients.", value=self.clients())
        version = sc.admission.etcd_version
        if version:
            warning = etcd_version_warning(version)
            known = GaugeMetricFamily(
                "tm_etcd_version_warning",
                "1 when the etcd this sidecar uses has a version with known data-loss bugs "
                "(the advice label names the version to run), else 0.",
                labels=["version", "advice"],
            )
            known.add_metric([version, warning or ""], int(warning is not None))
            yield known
        groups = {
            "create": sc.creates.stats,
            "report": sc.agent.report_batches,
            "task_read": sc.agent.read_batches,
        }
        batches = CounterMetricFamily(
            "tm_etcd_batches", "Group-commit requests sent to etcd, by kind.", labels=["kind"]
        )
        items = CounterMetricFamily(
            "tm_etcd_batched_items",
            "Requests that went in them (items / batches is the batching won).",
            labels=["kind"],
        )
        for kind, stats in groups.items():
            batches.add_metric([kind], stats.batches)
            items.add_metric([kind], stats.items)
        yield batches
        yield items
        paused = GaugeMetricFamily(
            "tm_queue_paused",
            "1 for a paused queue (the leader assigns nothing from it).",
            labels=["queue"],
        )
        limits = GaugeMetricFamily(
            "tm_queue_limit",
            "A queue's cluster-wide limits: max_running, key_max_running; rate and key_rate "
            "as starts per second.",
            labels=["queue", "limit"],
        )
        for queue, config in sorted(sc.queue_configs.items()):
            paused.add_metric([queue], int(config.paused))
            for name in ("max_running", "key_max_running"):
                if getattr(config, name) is not None:
                    limits.add_metric([queue, name], getattr(config, name))
            for name in ("rate", "key_rate"):
                rate = getattr(config, name)
                if rate is not None:
                    limits.add_metric([queue, name], rate.limit / rate.window_s)
        yield paused
        yield limits
        flow = CounterMetricFamily(
            "tm_flow",
            "Flow-control actions this sidecar took: cancelled, ...",
            labels=["action"],
        )
        for action, count in sorted(sc.counters.items()):
            flow.add_metric([action], count)
        yield flow


class Metrics:
    """The sidecar's metrics registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.etcd_seconds = Histogram(
            "tm_etcd_request_seconds",
            "etcd requests by path and result.",
            ["path", "result"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
        )
        self.attempt_seconds = Histogram(
            "tm_attempt_seconds",
            "From assignment to reported outcome, by the state the outcome sent the task to.",
            ["outcome"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )
        self.start_latency = Histogram(
            "tm_start_latency_seconds",
            "From a task's due time (its commit, or its run_at) to its first attempt's start.",
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30),
        )
        self.schedule_lateness = Histogram(
            "tm_schedule_lateness_seconds",
            "From a schedule slot's time to the commit of its task (on the leader).",
            registry=self.registry,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30, 120),
        )
        #: Give these to the sidecar at construction: they feed the histograms.
        self.hooks = Hooks(
            on_start=self.start_latency.observe,
            on_outcome=lambda state, s: self.attempt_seconds.labels(state).observe(s),
            on_fire=self.schedule_lateness.observe,
        )

    def watch(self, sidecar: Sidecar, clients: Callable[[], int]) -> None:
        """Read ``sidecar``'s counters at each scrape."""
        self.registry.register(_Snapshot(sidecar, clients))

    def etcd_request(self, path: str, seconds: float, result: str) -> None:
        """Time one etcd call: the etcd client's ``on_request``, given at its
        construction (``tm_sidecar.etcd.connect``)."""
        self.etcd_seconds.labels(path, result).observe(seconds)

    def render(self) -> bytes:
        """The text exposition."""
        return bytes(generate_latest(self.registry))

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve GET /metrics until cancelled; started with the bound port."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()[1]
        log.info("serving metrics", extra={"url": f"http://{host}:{bound}/metrics"})
        task_status.started(bound)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            request = b""
            with trio.move_on_after(5):
                while b"\r\n\r\n" not in request and len(request) < 8192:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        break
                    request += chunk
            line = request.split(b"\r\n", 1)[0].split()
            if (
                len(line) >= 2
                and line[0] == b"GET"
                and line[1].split(b"?")[0] in (b"/metrics", b"/")
            ):
                body, status = self.render(), b"200 OK"
                kind = b"text/plain; version=0.0.4; charset=utf-8"
            else:
                body, status, kind = b"not found\n", b"404 Not Found", b"text/plain"
            head = b"HTTP/1.1 " + status + b"\r\nContent-Type: " + kind
            head += (
                b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
            )
            await stream.send_all(head + body)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()
