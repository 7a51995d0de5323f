"""tm-sidecar benchmarks, side by side with the ceiling of the etcd they run on.

    python -m bench                 # every scenario, prints a table, writes bench-result.json
    python -m bench --quick         # seconds: checks that the harness works
    python -m bench --only ceiling,latency --repeat 5

Starts its own etcd and sidecar processes on loopback. Each figure is the median of
``--repeat`` runs; ratios are computed within one run.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import signal
import statistics
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any, Literal

import trio
from taskmanager import TaskManager, WorkerTask

from bench.bulk import create_many_rate
from bench.drain import drain, peers
from bench.leader_ceiling import leader_ceiling
from tests.procs import SidecarProcess, create_tasks
from tm_sidecar import Etcd, EtcdConfig
from tm_sidecar.core import Delete, Keyspace, Put, Range, State, Txn
from tm_sidecar.etcd import TRANSPORTS, connect
from tm_sidecar.ops._embedded import EtcdProcess

Result = dict[str, Any]


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


async def rate(n: int, in_flight: int, op: Callable[[int], Awaitable[None]]) -> float:
    """Operations per second running ``n`` ops with ``in_flight`` at once."""
    counter = iter(range(n))
    start = trio.current_time()

    async def lane() -> None:
        for i in counter:
            await op(i)

    async with trio.open_nursery() as nursery:
        for _ in range(in_flight):
            nursery.start_soon(lane)
    return n / (trio.current_time() - start)


# -- scenarios -------------------------------------------------------------------------------


async def ceiling(env: Env) -> Result:
    """etcd's own limit through each transport: the gateway's (etcd3-py) and the gRPC
    one (and the gateway with no client to speak of, ``raw``), with the client's and
    etcd's CPU per call (the client's is this whole process, its threads included)."""
    out: Result = {}
    transports: tuple[Literal["gateway", "grpc"], ...] = ("gateway", "grpc")
    for transport in transports:
        etcd = connect(EtcdConfig(endpoints=(env.etcd.endpoint,), transport=transport, threads=64))
        for in_flight in (1, 64):
            n = env.scale(400 if in_flight == 1 else 3000)

            async def put(i: int, etcd: Etcd = etcd) -> None:
                await etcd.put(f"/bench/put/{i % 512}", "x" * 64)

            cpu, etcd_cpu = time.process_time(), _etcd_cpu_s(env)
            out[f"puts_per_s_{transport}_{in_flight}"] = await rate(n, in_flight, put)
            out[f"client_cpu_us_per_put_{transport}_{in_flight}"] = (
                (time.process_time() - cpu) / n * 1e6
            )
            out[f"etcd_cpu_us_per_put_{transport}_{in_flight}"] = (
                (_etcd_cpu_s(env) - etcd_cpu) / n * 1e6
            )
        await etcd.aclose()
    for transport in transports:
        etcd = connect(EtcdConfig(endpoints=(env.etcd.endpoint,), transport=transport))

        async def move(i: int, etcd: Etcd = etcd, transport: str = transport) -> None:
            # Each lane moves its own 32 keys between two prefixes, as a leader batch does.
            lane = i % 8
            src, dst = ("a", "b") if (i // 8) % 2 == 0 else ("b", "a")
            ops: list[Put | Delete] = []
            for k in range(32):
                ops += [
                    Delete(f"/bench/move/{transport}/{lane}/{src}/{k}"),
                    Put(f"/bench/move/{transport}/{lane}/{dst}/{k}", "x" * 64),
                ]
            await etcd.txn(Txn(success=tuple(ops)))

        n = env.scale(400)
        out[f"moved_keys_per_s_{transport}_32"] = 32 * await rate(n, 8, move)
        await etcd.aclose()
    return out | await raw_ceiling(env)


class RawGateway:
    """The least a client can do per request: prebuilt bytes on a kept-alive connection,
    and an answer read by its Content-Length, never parsed. etcd's own ceiling."""

    def __init__(self, endpoint: str) -> None:
        url = urllib.parse.urlsplit(endpoint)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 2379
        self.head = f"POST %s HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Length: %d\r\n\r\n"

    def request(self, path: str, body: dict[str, Any]) -> bytes:
        data = json.dumps(body).encode()
        return (self.head % (path, len(data))).encode() + data

    async def lane(self, requests: list[bytes]) -> None:
        stream = await trio.open_tcp_stream(self.host, self.port)
        buffer = b""
        async with stream:
            for request in requests:
                await stream.send_all(request)
                while b"\r\n\r\n" not in buffer:
                    buffer += await stream.receive_some(65536)
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200"), head[:80]
                if b"content-length:" in head.lower():
                    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                    while len(buffer) < length:
                        buffer += await stream.receive_some(65536)
                    buffer = buffer[length:]
                else:  # chunked (a large answer): up to the last, empty chunk
                    while b"\r\n0\r\n\r\n" not in buffer:
                        buffer += await stream.receive_some(65536)
                    buffer = buffer.partition(b"\r\n0\r\n\r\n")[2]


async def raw_rate(raw: RawGateway, requests: list[bytes], lanes: int) -> float:
    """Requests per second over ``lanes`` connections, each one request at a time."""
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for i in range(lanes):
            nursery.start_soon(raw.lane, requests[i::lanes])
    return len(requests) / (trio.current_time() - start)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


async def raw_ceiling(env: Env) -> Result:
    """The same figures as :func:`ceiling` with :class:`RawGateway`."""
    raw = RawGateway(env.etcd.endpoint)
    out: Result = {}
    for in_flight in (1, 64):
        n = env.scale(1000 if in_flight == 1 else 8000)
        body = [{"key": _b64(f"/bench/raw/{i % 512}"), "value": _b64("x" * 64)} for i in range(n)]
        requests = [raw.request("/v3/kv/put", b) for b in body]
        out[f"puts_per_s_raw_{in_flight}"] = await raw_rate(raw, requests, in_flight)
    n = env.scale(400)
    moves = []
    for i in range(n):
        lane = i % 8
        src, dst = ("a", "b") if (i // 8) % 2 == 0 else ("b", "a")
        ops: list[dict[str, Any]] = []
        for k in range(32):
            ops.append({"request_delete_range": {"key": _b64(f"/bench/rmove/{lane}/{src}/{k}")}})
            ops.append(
                {
                    "request_put": {
                        "key": _b64(f"/bench/rmove/{lane}/{dst}/{k}"),
                        "value": _b64("x" * 64),
                    }
                }
            )
        moves.append(raw.request("/v3/kv/txn", {"success": ops}))
    # Lane i must move its own keys in order: lanes = 8, requests interleaved by lane.
    out["moved_keys_per_s_raw_32"] = 32 * await raw_rate(raw, moves, 8)
    return out


def _etcd_cpu_s(env: Env) -> float:
    """CPU seconds etcd has used so far (user + system)."""
    pid = env.etcd.pid
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def etcd_cpu(env: Env) -> Result:
    """etcd's CPU per key written (32 puts a transaction), and per watcher of those keys:
    what a task's seven key writes and its watch deliveries cost etcd at least."""
    etcd = connect(EtcdConfig(endpoints=(env.etcd.endpoint,), transport="gateway"))
    out: Result = {}
    n = env.scale(12_800, quick=640)
    for watchers in (0, 1, 3):
        prefix = f"/bench/cpu{watchers}/"
        start_rev = await etcd.revision()
        seen = [0] * watchers

        async def watch(
            i: int, prefix: str = prefix, rev: int = start_rev, seen: list[int] = seen
        ) -> None:
            async with aclosing(etcd.watch_once(prefix, rev + 1, prev_kv=False)) as stream:
                async for changes in stream:
                    seen[i] += len(changes.events)

        async with trio.open_nursery() as nursery:
            for i in range(watchers):
                nursery.start_soon(watch, i)
            cpu0 = _etcd_cpu_s(env)

            async def put32(b: int, prefix: str = prefix) -> None:
                keys = range(b * 32, b * 32 + 32)
                await etcd.txn(Txn(success=tuple(Put(f"{prefix}{k}", "x" * 150) for k in keys)))

            await rate(n // 32, 8, put32)
            with trio.fail_after(60):
                while any(count < n for count in seen):
                    await trio.sleep(0.01)
            cpu = _etcd_cpu_s(env) - cpu0
            nursery.cancel_scope.cancel()
        out[f"etcd_cpu_us_per_key_{watchers}_watchers"] = cpu / n * 1e6
        await etcd.delete(prefix, prefix=True)
    await etcd.aclose()
    return out


def cpu_s(proc: SidecarProcess) -> float:
    """CPU seconds (user + system) a sidecar process has used so far."""
    assert proc.proc is not None
    fields = Path(f"/proc/{proc.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class DashboardViewer:
    """What an open overview page asks of a sidecar: its event stream (server-sent
    events) and the overview's body every 2 s. Counts what the stream brought."""

    def __init__(self, url: str) -> None:
        parsed = urllib.parse.urlsplit(url)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 80
        self.batches = 0
        self.events_sent = 0
        self.events_seen = 0
        self.refreshes = 0

    async def _get(self, path: str) -> trio.SocketStream:
        stream = await trio.open_tcp_stream(self.host, self.port)
        head = f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nConnection: close\r\n\r\n"
        await stream.send_all(head.encode())
        return stream

    async def stream(self) -> None:
        stream = await self._get("/api/events")
        buffer = b""
        async with stream:
            while data := await stream.receive_some(65536):
                buffer += data
                # One server-sent message per HTTP chunk: the chunks' framing lines fall
                # between messages, never inside one.
                while b"\n\n" in buffer:
                    message, buffer = buffer.split(b"\n\n", 1)
                    if b"event: batch" not in message:
                        continue
                    batch = json.loads(message.split(b"data: ", 1)[1].split(b"\n", 1)[0])
                    self.batches += 1
                    self.events_sent += len(batch["events"])
                    self.events_seen = batch["seen"]

    async def refresh(self) -> None:
        # The overview's 2 s refresh, and a queue's page (its flow control, its
        # pictures, a page of its tasks) as a person looking at it reloads it.
        while True:
            for path in ("/fragments/overview", "/queues/default?state=pending"):
                stream = await self._get(path)
                async with stream:
                    while await stream.receive_some(65536):
                        pass
            self.refreshes += 1
            await trio.sleep(2.0)


async def dashboard_url(proc: SidecarProcess) -> str:
    """The URL the sidecar logs once its dashboard listens (which may follow its socket)."""
    with trio.fail_after(20):
        while not (found := re.search(r'msg="dashboard listening" url=(http://\S+/)', proc.log())):
            await trio.sleep(0.05)
    return found.group(1)


async def throughput(
    env: Env,
    sidecars: int,
    limits: dict[str, Any] | None = None,
    *,
    dashboard: bool = False,
) -> Result:
    """No-op tasks created, run and completed end to end through the SDK; with
    ``limits``, under those queue limits (set so as not to bind: their cost alone); with
    ``dashboard``, the first sidecar serves its dashboard and a viewer keeps the
    overview open (the event stream and the 2 s refresh) throughout."""
    n = env.scale(3200)
    extra = ("--web", "127.0.0.1:0") if dashboard else ()
    async with env.sidecars(sidecars, extra=extra) as procs:
        done = 0
        managers = [TaskManager(str(p.socket_path)) for p in procs]
        viewer = DashboardViewer(await dashboard_url(procs[0])) if dashboard else None
        if limits:
            await managers[0].set_limits(**limits)

        async def noop(task: WorkerTask) -> None:
            return None

        async with trio.open_nursery() as nursery:
            for m in managers:
                await m.process(noop, concurrency=64)
            if viewer is not None:
                nursery.start_soon(viewer.stream)
                nursery.start_soon(viewer.refresh)
            cpu0 = cpu_s(procs[0])
            all0 = sum(cpu_s(p) for p in procs)
            etcd0 = _etcd_cpu_s(env)
            # The client: this process, where the SDK's producers and workers run.
            client0 = time.process_time()
            start = trio.current_time()

            async def producer(m: TaskManager, count: int) -> None:
                nonlocal done
                tasks = []
                for i in range(count):
                    tasks.append(await (await m.create({"i": i})).commit())
                for t in tasks:
                    await t.result(timeout=600)
                    done += 1

            per = n // (64 * len(managers))  # 64 producers per sidecar, each one at a time
            async with trio.open_nursery() as producers:
                for m in managers:
                    for _ in range(64):
                        producers.start_soon(producer, m, per)
            elapsed = trio.current_time() - start
            cpu = cpu_s(procs[0]) - cpu0
            all_cpu = sum(cpu_s(p) for p in procs) - all0
            etcd_cpu = _etcd_cpu_s(env) - etcd0
            client_cpu = time.process_time() - client0
            for m in managers:
                await m.shutdown()
            nursery.cancel_scope.cancel()
        rss = [rss_mb(p) for p in procs]
    out: Result = {
        "tasks": done,
        "tasks_per_s": done / elapsed,
        "sidecar_rss_mb": max(rss),
        "sidecar_cpu_ms_per_task": cpu / done * 1000,
        "sidecar_cpu_share": cpu / elapsed,
        # Every sidecar's CPU (the first one's alone is sidecar_cpu_ms_per_task).
        "sidecars_cpu_ms_per_task": all_cpu / done * 1000,
        "etcd_cpu_ms_per_task": etcd_cpu / done * 1000,
        "client_cpu_ms_per_task": client_cpu / done * 1000,
    }
    if viewer is not None:
        out["events_seen_per_s"] = viewer.events_seen / elapsed
        out["events_streamed_per_s"] = viewer.events_sent / elapsed
        out["batches_per_s"] = viewer.batches / elapsed
        out["overview_refreshes"] = viewer.refreshes
    return out


async def latency(env: Env) -> Result:
    """One task at a time on an idle system: commit to handler start, and to result."""
    n = env.scale(200)
    async with env.sidecars(1) as (proc,):
        started: dict[str, float] = {}
        async with TaskManager(str(proc.socket_path)) as m:

            async def handler(task: WorkerTask) -> None:
                started[task.id] = time.perf_counter()

            await m.process(handler, concurrency=4)
            to_start, to_result = [], []
            for i in range(n):
                task = await m.create({"i": i})
                await task.commit()
                committed = time.perf_counter()
                await task.result(timeout=30)
                to_result.append(time.perf_counter() - committed)
                to_start.append(started[task.id] - committed)
    ms = 1000
    return {
        "start_p50_ms": pct(to_start, 50) * ms,
        "start_p99_ms": pct(to_start, 99) * ms,
        "result_p50_ms": pct(to_result, 50) * ms,
        "result_p99_ms": pct(to_result, 99) * ms,
    }


async def delays(env: Env) -> Result:
    """How late delayed tasks start (they must never start early)."""
    n = env.scale(100)
    async with env.sidecars(1) as (proc,):
        lateness: list[float] = []
        async with TaskManager(str(proc.socket_path)) as m:
            due: dict[str, float] = {}

            def handler(task: WorkerTask) -> None:
                lateness.append(time.time() - due[task.id])

            await m.process(handler, concurrency=16)
            tasks = []
            for i in range(n):
                task = await m.create({"i": i})
                task.with_delay(0.5 + (i % 10) * 0.1)
                assert task.run_at is not None
                due[task.id] = task.run_at
                tasks.append(await task.commit())
            for t in tasks:
                await t.result(timeout=60)
    return {
        "late_p50_ms": pct(lateness, 50) * 1000,
        "late_p99_ms": pct(lateness, 99) * 1000,
        "earliest_ms": min(lateness) * 1000,
    }


async def failover(env: Env) -> Result:
    """SIGKILL the leader under load: time until assignments resume; SIGTERM: handover."""
    out: Result = {}
    for how in ("kill", "term"):
        ks = Keyspace(namespace=env.namespace())
        procs = [env.sidecar(n, ks.namespace, handler=IN_PROCESS) for n in ("a", "b")]
        etcd = connect(EtcdConfig(endpoints=(env.etcd.endpoint,)))
        try:
            procs[0].start()
            await procs[0].wait_serving()
            procs[1].start()
            await procs[1].wait_serving()
            # Enough work to outlast the kill (8 slots): 1,500 tasks is about 2 s of it.
            await create_tasks(etcd, ks, env.scale(3000, quick=1500), work_s=0.01)
            await trio.sleep(0.5)
            procs[0].signal(signal.SIGKILL if how == "kill" else signal.SIGTERM)
            t0 = time.perf_counter()
            # Writes the old leader had in flight land within milliseconds: anything
            # assigned after this revision is the new leader's.
            await trio.sleep(0.05)
            rev = await etcd.revision()
            with trio.fail_after(60):
                while True:
                    r = await etcd.range(Range(ks.assignments("b"), prefix=True))
                    if any(kv.create_revision > rev for kv in r.kvs):
                        break
                    await trio.sleep(0.005)
            out[f"{how}_resume_s"] = time.perf_counter() - t0
        finally:
            for p in procs:
                p.stop()
            await etcd.aclose()
    return out


async def stall(env: Env) -> Result:
    """SIGKILL a worker's sidecar with tasks in flight: time until they run elsewhere."""
    ks = Keyspace(namespace=env.namespace())
    lead = env.sidecar("lead", ks.namespace)
    worker = env.sidecar("w", ks.namespace, handler=IN_PROCESS)
    etcd = connect(EtcdConfig(endpoints=(env.etcd.endpoint,)))
    try:
        lead.start()
        await lead.wait_serving()
        worker.start()
        await worker.wait_serving()
        ids = await create_tasks(etcd, ks, 4, work_s=3600)
        while (
            await etcd.range(Range(ks.assignments("w"), prefix=True, count_only=True))
        ).count < 4:
            await trio.sleep(0.01)
        async with TaskManager(str(lead.socket_path)) as m:
            reran: list[float] = []

            def handler(task: WorkerTask) -> None:
                reran.append(time.perf_counter())

            await m.process(handler, concurrency=4)
            worker.kill()
            t0 = time.perf_counter()
            for tid in ids:
                await m.get(tid)
            while len(reran) < 4:
                await trio.sleep(0.01)
        return {"rerun_s": min(reran) - t0, "all_rerun_s": max(reran) - t0}
    finally:
        lead.stop()
        worker.stop()
        await etcd.aclose()


async def backlog(env: Env) -> Result:
    """Throughput and RSS with a large pending backlog; the leader's re-list time."""
    n = env.scale(100_000, quick=2_000)
    ks = Keyspace(namespace=env.namespace())
    etcd = connect(EtcdConfig(endpoints=(env.etcd.endpoint,)))
    await create_tasks(etcd, ks, n, work_s=0.0)
    procs = [env.sidecar(x, ks.namespace) for x in ("a", "b")]
    try:
        for p in procs:
            p.start()
            await p.wait_serving()
        # Measure once the leader has listed the backlog (its first listing is timed too).
        with trio.fail_after(120):
            while LISTED not in procs[0].log():
                await trio.sleep(0.05)
        relist = _relist_s(procs[0].log())
        async with TaskManager(str(procs[0].socket_path)) as m:
            done = 0

            async def noop(task: WorkerTask) -> None:
                nonlocal done
                done += 1

            await m.process(noop, concurrency=64)
            window = 5.0 if not env.quick else 1.0
            cpu0, etcd0, client0 = cpu_s(procs[0]), _etcd_cpu_s(env), time.process_time()
            start_done = done
            await trio.sleep(window)
            measured = done / window
            ran = max(done - start_done, 1)
            cpu_per_task = {
                "sidecar_cpu_ms_per_task": (cpu_s(procs[0]) - cpu0) / ran * 1000,
                "etcd_cpu_ms_per_task": (_etcd_cpu_s(env) - etcd0) / ran * 1000,
                "client_cpu_ms_per_task": (time.process_time() - client0) / ran * 1000,
            }
        pending = (
            await etcd.range(Range(ks.state_prefix(State.PENDING), prefix=True, count_only=True))
        ).count
        rss = rss_mb(procs[0])
        # Failover with the backlog: the new leader's listing time.
        procs[0].kill()
        with trio.move_on_after(60):
            while LISTED not in procs[1].log():
                await trio.sleep(0.05)
        if LISTED not in procs[1].log():
            raise RuntimeError(f"no listing after failover:\n{procs[1].log()[-3000:]}")
        relist_after = _relist_s(procs[1].log())
    finally:
        for p in procs:
            p.stop()
        await etcd.aclose()
    return {
        "backlog": n,
        "tasks_per_s_with_backlog": measured,
        "pending_left": pending,
        "leader_rss_mb": rss,
        "first_list_s": relist,
        "relist_after_failover_s": relist_after,
        **cpu_per_task,
    }


#: The leader's log lines that _relist_s times (tm_sidecar/leader/_leading.py).
LEADING, LISTED = 'msg="leading with fence"', 'msg="leader view listed"'


def _relist_s(log: str) -> float | None:
    """Seconds between the last 'leading with fence' and 'leader view listed' in a sidecar's
    log."""

    def ts(line: str) -> float:
        stamp = line.split(" ", 1)[0].removeprefix("ts=")
        return time.mktime(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")) + float(
            "0." + stamp[20:23]
        )

    lines = log.splitlines()
    starts = [ts(ln) for ln in lines if LEADING in ln]
    listed = [ts(ln) for ln in lines if LISTED in ln]
    return listed[-1] - starts[-1] if starts and listed else None


def rss_mb(proc: SidecarProcess) -> float:
    """Resident memory of a sidecar process."""
    assert proc.proc is not None
    try:
        for line in Path(f"/proc/{proc.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


# -- harness ---------------------------------------------------------------------------------


#: The in-process handler the failover and stall scenarios give their sidecars.
IN_PROCESS = "tests.proc_handlers:work"


class Env:
    """One etcd, and sidecar processes on demand."""

    def __init__(self, tmp: Path, quick: bool, transport: str = "grpc") -> None:
        self.tmp = tmp
        self.quick = quick
        #: The sidecars' --etcd-transport.
        self.transport = transport
        self.etcd = EtcdProcess(data_dir=tmp / "etcd")
        self._ns = 0

    def scale(self, n: int, quick: int | None = None) -> int:
        return (quick or max(1, n // 20)) if self.quick else n

    def sidecar(
        self,
        name: str,
        namespace: str,
        handler: str | None = None,
        extra: tuple[str, ...] = (),
    ) -> SidecarProcess:
        """A sidecar process (not started) with the benchmarks' lease TTL of 5 s; its
        workers connect over the SDK unless ``handler`` runs tasks in the process."""
        log = self.tmp / f"{namespace}-{name}.log"
        return SidecarProcess(
            name,
            self.etcd.endpoint,
            namespace,
            log,
            lease_ttl_s=5,
            handler=handler,
            extra=("--etcd-transport", self.transport, *extra),
        )

    def namespace(self) -> str:
        self._ns += 1
        return f"b{self._ns}"

    def sidecars(self, count: int, extra: tuple[str, ...] = ()) -> Any:
        env = self

        class _Ctx:
            async def __aenter__(self) -> list[SidecarProcess]:
                ns = env.namespace()
                # Extra flags go to the first sidecar only (the one a viewer looks at).
                self.procs = [
                    env.sidecar(f"n{i}", ns, extra=extra if i == 0 else ()) for i in range(count)
                ]
                for p in self.procs:
                    p.start()
                    await p.wait_serving()
                return self.procs

            async def __aexit__(self, *exc: object) -> None:
                for p in self.procs:
                    p.stop()

        return _Ctx()


SCENARIOS: dict[str, Callable[[Env], Awaitable[Result]]] = {
    "ceiling": ceiling,
    "etcd_cpu": etcd_cpu,
    "throughput_1": lambda env: throughput(env, 1),
    "throughput_3": lambda env: throughput(env, 3),
    "throughput_1_web": lambda env: throughput(env, 1, dashboard=True),
    # The cost of flow control: a concurrency limit and a rate limit that never bind
    # (the leader still counts, and writes the rate window with every batch).
    "throughput_1_limited": lambda env: throughput(
        env, 1, {"max_running": 100_000, "rate": (1_000_000, 1.0)}
    ),
    "latency": latency,
    "delays": delays,
    "failover": failover,
    "stall": stall,
    "backlog": backlog,
    "drain": drain,
    "drain_4": lambda env: drain(env, 4),
    "peers": peers,
    "create_many": create_many_rate,
    "leader_ceiling": leader_ceiling,
}


def median_of(runs: list[Result]) -> Result:
    keys = runs[0].keys()
    out: Result = {}
    for k in keys:
        values = [r[k] for r in runs if isinstance(r.get(k), int | float)]
        out[k] = statistics.median(values) if values else runs[0][k]
    return out


async def main(args: argparse.Namespace) -> Result:
    chosen = [s for s in (args.only.split(",") if args.only else SCENARIOS)]
    results: Result = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "sidecar_etcd_transport": args.etcd_transport,
        }
    }
    with (
        contextlib.nullcontext(args.keep)
        if args.keep
        else tempfile.TemporaryDirectory(prefix="tm-bench-")
    ) as tmp:
        os.makedirs(tmp, exist_ok=True)
        env = Env(Path(tmp), args.quick, args.etcd_transport)
        await trio.to_thread.run_sync(env.etcd.start)
        results["machine"]["etcd"] = env.etcd.version
        try:
            for name in chosen:
                runs = []
                for _ in range(1 if args.quick else args.repeat):
                    runs.append(await SCENARIOS[name](env))
                results[name] = median_of(runs)
                print(
                    f"{name}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in results[name].items()),
                    flush=True,
                )
        finally:
            await trio.to_thread.run_sync(env.etcd.stop)
    ceiling_figures = results.get("ceiling", {})
    for name in ("throughput_1", "throughput_3"):
        for client in ("gateway", "grpc", "raw"):
            ceil = ceiling_figures.get(f"puts_per_s_{client}_64")
            if ceil and name in results:
                results[name][f"ratio_to_{client}_put_ceiling_64"] = (
                    results[name]["tasks_per_s"] / ceil
                )
    return results


def _fmt(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def cli(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="a few seconds: check the harness works")
    p.add_argument("--only", default="", help=f"comma-separated scenarios: {', '.join(SCENARIOS)}")
    p.add_argument("--repeat", type=int, default=3, help="runs per figure (the median is reported)")
    p.add_argument("--out", default="bench-result.json", help="where to write the JSON")
    p.add_argument("--keep", default="", help="a directory for etcd and the sidecar logs, kept")
    p.add_argument(
        "--etcd-transport",
        choices=TRANSPORTS,
        default="grpc",
        help="the sidecars' etcd client (the ceiling measures every one regardless)",
    )
    args = p.parse_args(argv)
    results = trio.run(main, args)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print("\n| scenario | figure | value |\n| --- | --- | --- |")
    for name, figures in results.items():
        if name == "machine":
            continue
        for k, v in figures.items():
            print(f"| {name} | {k} | {_fmt(v)} |")
    print(f"\nmachine: {results['machine']}; JSON in {args.out}")
