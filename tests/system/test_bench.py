"""The benchmark harness works (the figures themselves come from ``python -m bench``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.procs import ROOT


def test_the_quick_benchmark_runs_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--only",
            "ceiling,latency,throughput_1,create_many,leader_ceiling,drain_4",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["ceiling"]["puts_per_s_gateway_64"] > 0
    assert results["ceiling"]["puts_per_s_raw_64"] > 0
    assert results["ceiling"]["puts_per_s_grpc_64"] > 0
    assert results["ceiling"]["moved_keys_per_s_grpc_32"] > 0
    assert results["ceiling"]["client_cpu_us_per_put_grpc_1"] > 0
    assert results["ceiling"]["moved_keys_per_s_raw_32"] > 0
    assert results["latency"]["start_p50_ms"] > 0
    # Every throughput scenario tells where the CPU went: etcd, the sidecar, the client.
    for who in ("etcd", "sidecar", "client"):
        assert results["throughput_1"][f"{who}_cpu_ms_per_task"] > 0
    assert results["throughput_1"]["sidecars_cpu_ms_per_task"] > 0
    # Issue 19's scenarios: the bulk create in as few transactions as etcd takes (two
    # writes a task, 128 operations a transaction), the leader's own ceiling over 100
    # simulated nodes, and the drain by four worker processes.
    bulk = results["create_many"]
    assert bulk["tasks"] == 500
    assert 1 <= bulk["etcd_txns"] <= -(-500 // 64)  # at most as many as at 128 ops
    for who in ("etcd", "sidecar", "client"):
        assert bulk[f"{who}_cpu_ms_per_task"] > 0
    assert results["leader_ceiling"]["nodes"] == 100
    assert results["leader_ceiling"]["assignments_per_s"] > 0
    assert results["drain_4"]["workers"] == 4
    for who in ("etcd", "sidecar", "workers"):
        assert results["drain_4"][f"{who}_cpu_ms_per_task"] > 0
    assert "| latency | start_p99_ms |" in run.stdout
