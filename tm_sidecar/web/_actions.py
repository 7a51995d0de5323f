"""The dashboard's actions: which fields each takes, and doing them with tmctl's
functions, so that a click and a ``tmctl`` command make the same moves."""

from __future__ import annotations

import re
import secrets
import time

import attrs

from .._errors import InvalidRequest
from ..admin import (
    REPAIR_STATES,
    Queries,
    RepairFilter,
    cancel_record,
    purge_records,
    retry_failed,
    run_schedule_now,
)
from ..core import JSON, LIMIT_FIELDS, QueueConfig, State, TaskId, check_name, with_limits
from ..node import pausing, update_queue, update_schedule
from ..node._sidecar import Sidecar
from ._data import filter_queue


class HTTPError(Exception):
    """A request the dashboard refuses: a status and a message for the person."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


ACTIONS = {
    "retry": "Retry this failed task with fresh attempts",
    "retry-queue": "Retry every failed task of this queue with fresh attempts",
    "cancel": "Cancel this task: it goes to failed as Cancelled (a running handler is cancelled)",
    "purge": "Delete these records and their tasks for good",
    "queue-pause": "Pause this queue: the leader assigns none of its tasks until resumed "
    "(creates still land, running tasks finish)",
    "queue-resume": "Resume this queue: its tasks are assigned again",
    "queue-limits": "Set this queue's limits (an empty one is lifted)",
    "schedule-pause": "Pause this schedule: it fires nothing until resumed",
    "schedule-resume": "Resume this schedule, from its first slot after now",
    "schedule-run": "Run this schedule now: one task with its payload and options "
    "(its slots stay as they are)",
    "schedule-delete": "Delete this schedule (the tasks it made stay)",
    "bulk-retry": "Retry every task that matches, with fresh attempts",
    "bulk-cancel": "Cancel every task that matches: each goes to failed as Cancelled",
    "bulk-purge": "Delete every record that matches, and its task, for good",
}
#: The fields of a repair by filter (besides the queue and the state).
FILTER_FIELDS = ("error_type", "text", "older_than_s")
#: A rate as the limits form takes it: ``5/2s`` (5 starts in any 2 seconds), ``5/2``.
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)\s*s?\s*$")
#: A once-per-confirmation id (a run now, a repair by filter): a second POST of the
#: same form does the work once.
_ONCE = re.compile(r"^[A-Za-z0-9]{4,12}$")


def action_fields(action: str, params: dict[str, str]) -> dict[str, str]:
    """The validated fields an action takes."""
    if action in ("retry", "cancel"):
        return {"task": valid_name(params.get("task", ""), "task id")}
    if action == "retry-queue" or action in ("queue-pause", "queue-resume"):
        return {"queue": valid_name(params.get("queue", ""), "queue")}
    if action == "queue-limits":
        fields = {"queue": valid_name(params.get("queue", ""), "queue")}
        for name in LIMIT_FIELDS:
            fields[name] = params.get(name, "").strip()
        limit_changes(fields)  # refused here, before the confirmation
        return fields
    if action.startswith("schedule-"):
        fields = {"schedule": valid_name(params.get("schedule", ""), "schedule")}
        if action == "schedule-run":
            fields["run"] = once_id(params.get("run"))
        return fields
    if action.startswith("bulk-"):
        return filter_fields(action, params)
    state = params.get("state", "")
    if state not in ("completed", "failed"):
        raise HTTPError(400, "purge takes state=completed or state=failed")
    fields = {"state": state}
    if params.get("queue"):
        fields["queue"] = valid_name(params["queue"], "queue")
    return fields


def once_id(given: str | None) -> str:
    """The id of one confirmation: the one given (checked), or a new one for a new
    confirmation page."""
    if given is None or given == "":
        return secrets.token_hex(6)
    if not _ONCE.match(given):
        raise HTTPError(400, "that is not this form's id (4 to 12 letters and digits)")
    return given


def limit_changes(fields: dict[str, str]) -> dict[str, JSON]:
    """The limits form as ``with_limits`` takes it: a number, a rate (``5/2s``), or
    empty to lift; a 400 for anything else."""
    changes: dict[str, JSON] = {}
    for name in LIMIT_FIELDS:
        text = fields.get(name, "")
        if not text:
            changes[name] = None
        elif name in ("rate", "key_rate"):
            found = _RATE.match(text)
            if found is None:
                raise HTTPError(400, f"{name}: a rate is starts/seconds, as in 5/2s")
            changes[name] = {"limit": int(found.group(1)), "period_s": float(found.group(2))}
        elif text.isdigit():
            changes[name] = int(text)
        else:
            raise HTTPError(400, f"{name}: a whole number >= 1, or empty to lift it")
    try:
        with_limits(QueueConfig(), changes)
    except (ValueError, TypeError) as exc:
        raise HTTPError(400, str(exc)) from None
    return changes


def filter_fields(action: str, params: dict[str, str]) -> dict[str, str]:
    """The validated fields of a repair by filter."""
    repair = action.removeprefix("bulk-")
    fields = {
        "queue": valid_name(params.get("queue", ""), "queue"),
        "state": params.get("state", ""),
    }
    allowed = [s.value for s in REPAIR_STATES[repair]]
    if fields["state"] not in allowed:
        raise HTTPError(400, f"{repair} by filter takes state={' or state='.join(allowed)}")
    for name in FILTER_FIELDS:
        fields[name] = params.get(name, "").strip()
    repair_filter(fields)  # refused here, before the confirmation
    fields["job"] = once_id(params.get("job"))
    return fields


def repair_filter(fields: dict[str, str]) -> RepairFilter:
    """The filter of a repair's fields; a 400 for a bad one."""
    age = fields.get("older_than_s", "")
    try:
        return RepairFilter(
            queue=fields["queue"],
            state=State(fields["state"]),
            error_type=fields.get("error_type", ""),
            text=fields.get("text", ""),
            older_than_s=float(age) if age else 0.0,
        )
    except ValueError as exc:
        raise HTTPError(400, f"bad filter: {exc}") from None


async def perform(sidecar: Sidecar, action: str, fields: dict[str, str]) -> tuple[str, str]:
    """Do a confirmed action with tmctl's function for it; answers what it did and the
    page to go back to. Refusals are :class:`HTTPError` (409 when the task is not
    where the action needs it: nothing was done). Repairs by filter are not done here
    but by the dashboard's jobs (they take a while)."""
    etcd, ks = sidecar.etcd, sidecar.ks
    if action.startswith(("queue-", "schedule-")):
        return await flow_action(sidecar, action, fields)
    if action == "retry":
        task_id = TaskId(fields["task"])
        kv = await etcd.get(ks.state(State.FAILED, task_id))
        if kv is None:
            raise HTTPError(409, f"task {task_id} is not in the failed queue: nothing was done")
        moved = await retry_failed(etcd, ks, [kv])
        if not moved:
            raise HTTPError(409, f"task {task_id} moved meanwhile: nothing was done")
        return f"Task {task_id} sent back to pending with fresh attempts.", f"/tasks/{task_id}"
    if action == "cancel":
        task_id = TaskId(fields["task"])
        _, state, kv = await Queries(etcd, ks).find(task_id)
        if kv is None or state is None or state in (State.COMPLETED, State.FAILED):
            raise HTTPError(
                409, f"task {task_id} is not pending, delayed or running: nothing was done"
            )
        if not await cancel_record(etcd, ks, kv, state, by="dashboard"):
            raise HTTPError(409, f"task {task_id} moved meanwhile: nothing was done")
        return f"Task {task_id} cancelled.", f"/tasks/{task_id}"
    if action == "retry-queue":
        queue = fields["queue"]
        kvs, _ = await etcd.list_prefix(ks.state_prefix(State.FAILED))
        moved = await retry_failed(etcd, ks, filter_queue(kvs, State.FAILED, queue))
        return (
            f"{moved} failed task{'s' if moved != 1 else ''} of {queue} sent back to pending.",
            f"/queues/{queue}?state=pending",
        )
    state = State(fields["state"])
    queue_or_none = fields.get("queue")
    kvs, _ = await etcd.list_prefix(ks.state_prefix(state))
    purged = await purge_records(etcd, ks, filter_queue(kvs, state, queue_or_none))
    where = f" of {queue_or_none}" if queue_or_none else ""
    back = f"/queues/{queue_or_none}?state={state.value}" if queue_or_none else "/"
    return f"{purged} {state.value} record{'s' if purged != 1 else ''}{where} purged.", back


async def flow_action(sidecar: Sidecar, action: str, fields: dict[str, str]) -> tuple[str, str]:
    """Pause, resume or limit a queue; pause, resume, run or delete a schedule: with the
    shared settings code tmctl uses (``node._queues``) and ``admin.run_schedule_now``."""
    etcd, ks, now = sidecar.etcd, sidecar.ks, time.time()
    if action in ("queue-pause", "queue-resume", "queue-limits"):
        queue = fields["queue"]
        if action == "queue-limits":
            changes = limit_changes(fields)
            await update_queue(etcd, ks, queue, lambda c: with_limits(c, changes), now=now)
            return f"Limits of queue {queue} set.", f"/queues/{queue}"
        paused = action == "queue-pause"
        await update_queue(etcd, ks, queue, lambda c: attrs.evolve(c, paused=paused), now=now)
        return f"Queue {queue} {'paused' if paused else 'resumed'}.", f"/queues/{queue}"
    name = fields["schedule"]
    if action == "schedule-delete":
        if not await etcd.delete(ks.schedule(name)):
            raise HTTPError(409, f"there is no schedule {name!r}: nothing was done")
        return f"Schedule {name} deleted.", "/schedules"
    if action == "schedule-run":
        run = await run_schedule_now(etcd, ks, name, fields["run"], now=now)
        if run is None:
            raise HTTPError(409, f"there is no schedule {name!r}: nothing was done")
        if not run.created:
            return f"Schedule {name} was run already by this form: task {run.task_id}.", (
                f"/tasks/{run.task_id}"
            )
        return f"Schedule {name} run now: task {run.task_id}.", f"/tasks/{run.task_id}"
    paused = action == "schedule-pause"
    try:
        await update_schedule(etcd, ks, name, pausing(name, paused, now=now))
    except InvalidRequest as exc:
        raise HTTPError(409, f"{exc}: nothing was done") from None
    return f"Schedule {name} {'paused' if paused else 'resumed'}.", "/schedules"


def valid_name(value: str, kind: str) -> str:
    """``check_name``, refused as a 400 for the person."""
    try:
        return check_name(kind, value)
    except ValueError as exc:
        raise HTTPError(400, str(exc)) from None


def back_to(action: str, fields: dict[str, str]) -> str:
    """Where a person goes back to from an action's confirmation."""
    if "task" in fields:
        return f"/tasks/{fields['task']}"
    if "schedule" in fields:
        return "/schedules"
    if action.startswith("queue-"):
        return f"/queues/{fields['queue']}"
    if "queue" in fields:
        return f"/queues/{fields['queue']}?state={fields.get('state', 'failed')}"
    return "/"
