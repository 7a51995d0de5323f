"""Flow control of a queue: its settings in ``queues/<name>`` (paused, concurrency and rate
limits), and the planner that changes them.

Anyone may change a queue's settings (a sidecar for a client, tmctl for an operator):
each change is a read-modify-write guarded by the key's mod revision, so two changes
never lose one another. The leader reads the settings through its view and guards every
assignment batch with the mod revision of its queue's key, so that no assignment it
decided before a change (a pause, a lower limit) can commit after it.
"""

from __future__ import annotations

import bisect
import json
import math
from collections import Counter
from typing import Any

import attrs

from ._keys import Keyspace, TaskId
from ._model import JSON, dumps
from ._txn import Compare, KeyValue, Put, Txn


def _positive_int_or_none(_inst: object, attr: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{attr.name} must be a whole number >= 1 (or none), got {value!r}")


@attrs.frozen(kw_only=True)
class RateLimit:
    """At most ``limit`` assignments in any window of ``period_s`` seconds; with
    ``slack_s``, in any window of ``period_s + slack_s``.

    The leader counts assignments, not the handlers' starts: a start comes some time
    after its assignment (the watch, the agent, the delivery to an SDK worker), and
    those delays differ from task to task, so starts counted in one window can spread
    into the next one. ``slack_s`` is the bound on that delay the user is willing to
    assume: counting windows of ``period_s + slack_s`` at assignment, any window of
    ``period_s`` at the handlers holds at most ``limit`` starts of tasks that started
    within ``slack_s`` of their assignment (a start at ``s`` in ``[a, a + slack_s]``
    lies in a handler window ``[t, t + period_s)`` only if its assignment ``a`` lies in
    ``[t - slack_s, t + period_s)``, a window the leader held to ``limit``). It costs
    throughput only: ``limit`` per ``period_s + slack_s`` instead of per ``period_s``.
    """

    limit: int = attrs.field()
    period_s: float = attrs.field()
    #: The delay from an assignment to its handler's start that the limit allows for.
    slack_s: float = attrs.field(default=0.0)

    @property
    def window_s(self) -> float:
        """The window the leader counts assignments in."""
        return self.period_s + self.slack_s

    @limit.validator
    def _check_limit(self, _attr: attrs.Attribute[Any], value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"a rate's limit must be a whole number >= 1, got {value!r}")

    @period_s.validator
    def _check_period(self, _attr: attrs.Attribute[Any], value: float) -> None:
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise ValueError(f"period_s must be a positive number of seconds, got {value!r}")

    @slack_s.validator
    def _check_slack(self, _attr: attrs.Attribute[Any], value: float) -> None:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not (ok and math.isfinite(value) and 0 <= value <= MAX_SLACK_S):
            raise ValueError(f"slack_s is 0 to {MAX_SLACK_S:g} seconds, got {value!r}")

    def to_json(self) -> dict[str, JSON]:
        """The JSON object stored in etcd (``slack_s`` only when set)."""
        obj: dict[str, JSON] = {"limit": self.limit, "period_s": self.period_s}
        if self.slack_s:
            obj["slack_s"] = self.slack_s
        return obj

    @classmethod
    def from_json(cls, obj: JSON) -> RateLimit:
        """Read the JSON object (refuses anything else with ValueError)."""
        if not isinstance(obj, dict) or set(obj) - {"limit", "period_s", "slack_s"}:
            raise ValueError("a rate limit is {limit, period_s, slack_s (optional)}")
        return cls(
            limit=obj.get("limit"),  # type: ignore[arg-type]
            period_s=obj.get("period_s"),  # type: ignore[arg-type]
            slack_s=obj.get("slack_s", 0.0),
        )


#: The most slack a rate may take: an hour of delivery is not a delivery.
MAX_SLACK_S = 3600.0


@attrs.frozen(kw_only=True)
class QueueConfig:
    """A queue's flow-control settings. The default is a queue with no key at all."""

    paused: bool = False
    #: Tasks of the queue running at once, across every node.
    max_running: int | None = attrs.field(default=None, validator=_positive_int_or_none)
    #: Tasks running at once per concurrency key (a task's ``concurrency_key`` option).
    key_max_running: int | None = attrs.field(default=None, validator=_positive_int_or_none)
    #: Starts of the queue's tasks, across every node.
    rate: RateLimit | None = None
    #: Starts per concurrency key.
    key_rate: RateLimit | None = None
    updated_at: float = 0.0

    @property
    def limited(self) -> bool:
        """Whether any limit applies."""
        return any(
            x is not None
            for x in (self.max_running, self.key_max_running, self.rate, self.key_rate)
        )

    def to_json(self) -> str:
        """The value stored in etcd."""
        obj: dict[str, JSON] = {"paused": self.paused, "updated_at": self.updated_at}
        for name in ("max_running", "key_max_running"):
            if getattr(self, name) is not None:
                obj[name] = getattr(self, name)
        for name in ("rate", "key_rate"):
            limit = getattr(self, name)
            if limit is not None:
                obj[name] = limit.to_json()
        return dumps(obj)

    def to_obj(self) -> dict[str, JSON]:
        """The settings as a JSON object (as the protocol shows them)."""
        return dict(json.loads(self.to_json()))

    @classmethod
    def from_json(cls, text: str) -> QueueConfig:
        """Read the value stored in etcd."""
        obj = json.loads(text)
        if not isinstance(obj, dict):
            raise ValueError("a queue's settings are a JSON object")
        rate, key_rate = obj.get("rate"), obj.get("key_rate")
        return cls(
            paused=bool(obj.get("paused", False)),
            max_running=obj.get("max_running"),
            key_max_running=obj.get("key_max_running"),
            rate=None if rate is None else RateLimit.from_json(rate),
            key_rate=None if key_rate is None else RateLimit.from_json(key_rate),
            updated_at=float(obj.get("updated_at", 0.0)),
        )


#: The limit settings a client may change, and the JSON each takes.
LIMIT_FIELDS = ("max_running", "key_max_running", "rate", "key_rate")


def with_limits(config: QueueConfig, changes: dict[str, JSON]) -> QueueConfig:
    """``config`` with the limits in ``changes`` set (a JSON null lifts one); raises
    ValueError for an unknown name or a bad value."""
    unknown = set(changes) - set(LIMIT_FIELDS)
    if unknown:
        raise ValueError(f"unknown limits: {sorted(unknown)} (known: {', '.join(LIMIT_FIELDS)})")
    values: dict[str, Any] = {}
    for name, value in changes.items():
        if name in ("rate", "key_rate"):
            values[name] = None if value is None else RateLimit.from_json(value)
        else:
            values[name] = value
    return attrs.evolve(config, **values)


def plan_queue_config(ks: Keyspace, queue: str, config: QueueConfig, seen: KeyValue | None) -> Txn:
    """Write a queue's settings if its key is as ``seen`` (None: absent)."""
    key = ks.queue(queue)
    return Txn(
        compare=(Compare.modified_at(key, seen.mod_revision if seen is not None else 0),),
        success=(Put(key, config.to_json()),),
    )


def queue_guard(ks: Keyspace, queue: str, mod_revision: int) -> Compare:
    """The guard of an assignment from ``queue``: its settings are as the leader saw them
    (mod revision 0: the queue has no settings key)."""
    return Compare.modified_at(ks.queue(queue), mod_revision)


#: A pending task in the leader's queue heap: (-priority, its place in the queue, the
#: create revision of its pending key, task id). The place is the create revision too,
#: unless the task kept an earlier one through a requeue (``Record.order``).
Entry = tuple[int, int, int, TaskId]


@attrs.define(eq=False)
class KeyCounts:
    """What the leader counts per (queue, concurrency key): tasks processing plus
    assignments in flight, and the pending tasks set aside because their key was at its
    limit (parked, in heap order, until a task of the key ends or the limit changes)."""

    running: Counter[tuple[str, str]] = attrs.Factory(Counter)
    _parked: dict[tuple[str, str], list[Entry]] = attrs.Factory(dict)

    def add(self, queue: str, key: str) -> None:
        """One more task of ``key`` runs (or is being assigned)."""
        self.running[(queue, key)] += 1

    def remove(self, queue: str, key: str) -> list[Entry]:
        """One task of ``key`` less; answers the tasks parked on it, to consider again."""
        k = (queue, key)
        self.running[k] -= 1
        if self.running[k] <= 0:
            del self.running[k]
        return self._parked.pop(k, [])

    def full(self, queue: str, key: str, limit: int) -> bool:
        """Whether ``key`` has ``limit`` tasks running or being assigned."""
        return self.running[(queue, key)] >= limit

    def park(self, queue: str, key: str, entry: Entry) -> None:
        """Set a pending task aside until its key has room."""
        self._parked.setdefault((queue, key), []).append(entry)

    def unpark(self, queue: str, key: str) -> list[Entry]:
        """The tasks parked on ``key`` (its rate window has room again)."""
        return self._parked.pop((queue, key), [])

    def unpark_queue(self, queue: str) -> list[Entry]:
        """Every task parked in ``queue`` (its limits changed)."""
        out: list[Entry] = []
        for k in [k for k in self._parked if k[0] == queue]:
            out += self._parked.pop(k)
        return out


@attrs.define(eq=False)
class RateWindow:
    """The recent starts of one queue (or one concurrency key of it): a sliding window,
    so that no window of the rate's period ever holds more than its limit.

    Starts made before a change of the rate count against the new one: a limit lowered
    or a period lengthened holds back until enough of them have left the new window.
    So the leader keeps the last ``limit`` starts whatever their age (enough to count
    exactly under any limit up to the present one, for any period), and the time of the
    latest start it forgot: a window that reaches back to that time is counted full,
    since the leader no longer knows what it held (stricter, never looser).

    The leader persists the window rounded up to a grid of ``period_s / GRID`` (later
    times leave the window later: a new leader that reads them back can only be
    stricter than the old one was), in the same fenced transaction as the assignments
    it counts.
    """

    starts: list[float] = attrs.Factory(list)  # ascending
    #: The latest start no longer in ``starts`` (None: none forgotten yet).
    forgotten: float | None = None

    def prune(self, now: float, period_s: float, keep: int = 0) -> None:
        """Forget the starts that have left the window, all but the last ``keep``."""
        cut = 0
        can_go = len(self.starts) - keep
        while cut < can_go and self.starts[cut] <= now - period_s:
            cut += 1
        if cut:
            self.forgotten = max(self.starts[cut - 1], self.forgotten or -math.inf)
            del self.starts[:cut]

    def room(self, now: float, rate: RateLimit) -> int:
        """How many more starts the window allows at ``now``."""
        self.prune(now, rate.window_s, keep=rate.limit)
        since = now - rate.window_s
        if self.forgotten is not None and self.forgotten > since:
            return 0  # the window reaches back past what the leader remembers
        recent = len(self.starts) - bisect.bisect_right(self.starts, since)
        return max(rate.limit - recent, 0)

    def free_at(self, rate: RateLimit) -> float:
        """When the next start is allowed: once the start ``limit`` back (and the
        latest forgotten one) has left the window."""
        times = [] if self.forgotten is None else [self.forgotten]
        if len(self.starts) >= rate.limit:
            times.append(self.starts[-rate.limit])
        return max(times) + rate.window_s if times else 0.0

    def record(self, now: float) -> None:
        """A start at ``now``."""
        self.starts.append(now)

    def to_json(self, period_s: float) -> str:
        """The persisted form: [time, count] pairs on the grid, times rounded up, of the
        starts in the period before the last one (no window from now on holds an older
        one with it); ``forgotten``, the latest start left out (also rounded up)."""
        step = period_s / GRID
        since = self.starts[-1] - period_s if self.starts else -math.inf
        cut = bisect.bisect_right(self.starts, since)
        cells: Counter[float] = Counter(math.ceil(t / step) * step for t in self.starts[cut:])
        obj: dict[str, JSON] = {
            "period_s": period_s,
            "starts": sorted([t, n] for t, n in cells.items()),
        }
        older = self.starts[cut - 1] if cut else self.forgotten
        if older is not None:
            obj["forgotten"] = math.ceil(older / step) * step
        return dumps(obj)

    @classmethod
    def from_json(cls, text: str) -> RateWindow:
        """Read the persisted form."""
        obj = json.loads(text)
        starts: list[float] = []
        for at, count in obj.get("starts", []):
            starts += [float(at)] * int(count)
        forgotten = obj.get("forgotten")
        return cls(sorted(starts), None if forgotten is None else float(forgotten))


#: Cells per period in a persisted rate window.
GRID = 32
