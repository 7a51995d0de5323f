"""Running a schedule now, outside its slots: the one shared operation behind the
dashboard's "Run now" (and a ``tmctl`` command that wants the same move).

The task it makes has the schedule's payload and options and an id derived from the
schedule and a *run id* the caller picks once per request (the dashboard: one per
confirmation page), so that the same request sent twice (a double click, a browser
resending a form) creates one task, not two.
"""

from __future__ import annotations

import re

import attrs

from ..core import (
    Compare,
    Keyspace,
    Put,
    Record,
    Schedule,
    State,
    TaskId,
    TaskSpec,
    Txn,
    check_name,
    initial_record,
)
from ..etcd import Etcd

#: A run id: short, and only characters a task id may hold.
_RUN_ID = re.compile(r"^[A-Za-z0-9]{4,12}$")


@attrs.frozen
class ScheduleRun:
    """What a run now did: the task's id, and whether this call created it (False: the
    same run id had already created it, so nothing more was done)."""

    task_id: TaskId
    created: bool


def run_task_id(schedule: Schedule, run_id: str, incarnation: int) -> TaskId:
    """The id of the task a run now makes: ``<name>.run.<run id>.<incarnation>`` (the
    schedule key's create revision, as a slot's task id has it)."""
    if not _RUN_ID.match(run_id):
        raise ValueError("a run id is 4 to 12 letters and digits")
    return TaskId(f"{schedule.name}.run.{run_id}.{incarnation:x}")


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
        task_id = run_task_id(schedule, run_id, kv.create_revision)
        spec = TaskSpec(
            id=task_id, payload=schedule.payload, options=schedule.options, created_at=now
        )
        record = initial_record(
            Record(state=State.PENDING, options=schedule.options, since_at=now),
            now=now,
            run_at=None,
        )
        txn = Txn(
            compare=(Compare.created_at(key, kv.create_revision), Compare.absent(ks.task(task_id))),
            success=(
                Put(ks.task(task_id), spec.to_json()),
                Put(ks.state(State.PENDING, task_id), record.to_json()),
            ),
        )
        if (await etcd.txn(txn)).succeeded:
            return ScheduleRun(task_id, created=True)
        if await etcd.get(ks.task(task_id)) is not None:
            return ScheduleRun(task_id, created=False)
        # The schedule was deleted (or made again) meanwhile: read it again.
