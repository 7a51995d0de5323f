"""Cron and interval schedules: which slots are due, and the fenced transaction that
fires them.

A schedule lives in ``schedules/<name>`` with the slot it fires next (``next_at``). The
leader fires due slots with one transaction that creates a task per slot (ids derived
from the schedule and the slot, so a slot's task can exist once) and advances
``next_at``, comparing its fence and the schedule key's mod revision: a slot fires
exactly once, whoever leads, and a slot due while no leader exists fires when the next
one takes over (or is dropped as the missed-slot policy says).

Slots of a cron schedule are computed in its time zone by ``cronsim`` (days of week and
month as Debian's cron has them, daylight-saving gaps and repeats included); interval
slots are ``anchor_at + k * every_s``. Times are UTC epoch seconds; ``now`` is an
argument, as everywhere in the core. (``zoneinfo`` reads the time-zone database once
per zone and caches it: static data, not state.)
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Iterator
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import attrs
from cronsim import CronSim, CronSimError

from ._batch import Batch
from ._keys import Keyspace, State, TaskId, check_name
from ._model import JSON, Record, TaskOptions, TaskSpec, dumps
from ._policy import initial_record
from ._txn import Compare, KeyValue, Put, Request, Txn

#: What to do with missed slots (no leader, a pause of etcd: see ``due``): fire none of
#: them (and the latest only within ``grace_s``), only the latest, or each (at most
#: ``max_catch_up`` of those more than ``grace_s`` late).
MISSED_POLICIES = ("skip", "one", "all")
#: Tasks one firing may create: a slot is two writes in the firing's transaction.
MAX_SLOTS_PER_FIRING = 50
#: Schedule names are shorter than task names: a slot's task id adds to it.
MAX_NAME = 96


def check_schedule_name(name: str) -> str:
    """A schedule's name is a key segment of at most 96 characters."""
    check_name("schedule name", name)
    if len(name) > MAX_NAME:
        raise ValueError(f"a schedule name has at most {MAX_NAME} characters")
    return name


@attrs.frozen(kw_only=True)
class Schedule:
    """A cron or interval schedule, as stored in ``schedules/<name>``."""

    name: str
    payload: JSON = None
    options: TaskOptions = attrs.Factory(TaskOptions)
    cron: str | None = None
    every_s: float | None = None
    timezone: str = "UTC"
    missed: str = "one"
    max_catch_up: int = MAX_SLOTS_PER_FIRING
    #: A slot fired later than this after its time counts as missed (``skip`` drops it;
    #: ``all`` fires those within it each, the older ones up to ``max_catch_up``).
    grace_s: float = 60.0
    paused: bool = False
    anchor_at: float = 0.0  # interval slots: anchor_at + k * every_s
    next_at: float = 0.0  # the next slot to fire
    created_at: float = 0.0
    fired: int = 0  # slots fired so far
    last_slot_at: float | None = None
    last_task_id: str | None = None

    def __attrs_post_init__(self) -> None:
        check_schedule_name(self.name)
        if (self.cron is None) == (self.every_s is None):
            raise ValueError("a schedule has either a cron expression or an interval (every_s)")
        if self.every_s is not None and not (math.isfinite(self.every_s) and self.every_s >= 1):
            raise ValueError(f"every_s must be at least 1 second, got {self.every_s!r}")
        if self.missed not in MISSED_POLICIES:
            raise ValueError(f"missed must be one of {', '.join(MISSED_POLICIES)}")
        if not 1 <= self.max_catch_up <= MAX_SLOTS_PER_FIRING:
            raise ValueError(f"max_catch_up is 1 to {MAX_SLOTS_PER_FIRING}")
        if not (math.isfinite(self.grace_s) and self.grace_s >= 0):
            raise ValueError("grace_s must be a number of seconds >= 0")
        if self.options.unique_key is not None:
            raise ValueError("a schedule's tasks cannot take a unique_key")
        zone(self.timezone)
        if self.cron is not None:
            try:
                CronSim(self.cron, datetime.fromtimestamp(0, zone(self.timezone)))
            except (CronSimError, ValueError) as exc:
                raise ValueError(f"bad cron expression {self.cron!r}: {exc}") from exc

    def to_json(self) -> str:
        """The value stored in etcd."""
        obj: dict[str, JSON] = {
            "name": self.name,
            "payload": self.payload,
            "options": self.options.to_json(),
            "timezone": self.timezone,
            "missed": self.missed,
            "max_catch_up": self.max_catch_up,
            "grace_s": self.grace_s,
            "paused": self.paused,
            "anchor_at": self.anchor_at,
            "next_at": self.next_at,
            "created_at": self.created_at,
            "fired": self.fired,
        }
        for name in ("cron", "every_s", "last_slot_at", "last_task_id"):
            if getattr(self, name) is not None:
                obj[name] = getattr(self, name)
        return dumps(obj)

    def to_obj(self) -> dict[str, JSON]:
        """The schedule as a JSON object (as the protocol shows it)."""
        return dict(json.loads(self.to_json()))

    @classmethod
    def from_json(cls, text: str) -> Schedule:
        """Read the value stored in etcd."""
        obj = json.loads(text)
        if not isinstance(obj, dict):
            raise ValueError("a schedule is a JSON object")
        get = obj.get
        return cls(
            name=obj["name"],
            payload=get("payload"),
            options=TaskOptions.from_json(get("options") or {}),
            cron=get("cron"),
            every_s=None if obj.get("every_s") is None else float(obj["every_s"]),
            timezone=get("timezone", "UTC"),
            missed=get("missed", "one"),
            max_catch_up=int(get("max_catch_up", MAX_SLOTS_PER_FIRING)),
            grace_s=float(get("grace_s", 60.0)),
            paused=bool(get("paused", False)),
            anchor_at=float(get("anchor_at", 0.0)),
            next_at=float(get("next_at", 0.0)),
            created_at=float(get("created_at", 0.0)),
            fired=int(get("fired", 0)),
            last_slot_at=None if obj.get("last_slot_at") is None else float(obj["last_slot_at"]),
            last_task_id=get("last_task_id"),
        )


def zone(name: str) -> ZoneInfo:
    """The time zone called ``name`` (ValueError if there is none)."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {name!r} (use an IANA name: Europe/Berlin)") from exc


def slots_after(schedule: Schedule, after: float) -> Iterator[float]:
    """The schedule's slots strictly after ``after``, ascending."""
    if schedule.every_s is not None:
        every, anchor = schedule.every_s, schedule.anchor_at
        k = max(math.floor((after - anchor) / every) + 1, 1)
        while True:
            slot = anchor + k * every
            if slot > after:
                yield slot
            k += 1
    assert schedule.cron is not None
    start = datetime.fromtimestamp(math.floor(after), zone(schedule.timezone))
    for at in CronSim(schedule.cron, start):
        yield at.timestamp()


def slots_before(schedule: Schedule, before: float) -> Iterator[float]:
    """The schedule's slots strictly before ``before``, descending."""
    if schedule.every_s is not None:
        every, anchor = schedule.every_s, schedule.anchor_at
        k = math.ceil((before - anchor) / every) - 1
        while k >= 1:
            slot = anchor + k * every
            if slot < before:
                yield slot
            k -= 1
        return
    assert schedule.cron is not None
    start = datetime.fromtimestamp(math.ceil(before), zone(schedule.timezone))
    for at in CronSim(schedule.cron, start, reverse=True):
        if at.timestamp() < before:
            yield at.timestamp()


def first_slot(schedule: Schedule, now: float) -> float:
    """The first slot after ``now`` (for a new or resumed schedule)."""
    return next(slots_after(schedule, now))


@attrs.frozen
class Firing:
    """The slots a schedule fires now (ascending), and its next slot after them."""

    slots: tuple[float, ...]
    next_at: float


def due(schedule: Schedule, now: float) -> Firing | None:
    """What to fire at ``now``: None when nothing is due.

    A slot is *missed* when it has not fired by the time a later slot is due, or when it
    is more than ``grace_s`` late. The policy says what a firing does with its due slots:

    - ``skip``: missed slots never fire; the latest due slot fires if it is at most
      ``grace_s`` late (a failover's delay), else nothing does. One task at most.
    - ``one``: the due slots coalesce into one task, for the latest of them, however
      late.
    - ``all``: each due slot fires, in order: every one at most ``grace_s`` late, and the
      latest ``max_catch_up`` of the older ones.

    At most ``MAX_SLOTS_PER_FIRING`` slots fire at once (the latest); the next slot is the
    first after ``now``.
    """
    if schedule.paused or schedule.next_at > now:
        return None
    next_at = first_slot(schedule, now)
    if schedule.missed != "all":
        # The latest due slot: the last one at or before now (next_at itself at least).
        at_or_before_now = slots_before(schedule, math.nextafter(now, math.inf))
        latest = max(next(at_or_before_now, schedule.next_at), schedule.next_at)
        if schedule.missed == "skip" and now - latest > schedule.grace_s:
            return Firing((), next_at)
        return Firing((latest,), next_at)
    on_time_from = max(schedule.next_at, now - schedule.grace_s)
    candidates: Iterator[float]
    if schedule.next_at >= on_time_from:
        candidates = itertools.chain([schedule.next_at], slots_after(schedule, schedule.next_at))
    else:
        candidates = slots_after(schedule, on_time_from - 1e-6)
    on_time: list[float] = []
    for slot in candidates:
        if slot > now or len(on_time) >= MAX_SLOTS_PER_FIRING:
            break
        on_time.append(slot)
    missed: list[float] = []
    if schedule.next_at < on_time_from:
        for slot in slots_before(schedule, on_time_from):
            if slot < schedule.next_at or len(missed) >= schedule.max_catch_up:
                break
            missed.append(slot)
        missed.reverse()
    slots = (missed + on_time)[-MAX_SLOTS_PER_FIRING:]
    return Firing(tuple(slots), next_at)


def slot_task_id(schedule: Schedule, slot: float, incarnation: int) -> TaskId:
    """The id of the task a slot creates: one slot, one possible task. ``incarnation``
    (the schedule key's create revision) keeps a schedule made again under an old name
    from meeting its predecessor's tasks."""
    return TaskId(f"{schedule.name}.{math.floor(slot)}.{incarnation:x}")


def _task_writes(ks: Keyspace, schedule: Schedule, tid: TaskId, now: float) -> list[Request]:
    """The payload and the pending record of a task made from ``schedule`` at ``now``."""
    spec = TaskSpec(id=tid, payload=schedule.payload, options=schedule.options, created_at=now)
    record = initial_record(
        Record(state=State.PENDING, options=schedule.options, since_at=now), now=now, run_at=None
    )
    return [Put(ks.task(tid), spec.to_json()), Put(ks.state(State.PENDING, tid), record.to_json())]


def fire_ops(
    ks: Keyspace,
    schedule: Schedule,
    incarnation: int,
    firing: Firing,
    now: float,
) -> tuple[list[Compare], list[Request], Schedule]:
    """The compares and writes that fire ``firing``: each slot's task must not exist yet;
    each is created pending, and the schedule advanced. Answers the new schedule too."""
    compares: list[Compare] = []
    writes: list[Request] = []
    last_id = schedule.last_task_id
    for slot in firing.slots:
        tid = slot_task_id(schedule, slot, incarnation)
        compares.append(Compare.absent(ks.task(tid)))
        writes.extend(_task_writes(ks, schedule, tid, now))
        last_id = tid
    advanced = attrs.evolve(
        schedule,
        next_at=firing.next_at,
        fired=schedule.fired + len(firing.slots),
        last_slot_at=firing.slots[-1] if firing.slots else schedule.last_slot_at,
        last_task_id=last_id,
    )
    writes.append(Put(ks.schedule(schedule.name), advanced.to_json()))
    return compares, writes, advanced


def schedule_from_request(obj: dict[str, Any], *, now: float) -> Schedule:
    """A new schedule from a client's fields (ValueError for a bad one); its first slot
    is the first after ``now``."""
    schedule = Schedule(
        name=obj["name"],
        payload=obj.get("payload"),
        options=obj.get("options") or TaskOptions(),
        cron=obj.get("cron"),
        every_s=None if obj.get("every_s") is None else float(obj["every_s"]),
        timezone=obj.get("timezone") or "UTC",
        missed=obj.get("missed") or "one",
        max_catch_up=int(obj.get("max_catch_up") or MAX_SLOTS_PER_FIRING),
        grace_s=float(obj["grace_s"]) if obj.get("grace_s") is not None else 60.0,
        paused=bool(obj.get("paused", False)),
        anchor_at=now,
        created_at=now,
    )
    return attrs.evolve(schedule, next_at=first_slot(schedule, now))


def firing_batch(ks: Keyspace, kv: KeyValue, schedule: Schedule, now: float) -> Batch | None:
    """The leader's batch that fires what ``schedule`` (seen as ``kv``) has due at
    ``now``, or None: it compares the schedule's mod revision and that each slot's task
    does not exist yet, and the fence like every leader transaction."""
    firing = due(schedule, now)
    if firing is None:
        return None
    compares, writes, _ = fire_ops(ks, schedule, kv.create_revision, firing, now)
    guards = (Compare.modified_at(kv.key, kv.mod_revision), *compares)
    return Batch(
        "fire", (), guards=guards, extra=tuple(writes), schedule=schedule.name, slots=firing.slots
    )


#: A run id: short, and only characters a task id may hold.
_RUN_ID = re.compile(r"^[A-Za-z0-9]{4,16}$")


def run_task_id(schedule: Schedule, run_id: str, incarnation: int) -> TaskId:
    """The id of the task a run now makes: ``<name>.run.<run id>.<incarnation>`` (the
    schedule key's create revision, as a slot's task id has it). The caller picks the
    run id once per request, so that the same request sent twice makes one task."""
    if not _RUN_ID.match(run_id):
        raise ValueError("a run id is 4 to 16 letters and digits")
    return TaskId(f"{schedule.name}.run.{run_id}.{incarnation:x}")


def run_now(
    ks: Keyspace, kv: KeyValue, schedule: Schedule, run_id: str, now: float
) -> tuple[TaskId, Txn]:
    """A task made now from ``schedule`` (seen as ``kv``), outside its slots (the
    dashboard's "Run now", ``tmctl run-schedule``): the schedule's payload and options,
    the id :func:`run_task_id` gives. The transaction compares the schedule's create
    revision (the schedule read is the one still there, whatever the leader fired since)
    and the task's absence; it leaves the schedule's slots and ``next_at`` alone."""
    tid = run_task_id(schedule, run_id, kv.create_revision)
    compare = (Compare.created_at(kv.key, kv.create_revision), Compare.absent(ks.task(tid)))
    return tid, Txn(compare=compare, success=tuple(_task_writes(ks, schedule, tid, now)))
