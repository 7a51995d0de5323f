"""tmctl's text: the tables and cells it prints for people, and the limits and rates it
reads from its command line (``--rate 100/60s``). No I/O: the commands print what these
build.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import Any

from ..core import AttemptEnd, NodeInfo, QueueConfig, RateLimit, Record, State, TaskSpec


def capacity_by_queue(nodes: Sequence[NodeInfo]) -> dict[str, int]:
    """Registered concurrency per queue, summed over the live sidecars."""
    capacity: dict[str, int] = {}
    for node in nodes:
        for queue, cap in node.capacity.items():
            capacity[queue] = capacity.get(queue, 0) + cap
    return capacity


def unserved(queues: dict[str, dict[str, int]], capacity: dict[str, int]) -> list[str]:
    """A sentence for each queue with work waiting and no worker registered for it."""
    out = []
    for queue, row in queues.items():
        waiting = {k: row[k] for k in ("pending", "delayed") if row.get(k)}
        if waiting and not capacity.get(queue):
            what = " and ".join(f"{n} {k}" for k, n in waiting.items())
            out.append(
                f"queue {queue!r} has {what} tasks and no registered worker "
                f"(no sidecar has a handler for it)"
            )
    return out


def show_table(
    task_id: str, state: State | None, spec: TaskSpec | None, rec: Record | None
) -> list[list[str]]:
    """One task for people: a field per line."""
    rows = [["FIELD", "VALUE"], ["task", task_id], ["state", state.value if state else "-"]]
    options = spec.options if spec is not None else rec.options if rec is not None else None
    if options is not None:
        rows.append(["queue", options.queue])
        rows.append(["priority", str(options.priority)])
        timeout = "-" if options.timeout_s is None else f"{options.timeout_s:g} s"
        rows.append(["timeout", timeout])
        if options.unique_key is not None:
            window = (
                "" if options.unique_for_s is None else f" (and {options.unique_for_s:g} s after)"
            )
            rows.append(["unique key", options.unique_key + window])
        if options.concurrency_key is not None:
            rows.append(["concurrency key", options.concurrency_key])
        if options.traceparent is not None:
            state_part = "" if options.tracestate is None else f" ({options.tracestate})"
            rows.append(
                ["trace", f"{options.trace_id} (traceparent {options.traceparent}){state_part}"]
            )
    if rec is not None:
        limit = f" of {options.max_attempts}" if options is not None else ""
        rows.append(["attempts", f"{rec.attempts}{limit}"])
    if spec is not None:
        rows.append(["created", utc_time(spec.created_at)])
        if spec.run_at is not None:
            rows.append(["run at", utc_time(spec.run_at)])
    if rec is not None:
        rows.append(["since", utc_time(rec.since_at)])
        for label, at in (("due", rec.due_at), ("started", rec.started_at)):
            if at is not None:
                rows.append([label, utc_time(at)])
        if rec.node is not None:
            rows.append(["node", rec.node])
        if rec.reason is not None:
            rows.append(["reason", rec.reason])
        if rec.error is not None:
            retry = "" if rec.error.retryable else " (not retryable)"
            rows.append(["error", f"{rec.error.type}: {rec.error.message}{retry}"])
        if state is State.PROCESSING and rec.progress is not None:
            rows.append(["progress", _short_json(rec.progress)])
        if state is State.COMPLETED:
            rows.append(["result", _short_json(rec.result)])
        for entry in rec.history:
            rows.append([f"attempt {entry.attempt}", history_line(entry)])
    rows.append(["payload", _short_json(spec.payload) if spec is not None else "(gone)"])
    return [[label, value.replace("\n", " ")] for label, value in rows]


def history_line(entry: AttemptEnd) -> str:
    """One ended attempt on a line: node, start, end, outcome and error."""
    parts = [f"on {entry.node or '-'}"]
    if entry.started_at is not None:
        parts.append(f"started {utc_time(entry.started_at)}")
    parts.append(f"ended {utc_time(entry.ended_at)}")
    parts.append(entry.outcome)
    if entry.error is not None:
        parts.append(f"{entry.error.type}: {entry.error.message}")
    return ", ".join(parts)


def queue_table(configs: dict[str, QueueConfig]) -> list[list[str]]:
    table = [["QUEUE", "PAUSED", "MAX RUNNING", "PER KEY", "RATE", "PER KEY RATE"]]
    for name, c in configs.items():
        table.append(
            [
                name,
                yes(c.paused),
                _opt(c.max_running),
                _opt(c.key_max_running),
                _rate(c.rate),
                _rate(c.key_rate),
            ]
        )
    return table


def limit_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The limits given on tmctl's command line, as the protocol's JSON."""
    changes: dict[str, Any] = {}
    for flag, name in (("max_running", "max_running"), ("per_key", "key_max_running")):
        value = getattr(args, flag)
        if value is not None:
            changes[name] = None if value == "none" else _whole(value, flag)
    for flag, name in (("rate", "rate"), ("key_rate", "key_rate")):
        value = getattr(args, flag)
        if value is not None:
            changes[name] = None if value == "none" else parse_rate(value)
    if not changes:
        raise ValueError("give at least one of --max-running, --per-key, --rate, --key-rate")
    return changes


def _whole(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--{flag.replace('_', '-')} takes a whole number or none") from None


#: Duration units tmctl reads (``90s``, ``10m``, ``2h``, ``7d``; a bare number is seconds).
UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """``90s``, ``10m``, ``2h``, ``7d`` or ``30`` (seconds) as seconds (ArgumentTypeError
    otherwise, so that argparse names the flag)."""
    try:
        scale = UNITS.get(text[-1:])
        seconds = float(text[:-1]) * scale if scale else float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"a duration is e.g. 90s, 10m, 2h or 7d, not {text!r}")
    return seconds


def _seconds(text: str) -> float:
    if text.endswith("ms"):
        return float(text[:-2]) / 1000
    scale = {"s": 1.0, "m": 60.0, "h": 3600.0}.get(text[-1:])
    return float(text[:-1]) * scale if scale else float(text)


def parse_rate(text: str) -> dict[str, Any]:
    """``100/60s``, ``5/1m``, ``10/1h``, ``3/2.5`` (seconds) as {limit, period_s}; a
    ``+SLACK`` after the period (``5/2s+50ms``) adds the rate's ``slack_s``."""
    try:
        count, period = text.split("/", 1)
        period, plus, slack = period.partition("+")
        rate: dict[str, Any] = {"limit": int(count), "period_s": _seconds(period)}
        if plus:
            rate["slack_s"] = _seconds(slack)
        return rate
    except ValueError:
        raise ValueError(
            f"a rate is COUNT/PERIOD[+SLACK], e.g. 100/60s, 5/1m or 5/2s+50ms, not {text!r}"
        ) from None


def yes(flag: bool) -> str:
    """A flag as a cell: ``yes`` or ``-``."""
    return "yes" if flag else "-"


def _opt(value: int | None) -> str:
    return "-" if value is None else str(value)


def _rate(rate: RateLimit | None) -> str:
    if rate is None:
        return "-"
    slack = f"+{rate.slack_s:g}s" if rate.slack_s else ""
    return f"{rate.limit}/{rate.period_s:g}s{slack}"


def _short_json(value: Any, limit: int = 300) -> str:
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters: --json shows it all)"


def utc_time(epoch: float) -> str:
    """An epoch time as a cell: ISO 8601 in UTC, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def workers_table(
    nodes: Sequence[NodeInfo], inflight: dict[str, int], leader: str | None
) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """The workers each live sidecar registered (its handlers' concurrency per queue,
    in-process and SDK workers summed), as JSON rows and a table."""
    data: list[dict[str, Any]] = []
    table = [["NODE", "HOST", "PID", "QUEUE", "CONCURRENCY", "IN FLIGHT", "VERSION", "UP SINCE"]]
    for n in nodes:
        data.append(
            {
                "node": n.id,
                "host": n.host,
                "pid": n.pid,
                "version": n.version,
                "started_at": n.started_at,
                "leader": n.id == leader,
                "capacity": n.capacity,
                "in_flight": inflight.get(n.id, 0),
            }
        )
        queues = sorted(n.capacity.items()) or [("-", 0)]
        for i, (queue, concurrency) in enumerate(queues):
            first = i == 0
            table.append(
                [
                    n.id + (" (leader)" if first and n.id == leader else "") if first else "",
                    n.host if first else "",
                    str(n.pid) if first else "",
                    queue,
                    str(concurrency),
                    str(inflight.get(n.id, 0)) if first else "",
                    (n.version or "-") if first else "",
                    (utc_time(n.started_at) if n.started_at else "-") if first else "",
                ]
            )
    return data, table
