"""``tmctl``: look at and repair tm-sidecar's queues, straight from etcd (no sidecar needed).

With no ``--etcd``, it finds the embedded etcd of a sidecar on this host by its data
directory (the same default as the sidecar's, or ``--data-dir`` / ``TM_DATA_DIR``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from contextlib import aclosing
from typing import Any

import attrs
import trio

from .._errors import EtcdUnavailable, TaskManagerError
from ..admin import QUEUE_STATES, Queries, cancel_record, purge_records, retry_failed
from ..core import (
    EventDeriver,
    Keyspace,
    NodeInfo,
    QueueConfig,
    RateLimit,
    Record,
    Schedule,
    State,
    TaskId,
    TaskOptions,
    TaskSpec,
    schedule_from_request,
    with_limits,
)
from ..etcd import Etcd, EtcdConfig, connect
from ..leader._leading import sweep_payloads
from ..node._sidecar import pausing, update_queue, update_schedule
from ._embedded import PORTS_FILE
from ._settings import Settings, add_flags, load_settings

STATES = [s.value for s in State]


def build_parser() -> argparse.ArgumentParser:
    """tmctl's arguments: its connection settings are the sidecar's (the same table, the
    same TM_* variables, the same --config file), then the command."""
    p = argparse.ArgumentParser(prog="tmctl", description=__doc__)
    add_flags(p, "tmctl")
    p.add_argument("--json", action="store_true", help="JSON output for scripts")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="leader, nodes with capacity and in-flight counts, queue depths")
    sub.add_parser("leader", help="the leading node")
    sub.add_parser(
        "endpoint",
        help="print the etcd URL tmctl uses (the embedded etcd's, found by --data-dir, or "
        "--etcd): export ETCDCTL_ENDPOINTS=$(tmctl endpoint)",
    )
    ls = sub.add_parser("ls", help="tasks in one state")
    ls.add_argument("state", choices=STATES)
    ls.add_argument("--limit", type=int, default=100)
    ls.add_argument("--queue", help="only the tasks of this queue")
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
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    recover = sub.add_parser(
        "recover",
        help="recover a full etcd (NOSPACE alarm): delete completed records and their "
        "payloads with plain deletes, compact, defragment every member, disarm the alarm",
    )
    recover.add_argument("--include-failed", action="store_true", help="delete failed records too")
    recover.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    sub.add_parser("events", help="print task events as they happen (Ctrl-C stops)")
    pause = sub.add_parser(
        "pause", help="pause a queue cluster-wide: nothing more is assigned from it"
    )
    pause.add_argument("queue")
    resume = sub.add_parser("resume", help="resume a paused queue")
    resume.add_argument("queue")
    sub.add_parser("queues", help="every queue's flow control: paused, limits")
    limit = sub.add_parser(
        "limit",
        help="set a queue's cluster-wide limits (each flag given is set; 'none' lifts it)",
    )
    limit.add_argument("queue")
    limit.add_argument("--max-running", help="tasks of the queue running at once, or none")
    limit.add_argument("--per-key", help="tasks running at once per concurrency key, or none")
    limit.add_argument("--rate", help="starts per period, e.g. 100/60s (or none)")
    limit.add_argument("--key-rate", help="starts per period per concurrency key (or none)")
    sub.add_parser("schedules", help="every schedule: cron or interval, next slot, fired")
    sched = sub.add_parser(
        "schedule", help="create or replace a schedule: a task at each slot, fired once"
    )
    sched.add_argument("name")
    when = sched.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", help="a cron expression, e.g. '*/5 * * * *'")
    when.add_argument("--every", type=float, help="an interval in seconds")
    sched.add_argument("--tz", default="UTC", help="the cron's time zone (IANA name)")
    sched.add_argument("--payload", default="null", help="the tasks' payload, as JSON")
    sched.add_argument("--queue", default="default", help="the tasks' queue")
    sched.add_argument(
        "--missed", default="one", choices=["skip", "one", "all"], help="slots missed by downtime"
    )
    for name, what in (
        ("pause-schedule", "fire nothing more until resumed"),
        ("resume-schedule", "fire again, from the first slot after now"),
        ("unschedule", "delete a schedule (its tasks stay)"),
    ):
        sub.add_parser(name, help=what).add_argument("name")
    return p


class Ctl(Queries):
    """The commands, over one etcd connection."""

    def __init__(self, etcd: Etcd, ks: Keyspace, as_json: bool) -> None:
        super().__init__(etcd, ks)
        self.as_json = as_json

    def out(self, data: Any, table: list[list[str]] | None = None) -> None:
        if self.as_json or table is None:
            print(json.dumps(data, indent=2, default=str))
            return
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        for row in table:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())

    async def status(self) -> None:
        depths = {s.value: await self.count(s) for s in State}
        nodes = await self.nodes()
        procs, _ = await self.etcd.list_prefix(self.ks.state_prefix(State.PROCESSING))
        inflight: dict[str, int] = {}
        for kv in procs:
            parsed = self.ks.parse(kv.key)
            if parsed and parsed.node:
                inflight[parsed.node] = inflight.get(parsed.node, 0) + 1
        queues = await self.queue_depths(procs)
        capacity = _capacity(nodes)
        for queue in capacity:
            queues.setdefault(queue, dict.fromkeys(QUEUE_STATES, 0))
        paused = await self.paused_queues()
        for queue in paused:
            queues.setdefault(queue, dict.fromkeys(QUEUE_STATES, 0))
        for queue, row in queues.items():
            row["capacity"] = capacity.get(queue, 0)
            if queue in paused:
                row["paused"] = 1
        warnings = _unserved(queues, capacity)
        leader = await self.leader()
        data = {
            "namespace": self.ks.namespace,
            "leader": leader,
            "depths": depths,
            "queues": queues,
            "warnings": warnings,
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
            print("tasks: " + "  ".join(f"{k}={v}" for k, v in depths.items()))
            # A PAUSED column only when a queue is paused.
            flag = ["PAUSED"] if paused else []
            rows = [["QUEUE", *(s.upper() for s in QUEUE_STATES), "CAPACITY", *flag]]
            for queue, row in queues.items():
                cells = [str(row[k]) for k in (*QUEUE_STATES, "capacity")]
                mark = [_yes(bool(row.get("paused")))] if paused else []
                rows.append([queue, *cells, *mark])
            if len(rows) > 1:
                self.out(None, rows)
            for warning in warnings:
                print(f"warning: {warning}")
            print()
        self.out(data, table if nodes else [["NODE"], ["(no sidecar registered)"]])

    async def ls(self, state: State, limit: int, queue: str | None = None) -> None:
        kvs, _ = await self.etcd.list_prefix(self.ks.state_prefix(state))
        rows: list[tuple[TaskId, Record]] = []
        waiting: dict[str, dict[str, int]] = {}
        for kv in kvs:
            parsed = self.ks.parse(kv.key)
            if parsed is None or parsed.task_id is None:
                continue
            rec = Record.from_json(state, kv.value)
            if queue is not None and rec.options.queue != queue:
                continue
            row = waiting.setdefault(rec.options.queue, dict.fromkeys(QUEUE_STATES, 0))
            if state.value in row:
                row[state.value] += 1
            if len(rows) < limit:
                rows.append((parsed.task_id, rec))
        data = [{"task_id": tid, **json.loads(rec.to_json())} for tid, rec in rows]
        table = [["TASK", "QUEUE", "ATTEMPTS", "SINCE", "DETAIL"]]
        for tid, rec in rows:
            detail = rec.node or (f"{rec.error.type}: {rec.error.message}" if rec.error else "")
            if rec.due_at:
                detail = f"due {_when(rec.due_at)}"
            table.append(
                [tid, rec.options.queue, str(rec.attempts), _when(rec.since_at), detail[:60]]
            )
        self.out(data, table)
        if state in (State.PENDING, State.DELAYED) and waiting:
            # On stderr: the listing itself stays a table (or JSON) for the next command.
            for warning in _unserved(waiting, _capacity(await self.nodes())):
                print(f"tmctl: warning: {warning}", file=sys.stderr)

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
        if self.as_json:
            self.out(data)
            return 0
        rec = Record.from_json(state, kv.value) if kv is not None and state is not None else None
        self.out(data, _show_table(task_id, state, spec, rec))
        if rec is not None and rec.error is not None and rec.error.traceback:
            print("\n" + rec.error.traceback.rstrip())
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
        spec, state, kv = await self.find(task_id)
        if kv is None or state is None:
            what = "has no state record" if spec is not None else "not found"
            print(f"tmctl: task {task_id} {what}", file=sys.stderr)
            return 1
        if state in (State.COMPLETED, State.FAILED):
            print(
                f"tmctl: task {task_id} is already {state.value}: only a pending, delayed or "
                "running task can be cancelled",
                file=sys.stderr,
            )
            return 1
        ok = await cancel_record(self.etcd, self.ks, kv, state)
        if not ok:
            print(f"tmctl: task {task_id} moved meanwhile; look again", file=sys.stderr)
            return 1
        self.out({"cancelled": task_id}, [["CANCELLED"], [task_id]])
        return 0

    async def set_paused(self, queue: str, paused: bool) -> int:
        config = await update_queue(
            self.etcd, self.ks, queue, lambda c: attrs.evolve(c, paused=paused), now=time.time()
        )
        self.out({queue: config.to_obj()}, [["QUEUE", "PAUSED"], [queue, _yes(config.paused)]])
        return 0

    async def limit(self, queue: str, args: argparse.Namespace) -> int:
        try:
            changes = _limit_changes(args)
            with_limits(QueueConfig(), changes)
        except ValueError as exc:
            print(f"tmctl: {exc}", file=sys.stderr)
            return 2
        config = await update_queue(
            self.etcd, self.ks, queue, lambda c: with_limits(c, changes), now=time.time()
        )
        self.out({queue: config.to_obj()}, _queue_table({queue: config}))
        return 0

    async def schedules(self) -> None:
        kvs, _ = await self.etcd.list_prefix(self.ks.schedules())
        found = [Schedule.from_json(kv.value) for kv in kvs]
        table = [["SCHEDULE", "WHEN", "TZ", "NEXT", "FIRED", "MISSED", "PAUSED", "QUEUE"]]
        for s in found:
            when = s.cron if s.cron is not None else f"every {s.every_s:g} s"
            table.append(
                [
                    s.name,
                    when,
                    s.timezone,
                    _when(s.next_at),
                    str(s.fired),
                    s.missed,
                    _yes(s.paused),
                    s.options.queue,
                ]
            )
        self.out([s.to_obj() for s in found], table)

    async def set_schedule(self, args: argparse.Namespace) -> int:
        try:
            fields = {
                "name": args.name,
                "cron": args.cron,
                "every_s": args.every,
                "timezone": args.tz,
                "payload": json.loads(args.payload),
                "options": TaskOptions(queue=args.queue),
                "missed": args.missed,
            }
            new = schedule_from_request(fields, now=time.time())
        except (ValueError, TypeError) as exc:
            print(f"tmctl: bad schedule: {exc}", file=sys.stderr)
            return 2

        def replace(old: Schedule | None) -> Schedule:
            if old is None:
                return new
            return attrs.evolve(new, fired=old.fired, last_slot_at=old.last_slot_at)

        schedule = await update_schedule(self.etcd, self.ks, new.name, replace)
        assert schedule is not None
        self.out(
            schedule.to_obj(), [["SCHEDULE", "NEXT"], [schedule.name, _when(schedule.next_at)]]
        )
        return 0

    async def pause_schedule(self, name: str, paused: bool) -> int:
        try:
            schedule = await update_schedule(
                self.etcd, self.ks, name, pausing(name, paused, now=time.time())
            )
        except TaskManagerError as exc:
            print(f"tmctl: {exc}", file=sys.stderr)
            return 1
        assert schedule is not None
        rows = [["SCHEDULE", "PAUSED", "NEXT"], [name, _yes(paused), _when(schedule.next_at)]]
        self.out(schedule.to_obj(), rows)
        return 0

    async def unschedule(self, name: str) -> int:
        deleted = bool(await self.etcd.delete(self.ks.schedule(name)))
        if not deleted:
            print(f"tmctl: no schedule {name!r}", file=sys.stderr)
            return 1
        self.out({"deleted": name}, [["DELETED"], [name]])
        return 0

    async def queues(self) -> None:
        kvs, _ = await self.etcd.list_prefix(self.ks.queues())
        configs = {}
        for kv in kvs:
            parsed = self.ks.parse(kv.key)
            if parsed is not None and parsed.name is not None:
                configs[parsed.name] = QueueConfig.from_json(kv.value)
        self.out({name: c.to_obj() for name, c in configs.items()}, _queue_table(configs))

    async def purge(self, state: State) -> None:
        purged = await self._purge(state)
        self.out({"purged": purged}, [["PURGED"], [str(purged)]])

    async def _purge(self, state: State) -> int:
        """Delete every record in a final state, then its payload (see purge_records)."""
        kvs, _ = await self.etcd.list_prefix(self.ks.state_prefix(state))
        return await purge_records(self.etcd, self.ks, kvs)

    async def _space(self) -> dict[str, Any]:
        status = await self.etcd.status()
        return {
            "db_size": int(status.get("dbSize") or 0),
            "db_size_in_use": int(status.get("dbSizeInUse") or status.get("dbSize") or 0),
            "alarms": [name for _, name in await self.etcd.alarms()],
        }

    async def recover(self, cfg: EtcdConfig, include_failed: bool) -> None:
        """Free space in a full etcd and let it take writes again."""
        before = await self._space()
        purged = await self._purge(State.COMPLETED)
        if include_failed:
            purged += await self._purge(State.FAILED)
        # Payloads whose record expired, which the leader would sweep in time (a full
        # etcd grants no lease, so there may be no leader to do it).
        purged += await sweep_payloads(self.etcd, self.ks)
        # Compaction drops the deleted values' history; defragmenting gives the space
        # back to the file; both work over quota. Then the alarm can go.
        await self.etcd.compact(await self.etcd.revision())
        for url in await self.etcd.member_urls():
            member = connect(attrs.evolve(cfg, endpoints=(url,), timeout_s=max(cfg.timeout_s, 60)))
            try:
                await member.defragment()
            finally:
                await member.aclose()
        for member_id, alarm in await self.etcd.alarms():
            if alarm == "NOSPACE":
                await self.etcd.disarm(member_id, alarm)
        after = await self._space()
        report = {
            "purged": purged,
            **{f"{k}_before": v for k, v in before.items()},
            **{f"{k}_after": v for k, v in after.items()},
        }
        self.out(
            report,
            [
                ["PURGED", "IN USE BEFORE", "IN USE AFTER", "FILE AFTER", "ALARMS AFTER"],
                [
                    str(purged),
                    str(before["db_size_in_use"]),
                    str(after["db_size_in_use"]),
                    str(after["db_size"]),
                    ",".join(after["alarms"]) or "-",
                ],
            ],
        )

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


#: The states of unfinished tasks, shown per queue.


def _capacity(nodes: Sequence[NodeInfo]) -> dict[str, int]:
    """Registered concurrency per queue, summed over the live sidecars."""
    capacity: dict[str, int] = {}
    for node in nodes:
        for queue, cap in node.capacity.items():
            capacity[queue] = capacity.get(queue, 0) + cap
    return capacity


def _unserved(queues: dict[str, dict[str, int]], capacity: dict[str, int]) -> list[str]:
    """A sentence for each queue with work waiting and no worker registered for it."""
    out = []
    for queue, row in queues.items():
        waiting = {k: row[k] for k in ("pending", "delayed") if row.get(k)}
        if waiting and not capacity.get(queue):
            what = " and ".join(f"{n} {k}" for k, n in waiting.items())
            out.append(
                f"queue {queue!r} has {what} tasks and no registered worker "
                f"(no sidecar has a handler for it)"
            )
    return out


def _show_table(
    task_id: str, state: State | None, spec: TaskSpec | None, rec: Record | None
) -> list[list[str]]:
    """One task for people: a field per line."""
    rows = [["FIELD", "VALUE"], ["task", task_id], ["state", state.value if state else "-"]]
    options = spec.options if spec is not None else rec.options if rec is not None else None
    if options is not None:
        rows.append(["queue", options.queue])
        rows.append(["priority", str(options.priority)])
        timeout = "-" if options.timeout_s is None else f"{options.timeout_s:g} s"
        rows.append(["timeout", timeout])
        if options.unique_key is not None:
            window = (
                "" if options.unique_for_s is None else f" (and {options.unique_for_s:g} s after)"
            )
            rows.append(["unique key", options.unique_key + window])
        if options.concurrency_key is not None:
            rows.append(["concurrency key", options.concurrency_key])
    if rec is not None:
        limit = f" of {options.max_attempts}" if options is not None else ""
        rows.append(["attempts", f"{rec.attempts}{limit}"])
    if spec is not None:
        rows.append(["created", _when(spec.created_at)])
        if spec.run_at is not None:
            rows.append(["run at", _when(spec.run_at)])
    if rec is not None:
        rows.append(["since", _when(rec.since_at)])
        for label, at in (("due", rec.due_at), ("started", rec.started_at)):
            if at is not None:
                rows.append([label, _when(at)])
        if rec.node is not None:
            rows.append(["node", rec.node])
        if rec.reason is not None:
            rows.append(["reason", rec.reason])
        if rec.error is not None:
            retry = "" if rec.error.retryable else " (not retryable)"
            rows.append(["error", f"{rec.error.type}: {rec.error.message}{retry}"])
        if state is State.PROCESSING and rec.progress is not None:
            rows.append(["progress", _short_json(rec.progress)])
        if state is State.COMPLETED:
            rows.append(["result", _short_json(rec.result)])
    rows.append(["payload", _short_json(spec.payload) if spec is not None else "(gone)"])
    return [[label, value.replace("\n", " ")] for label, value in rows]


def _queue_table(configs: dict[str, QueueConfig]) -> list[list[str]]:
    table = [["QUEUE", "PAUSED", "MAX RUNNING", "PER KEY", "RATE", "PER KEY RATE"]]
    for name, c in configs.items():
        table.append(
            [
                name,
                _yes(c.paused),
                _opt(c.max_running),
                _opt(c.key_max_running),
                _rate(c.rate),
                _rate(c.key_rate),
            ]
        )
    return table


def _limit_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The limits given on tmctl's command line, as the protocol's JSON."""
    changes: dict[str, Any] = {}
    for flag, name in (("max_running", "max_running"), ("per_key", "key_max_running")):
        value = getattr(args, flag)
        if value is not None:
            changes[name] = None if value == "none" else _whole(value, flag)
    for flag, name in (("rate", "rate"), ("key_rate", "key_rate")):
        value = getattr(args, flag)
        if value is not None:
            changes[name] = None if value == "none" else _parse_rate(value)
    if not changes:
        raise ValueError("give at least one of --max-running, --per-key, --rate, --key-rate")
    return changes


def _whole(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--{flag.replace('_', '-')} takes a whole number or none") from None


def _parse_rate(text: str) -> dict[str, Any]:
    """``100/60s``, ``5/1m``, ``10/1h``, ``3/2.5`` (seconds) as {limit, period_s}."""
    try:
        count, period = text.split("/", 1)
        scale = {"s": 1.0, "m": 60.0, "h": 3600.0}.get(period[-1:])
        seconds = float(period[:-1]) * scale if scale else float(period)
        return {"limit": int(count), "period_s": seconds}
    except ValueError:
        raise ValueError(f"a rate is COUNT/PERIOD, e.g. 100/60s or 5/1m, not {text!r}") from None


def _yes(flag: bool) -> str:
    return "yes" if flag else "-"


def _opt(value: int | None) -> str:
    return "-" if value is None else str(value)


def _rate(rate: RateLimit | None) -> str:
    return "-" if rate is None else f"{rate.limit}/{rate.period_s:g}s"


def _short_json(value: Any, limit: int = 300) -> str:
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters: --json shows it all)"


# The repairs, as functions of their own: the web dashboard makes them too.


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


class NoEndpoint(Exception):
    """Neither an endpoint nor an embedded etcd to be found."""


def embedded_endpoint(data_dir: str) -> str:
    """The client URL of the embedded etcd a sidecar keeps in ``data_dir``."""
    path = os.path.join(data_dir, PORTS_FILE)
    try:
        with open(path) as f:
            port = int(json.load(f)["client"])
    except FileNotFoundError:
        raise NoEndpoint(
            f"no --etcd (or TM_ETCD), and no embedded etcd in {data_dir} ({PORTS_FILE} is "
            "missing): give the etcd the sidecars use, or the sidecar's --data-dir"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise NoEndpoint(f"cannot read the embedded etcd's port from {path}: {exc}") from exc
    return f"http://127.0.0.1:{port}"


async def _confirm_purge(ctl: Ctl, state: State) -> bool:
    """Ask before deleting for good; refuse when nobody can be asked."""
    if not sys.stdin.isatty():
        print(
            f"tmctl: purge deletes every {state.value} record for good: add --yes to do it "
            "without a terminal to confirm on",
            file=sys.stderr,
        )
        return False
    count = await ctl.count(state)
    return await _ask(
        f"Delete {count} {state.value} records, and their payloads, of namespace "
        f"{ctl.ks.namespace!r}?",
        "nothing purged",
    )


async def _confirm_recover(ctl: Ctl, include_failed: bool) -> bool:
    """Ask before recovering (it deletes records for good); refuse with no terminal."""
    what = "completed and failed" if include_failed else "completed"
    if not sys.stdin.isatty():
        print(
            f"tmctl: recover deletes every {what} record for good: add --yes to do it "
            "without a terminal to confirm on",
            file=sys.stderr,
        )
        return False
    return await _ask(
        f"Delete every {what} record of namespace {ctl.ks.namespace!r} with its payload, "
        "then compact and defragment etcd and disarm its NOSPACE alarm?",
        "nothing done",
    )


async def _ask(question: str, declined: str) -> bool:
    try:
        answer = await trio.to_thread.run_sync(input, f"{question} [y/N] ")
    except EOFError:
        answer = ""
    if answer.strip().lower() in ("y", "yes"):
        return True
    print(f"tmctl: {declined}", file=sys.stderr)
    return False


async def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run one command; answers the exit code."""
    endpoints = settings.endpoints
    embedded = not endpoints
    if embedded:
        try:
            endpoints = (embedded_endpoint(settings.data_dir),)
        except NoEndpoint as exc:
            print(f"tmctl: {exc}", file=sys.stderr)
            return 2
    if args.command == "endpoint":
        print(",".join(endpoints))
        return 0
    cfg = settings.etcd_config(endpoints)
    etcd = connect(cfg)
    ctl = Ctl(etcd, Keyspace(namespace=settings.namespace), args.json)
    try:
        match args.command:
            case "status":
                await ctl.status()
            case "leader":
                leader = await ctl.leader()
                ctl.out({"leader": leader}, [["LEADER"], [leader or "-"]])
            case "ls":
                await ctl.ls(State(args.state), args.limit, args.queue)
            case "show":
                return await ctl.show(args.task_id)
            case "retry":
                return await ctl.retry(args.task_id, args.all_failed)
            case "cancel":
                return await ctl.cancel(args.task_id)
            case "purge":
                if not args.yes and not await _confirm_purge(ctl, State(args.state)):
                    return 1
                await ctl.purge(State(args.state))
            case "recover":
                if not args.yes and not await _confirm_recover(ctl, args.include_failed):
                    return 1
                await ctl.recover(cfg, args.include_failed)
            case "events":
                await ctl.events()
            case "pause" | "resume":
                return await ctl.set_paused(args.queue, args.command == "pause")
            case "queues":
                await ctl.queues()
            case "limit":
                return await ctl.limit(args.queue, args)
            case "schedules":
                await ctl.schedules()
            case "schedule":
                return await ctl.set_schedule(args)
            case "pause-schedule" | "resume-schedule":
                return await ctl.pause_schedule(args.name, args.command == "pause-schedule")
            case "unschedule":
                return await ctl.unschedule(args.name)
        return 0
    except EtcdUnavailable as exc:
        hint = f" (the embedded etcd of {settings.data_dir}: is its sidecar running?)"
        print(f"tmctl: {exc}{hint if embedded else ''}", file=sys.stderr)
        return 1
    except TaskManagerError as exc:
        print(f"tmctl: {exc}", file=sys.stderr)
        return 1
    finally:
        await etcd.aclose()


def main(argv: Sequence[str] | None = None) -> None:
    """The console script."""
    args, settings = load_settings("tmctl", build_parser(), argv)
    try:
        sys.exit(trio.run(run, args, settings))
    except KeyboardInterrupt:
        sys.exit(130)
