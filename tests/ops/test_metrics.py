"""Prometheus metrics (tm_sidecar/ops/_metrics.py): a real sidecar process serves them over HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tm_sidecar.ops._embedded import EtcdProcess


def test_metrics_endpoint(etcd_server: EtcdProcess, tmp_path: Path) -> None:
    import urllib.request

    from tm_sidecar.ops._embedded import free_port

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path.cwd()), "TM_ETCD_PASSWORD": "never-shown"}
    args = [
        "--etcd",
        etcd_server.endpoint,
        "--socket",
        str(tmp_path / "tm.sock"),
        "--namespace",
        "metrics",
        "--metrics",
        str(port),
        "--handler",
        "tests.proc_handlers:work",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tm_sidecar", *args], env=env, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 20
        body = ""
        while "tm_leader 1.0" not in body or 'tm_queue_depth{state="pending"}' not in body:
            assert time.monotonic() < deadline, body[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
                    body = resp.read().decode()
            except OSError:
                pass
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        assert proc.stderr is not None
        proc.stderr.close()
    for name in (
        "tm_etcd_request_seconds_bucket",
        "tm_nodes",
        "tm_socket_clients",
        "tm_node_outcomes_total",
        "tm_start_latency_seconds_bucket",
    ):
        assert name in body
    assert "never-shown" not in body
