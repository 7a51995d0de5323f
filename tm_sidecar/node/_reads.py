"""One task's reads: where it stands (``get``, every key at one revision), waiting for
its end (``wait``), and cancelling it (a read, then a write guarded by what was read)."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

import attrs
import trio

from .._errors import LeaseNotFound, TaskNotFound, Unavailable
from ..core import (
    Keyspace,
    KeyValue,
    Record,
    Slot,
    TaskId,
    TaskSpec,
    cancelled,
    plan_cancel,
)
from ..etcd import Etcd, read_task_keys
from ..etcd._session import RetentionLeases
from ._hub import EventHub
from ._values import TaskInfo, is_final

log = logging.getLogger("tm_sidecar")

#: How often a cancel reads and tries again when the task moves under it.
CANCEL_TRIES = 10


@attrs.define(eq=False)
class TaskReads:
    """Reads, waits for and cancels one task at a time."""

    etcd: Etcd
    ks: Keyspace
    hub: EventHub
    retention: RetentionLeases
    #: What this sidecar did for its clients, by kind (``cancelled``), for metrics.
    counters: Counter[str]
    clock: Callable[[], float] = time.time

    async def get(self, task_id: TaskId) -> TaskInfo:
        """The task and where it stands (linearizable reads of its own keys, at one
        revision, so that a task moving meanwhile is seen in one place or the other)."""
        existing, found, at = await self.read(task_id)
        if existing is None:
            raise TaskNotFound(f"no task {task_id} (it may have expired)")
        if not found:
            # A payload with no state key left: the task finished and its record expired.
            raise TaskNotFound(f"no task {task_id} (it has expired)")
        return self._info(TaskSpec.from_json(existing.value), found, at)

    def _info(self, spec: TaskSpec, kvs: list[KeyValue], revision: int) -> TaskInfo:
        for kv in kvs:
            parsed = self.ks.parse(kv.key)
            if parsed is not None and parsed.state is not None and parsed.task_id == spec.id:
                return TaskInfo(
                    spec=spec,
                    state=parsed.state,
                    record=Record.from_json(parsed.state, kv.value),
                    revision=revision,
                    kv=kv,
                )
        return TaskInfo(spec=spec, state=None, record=None, revision=revision)

    async def read(self, task_id: TaskId) -> tuple[KeyValue | None, list[KeyValue], int]:
        """The task's payload key and its state keys, all as of one revision (the third);
        no state keys when the payload is gone (the task is not found). The one task
        lookup, ``etcd.read_task_keys``, does the reading."""
        keys = await read_task_keys(self.etcd, self.ks, task_id)
        if keys.payload is None:
            return None, [], keys.revision
        return keys.payload, list(keys.states), keys.revision

    async def wait(self, task_id: TaskId, timeout_s: float | None = None) -> TaskInfo:
        """Wait until the task is completed or failed for good; answers how it ended."""
        with self.hub.subscribe(task_id, gaps=True) as sub:
            info = await self.get(task_id)
            if info.final:
                return info
            with trio.fail_after(timeout_s) if timeout_s is not None else trio.CancelScope():
                async for event in sub:
                    if is_final(event):
                        return await self.get(task_id)
                    if event.kind == "gap":
                        # The hub missed events: the outcome may be among them.
                        info = await self.get(task_id)
                        if info.final:
                            return info
        raise Unavailable("event stream ended")  # pragma: no cover - the hub runs until stopped

    async def cancel(self, task_id: TaskId, *, message: str = "cancelled") -> tuple[bool, TaskInfo]:
        """Cancel a task: answers (whether this call cancelled it, the task afterwards).

        A pending or delayed task fails at once with ``Cancelled``, for good; a running
        one too, and its node cancels the handler when it sees its assignment go. A task
        that has finished is left as it is (``False``, and how it ended). Raises
        :class:`TaskNotFound` for an unknown or expired task.
        """
        for _ in range(CANCEL_TRIES):
            info = await self.get(task_id)
            if info.final or info.kv is None or info.record is None or info.state is None:
                return False, info
            kv = info.kv
            slot = Slot(task_id, kv.key, kv.create_revision, kv.mod_revision, info.record)
            record = cancelled(info.record, now=self.clock(), message=message)
            try:
                txn = plan_cancel(self.ks, slot, record, lease=await self.retention.current())
                result = await self.etcd.txn(txn)
            except LeaseNotFound:
                self.retention.forget()
                continue
            if result.succeeded:
                self.counters["cancelled"] += 1
                log.info("task cancelled", extra={"task": task_id, "was": info.state.value})
                return True, await self.get(task_id)
            # It moved meanwhile (assigned, promoted, finished): look again.
        raise Unavailable(f"task {task_id} kept moving: could not cancel it, try again")
