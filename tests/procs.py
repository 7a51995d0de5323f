"""tm-sidecar processes for the multi-process tests, and the checks they share."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from tm_sidecar import Etcd
from tm_sidecar._errors import Compacted, EtcdUnavailable
from tm_sidecar.core import (
    Keyspace,
    Record,
    State,
    TaskOptions,
    TaskSpec,
    Txn,
    WatchEvent,
    initial_record,
    make_task_id,
    plan_create,
)
from tm_sidecar.ops._embedded import EtcdProcess

ROOT = Path(__file__).resolve().parent.parent
#: The etcd transport of every sidecar these tests start (``--etcd-transport``), in a
#: process of its own or in the test's (``tests.helpers.running_sidecars``): set
#: ``TM_TEST_ETCD_TRANSPORT=gateway`` to run the sidecar, SDK, multi-process and fault
#: tests on the gateway; unset, the sidecar's own default.
TRANSPORT = os.environ.get("TM_TEST_ETCD_TRANSPORT") or None


@attrs.define(eq=False)
class SidecarProcess:
    """One ``tm-sidecar`` process with in-process handlers from tests/proc_handlers.py."""

    node_id: str
    endpoint: str
    namespace: str
    log_path: Path
    lease_ttl_s: int = 2
    concurrency: int = 4
    handler: str | None = "tests.proc_handlers:work"
    extra: tuple[str, ...] = ()
    env: dict[str, str] = attrs.Factory(dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, **self.env, "PYTHONPATH": str(ROOT), "TM_NODE_ID": self.node_id}
        args = [
            sys.executable,
            "-m",
            "tm_sidecar",
            "--etcd",
            self.endpoint,
            "--namespace",
            self.namespace,
            "--socket",
            str(self.socket_path),
            "--lease-ttl",
            str(self.lease_ttl_s),
            "--log-level",
            "info",
        ]
        if TRANSPORT is not None:
            args += ["--etcd-transport", TRANSPORT]
        args += self.extra  # after it: a test's own --etcd-transport wins
        if self.handler:
            args += ["--handler", self.handler, "--concurrency", str(self.concurrency)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                return self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None
        return self.proc.returncode

    @property
    def socket_path(self) -> Path:
        """This sidecar's socket, beside its log."""
        return self.log_path.with_suffix(".sock")

    async def wait_serving(self, timeout_s: float = 20) -> None:
        """Poll until the socket accepts connections (bounded)."""
        import socket as _socket

        with trio.fail_after(timeout_s):
            while True:
                assert self.proc is not None
                assert self.proc.poll() is None, self.log()[-2000:]
                probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
                try:
                    probe.connect(str(self.socket_path))
                    return
                except OSError:
                    await trio.sleep(0.05)
                finally:
                    probe.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


async def create_tasks(etcd: Etcd, ks: Keyspace, count: int, *, work_s: float = 0.01) -> list[str]:
    """Commit ``count`` tasks the way the API does, several per transaction."""
    ids: list[str] = []
    batch: list[Txn] = []
    for i in range(count):
        now = time.time()
        spec = TaskSpec(
            id=make_task_id(int(now * 1000), i, 0),
            payload={"i": i, "work_s": work_s},
            options=TaskOptions(max_attempts=5),
            created_at=now,
        )
        rec = initial_record(
            Record(state=State.PENDING, options=spec.options, since_at=now), now=now, run_at=None
        )
        batch.append(plan_create(ks, spec, rec))
        ids.append(spec.id)
        if len(batch) == 32 or i == count - 1:
            txn = Txn(
                compare=tuple(c for t in batch for c in t.compare),
                success=tuple(op for t in batch for op in t.success),
            )
            assert (await etcd.txn(txn)).succeeded
            batch = []
    return ids


@attrs.define(eq=False)
class Auditor:
    """Watches every state change of a namespace and checks the safety properties as it goes."""

    ks: Keyspace
    completed_puts: Counter[str] = attrs.Factory(Counter)
    assignments: Counter[str] = attrs.Factory(Counter)
    live: dict[str, set[str]] = attrs.Factory(lambda: defaultdict(set))
    violations: list[str] = attrs.Factory(list)
    assign_times: list[tuple[float, int]] = attrs.Factory(list)  # (trio time seen, revision)
    changed: trio.Event = attrs.Factory(trio.Event)

    def see(self, event: WatchEvent) -> None:
        parsed = self.ks.parse(event.kv.key)
        if parsed is None or parsed.task_id is None or parsed.kind != "state":
            return
        tid = parsed.task_id
        if event.kind == "PUT" and event.prev is None:
            if self.live[tid]:
                self.violations.append(f"{tid} entered {event.kv.key} while in {self.live[tid]}")
            self.live[tid].add(event.kv.key)
            if parsed.state is State.COMPLETED:
                self.completed_puts[tid] += 1
            if parsed.state is State.PROCESSING:
                self.assignments[tid] += 1
                self.assign_times.append((trio.current_time(), event.kv.mod_revision))
        elif event.kind == "PUT":
            if parsed.state is State.COMPLETED:
                self.violations.append(f"{tid}: completed record rewritten")
        else:
            self.live[tid].discard(event.kv.key)

    async def run(self, etcd: Etcd, start_revision: int) -> None:
        """Audit from ``start_revision`` on. A watch stream that breaks (a loaded machine,
        an etcd member restarting) resumes after the last revision it delivered: etcd's
        history has every change, so nothing goes unaudited."""
        next_revision = start_revision
        while True:
            watch = etcd.watch_once(
                self.ks.prefix, next_revision, range_end=self.ks.prefix + "task"
            )
            try:
                async with aclosing(watch) as changes:
                    async for batch in changes:
                        # Events of one revision are one transaction: apply deletes first.
                        for event in sorted(
                            batch.events, key=lambda e: (e.kv.mod_revision, e.kind != "DELETE")
                        ):
                            self.see(event)
                        next_revision = max(next_revision, batch.revision + 1)
                        self.changed.set()
                        self.changed = trio.Event()
            except Compacted:
                self.violations.append("audit watch fell behind compaction")
                return
            except EtcdUnavailable:
                await trio.sleep(0.1)  # a backoff before watching again, not a wait

    async def wait_completed(self, ids: list[str], timeout_s: float) -> None:
        with trio.fail_after(timeout_s):
            while not all(self.completed_puts[t] for t in ids):
                await self.changed.wait()


async def wait_registered(
    etcd: Etcd, ks: Keyspace, node_ids: list[str], timeout_s: float = 20
) -> None:
    """Poll until every node has registered (bounded by the deadline)."""
    with trio.fail_after(timeout_s):
        while True:
            kvs, _ = await etcd.list_prefix(ks.nodes())
            if {kv.key.rsplit("/", 1)[1] for kv in kvs} >= set(node_ids):
                return
            await trio.sleep(0.05)


async def leader_node(etcd: Etcd, ks: Keyspace) -> str | None:
    """The node id of the current leader, from the election keys."""
    import json

    kvs, _ = await etcd.list_prefix(ks.election())
    if not kvs:
        return None
    first = min(kvs, key=lambda kv: kv.create_revision)
    return str(json.loads(first.value)["node"])


@asynccontextmanager
async def sidecars(
    etcd: EtcdProcess, namespace: str, tmp_path: Path, *names: str, **kw: Any
) -> AsyncIterator[list[SidecarProcess]]:
    """Sidecar processes with no handler of their own, started in order (the first leads)."""
    kw.setdefault("handler", None)
    procs = [
        SidecarProcess(n, etcd.endpoint, namespace, tmp_path / f"{n}.log", **kw) for n in names
    ]
    try:
        for p in procs:
            p.start()
            await p.wait_serving()
        yield procs
    finally:
        for p in procs:
            p.stop()
