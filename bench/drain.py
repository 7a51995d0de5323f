"""Draining a backlog, the way Huey, Celery and Dramatiq are usually measured: N no-op
tasks created first with no worker, then drained by two worker processes (``drain``; four
in ``drain_4``); and the same work on the peers (Huey and Celery on Redis) in the same
run, when they are installed. Huey runs three times: on a Redis that persists nothing
(the bench's own peer config), then with Redis's append-only file at ``appendfsync
everysec`` and ``appendfsync always`` (durability comparable to etcd's, which syncs
every commit to disk).

The peers' task increments a Redis counter (that is how the run knows they are done);
ours records its outcome in etcd, as every task does. CPU per task is read from /proc
for every process involved.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from tests.procs import ROOT, create_tasks
from tm_sidecar import Etcd, EtcdConfig, connect
from tm_sidecar.core import Keyspace, Range, State
from tm_sidecar.ops._embedded import free_port

if TYPE_CHECKING:
    from bench.run import Env, Result

#: The drain's size; --quick takes a twentieth.
DRAIN_TASKS = 20_000
WORKERS = 2


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a process and its reaped children so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(int(f) for f in fields[11:15]) / ticks


async def _count(etcd: Etcd, ks: Keyspace, state: State) -> int:
    return (await etcd.range(Range(ks.state_prefix(state), prefix=True, count_only=True))).count


async def drain(env: Env, workers_count: int = WORKERS) -> Result:
    """Our drain: one sidecar, N tasks pending, ``workers_count`` SDK worker processes."""
    from bench.run import _etcd_cpu_s, cpu_s

    n = env.scale(DRAIN_TASKS)
    ns = env.namespace()
    ks = Keyspace(namespace=ns)
    sidecar = env.sidecar("n0", ns)
    sidecar.start()
    await sidecar.wait_serving()
    etcd = connect(EtcdConfig(endpoints=(env.etcd.endpoint,)))
    workers: list[trio.Process] = []
    try:
        await create_tasks(etcd, ks, n, work_s=0.0)
        assert await _count(etcd, ks, State.PENDING) == n
        etcd_before, sidecar_before = _etcd_cpu_s(env), cpu_s(sidecar)
        started = time.monotonic()
        worker_env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "TM_SOCKET": str(sidecar.socket_path),
        }
        for _ in range(workers_count):
            workers.append(
                await trio.lowlevel.open_process(
                    [sys.executable, "-m", "bench.noop_worker"],
                    env=worker_env,
                    stdout=subprocess.DEVNULL,
                )
            )
        with trio.fail_after(600):
            while await _count(etcd, ks, State.COMPLETED) < n:
                await trio.sleep(0.05)
        took = time.monotonic() - started
        worker_cpu = sum(proc_cpu_s(w.pid) for w in workers)
        return {
            "tasks": n,
            "workers": workers_count,
            "tasks_per_s": round(n / took, 1),
            "etcd_cpu_ms_per_task": round((_etcd_cpu_s(env) - etcd_before) * 1000 / n, 3),
            "sidecar_cpu_ms_per_task": round((cpu_s(sidecar) - sidecar_before) * 1000 / n, 3),
            "workers_cpu_ms_per_task": round(worker_cpu * 1000 / n, 3),
        }
    finally:
        for w in workers:
            w.terminate()
        with trio.move_on_after(10, shield=True):
            for w in workers:
                await w.wait()
        sidecar.stop()
        await etcd.aclose()


@contextmanager
def redis_server(tmp: Path, appendfsync: str | None = None) -> Iterator[int]:
    """A private redis-server on a free loopback port: no persistence, or with
    ``appendfsync`` (``everysec``, ``always``) its append-only file in ``tmp``."""
    port = free_port()
    aof = ["--appendonly", "no"]
    if appendfsync is not None:
        aof = ["--appendonly", "yes", "--appendfsync", appendfsync]
        aof += ["--appendfilename", f"bench-{appendfsync}-{port}.aof"]
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            *aof,
            "--dir",
            str(tmp),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        import redis

        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def _peer_missing() -> str | None:
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (Debian's redis-server)"
    try:
        import celery  # noqa: F401
        import huey  # noqa: F401
        import redis  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed (pip install '.[bench]')"
    return None


def _drain_peer(
    name: str, n: int, port: int, consumer: list[str], label: str | None = None
) -> dict[str, Any]:
    """Enqueue ``n`` no-op tasks with the peer, then time two consumer processes; the
    figures are named after ``label`` (default: the peer's name)."""
    label = label or name
    import redis

    env = {**os.environ, "PYTHONPATH": str(ROOT), "BENCH_REDIS_PORT": str(port)}
    client = redis.Redis(port=port)
    client.flushall()
    enqueue = subprocess.run(
        [sys.executable, "-m", "bench.peer_enqueue", name, str(n)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    enqueue_s = float(enqueue.stdout.strip())
    started = time.monotonic()
    consumers = [
        subprocess.Popen(consumer, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(WORKERS)
    ]
    redis_pid = int(client.info("server")["process_id"])
    redis_before = proc_cpu_s(redis_pid)
    try:
        deadline = started + 600
        while int(client.get("done") or 0) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not drain {n} tasks in 600 s")
            ended = [c.returncode for c in consumers if c.poll() is not None]
            if ended:
                raise RuntimeError(f"a {name} worker exited with {ended[0]}")
            time.sleep(0.05)
        took = time.monotonic() - started
        cpu = sum(proc_cpu_s(c.pid) for c in consumers)
        return {
            f"{label}_tasks_per_s": round(n / took, 1),
            f"{label}_enqueue_per_s": round(n / enqueue_s, 1),
            f"{label}_workers_cpu_ms_per_task": round(cpu * 1000 / n, 3),
            f"{label}_redis_cpu_ms_per_task": round(
                (proc_cpu_s(redis_pid) - redis_before) * 1000 / n, 3
            ),
        }
    finally:
        for c in consumers:
            c.terminate()
        for c in consumers:
            try:
                c.wait(20)
            except subprocess.TimeoutExpired:
                c.kill()
                c.wait()


async def peers(env: Env) -> Result:
    """Huey and Celery on Redis draining the same backlog, in this run."""
    missing = _peer_missing()
    if missing is not None:
        print(f"peers: skipped: {missing}", file=sys.stderr)
        return {"skipped": missing}
    n = env.scale(DRAIN_TASKS)

    huey_consumer = [
        sys.executable,
        "-m",
        "huey.bin.huey_consumer",
        "bench.peer_huey.huey",
        "-w",
        "1",
        "-k",
        "thread",
        "-q",
    ]

    def run_all() -> dict[str, Any]:
        out: dict[str, Any] = {"tasks": n}
        # Huey on a Redis that syncs its append-only file each second, then each write.
        for fsync in ("everysec", "always"):
            with redis_server(env.tmp, appendfsync=fsync) as port:
                out.update(_drain_peer("huey", n, port, huey_consumer, f"huey_{fsync}"))
        with redis_server(env.tmp) as port:
            out.update(_drain_peer("huey", n, port, huey_consumer))
            out.update(
                _drain_peer(
                    "celery",
                    n,
                    port,
                    [
                        sys.executable,
                        "-m",
                        "celery",
                        "-A",
                        "bench.peer_celery",
                        "worker",
                        "--pool=solo",
                        "--concurrency=1",
                        "--without-heartbeat",
                        "--without-gossip",
                        "--without-mingle",
                        "-l",
                        "WARNING",
                    ],
                )
            )
        return out

    return await trio.to_thread.run_sync(run_all)
