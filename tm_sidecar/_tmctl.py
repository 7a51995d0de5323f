"""``tmctl``: look at and repair tm-sidecar's queues, straight from etcd (no sidecar needed)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from contextlib import aclosing
from typing import Any

import trio

from ._errors import TaskManagerError
from ._etcd import Etcd, EtcdConfig
from .core import (
    Compare,
    Delete,
    EventDeriver,
    Keyspace,
    KeyValue,
    NodeInfo,
    Op,
    Put,
    Range,
    Record,
    State,
    Target,
    TaskError,
    TaskId,
    TaskSpec,
    Touch,
    Txn,
)

STATES = [s.value for s in State]


def build_parser() -> argparse.ArgumentParser:
    """tmctl's arguments; connection settings also come from the sidecar's TM_* variables."""
    env = os.environ.get
    p = argparse.ArgumentParser(prog="tmctl", description=__doc__)
    p.add_argument(
        "--etcd", default=env("TM_ETCD", ""), help="etcd endpoints, comma-separated [TM_ETCD]"
    )
    p.add_argument("--namespace", default=env("TM_NAMESPACE", "default"), help="[TM_NAMESPACE]")
    p.add_argument("--etcd-ca", default=env("TM_ETCD_CA"))
    p.add_argument("--etcd-cert", default=env("TM_ETCD_CERT"))
    p.add_argument("--etcd-key", default=env("TM_ETCD_KEY"))
    p.add_argument("--etcd-user", default=env("TM_ETCD_USER"))
    p.add_argument(
        "--etcd-password", default=env("TM_ETCD_PASSWORD"), help="prefer TM_ETCD_PASSWORD"
    )
    p.add_argument("--json", action="store_true", help="JSON output for scripts")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="leader, nodes with capacity and in-flight counts, queue depths")
    sub.add_parser("leader", help="the leading node")
    ls = sub.add_parser("ls", help="tasks in one state")
    ls.add_argument("state", choices=STATES)
    ls.add_argument("--limit", type=int, default=100)
    show = sub.add_parser("show", help="one task: payload, options, state")
    show.add_argument("task_id")
    retry = sub.add_parser("retry", help="send failed tasks back to pending with fresh attempts")
    group = retry.add_mutually_exclusive_group(required=True)
    group.add_argument("task_id", nargs="?")
    group.add_argument("--all-failed", action="store_true")
    cancel = sub.add_parser("cancel", help="move a pending, delayed or running task to failed")
    cancel.add_argument("task_id")
    purge = sub.add_parser(
        "purge", help="delete every completed or failed record (and its payload)"
    )
    purge.add_argument("state", choices=["completed", "failed"])
    sub.add_parser("events", help="print task events as they happen (Ctrl-C stops)")
    return p


class Ctl:
    """The commands, over one etcd connection."""

    def __init__(self, etcd: Etcd, ks: Keyspace, as_json: bool) -> None:
        self.etcd, self.ks, self.as_json = etcd, ks, as_json

    def out(self, data: Any, table: list[list[str]] | None = None) -> None:
        if self.as_json or table is None:
            print(json.dumps(data, indent=2, default=str))
            return
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        for row in table:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())

    async def count(self, state: State) -> int:
        return (
            await self.etcd.range(Range(self.ks.state_prefix(state), prefix=True, count_only=True))
        ).count

    async def leader(self) -> str | None:
        kvs, _ = await self.etcd.list_prefix(self.ks.election())
        if not kvs:
            return None
        return str(json.loads(min(kvs, key=lambda kv: kv.create_revision).value).get("node"))

    async def status(self) -> None:
        depths = {s.value: await self.count(s) for s in State}
        nodes_kv, _ = await self.etcd.list_prefix(self.ks.nodes())
        nodes = [NodeInfo.from_json(kv.value) for kv in nodes_kv]
        procs, _ = await self.etcd.list_prefix(self.ks.state_prefix(State.PROCESSING))
        inflight: dict[str, int] = {}
        for kv in procs:
            parsed = self.ks.parse(kv.key)
            if parsed and parsed.node:
                inflight[parsed.node] = inflight.get(parsed.node, 0) + 1
        leader = await self.leader()
        data = {
            "namespace": self.ks.namespace,
            "leader": leader,
            "depths": depths,
            "nodes": [
                {
                    "id": n.id,
                    "host": n.host,
                    "pid": n.pid,
                    "capacity": n.capacity,
                    "in_flight": inflight.get(n.id, 0),
                }
                for n in nodes
            ],
        }
        table = [["NODE", "HOST", "PID", "CAPACITY", "IN FLIGHT", "ROLE"]]
        for n in nodes:
            cap = ",".join(f"{q}={c}" for q, c in n.capacity.items()) or "-"
            role = "leader" if n.id == leader else ""
            table.append([n.id, n.host, str(n.pid), cap, str(inflight.get(n.id, 0)), role])
        if not self.as_json:
            print("queues: " + "  ".join(f"{k}={v}" for k, v in depths.items()))
        self.out(data, table)

    async def ls(self, state: State, limit: int) -> None:
        kvs, _ = await self.etcd.list_prefix(self.ks.state_prefix(state))
        rows = []
        for kv in kvs[:limit]:
            parsed = self.ks.parse(kv.key)
            if parsed is None or parsed.task_id is None:
                continue
            rec = Record.from_json(state, kv.value)
            rows.append((parsed.task_id, rec))
        data = [{"task_id": tid, **json.loads(rec.to_json())} for tid, rec in rows]
        table = [["TASK", "ATTEMPTS", "SINCE", "DETAIL"]]
        for tid, rec in rows:
            detail = rec.node or (f"{rec.error.type}: {rec.error.message}" if rec.error else "")
            if rec.due_at:
                detail = f"due {_when(rec.due_at)}"
            table.append([tid, str(rec.attempts), _when(rec.since_at), detail[:60]])
        self.out(data, table)

    async def find(self, task_id: str) -> tuple[TaskSpec | None, State | None, KeyValue | None]:
        tid = TaskId(task_id)
        spec_kv = await self.etcd.get(self.ks.task(tid))
        spec = TaskSpec.from_json(spec_kv.value) if spec_kv else None
        for state in (State.PENDING, State.DELAYED, State.COMPLETED, State.FAILED):
            kv = await self.etcd.get(self.ks.state(state, tid))
            if kv is not None:
                return spec, state, kv
        procs, _ = await self.etcd.list_prefix(self.ks.state_prefix(State.PROCESSING))
        for kv in procs:
            if kv.key.endswith("/" + task_id):
                return spec, State.PROCESSING, kv
        return spec, None, None

    async def show(self, task_id: str) -> int:
        spec, state, kv = await self.find(task_id)
        if spec is None and kv is None:
            print(f"tmctl: no task {task_id}", file=sys.stderr)
            return 1
        data: dict[str, Any] = {"task_id": task_id, "state": state.value if state else None}
        if spec is not None:
            data.update(json.loads(spec.to_json()))
        if kv is not None and state is not None:
            data["record"] = json.loads(kv.value)
        self.out(data)
        return 0

    async def retry(self, task_id: str | None, all_failed: bool) -> int:
        if all_failed:
            kvs, _ = await self.etcd.list_prefix(self.ks.state_prefix(State.FAILED))
        else:
            kv = await self.etcd.get(self.ks.state(State.FAILED, TaskId(task_id or "")))
            if kv is None:
                print(f"tmctl: task {task_id} is not in the failed queue", file=sys.stderr)
                return 1
            kvs = (kv,)
        moved = await retry_failed(self.etcd, self.ks, kvs)
        self.out({"retried": moved}, [["RETRIED"], [str(moved)]])
        return 0

    async def cancel(self, task_id: str) -> int:
        _, state, kv = await self.find(task_id)
        if kv is None or state in (None, State.COMPLETED, State.FAILED):
            print(f"tmctl: task {task_id} is not pending, delayed or running", file=sys.stderr)
            return 1
        ok = await cancel_record(self.etcd, self.ks, kv, state)
        if not ok:
            print(f"tmctl: task {task_id} moved meanwhile; look again", file=sys.stderr)
            return 1
        self.out({"cancelled": task_id}, [["CANCELLED"], [task_id]])
        return 0

    async def purge(self, state: State) -> None:
        kvs, _ = await self.etcd.list_prefix(self.ks.state_prefix(state))
        purged = await purge_records(self.etcd, self.ks, kvs)
        self.out({"purged": purged}, [["PURGED"], [str(purged)]])

    async def events(self) -> None:
        start = await self.etcd.revision()
        watch = self.etcd.watch_once(
            self.ks.state_prefix(State.COMPLETED),
            start + 1,
            range_end=self.ks.prefix + "task",
            prev_kv=False,
            puts_only=True,
        )
        deriver = EventDeriver(self.ks)
        async with aclosing(watch) as changes:
            async for batch in changes:
                for event in (e for change in batch.events for e in deriver.derive(change)):
                    if self.as_json:
                        print(json.dumps(event.to_json()), flush=True)
                    else:
                        extra = f" node={event.node}" if event.node else ""
                        if event.error:
                            extra += f" error={event.error.type}"
                        print(
                            f"{event.kind:<9} {event.task_id} attempt={event.attempt}{extra}",
                            flush=True,
                        )


# The repairs, as functions of their own: the web dashboard makes them too.


async def retry_failed(etcd: Etcd, ks: Keyspace, kvs: Iterable[KeyValue]) -> int:
    """Send these failed records back to pending with fresh attempts; answers how many
    moved (a record that changed meanwhile, or whose task is gone, is left alone)."""
    moved = 0
    for kv in kvs:
        parsed = ks.parse(kv.key)
        if parsed is None or parsed.task_id is None:
            continue
        rec = Record.from_json(State.FAILED, kv.value)
        pending = Record(
            state=State.PENDING,
            attempts=0,
            options=rec.options,
            since_at=time.time(),
            reason="created",
        )
        txn = Txn(
            compare=(
                Compare.modified_at(kv.key, kv.mod_revision),
                Compare(ks.task(parsed.task_id), Target.VERSION, Op.GREATER, 0),
            ),
            success=(
                Delete(kv.key),
                Put(ks.state(State.PENDING, parsed.task_id), pending.to_json()),
                Touch(ks.task(parsed.task_id), 0),  # no longer expires
            ),
        )
        if (await etcd.txn(txn)).succeeded:
            moved += 1
    return moved


async def cancel_record(
    etcd: Etcd, ks: Keyspace, kv: KeyValue, state: State, *, by: str = "tmctl"
) -> bool:
    """Move a pending, delayed or processing record to failed as ``Cancelled``; False if
    it moved meanwhile."""
    parsed = ks.parse(kv.key)
    if parsed is None or parsed.task_id is None:
        return False
    rec = Record.from_json(state, kv.value)
    failed = Record(
        state=State.FAILED,
        attempts=rec.attempts,
        options=rec.options,
        since_at=time.time(),
        error=TaskError(
            type="Cancelled", message=f"cancelled by an operator ({by})", retryable=False
        ),
    )
    txn = Txn(
        compare=(Compare.modified_at(kv.key, kv.mod_revision),),
        success=(
            Delete(kv.key),
            Put(ks.state(State.FAILED, parsed.task_id), failed.to_json()),
        ),
    )
    return (await etcd.txn(txn)).succeeded


async def purge_records(etcd: Etcd, ks: Keyspace, kvs: Iterable[KeyValue]) -> int:
    """Delete these completed or failed records and their tasks; answers how many went."""
    purged = 0
    for kv in kvs:
        parsed = ks.parse(kv.key)
        if parsed is None or parsed.task_id is None:
            continue
        txn = Txn(
            compare=(Compare.modified_at(kv.key, kv.mod_revision),),
            success=(Delete(kv.key), Delete(ks.task(parsed.task_id))),
        )
        if (await etcd.txn(txn)).succeeded:
            purged += 1
    return purged


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


async def run(args: argparse.Namespace) -> int:
    """Run one command; answers the exit code."""
    endpoints = tuple(e.strip() for e in args.etcd.split(",") if e.strip())
    if not endpoints:
        print("tmctl: give --etcd (or TM_ETCD): the etcd the sidecars use", file=sys.stderr)
        return 2
    etcd = Etcd(
        EtcdConfig(
            endpoints=endpoints,
            ca_file=args.etcd_ca,
            cert_file=args.etcd_cert,
            key_file=args.etcd_key,
            username=args.etcd_user,
            password=args.etcd_password,
        )
    )
    ctl = Ctl(etcd, Keyspace(namespace=args.namespace), args.json)
    try:
        match args.command:
            case "status":
                await ctl.status()
            case "leader":
                leader = await ctl.leader()
                ctl.out({"leader": leader}, [["LEADER"], [leader or "-"]])
            case "ls":
                await ctl.ls(State(args.state), args.limit)
            case "show":
                return await ctl.show(args.task_id)
            case "retry":
                return await ctl.retry(args.task_id, args.all_failed)
            case "cancel":
                return await ctl.cancel(args.task_id)
            case "purge":
                await ctl.purge(State(args.state))
            case "events":
                await ctl.events()
        return 0
    except TaskManagerError as exc:
        print(f"tmctl: {exc}", file=sys.stderr)
        return 1
    finally:
        await etcd.aclose()


def main(argv: Sequence[str] | None = None) -> None:
    """The console script."""
    args = build_parser().parse_args(argv)
    try:
        sys.exit(trio.run(run, args))
    except KeyboardInterrupt:
        sys.exit(130)
