"""Prometheus metrics and health over HTTP (``--metrics 127.0.0.1:9464``).

prometheus-client renders the format and keeps the histograms; Starlette under
Hypercorn's Trio worker (the stack the dashboard runs on) serves ``/metrics`` and the
health endpoints, ``/livez`` and ``/readyz``, so that scraping or probing never touches
a thread and no HTTP is written by hand here.

Size: one collector that reads every figure at scrape time (per queue from the leader's
view, per node, the etcd and process figures) beside its HTTP app: split, the collector's
list of families would be cut in two without a seam between them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import trio
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import InfoMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from .. import __version__
from .._hooks import Hooks, Outcome
from ..core import QueueFigures, etcd_version_warning
from ..node._sidecar import Sidecar

log = logging.getLogger("tm_sidecar.metrics")
#: Distinct error types a sidecar gives ``tm_task_failures_total`` (the rest: other).
MAX_ERROR_TYPES = 20
#: How often the event loop's lag is sampled.
_LOOP_SAMPLE_S = 0.25


class _Snapshot(Collector):
    """Values read from the sidecar at scrape time."""

    def __init__(self, sidecar: Sidecar, clients: Callable[[], int], transport: str) -> None:
        self.sidecar = sidecar
        self.clients = clients
        self.transport = transport
        #: Every queue this sidecar has published figures of.
        self.queues: set[str] = set()

    def collect(self) -> Iterator[Metric]:
        sc = self.sidecar
        admission = sc.admission
        info = InfoMetricFamily(
            "tm_build",
            "This sidecar's version, how it reaches etcd, and etcd's server version (as "
            "last read; empty until read).",
        )
        info.add_metric(
            [],
            {
                "version": __version__,
                "transport": self.transport,
                "etcd_version": admission.etcd_version,
            },
        )
        yield info
        yield GaugeMetricFamily(
            "tm_etcd_db_size_bytes",
            "etcd's database space in use, as last read (every second).",
            value=admission.db_size,
        )
        yield GaugeMetricFamily(
            "tm_etcd_quota_bytes",
            "etcd's quota as this sidecar knows it (etcd_quota).",
            value=sc.settings.quota_bytes,
        )
        yield GaugeMetricFamily(
            "tm_etcd_admission_limit_bytes",
            "The database size past which creates are refused: quota_fraction of the "
            "quota, less the room the results of accepted tasks need.",
            value=admission.limit_bytes,
        )
        yield GaugeMetricFamily(
            "tm_etcd_nospace",
            "1 while etcd's NOSPACE alarm is raised.",
            value=int(admission.nospace),
        )
        yield from self._namespace()
        yield GaugeMetricFamily(
            "tm_watch_lag_seconds",
            "How long etcd has been at a revision this sidecar's watch has not delivered "
            "yet (0: caught up).",
            value=admission.watch_lag_s(),
        )
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
            "tm_running", "Attempts running on this node.", value=len(sc.agent.running)
        )
        yield GaugeMetricFamily("tm_socket_clients", "Connected SDK clients.", value=self.clients())
        yield GaugeMetricFamily(
            "tm_registration_taken",
            "1 while another sidecar holds this node's id (no work comes here).",
            value=int(sc.membership.taken_by is not None),
        )
        yield GaugeMetricFamily(
            "tm_carried_outcomes",
            "Ended attempts of a lost session still to report (etcd was away).",
            value=len(sc.agent.carried),
        )
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
        flow = CounterMetricFamily(
            "tm_flow",
            "Flow-control actions this sidecar took: cancelled, ...",
            labels=["action"],
        )
        for action, count in sorted(sc.counters.items()):
            flow.add_metric([action], count)
        yield flow

    def _namespace(self) -> Iterator[Metric]:
        """The namespace-wide figures: on the leader only, so that summing a scrape of
        every sidecar counts each queue once (the others publish none of these)."""
        sc = self.sidecar
        view = sc.leader.view
        if not sc.is_leader or view is None:
            return
        now = sc.clock()
        tasks = GaugeMetricFamily(
            "tm_tasks", "Tasks in each state, namespace-wide (every second).", labels=["state"]
        )
        for state, count in sorted(sc.depths.items()):
            tasks.add_metric([state], count)
        yield tasks
        yield GaugeMetricFamily(
            "tm_nodes", "Live sidecars registered in the namespace.", value=sc.node_count
        )
        figures = view.queue_figures()
        # A queue seen once stays, at 0, rather than vanish when it empties.
        self.queues.update(figures, sc.queue_configs)
        for queue in self.queues:
            figures.setdefault(queue, QueueFigures())
        depth = GaugeMetricFamily(
            "tm_queue_depth",
            "A queue's live tasks by state (pending, delayed, processing).",
            labels=["queue", "state"],
        )
        oldest = GaugeMetricFamily(
            "tm_queue_oldest_pending_age_seconds",
            "How long the queue's oldest pending task has waited in pending (0: none).",
            labels=["queue"],
        )
        for queue, row in sorted(figures.items()):
            for state, count in row.depth.items():
                depth.add_metric([queue, state], count)
            since = row.oldest_pending_at
            oldest.add_metric([queue], 0.0 if since is None else max(0.0, now - since))
        yield depth
        yield oldest
        held = CounterMetricFamily(
            "tm_queue_held_seconds",
            "Seconds a queue's pending tasks were held back by the queue itself: "
            "reason=paused, or rate_limited (its rate window full); counted while this "
            "sidecar leads.",
            labels=["queue", "reason"],
        )
        for (queue, reason), seconds in sorted(sc.leader.held.seconds(now).items()):
            held.add_metric([queue, reason], seconds)
        yield held
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


class Metrics:
    """The sidecar's metrics registry, and the HTTP service of it and of health.

    ``transport`` (``grpc`` or ``gateway``) is reported in ``tm_build_info``.
    """

    def __init__(self, transport: str = "grpc") -> None:
        self.registry = CollectorRegistry()
        self.transport = transport
        self._sidecar: Sidecar | None = None
        self.etcd_seconds = Histogram(
            "tm_etcd_request_seconds",
            "etcd requests by path and result.",
            ["path", "result"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
        )
        self.attempt_seconds = Histogram(
            "tm_attempt_seconds",
            "From assignment to reported outcome, by queue and the state the outcome "
            "sent the task to.",
            ["queue", "outcome"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )
        self.attempts = Counter(
            "tm_attempts",
            "Attempts ended here (reported by this node, or reaped by the leader here), by "
            "queue and result: completed, failed (for good), retried, snoozed, handed_back.",
            ["queue", "result"],
            registry=self.registry,
        )
        self.failures = Counter(
            "tm_task_failures",
            "Tasks failed for good, by queue and error type (at most "
            f"{MAX_ERROR_TYPES} error types per sidecar; the rest as 'other').",
            ["queue", "error_type"],
            registry=self.registry,
        )
        self.leader_changes = Counter(
            "tm_leader_changes",
            "Times this sidecar became the leader (their sum over every sidecar: the "
            "namespace's leader changes).",
            registry=self.registry,
        )
        self.loop_lag = Histogram(
            "tm_event_loop_lag_seconds",
            "How late the event loop woke a timer (sampled four times a second): a "
            "loop busy or blocked shows here first.",
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
        )
        ProcessCollector(registry=self.registry)
        self._error_types: set[str] = set()
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
            on_outcome=self.outcome,
            on_fire=self.schedule_lateness.observe,
            on_role=lambda leading: self.leader_changes.inc() if leading else None,
        )

    def outcome(self, outcome: Outcome) -> None:
        """Count one attempt's outcome (the ``on_outcome`` hook)."""
        if outcome.seconds is not None:
            self.attempt_seconds.labels(outcome.queue, outcome.state).observe(outcome.seconds)
        if outcome.state == "completed":
            result = "completed"
        elif outcome.state == "failed":
            result = "failed"
            self.failures.labels(outcome.queue, self._error_type(outcome.error_type)).inc()
        elif outcome.reason == "snoozed":
            result = "snoozed"
        elif outcome.reason == "handed back":
            result = "handed_back"
        else:
            result = "retried"
        self.attempts.labels(outcome.queue, result).inc()

    def _error_type(self, error_type: str | None) -> str:
        """The label for ``error_type``: bounded, so that a handler raising ever new
        exception classes cannot grow the series without end."""
        name = error_type or "none"
        if name in self._error_types:
            return name
        if len(self._error_types) < MAX_ERROR_TYPES:
            self._error_types.add(name)
            return name
        return "other"

    async def watch_loop(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Sample the event loop's lag until cancelled: how late a timer fires."""
        task_status.started()
        while True:
            asked = trio.current_time() + _LOOP_SAMPLE_S
            await trio.sleep_until(asked)
            self.loop_lag.observe(max(0.0, trio.current_time() - asked))

    def watch(self, sidecar: Sidecar, clients: Callable[[], int]) -> None:
        """Read ``sidecar``'s counters at each scrape; from now on ``/readyz`` asks it."""
        self.registry.register(_Snapshot(sidecar, clients, self.transport))
        self._sidecar = sidecar

    def etcd_request(self, path: str, seconds: float, result: str) -> None:
        """Time one etcd call: the etcd client's ``on_request``, given at its
        construction (``tm_sidecar.etcd.connect``)."""
        self.etcd_seconds.labels(path, result).observe(seconds)

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition in the format ``accept`` (a request's Accept header) asks for
        (Prometheus' text format by default, OpenMetrics if asked), and its media type."""
        encoder, media_type = choose_encoder(accept or "")
        return bytes(encoder(self.registry)), media_type

    def not_ready(self) -> list[str]:
        """Why this sidecar should get no traffic now (none: ready).

        Ready means serving its SDK clients (started, so etcd was reached), holding a
        session etcd has renewed in time (so etcd answers), and not draining.
        """
        sidecar = self._sidecar
        if sidecar is None:
            return ["starting: not serving clients yet (waiting for etcd?)"]
        reasons = []
        if not sidecar.registry.accepting:
            reasons.append("draining: taking no new tasks")
        session = sidecar.session
        if session is None or not session.trusted():
            reasons.append("no live etcd session: etcd has not renewed this node's lease in time")
        return reasons

    def app(self) -> Starlette:
        """The ASGI application: ``/metrics`` (and ``/``), ``/livez``, ``/readyz``."""

        async def metrics(request: Request) -> Response:
            body, media_type = self.render(request.headers.get("accept"))
            return Response(body, media_type=media_type)

        async def live(request: Request) -> Response:
            # Answering at all is the proof: a stalled event loop would not.
            return PlainTextResponse("live\n")

        async def ready(request: Request) -> Response:
            reasons = self.not_ready()
            if reasons:
                return PlainTextResponse("not ready: " + "; ".join(reasons) + "\n", 503)
            return PlainTextResponse("ready\n")

        return Starlette(
            routes=[
                Route("/metrics", metrics),
                Route("/", metrics),
                Route("/livez", live),
                Route("/readyz", ready),
            ]
        )

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve the metrics and health endpoints until cancelled; started with the bound
        port."""
        from hypercorn.config import Config
        from hypercorn.trio import serve

        config = Config()
        config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
        config.accesslog = None  # scrapes and probes every few seconds are not news
        config.errorlog = logging.getLogger("tm_sidecar.metrics.server")
        config.include_server_header = False
        config.graceful_timeout = 1.0
        async with trio.open_nursery() as nursery:
            await nursery.start(self.watch_loop)
            binds = await nursery.start(serve, self.app(), config)
            bound = int(binds[0].rsplit(":", 1)[1])
            log.info("serving metrics", extra={"url": f"{binds[0]}/metrics"})
            task_status.started(bound)
