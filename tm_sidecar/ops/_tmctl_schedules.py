"""tmctl's schedule commands: list, create or replace (every option the SDK's
``schedule()`` takes), pause, resume, delete, and run a schedule now.

``Commands`` is also where tmctl's output goes through (``out``: a table for people,
JSON for scripts); ``Ctl`` in ``_tmctl_commands.py`` adds the other commands.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

import attrs

from .._errors import TaskManagerError
from ..admin import Queries, run_schedule_now
from ..core import (
    MISSED_POLICIES,
    Keyspace,
    Schedule,
    TaskOptions,
    schedule_from_request,
)
from ..etcd import Etcd
from ..node._sidecar import pausing, update_schedule
from ._tmctl_format import utc_time, yes

#: The task options tmctl's flags set, by flag destination (``--options`` sets any).
OPTION_FLAGS = {
    "queue": "queue",
    "priority": "priority",
    "max_attempts": "max_attempts",
    "timeout": "timeout_s",
    "concurrency_key": "concurrency_key",
    "max_snoozes": "max_snoozes",
}


def add_schedule_parsers(sub: Any) -> None:
    """The schedule commands' arguments (``sub``: tmctl's subparsers)."""
    sub.add_parser("schedules", help="every schedule: cron or interval, next slot, fired")
    sched = sub.add_parser(
        "schedule",
        help="create or replace a schedule: a task at each slot, fired once (every option "
        "of the SDK's schedule(): --grace, --max-catch-up, --priority, --max-attempts, "
        "--timeout, --options for the rest)",
    )
    sched.add_argument("name")
    when = sched.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", help="a cron expression, e.g. '*/5 * * * *'")
    when.add_argument("--every", type=float, help="an interval in seconds")
    sched.add_argument("--tz", default="UTC", help="the cron's time zone (IANA name)")
    sched.add_argument("--payload", default="null", help="the tasks' payload, as JSON")
    sched.add_argument(
        "--missed",
        default="one",
        choices=MISSED_POLICIES,
        help="missed slots (downtime, failover): skip drops them (the latest fires only "
        "within --grace), one coalesces them into one task, all fires each",
    )
    sched.add_argument(
        "--grace", type=float, help="seconds a slot may fire late and still count (60)"
    )
    sched.add_argument(
        "--max-catch-up", type=int, help="with --missed all: the most missed slots fired (50)"
    )
    sched.add_argument("--paused", action="store_true", help="create it paused")
    sched.add_argument(
        "--options",
        default="{}",
        help="the tasks' options as JSON (as the SDK's options=: backoff, unique keys "
        "aside, ...); the flags below override it",
    )
    sched.add_argument("--queue", help="the tasks' queue (default)")
    sched.add_argument("--priority", type=int, help="the tasks' priority (higher first)")
    sched.add_argument(
        "--max-attempts",
        "--retries",
        dest="max_attempts",
        type=int,
        help="attempts in all, as the SDK's with_retries(n) (3)",
    )
    sched.add_argument("--timeout", type=float, help="seconds an attempt may run")
    sched.add_argument("--concurrency-key", help="the tasks' concurrency key")
    sched.add_argument("--max-snoozes", type=int, help="how often a task may snooze")
    for name, what in (
        ("pause-schedule", "fire nothing more until resumed"),
        ("resume-schedule", "fire again, from the first slot after now"),
        ("unschedule", "delete a schedule (its tasks stay)"),
        (
            "run-schedule",
            "create one task now from a schedule's payload and options (its slots and "
            "next slot are left alone)",
        ),
    ):
        sub.add_parser(name, help=what).add_argument("name")


def schedule_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The ``schedule`` fields tmctl's flags give (ValueError for a bad one)."""
    options = json.loads(args.options)
    if not isinstance(options, dict):
        raise ValueError("--options is a JSON object")
    for dest, option in OPTION_FLAGS.items():
        if getattr(args, dest) is not None:
            options[option] = getattr(args, dest)
    fields: dict[str, Any] = {
        "name": args.name,
        "cron": args.cron,
        "every_s": args.every,
        "timezone": args.tz,
        "payload": json.loads(args.payload),
        "options": TaskOptions.from_json(options),
        "missed": args.missed,
        "grace_s": args.grace,
        "max_catch_up": args.max_catch_up,
        "paused": args.paused,
    }
    return fields


class Commands(Queries):
    """tmctl's output, and its schedule commands, over one etcd connection."""

    def __init__(self, etcd: Etcd, ks: Keyspace, as_json: bool) -> None:
        super().__init__(etcd, ks)
        self.as_json = as_json

    def out(self, data: Any, table: list[list[str]] | None = None) -> None:
        """Print ``data`` as JSON (``--json``, or no table), else ``table`` aligned."""
        if self.as_json or table is None:
            print(json.dumps(data, indent=2, default=str))
            return
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        for row in table:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())

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
                    utc_time(s.next_at),
                    str(s.fired),
                    s.missed,
                    yes(s.paused),
                    s.options.queue,
                ]
            )
        self.out([s.to_obj() for s in found], table)

    async def set_schedule(self, args: argparse.Namespace) -> int:
        try:
            new = schedule_from_request(schedule_fields(args), now=time.time())
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
            schedule.to_obj(), [["SCHEDULE", "NEXT"], [schedule.name, utc_time(schedule.next_at)]]
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
        rows = [["SCHEDULE", "PAUSED", "NEXT"], [name, yes(paused), utc_time(schedule.next_at)]]
        self.out(schedule.to_obj(), rows)
        return 0

    async def unschedule(self, name: str) -> int:
        deleted = bool(await self.etcd.delete(self.ks.schedule(name)))
        if not deleted:
            print(f"tmctl: no schedule {name!r}", file=sys.stderr)
            return 1
        self.out({"deleted": name}, [["DELETED"], [name]])
        return 0

    async def run_schedule(self, name: str) -> int:
        """One task now from the schedule (``admin.run_schedule_now``, as the dashboard's
        "Run now"): one transaction guarded by the schedule's create revision and the
        task's absence, its slots left alone."""
        run = await run_schedule_now(
            self.etcd, self.ks, name, f"{math.floor(time.time() * 1000):x}", now=time.time()
        )
        if run is None:
            print(f"tmctl: no schedule {name!r}", file=sys.stderr)
            return 1
        queue = await self._queue_of(name)
        self.out(
            {"task_id": run.task_id, "schedule": name, "queue": queue},
            [["TASK", "SCHEDULE", "QUEUE"], [run.task_id, name, queue]],
        )
        return 0

    async def _queue_of(self, name: str) -> str:
        kv = await self.etcd.get(self.ks.schedule(name))
        return Schedule.from_json(kv.value).options.queue if kv is not None else ""
