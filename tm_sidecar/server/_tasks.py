"""The task ops: ``create``, ``create_many``, ``get``, ``wait`` and ``cancel``, and a task
as the protocol shows it.

A ``create`` that asks to ``subscribe`` opens its subscription (``_subscriptions.py``)
before the task exists, so that none of its events can be missed.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import trio
from taskmanager.protocol import EVENT_KINDS, InvalidRequest, Unavailable

from ..core import JSON, MAX_CREATE_MANY, State, TaskOptions
from ..node._sidecar import Created, NewTask, Sidecar, TaskInfo
from ._connection import Connection
from ._requests import is_finite, read_options, read_task_id
from ._subscriptions import Subscriptions


def task_json(info: TaskInfo) -> dict[str, JSON]:
    """A task as the protocol shows it."""
    record = info.record
    obj: dict[str, JSON] = {
        "task_id": info.spec.id,
        "state": info.state.value if info.state else None,
        "payload": info.spec.payload,
        "options": info.spec.options.to_json(),
        "created_at": info.spec.created_at,
        "attempts": record.attempts if record else None,
    }
    if record is not None:
        if info.state is State.COMPLETED:
            obj["result"] = record.result
        if record.error is not None:
            obj["error"] = record.error.to_json()
        if record.node is not None:
            obj["node"] = record.node
        if record.due_at is not None:
            obj["due_at"] = record.due_at
        if record.history:
            obj["history"] = [entry.to_json() for entry in record.history]
    return obj


def _created(created: Created) -> dict[str, JSON]:
    answer: dict[str, JSON] = {"task_id": created.spec.id}
    if created.existing:
        answer["existing"] = True
    return answer


@attrs.define(eq=False)
class Tasks:
    """The task ops of one sidecar's server."""

    sidecar: Sidecar
    subscriptions: Subscriptions

    async def op_create(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        """``create``: a task, now or at ``run_at``, with its events pushed if asked."""
        options = read_options(frame.get("options") or {})
        run_at = frame.get("run_at")
        if run_at is not None and not is_finite(run_at):
            raise InvalidRequest("run_at must be a UTC epoch time in seconds")
        task_id = frame.get("task_id")
        if task_id is not None:
            task_id = read_task_id(frame)
        if not frame.get("subscribe"):
            created = await self.sidecar.create_task(
                frame.get("payload"), options=options, run_at=run_at, task_id=task_id
            )
            return _created(created)
        # Subscribed before the task exists, so that no event of it can be missed; the
        # subscription ends with the task's final event.
        task_id = task_id or self.sidecar.new_task_id()
        kinds = frame.get("events")
        if kinds is not None and (
            not isinstance(kinds, list) or not kinds or any(k not in EVENT_KINDS for k in kinds)
        ):
            raise InvalidRequest(f"events must be a list of some of {', '.join(EVENT_KINDS)}")
        chosen = frozenset(kinds) if kinds else None
        sid, sub = self.subscriptions.open(conn, task_id, until_final=True, kinds=chosen)
        try:
            created = await self.sidecar.create_task(
                frame.get("payload"), options=options, run_at=run_at, task_id=task_id
            )
        except BaseException:
            conn.subscriptions.pop(sid, None)
            sub.close()
            raise
        if created.spec.id != task_id:
            # The unique key's holder answered: follow that task instead (it may finish
            # before this subscription starts: a client reads it once to be sure).
            conn.subscriptions.pop(sid, None)
            sub.close()
            sid, _ = self.subscriptions.open(conn, created.spec.id, until_final=True, kinds=chosen)
        return {**_created(created), "subscription": sid}

    async def op_create_many(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        """``create_many``: many tasks in one request, committed in order in as few etcd
        transactions as it takes; answers their ids in order."""
        tasks = frame.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise InvalidRequest("tasks must be a non-empty list of tasks")
        if len(tasks) > MAX_CREATE_MANY:
            raise InvalidRequest(
                f"create_many takes at most {MAX_CREATE_MANY} tasks in one call, not {len(tasks)}"
            )
        defaults = frame.get("options") or {}
        if not isinstance(defaults, dict):
            raise InvalidRequest("options must be an object")
        shared = read_options(defaults)  # read once: most tasks have no options of their own
        items = [_new_task(index, item, defaults, shared) for index, item in enumerate(tasks)]
        specs = await self.sidecar.create_many(items)
        return {"task_ids": [spec.id for spec in specs]}

    async def op_get(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        """``get``: a task as it is now."""
        info = await self.sidecar.get(read_task_id(frame))
        return task_json(info)

    async def op_wait(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        """``wait``: a task once it is final (``unavailable`` after ``timeout_s``)."""
        task_id = read_task_id(frame)
        timeout = frame.get("timeout_s")
        if timeout is not None and not (
            timeout == math.inf or (is_finite(timeout) and timeout >= 0)
        ):
            raise InvalidRequest("timeout_s must be a number of seconds, 0 or more")
        try:
            info = await self.sidecar.wait(task_id, timeout)
        except trio.TooSlowError as exc:
            raise Unavailable(f"the task did not finish within {timeout} s") from exc
        return task_json(info)

    async def op_cancel(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        """``cancel``: a task that is not final yet, with a reason."""
        task_id = read_task_id(frame)
        message = frame.get("reason", "cancelled by a client")
        if not isinstance(message, str) or len(message) > 1000:
            raise InvalidRequest("reason must be a string of at most 1000 characters")
        done, info = await self.sidecar.cancel(task_id, message=message)
        answer: dict[str, JSON] = {
            "task_id": task_id,
            "cancelled": done,
            "state": info.state.value if info.state else None,
        }
        if not done:
            answer["message"] = f"task {task_id} is already {answer['state']}: nothing to cancel"
        return answer


def _new_task(index: int, item: object, defaults: dict[str, Any], shared: TaskOptions) -> NewTask:
    """Item ``index`` of a ``create_many``: its own options over the shared ones
    (``defaults``, read as ``shared``)."""
    if not isinstance(item, dict) or "payload" not in item:
        raise InvalidRequest(f"tasks[{index}] must be an object with a payload")
    unknown = set(item) - {"payload", "options", "run_at", "task_id"}
    if unknown:
        raise InvalidRequest(f"tasks[{index}]: unknown fields {sorted(unknown)}")
    own = item.get("options") or {}
    if not isinstance(own, dict):
        raise InvalidRequest(f"tasks[{index}]: options must be an object")
    try:
        options = read_options({**defaults, **own}) if own else shared
        task_id = read_task_id(item) if item.get("task_id") is not None else None
    except InvalidRequest as exc:
        raise type(exc)(f"tasks[{index}]: {exc}") from None
    run_at = item.get("run_at")
    if run_at is not None and not is_finite(run_at):
        raise InvalidRequest(f"tasks[{index}]: run_at must be a UTC epoch time in seconds")
    return NewTask(payload=item["payload"], options=options, run_at=run_at, task_id=task_id)
