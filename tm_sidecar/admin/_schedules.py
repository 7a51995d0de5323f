"""Running a schedule now, outside its slots: the one shared operation behind the
dashboard's "Run now" and ``tmctl run-schedule`` (the core plans it: ``run_now``).

The task it makes has the schedule's payload and options and an id derived from the
schedule and a *run id* the caller picks once per request (the dashboard: one per
confirmation page; tmctl: the time in milliseconds), so that the same request sent twice
(a double click, a browser resending a form) creates one task, not two.
"""

from __future__ import annotations

import attrs

from ..core import Keyspace, Schedule, TaskId, check_name, run_now
from ..etcd import Etcd


@attrs.frozen
class ScheduleRun:
    """What a run now did: the task's id, and whether this call created it (False: the
    same run id had already created it, so nothing more was done)."""

    task_id: TaskId
    created: bool


async def run_schedule_now(
    etcd: Etcd, ks: Keyspace, name: str, run_id: str, *, now: float
) -> ScheduleRun | None:
    """Create one task from schedule ``name``'s payload and options now, leaving its
    slots and ``next_at`` alone; None if there is no such schedule.

    One guarded transaction: the schedule is the one read (its create revision), and
    the task's key is absent. A second call with the same ``run_id`` finds the task and
    answers it with ``created=False``.
    """
    key = ks.schedule(check_name("schedule", name))
    while True:
        kv = await etcd.get(key)
        if kv is None:
            return None
        schedule = Schedule.from_json(kv.value)
        task_id, txn = run_now(ks, kv, schedule, run_id, now)
        if (await etcd.txn(txn)).succeeded:
            return ScheduleRun(task_id, created=True)
        if await etcd.get(ks.task(task_id)) is not None:
            return ScheduleRun(task_id, created=False)
        # The schedule was deleted (or made again) meanwhile: read it again.
