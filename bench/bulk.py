"""The bulk create's rate: ``create_many`` of 10,000 small tasks in one call, through the
SDK and one sidecar, with the CPU each process spent on it and etcd's transactions; and,
in the same run, the same tasks created one ``create`` request each (64 in flight, the
sidecar's group commit batching them), which is what a bulk create replaces."""

from __future__ import annotations

import itertools
import time
from typing import TYPE_CHECKING

import trio
from taskmanager import TaskManager

from tm_sidecar import EtcdConfig, connect

if TYPE_CHECKING:
    from bench.run import Env, Result

#: Tasks in the one call; --quick takes 500.
BULK_TASKS = 10_000
#: Requests in flight for the one-by-one creates.
LANES = 64


async def create_many_rate(env: Env) -> Result:
    """One ``create_many`` of ``BULK_TASKS`` small tasks (no worker: they stay pending),
    timed from the call to its answer (every task durable in etcd)."""
    from bench.run import _etcd_cpu_s, cpu_s

    n = env.scale(BULK_TASKS, quick=500)
    items = [{"i": i} for i in range(n)]
    etcd = connect(EtcdConfig(endpoints=(env.etcd.endpoint,)))
    try:
        async with env.sidecars(1) as (proc,), TaskManager(str(proc.socket_path)) as m:
            await m.create_many([{"warm": True}])  # connected, and the path warm
            revision = await etcd.revision()
            sidecar0, etcd0, client0 = cpu_s(proc), _etcd_cpu_s(env), time.process_time()
            start = trio.current_time()
            ids = await m.create_many(items)
            elapsed = trio.current_time() - start
            sidecar_cpu, etcd_cpu = cpu_s(proc) - sidecar0, _etcd_cpu_s(env) - etcd0
            client_cpu = time.process_time() - client0
            # Each transaction is one revision (nothing else writes: no worker, no leader move).
            txns = await etcd.revision() - revision
            one_by_one = await _one_by_one(m, n)
    finally:
        await etcd.aclose()
    assert len(ids) == n
    return {
        "tasks": n,
        "tasks_per_s": round(n / elapsed, 1),
        "etcd_txns": txns,
        "sidecar_cpu_ms_per_task": round(sidecar_cpu * 1000 / n, 4),
        "etcd_cpu_ms_per_task": round(etcd_cpu * 1000 / n, 4),
        "client_cpu_ms_per_task": round(client_cpu * 1000 / n, 4),
        "one_by_one_tasks_per_s": round(one_by_one, 1),
    }


async def _one_by_one(m: TaskManager, n: int) -> float:
    """Tasks per second creating ``n`` tasks one ``create`` request each, ``LANES`` in
    flight (the protocol's create without a subscription: the least a create costs)."""
    numbers = itertools.count()

    async def lane() -> None:
        for i in numbers:
            if i >= n:
                return
            await m._request("create", {"payload": {"i": i}, "task_id": f"one-{i}"})

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(LANES):
            nursery.start_soon(lane)
    return n / (trio.current_time() - start)
