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

from ..core import NodeInfo, QueueConfig, RateLimit, Record, State, TaskSpec


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
    rows.append(["payload", _short_json(spec.payload) if spec is not None else "(gone)"])
    return [[label, value.replace("\n", " ")] for label, value in rows]


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


def parse_rate(text: str) -> dict[str, Any]:
    """``100/60s``, ``5/1m``, ``10/1h``, ``3/2.5`` (seconds) as {limit, period_s}."""
    try:
        count, period = text.split("/", 1)
        scale = {"s": 1.0, "m": 60.0, "h": 3600.0}.get(period[-1:])
        seconds = float(period[:-1]) * scale if scale else float(period)
        return {"limit": int(count), "period_s": seconds}
    except ValueError:
        raise ValueError(f"a rate is COUNT/PERIOD, e.g. 100/60s or 5/1m, not {text!r}") from None


def yes(flag: bool) -> str:
    """A flag as a cell: ``yes`` or ``-``."""
    return "yes" if flag else "-"


def _opt(value: int | None) -> str:
    return "-" if value is None else str(value)


def _rate(rate: RateLimit | None) -> str:
    return "-" if rate is None else f"{rate.limit}/{rate.period_s:g}s"


def _short_json(value: Any, limit: int = 300) -> str:
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters: --json shows it all)"


def utc_time(epoch: float) -> str:
    """An epoch time as a cell: ISO 8601 in UTC, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
