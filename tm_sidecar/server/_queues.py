"""The queue and schedule ops: pause, resume and limit a queue; list queues; make, list,
pause, resume and delete schedules."""

from __future__ import annotations

from typing import Any

import attrs
from taskmanager.protocol import InvalidRequest

from ..core import JSON, LIMIT_FIELDS
from ..node._sidecar import Sidecar
from ._connection import Connection
from ._requests import SCHEDULE_FIELDS, check_numbers_fit, read_name, read_options, read_queue


@attrs.define(eq=False)
class Queues:
    """The queue and schedule ops of one sidecar's server."""

    sidecar: Sidecar

    async def op_pause(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        """``pause``: a queue's tasks wait until it is resumed."""
        return (await self.sidecar.pause_queue(read_queue(frame))).to_obj()

    async def op_resume(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        """``resume``: a paused queue's tasks run again."""
        return (await self.sidecar.resume_queue(read_queue(frame))).to_obj()

    async def op_set_limits(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        """``set_limits``: change a queue's limits (the fields named, the others kept)."""
        queue = read_queue(frame)
        changes = {name: frame[name] for name in LIMIT_FIELDS if name in frame}
        check_numbers_fit(changes)
        unknown = set(frame) - {"id", "op", "queue", *LIMIT_FIELDS}
        if unknown:
            raise InvalidRequest(f"unknown fields: {sorted(unknown)}")
        return (await self.sidecar.set_limits(queue, changes)).to_obj()

    async def op_queues(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        """``queues``: every configured queue by name."""
        return {name: config.to_obj() for name, config in (await self.sidecar.queues()).items()}

    async def op_schedule(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        """``schedule``: make or replace a schedule."""
        known = {"id", "op", "name", "payload", "options", *SCHEDULE_FIELDS}
        unknown = set(frame) - known
        if unknown:
            raise InvalidRequest(f"unknown fields: {sorted(unknown)}")
        if not isinstance(frame.get("name"), str):
            raise InvalidRequest("a schedule needs a name")
        for name in ("cron", "timezone", "missed"):
            if frame.get(name) is not None and not isinstance(frame[name], str):
                raise InvalidRequest(f"{name} must be a string")
        check_numbers_fit({k: frame[k] for k in SCHEDULE_FIELDS if k in frame})
        fields = {k: frame[k] for k in ("name", "payload", *SCHEDULE_FIELDS) if k in frame}
        fields["options"] = read_options(frame.get("options") or {})
        return (await self.sidecar.schedule(fields)).to_obj()

    async def op_schedules(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        """``schedules``: every schedule."""
        return [s.to_obj() for s in await self.sidecar.schedules()]

    async def op_pause_schedule(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        """``pause_schedule``: a schedule makes no tasks until resumed."""
        name = read_name("schedule", frame.get("name"))
        return (await self.sidecar.pause_schedule(name, True)).to_obj()

    async def op_resume_schedule(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        """``resume_schedule``: a paused schedule makes tasks again."""
        name = read_name("schedule", frame.get("name"))
        return (await self.sidecar.pause_schedule(name, False)).to_obj()

    async def op_unschedule(self, conn: Connection, frame: dict[str, Any]) -> JSON:
        """``unschedule``: delete a schedule."""
        return await self.sidecar.delete_schedule(read_name("schedule", frame.get("name")))
