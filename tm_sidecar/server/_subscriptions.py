"""Subscriptions: a client's view of task events, pushed as they happen.

Owns the ``subscribe`` and ``unsubscribe`` ops and the subscriptions that ``create``
opens for the task it creates: each is a hub subscription whose events (and gaps, when
the sidecar's watch started again) become ``event`` and ``gap`` pushes on the client's
connection; a resumed one (``from_revision``) reads the missed events back first, at the
pace the client reads them.
"""

from __future__ import annotations

from typing import Any

import attrs
import trio
from taskmanager.protocol import InvalidRequest

from ..core import JSON, TaskEvent, TaskId
from ..node._hub import Subscription
from ..node._sidecar import Sidecar, is_final
from ._connection import OUTBOX, Connection, ids
from ._requests import read_task_id, read_whole


@attrs.define(eq=False)
class Subscriptions:
    """The subscription ops of one sidecar's server."""

    sidecar: Sidecar

    async def op_subscribe(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        """``subscribe``: events of one task (or of all), from now or from a revision."""
        task_id = frame.get("task_id")
        if task_id is not None:
            task_id = read_task_id(frame)
        until_final = bool(frame.get("until_final", False))
        if until_final and task_id is None:
            raise InvalidRequest("until_final needs a task_id")
        after = frame.get("from_revision")
        if after is not None and (
            isinstance(after, bool) or not isinstance(after, int) or after < 0
        ):
            raise InvalidRequest("from_revision must be a whole number, 0 or more")
        sid, sub = self.open(conn, task_id, until_final=until_final, from_revision=after)
        if sub.replay is not None:
            # Resumed: the events after from_revision are read back first (or a gap told).
            def on_gap(gap: dict[str, Any]) -> None:
                conn.push({"push": "gap", "subscription": sid, **gap})

            async def room() -> None:
                # Replayed events wait for the client to read, rather than overflow its
                # outbox (which would drop it) in one go.
                while conn.outbox_send.statistics().current_buffer_used > OUTBOX // 2:  # noqa: ASYNC110 - polled while the client reads
                    await trio.sleep(0.005)

            assert conn.nursery is not None
            conn.nursery.start_soon(self.sidecar.hub.catch_up, sub, on_gap, room)
        return {"subscription": sid, "revision": sub.revision}

    async def op_unsubscribe(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        """``unsubscribe``: True if the subscription was open."""
        sub = conn.subscriptions.pop(read_whole(frame, "subscription"), None)
        if sub is not None:
            sub.close()
        return sub is not None

    def open(
        self,
        conn: Connection,
        task_id: TaskId | None,
        *,
        until_final: bool,
        kinds: frozenset[str] | None = None,
        from_revision: int | None = None,
    ) -> tuple[int, Subscription]:
        """Subscribe ``conn`` to ``task_id``'s events (all tasks' if None): its number and
        the hub's subscription."""
        sid = next(ids)

        # Called by the hub for each event: no task, no channel per subscription.
        def deliver(event: TaskEvent) -> None:
            if kinds is None or event.kind in kinds:
                conn.push({"push": "event", "subscription": sid, "event": event.to_json()})
            if until_final and is_final(event):
                conn.subscriptions.pop(sid, None)
                sub.close()

        # Told when the sidecar's own watch missed events (it started again).
        def on_gap(gap: dict[str, Any]) -> None:
            conn.push({"push": "gap", "subscription": sid, **gap})

        if from_revision is None:
            sub = self.sidecar.subscribe(task_id, deliver=deliver, on_gap=on_gap)
        else:
            sub = self.sidecar.hub.subscribe(
                task_id, deliver, from_revision=from_revision, on_gap=on_gap
            )
        conn.subscriptions[sid] = sub
        return sid, sub

    @staticmethod
    def dropped(conn: Connection) -> None:
        """``conn`` closed: end its subscriptions."""
        for sub in conn.subscriptions.values():
            sub.close()
        conn.subscriptions.clear()
