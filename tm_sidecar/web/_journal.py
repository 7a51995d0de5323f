"""What this sidecar's event hub told the dashboard: each task's attempts and latest
events, the outcomes per minute, the latest events of the namespace.

etcd holds each task's spec and its *latest* state record only; the earlier attempts of
a task, and the completions per minute, are what the hub saw since this sidecar started.
The :class:`Journal` keeps them, bounded, and takes events from the hub's callback (quick,
never blocking, no I/O).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable

import attrs

from ..core import JSON, TaskError, TaskEvent, TaskId


@attrs.define
class AttemptSeen:
    """One attempt of a task as the events told it (times are when this sidecar saw them)."""

    number: int
    node: str | None = None
    assigned_at: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    outcome: str | None = None  # "completed", "failed", "retried"
    progress: JSON = None
    result: JSON = None
    error: TaskError | None = None


#: Tracebacks kept per attempt in the journal, at most (the record in etcd has the whole).
MAX_TRACEBACK = 16_000
#: Events kept per task, for its page.
EVENTS_PER_TASK = 40

#: An event as the journal keeps it: (sequence number, when seen, the event).
Seen = tuple[int, float, TaskEvent]


@attrs.define
class _TaskSeen:
    attempts: list[AttemptSeen] = attrs.Factory(list)
    queued_at: float | None = None  # when its creation was seen
    started_at: float | None = None  # when its first attempt's start was seen
    events: deque[Seen] = attrs.Factory(lambda: deque(maxlen=EVENTS_PER_TASK))


@attrs.define(eq=False)
class Journal:
    """Attempts per task, outcomes per minute and the latest events, as the hub told them."""

    max_tasks: int = 5000
    minutes_kept: int = 60
    recent_kept: int = 50
    clock: Callable[[], float] = time.time
    events_seen: int = 0
    _tasks: OrderedDict[TaskId, _TaskSeen] = attrs.Factory(OrderedDict)
    # minute (epoch // 60) -> [completed, failed for good]
    _minutes: dict[int, list[int]] = attrs.Factory(dict)
    recent: deque[tuple[float, TaskEvent]] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.recent = deque(maxlen=self.recent_kept)

    def see(self, event: TaskEvent) -> None:
        """Take in one event (the hub's callback: quick, never blocks)."""
        now = self.clock()
        self.events_seen += 1
        self.recent.append((now, event))
        if event.kind == "completed" or (event.kind == "failed" and not event.will_retry):
            minute = int(now // 60)
            counts = self._minutes.get(minute)
            if counts is None:
                counts = self._minutes[minute] = [0, 0]
                for old in [m for m in self._minutes if m <= minute - self.minutes_kept]:
                    del self._minutes[old]
            counts[0 if event.kind == "completed" else 1] += 1
        task = self._tasks.get(event.task_id)
        if task is None:
            if len(self._tasks) >= self.max_tasks:
                self._tasks.popitem(last=False)
            task = self._tasks[event.task_id] = _TaskSeen()
        else:
            self._tasks.move_to_end(event.task_id)
        task.events.append((self.events_seen, now, event))
        if event.kind == "queued":
            task.queued_at = task.queued_at or now
            return
        if event.kind == "started" and task.started_at is None:
            task.started_at = now
        attempts = task.attempts
        if event.kind == "assigned" or not attempts or attempts[-1].number != event.attempt:
            attempts.append(AttemptSeen(number=event.attempt))
        attempt = attempts[-1]
        if event.node is not None:
            attempt.node = event.node
        if event.kind == "assigned":
            attempt.assigned_at = now
        elif event.kind == "started":
            attempt.started_at = attempt.started_at or now
        elif event.kind == "updated":
            attempt.progress = event.data
        else:
            attempt.ended_at = now
            if event.kind == "completed":
                attempt.outcome, attempt.result = "completed", event.data
            else:
                attempt.outcome = "retried" if event.will_retry else "failed"
                attempt.error = _trimmed(event.error)

    def attempts(self, task_id: TaskId) -> list[AttemptSeen]:
        """The attempts seen of one task, oldest first (copies)."""
        task = self._tasks.get(task_id)
        return [attrs.evolve(a) for a in task.attempts] if task else []

    def wait_s(self, task_id: str) -> float | None:
        """How long the task waited from its commit to its first start, as this sidecar
        saw both (None unless it saw both)."""
        task = self._tasks.get(TaskId(task_id))
        if task is None or task.queued_at is None or task.started_at is None:
            return None
        return max(0.0, task.started_at - task.queued_at)

    def events(self, task_id: TaskId, after: int = 0, upto: int | None = None) -> list[Seen]:
        """The events seen of one task with a sequence number in ``(after, upto]``."""
        task = self._tasks.get(task_id)
        if task is None:
            return []
        return [e for e in task.events if after < e[0] and (upto is None or e[0] <= upto)]

    def per_minute(self, minutes: int = 30) -> list[tuple[int, int, int]]:
        """``(minute, completed, failed)`` for the last ``minutes`` minutes, oldest first."""
        now_minute = int(self.clock() // 60)
        return [
            (m, *self._minutes.get(m, [0, 0]))  # type: ignore[misc]
            for m in range(now_minute - minutes + 1, now_minute + 1)
        ]


def _trimmed(error: TaskError | None) -> TaskError | None:
    if error is None or not error.traceback or len(error.traceback) <= MAX_TRACEBACK:
        return error
    return attrs.evolve(error, traceback="...\n" + error.traceback[-MAX_TRACEBACK:])
