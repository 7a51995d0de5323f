"""tmctl's commands: each one reads or repairs the namespace over one etcd connection and
prints what it found or did, as a table for people or JSON for scripts (``--json``).

The reads are :class:`~tm_sidecar.admin.Queries`'; the repairs are ``tm_sidecar.admin``'s
and the sidecar's own functions, so that tmctl makes the moves the dashboard and the
daemon make. The tables are built in ``_tmctl_format.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import aclosing
from typing import Any

import attrs

from .._errors import EtcdError
from ..admin import QUEUE_STATES, cancel_record, purge_records, retry_failed
from ..core import (
    EventDeriver,
    KeyValue,
    QueueConfig,
    Record,
    State,
    TaskId,
    etcd_version_warning,
    with_limits,
)
from ..etcd import EtcdConfig, connect
from ..leader import sweep_payloads
from ..node._sidecar import update_queue
from ._tmctl_format import (
    capacity_by_queue,
    limit_changes,
    queue_table,
    show_table,
    unserved,
    utc_time,
    workers_table,
    yes,
)
from ._tmctl_schedules import Commands


class Ctl(Commands):
    """The commands, over one etcd connection (the schedules' in ``Commands``)."""

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
        capacity = capacity_by_queue(nodes)
        for queue in capacity:
            queues.setdefault(queue, dict.fromkeys(QUEUE_STATES, 0))
        paused = await self.paused_queues()
        for queue in paused:
            queues.setdefault(queue, dict.fromkeys(QUEUE_STATES, 0))
        for queue, row in queues.items():
            row["capacity"] = capacity.get(queue, 0)
            if queue in paused:
                row["paused"] = 1
        warnings = unserved(queues, capacity)
        etcd_version = str((await self.etcd.status()).get("version") or "unknown")
        version_warning = etcd_version_warning(etcd_version)
        leader = await self.leader()
        data = {
            "namespace": self.ks.namespace,
            "etcd_version": etcd_version,
            "etcd_version_warning": version_warning,
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
            print(f"etcd: {etcd_version}")
            if version_warning is not None:
                print(f"warning: {version_warning}")
            print("tasks: " + "  ".join(f"{k}={v}" for k, v in depths.items()))
            # A PAUSED column only when a queue is paused.
            flag = ["PAUSED"] if paused else []
            rows = [["QUEUE", *(s.upper() for s in QUEUE_STATES), "CAPACITY", *flag]]
            for queue, row in queues.items():
                cells = [str(row[k]) for k in (*QUEUE_STATES, "capacity")]
                mark = [yes(bool(row.get("paused")))] if paused else []
                rows.append([queue, *cells, *mark])
            if len(rows) > 1:
                self.out(None, rows)
            for warning in warnings:
                print(f"warning: {warning}")
            print()
        self.out(data, table if nodes else [["NODE"], ["(no sidecar registered)"]])

    async def ls(
        self,
        state: State,
        limit: int,
        queue: str | None = None,
        older_than_s: float | None = None,
    ) -> None:
        kvs, _ = await self.etcd.list_prefix(self.ks.state_prefix(state))
        # In this state since before the cut-off (``--older-than``).
        cutoff = time.time() - older_than_s if older_than_s is not None else None
        rows: list[tuple[TaskId, Record]] = []
        waiting: dict[str, dict[str, int]] = {}
        for kv in kvs:
            parsed = self.ks.parse(kv.key)
            if parsed is None or parsed.task_id is None:
                continue
            rec = Record.from_json(state, kv.value)
            if queue is not None and rec.options.queue != queue:
                continue
            if cutoff is not None and rec.since_at > cutoff:
                continue
            row = waiting.setdefault(rec.options.queue, dict.fromkeys(QUEUE_STATES, 0))
            if state.value in row:
                row[state.value] += 1
            if len(rows) < limit:
                rows.append((parsed.task_id, rec))
        data = [{"task_id": tid, **json.loads(rec.to_json())} for tid, rec in rows]
        table = [["TASK", "QUEUE", "ATTEMPTS", "SINCE", "DETAIL"]]
        for tid, rec in rows:
            error = f"{rec.error.type}: {rec.error.message}" if rec.error else ""
            # (a final record names its last node too: its error says more)
            detail = rec.node if state is State.PROCESSING and rec.node else error
            if rec.due_at:
                detail = f"due {utc_time(rec.due_at)}"
            table.append(
                [tid, rec.options.queue, str(rec.attempts), utc_time(rec.since_at), detail[:60]]
            )
        self.out(data, table)
        if state in (State.PENDING, State.DELAYED) and waiting:
            # On stderr: the listing itself stays a table (or JSON) for the next command.
            for warning in unserved(waiting, capacity_by_queue(await self.nodes())):
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
        self.out(data, show_table(task_id, state, spec, rec))
        if rec is not None and rec.error is not None and rec.error.traceback:
            print("\n" + rec.error.traceback.rstrip())
        return 0

    async def retry(self, task_id: str | None, all_failed: bool, queue: str | None = None) -> int:
        if all_failed or queue is not None:
            kvs = await self.records(State.FAILED, queue)
        else:
            kv = await self.etcd.get(self.ks.state(State.FAILED, TaskId(task_id or "")))
            if kv is None:
                print(f"tmctl: task {task_id} is not in the failed queue", file=sys.stderr)
                return 1
            kvs = [kv]
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
        self.out({queue: config.to_obj()}, [["QUEUE", "PAUSED"], [queue, yes(config.paused)]])
        return 0

    async def limit(self, queue: str, args: argparse.Namespace) -> int:
        try:
            changes = limit_changes(args)
            with_limits(QueueConfig(), changes)
        except ValueError as exc:
            print(f"tmctl: {exc}", file=sys.stderr)
            return 2
        config = await update_queue(
            self.etcd, self.ks, queue, lambda c: with_limits(c, changes), now=time.time()
        )
        self.out({queue: config.to_obj()}, queue_table({queue: config}))
        return 0

    async def queues(self) -> None:
        kvs, _ = await self.etcd.list_prefix(self.ks.queues())
        configs = {}
        for kv in kvs:
            parsed = self.ks.parse(kv.key)
            if parsed is not None and parsed.name is not None:
                configs[parsed.name] = QueueConfig.from_json(kv.value)
        self.out({name: c.to_obj() for name, c in configs.items()}, queue_table(configs))

    async def records(self, state: State, queue: str | None = None) -> list[KeyValue]:
        """The records in ``state`` (of one queue, or all)."""
        kvs, _ = await self.etcd.list_prefix(self.ks.state_prefix(state))
        if queue is None:
            return list(kvs)
        return [kv for kv in kvs if Record.from_json(state, kv.value).options.queue == queue]

    async def workers(self) -> None:
        """The live sidecars and their registered workers, per queue."""
        procs, _ = await self.etcd.list_prefix(self.ks.state_prefix(State.PROCESSING))
        inflight: dict[str, int] = {}
        for kv in procs:
            parsed = self.ks.parse(kv.key)
            if parsed and parsed.node:
                inflight[parsed.node] = inflight.get(parsed.node, 0) + 1
        data, table = workers_table(await self.nodes(), inflight, await self.leader())
        self.out(data, table if data else [["NODE"], ["(no sidecar registered)"]])

    async def purge(self, state: State, queue: str | None = None) -> None:
        purged = await self._purge(state, queue)
        self.out({"purged": purged}, [["PURGED"], [str(purged)]])

    async def _purge(self, state: State, queue: str | None = None) -> int:
        """Delete every record in a final state (of one queue, or all), then its payload
        (see purge_records)."""
        return await purge_records(self.etcd, self.ks, await self.records(state, queue))

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
        await self.etcd.compact(await self.etcd.revision(self.ks.prefix))
        for url in await self.etcd.member_urls():
            member = connect(attrs.evolve(cfg, endpoints=(url,), timeout_s=max(cfg.timeout_s, 60)))
            try:
                await member.defragment()
            except EtcdError as exc:
                if "permission denied" not in str(exc):
                    raise
                # Deletes and compaction are allowed to the queue's own role; this is not.
                raise EtcdError(
                    f"{exc}: defragmenting needs etcd's root role: run it again as "
                    "tmctl --etcd-user root recover (the records are already deleted)"
                ) from None
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
        start = await self.etcd.revision(self.ks.prefix)
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
