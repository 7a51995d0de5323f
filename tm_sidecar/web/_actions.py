"""The dashboard's actions: which fields each takes, and doing them with tmctl's
functions, so that a click and a ``tmctl`` command make the same moves."""

from __future__ import annotations

from ..admin import Queries, cancel_record, purge_records, retry_failed
from ..core import State, TaskId, check_name
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
}


def action_fields(action: str, params: dict[str, str]) -> dict[str, str]:
    """The validated fields an action takes."""
    if action in ("retry", "cancel"):
        return {"task": valid_name(params.get("task", ""), "task id")}
    if action == "retry-queue":
        return {"queue": valid_name(params.get("queue", ""), "queue")}
    state = params.get("state", "")
    if state not in ("completed", "failed"):
        raise HTTPError(400, "purge takes state=completed or state=failed")
    fields = {"state": state}
    if params.get("queue"):
        fields["queue"] = valid_name(params["queue"], "queue")
    return fields


async def perform(sidecar: Sidecar, action: str, fields: dict[str, str]) -> tuple[str, str]:
    """Do a confirmed action with tmctl's function for it; answers what it did and the
    page to go back to. Refusals are :class:`HTTPError` (409 when the task is not
    where the action needs it: nothing was done)."""
    etcd, ks = sidecar.etcd, sidecar.ks
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
    if "queue" in fields:
        return f"/queues/{fields['queue']}?state={fields.get('state', 'failed')}"
    return "/"
