"""A real Prometheus (Debian's ``prometheus``) scrapes three sidecars under a small load:
every metric docs/operations.md documents is there, the per-queue figures match what
the SDK did, and the namespace-wide ones come from one sidecar (the leader). The
example alerting rules pass ``promtool check rules`` and their ``promtool test rules``
unit tests."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from taskmanager import TaskFailed, TaskManager, WorkerTask

from tests.procs import ROOT, SidecarProcess
from tests.tools import require
from tm_sidecar.ops._embedded import EtcdProcess, free_port

RULES = ROOT / "docs" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "tests" / "ops" / "alerts_test.yml"
#: A metric name as docs/operations.md lists it: `tm_...` or `process_...` in backticks.
DOCUMENTED = re.compile(r"`((?:tm|process)_[a-z_]+)(?=[`{])")


def documented_metrics() -> list[str]:
    """The metric names the metrics section of docs/operations.md lists."""
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text.split("## Metrics and the alerts worth setting", 1)[1].split("\n## ", 1)[0]
    return sorted(set(DOCUMENTED.findall(section)))


def test_promtool_checks_and_unit_tests_the_example_rules() -> None:
    (promtool,) = require("promtool", package="prometheus")
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    alerts = RULES.read_text().count("- alert: ")
    assert alerts >= 16
    assert f"SUCCESS: {alerts} rules found" in check.stdout  # each one loaded
    unit = subprocess.run(
        [promtool, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr
    assert "SUCCESS" in unit.stdout


class CardDeclined(Exception):
    """The error the failing queue's handler raises."""


async def handler(task: WorkerTask) -> Any:
    if task.options.get("queue") == "pay":
        raise CardDeclined(f"card declined (attempt {task.attempt})")
    return {"i": task.data["i"]}


def _query(port: int, promql: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as answer:
        body = json.loads(answer.read())
    assert body["status"] == "success", body
    return list(body["data"]["result"])


async def query(port: int, promql: str) -> dict[tuple[str, ...], float]:
    """An instant query's answer: value by the series' label values (sorted by name,
    ``__name__`` left out)."""
    result = await trio.to_thread.run_sync(_query, port, promql)
    return {
        tuple(v for k, v in sorted(r["metric"].items()) if k != "__name__"): float(r["value"][1])
        for r in result
    }


async def until(
    port: int, promql: str, check: Callable[[dict[tuple[str, ...], float]], bool]
) -> Any:
    """Poll ``promql`` until ``check`` holds of its answer (bounded: scrapes every 1 s)."""
    answer: dict[tuple[str, ...], float] = {}
    try:
        with trio.fail_after(20):
            while True:
                answer = await query(port, promql)
                if check(answer):
                    return answer
                await trio.sleep(0.25)
    except trio.TooSlowError:
        raise AssertionError(f"{promql}: {answer}") from None


async def test_prometheus_scrapes_three_sidecars_under_load(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    (prometheus,) = require("prometheus", package="prometheus")
    ports = [free_port() for _ in range(3)]
    procs = [
        SidecarProcess(
            name,
            etcd_server.endpoint,
            namespace,
            tmp_path / f"{name}.log",
            handler=None,
            extra=("--metrics", str(port)),
        )
        for name, port in zip("abc", ports, strict=True)
    ]
    web = free_port()
    config = tmp_path / "prometheus.yml"
    targets = [f"127.0.0.1:{p}" for p in ports]
    config.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES)],
                "scrape_configs": [
                    {"job_name": "tm-sidecar", "static_configs": [{"targets": targets}]}
                ],
            }
        )
    )
    server: subprocess.Popen[bytes] | None = None
    try:
        for proc in procs:  # in order: the first leads
            proc.start()
            await proc.wait_serving()
        server = _start_prometheus(prometheus, config, tmp_path, web)
        await _load_and_check([p.socket_path for p in procs], web, targets[0])
    finally:
        if server is not None:
            server.terminate()
            server.wait(10)
        for proc in procs:
            proc.stop()


def _start_prometheus(binary: str, config: Path, tmp_path: Path, port: int) -> Any:
    with open(tmp_path / "prometheus.log", "wb") as log:
        return subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )


async def _load_and_check(sockets: list[Path], web: int, leader: str) -> None:
    managers = [TaskManager(str(s)) for s in sockets]
    try:
        for manager in managers:
            for queue in ("mail", "pay", "rl"):
                await manager.process(handler, queue=queue, concurrency=4)
        tm = managers[0]
        await tm.pause_queue("slow")
        await tm.set_limits("rl", rate=(1, 600))
        mail = [await tm.submit({"i": i}, queue="mail") for i in range(30)]
        pay = []
        for i in range(5):
            task = await tm.create({"i": i})
            task.with_queue("pay").with_retries(2, base_s=0.05, jitter=0)
            pay.append(await task.commit())
        slow = [await tm.submit({"i": i}, queue="slow") for i in range(3)]
        assert await tm.cancel(slow[0].id)
        rl = [await tm.submit({"i": i}, queue="rl") for i in range(3)]
        for task in mail:
            assert (await task.result(timeout=30))["i"] is not None
        for task in pay:
            with pytest.raises(TaskFailed, match="card declined"):
                await task.result(timeout=30)
        await rl[0].result(timeout=30)

        # Every sidecar is up and scraped.
        await until(web, 'up{job="tm-sidecar"}', lambda a: len(a) == 3 and min(a.values()) == 1)
        # Per queue, summed over every sidecar, as the SDK did.
        await until(
            web,
            "sum by (queue, result) (tm_attempts_total)",
            lambda a: (
                a.get(("mail", "completed")) == 30
                and a.get(("pay", "retried")) == 5
                and a.get(("pay", "failed")) == 5
                and a.get(("rl", "completed")) == 1
            ),
        )
        failures = await query(web, "sum by (queue, error_type) (tm_task_failures_total)")
        assert failures == {("CardDeclined", "pay"): 5}
        durations = await query(web, "sum by (queue, outcome) (tm_attempt_seconds_count)")
        assert durations[("completed", "mail")] == 30
        assert durations[("failed", "pay")] == 5
        assert durations[("delayed", "pay")] + durations.get(("pending", "pay"), 0) == 5
        # Namespace-wide figures: from the leader alone (one series each, on a).
        depth = await until(
            web, 'tm_queue_depth{queue="slow",state="pending"}', lambda a: list(a.values()) == [2]
        )
        assert [labels[0] for labels in depth] == [leader]
        assert {labels[0] for labels in await query(web, "tm_queue_depth")} == {leader}
        by_queue = await query(web, "sum by (queue, state) (tm_queue_depth)")
        # (A queue is listed once a scrape saw it with live tasks or settings.)
        assert by_queue.get(("mail", "pending"), 0) == 0
        assert by_queue.get(("mail", "processing"), 0) == 0
        assert by_queue[("slow", "pending")] == 2
        assert by_queue[("rl", "pending")] == 2
        tasks = await query(web, "sum by (state) (tm_tasks)")
        assert tasks[("completed",)] == 31
        assert tasks[("failed",)] == 5 + 1  # the pay tasks, and the cancelled one
        assert len(await query(web, "tm_tasks")) == 5  # one sidecar's five states
        oldest = await query(web, "tm_queue_oldest_pending_age_seconds")
        ages = {labels[2]: value for labels, value in oldest.items()}
        assert ages.get("mail", 0) == 0
        assert ages["slow"] > 0
        assert ages["rl"] > 0
        await until(
            web,
            "sum by (queue, reason) (tm_queue_held_seconds_total)",
            lambda a: a.get(("slow", "paused"), 0) > 0 and a.get(("rl", "rate_limited"), 0) > 0,
        )
        assert await query(web, "sum(tm_leader_changes_total)") == {(): 1}
        assert await query(web, 'sum(tm_flow_total{action="cancelled"})') == {(): 1}
        process = await query(web, "process_resident_memory_bytes")
        assert len(process) == 3
        assert min(process.values()) > 0
        # Every documented metric is there.
        names = documented_metrics()
        assert len(names) >= 30
        missing = []
        for name in names:
            # A histogram's series are NAME_bucket, NAME_count and NAME_sum.
            if not await query(web, f'{{__name__=~"{name}|{name}_count"}}'):
                missing.append(name)
        assert missing == []
        # The example rules load into the real server too.
        rules = await trio.to_thread.run_sync(_get_json, web, "/api/v1/rules")
        loaded = [r["name"] for g in rules["data"]["groups"] for r in g["rules"]]
        assert len(loaded) == RULES.read_text().count("- alert: ")
        assert "TmQueueWaiting" in loaded
    finally:
        for manager in managers:
            await manager.shutdown(timeout=10)


def _get_json(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
        return json.loads(answer.read())
