"""Queue and schedule settings: read-change-write loops guarded by the key's revision
(``update_queue``, ``update_schedule``, ``pausing``; tmctl uses them too), and the
sidecar's operations on them (``QueueOps``: pause, resume, limits, schedules)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import attrs

from .._errors import InvalidRequest
from ..core import (
    JSON,
    Compare,
    Keyspace,
    Put,
    QueueConfig,
    Schedule,
    Txn,
    check_name,
    first_slot,
    plan_queue_config,
    schedule_from_request,
    with_limits,
)
from ..etcd import Etcd

log = logging.getLogger("tm_sidecar")


async def list_queues(etcd: Etcd, ks: Keyspace) -> dict[str, QueueConfig]:
    """Every queue that has settings (paused, limits), by name."""
    kvs, _ = await etcd.list_prefix(ks.queues())
    out = {}
    for kv in kvs:
        parsed = ks.parse(kv.key)
        if parsed is not None and parsed.name is not None:
            out[parsed.name] = QueueConfig.from_json(kv.value)
    return out


async def update_queue(
    etcd: Etcd,
    ks: Keyspace,
    queue: str,
    change: Callable[[QueueConfig], QueueConfig],
    *,
    now: float,
) -> QueueConfig:
    """Read a queue's settings, change them, and write them back if nobody else did
    meanwhile (else read again). Shared by the sidecar and tmctl."""
    check_name("queue", queue)
    while True:
        seen = await etcd.get(ks.queue(queue))
        current = QueueConfig.from_json(seen.value) if seen is not None else QueueConfig()
        config = attrs.evolve(change(current), updated_at=now)
        if (await etcd.txn(plan_queue_config(ks, queue, config, seen))).succeeded:
            return config


def pausing(name: str, paused: bool, *, now: float) -> Callable[[Schedule | None], Schedule]:
    """The change that pauses a schedule, or resumes it from its first slot after now
    (the slots of a pause are not missed ones: none of them fires)."""

    def change(old: Schedule | None) -> Schedule:
        if old is None:
            raise InvalidRequest(f"no schedule {name!r}")
        if paused:
            return attrs.evolve(old, paused=True)
        resumed = attrs.evolve(old, paused=False)
        return attrs.evolve(resumed, next_at=first_slot(resumed, now))

    return change


async def update_schedule(
    etcd: Etcd,
    ks: Keyspace,
    name: str,
    change: Callable[[Schedule | None], Schedule],
) -> Schedule | None:
    """Read a schedule (None: there is none), change it, and write it back if nobody
    (the leader firing it, say) wrote it meanwhile; else read again."""
    check_name("schedule", name)
    key = ks.schedule(name)
    while True:
        seen = await etcd.get(key)
        schedule = change(Schedule.from_json(seen.value) if seen is not None else None)
        txn = Txn(
            compare=(Compare.modified_at(key, seen.mod_revision if seen is not None else 0),),
            success=(Put(key, schedule.to_json()),),
        )
        if (await etcd.txn(txn)).succeeded:
            return schedule


@attrs.define(eq=False)
class QueueOps:
    """The sidecar's operations on queue settings and schedules."""

    etcd: Etcd
    ks: Keyspace
    clock: Callable[[], float] = time.time

    async def queues(self) -> dict[str, QueueConfig]:
        """Every queue that has settings (paused, limits), by name."""
        return await list_queues(self.etcd, self.ks)

    async def update_queue(
        self, queue: str, change: Callable[[QueueConfig], QueueConfig]
    ) -> QueueConfig:
        """Change a queue's settings (read, ``change``, write if unchanged meanwhile)."""
        return await update_queue(self.etcd, self.ks, queue, change, now=self.clock())

    async def pause_queue(self, queue: str) -> QueueConfig:
        """The leader assigns nothing more from ``queue`` (creates still land, running
        tasks finish) until :meth:`resume_queue`."""
        config = await self.update_queue(queue, lambda c: attrs.evolve(c, paused=True))
        log.info("queue paused", extra={"queue": queue})
        return config

    async def resume_queue(self, queue: str) -> QueueConfig:
        """Assign from ``queue`` again."""
        config = await self.update_queue(queue, lambda c: attrs.evolve(c, paused=False))
        log.info("queue resumed", extra={"queue": queue})
        return config

    async def set_limits(self, queue: str, changes: dict[str, JSON]) -> QueueConfig:
        """Set (or, with None, lift) a queue's cluster-wide limits: ``max_running``,
        ``key_max_running``, ``rate`` and ``key_rate`` ({limit, period_s}). Raises
        :class:`InvalidRequest` for a bad name or value."""
        try:
            with_limits(QueueConfig(), changes)  # checked before anything is read
        except (ValueError, TypeError) as exc:
            raise InvalidRequest(str(exc)) from exc
        config = await self.update_queue(queue, lambda c: with_limits(c, changes))
        log.info("queue limits set", extra={"queue": queue, "config": config.to_json()})
        return config

    async def schedule(self, fields: dict[str, Any]) -> Schedule:
        """Create or replace a schedule (``name``, ``payload``, ``options``, ``cron`` or
        ``every_s``, ``timezone``, ``missed``, ``max_catch_up``, ``grace_s``). Its next
        slot is the first after now; a replaced one keeps its count of fired slots.
        Raises :class:`InvalidRequest` for a bad one."""
        now = self.clock()
        try:
            new = schedule_from_request(fields, now=now)
        except (ValueError, TypeError, KeyError) as exc:
            raise InvalidRequest(f"bad schedule: {exc}") from exc

        def replace(old: Schedule | None) -> Schedule:
            if old is None:
                return new
            return attrs.evolve(
                new, fired=old.fired, last_slot_at=old.last_slot_at, last_task_id=old.last_task_id
            )

        schedule = await update_schedule(self.etcd, self.ks, new.name, replace)
        assert schedule is not None
        log.info("schedule set", extra={"schedule": schedule.name, "next_at": schedule.next_at})
        return schedule

    async def schedules(self) -> list[Schedule]:
        """Every schedule of the namespace."""
        kvs, _ = await self.etcd.list_prefix(self.ks.schedules())
        return [Schedule.from_json(kv.value) for kv in kvs]

    async def pause_schedule(self, name: str, paused: bool = True) -> Schedule:
        """Fire nothing more until resumed; resuming starts with the first slot after
        now (the slots of the pause are not missed ones: none of them fires)."""
        change = pausing(name, paused, now=self.clock())
        schedule = await update_schedule(self.etcd, self.ks, name, change)
        assert schedule is not None
        return schedule

    async def delete_schedule(self, name: str) -> bool:
        """Delete a schedule (the tasks it made stay); False if there was none."""
        return bool(await self.etcd.delete(self.ks.schedule(check_name("schedule", name))))
