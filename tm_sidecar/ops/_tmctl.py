"""``tmctl``: look at and repair tm-sidecar's queues, straight from etcd (no sidecar needed).

With no ``--etcd``, it finds the embedded etcd of a sidecar on this host by its data
directory (the same default as the sidecar's, or ``--data-dir`` / ``TM_DATA_DIR``).

Its command line and its run: the parser (connection settings from the one settings
table, then the command), finding the embedded etcd, the prompts before a deletion, and
the dispatch to the commands (``_tmctl_commands.py``, which print through
``_tmctl_format.py``). ``main`` is the ``tmctl`` console script.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import trio

from .._errors import EtcdUnavailable, TaskManagerError
from ..core import Keyspace, State
from ..etcd import connect
from ._embedded import PORTS_FILE
from ._settings import Settings, add_flags, load_settings
from ._tmctl_commands import Ctl
from ._tmctl_schedules import add_schedule_parsers

STATES = [s.value for s in State]
#: What ``tmctl --help`` says of it (the module's docstring also says how it is built).
DESCRIPTION = """\
``tmctl``: look at and repair tm-sidecar's queues, straight from etcd (no sidecar needed).

With no ``--etcd``, it finds the embedded etcd of a sidecar on this host by its data
directory (the same default as the sidecar's, or ``--data-dir`` / ``TM_DATA_DIR``).
"""


def build_parser() -> argparse.ArgumentParser:
    """tmctl's arguments: its connection settings are the sidecar's (the same table, the
    same TM_* variables, the same --config file), then the command."""
    p = argparse.ArgumentParser(prog="tmctl", description=DESCRIPTION)
    add_flags(p, "tmctl")
    p.add_argument("--json", action="store_true", help="JSON output for scripts")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="leader, nodes with capacity and in-flight counts, queue depths")
    sub.add_parser("leader", help="the leading node")
    sub.add_parser(
        "endpoint",
        help="print the etcd URL tmctl uses (the embedded etcd's, found by --data-dir, or "
        "--etcd): export ETCDCTL_ENDPOINTS=$(tmctl endpoint)",
    )
    ls = sub.add_parser("ls", help="tasks in one state")
    ls.add_argument("state", choices=STATES)
    ls.add_argument("--limit", type=int, default=100)
    ls.add_argument("--queue", help="only the tasks of this queue")
    show = sub.add_parser("show", help="one task: payload, options, state")
    show.add_argument("task_id")
    retry = sub.add_parser("retry", help="send failed tasks back to pending with fresh attempts")
    group = retry.add_mutually_exclusive_group(required=True)
    group.add_argument("task_id", nargs="?")
    group.add_argument("--all-failed", action="store_true")
    cancel = sub.add_parser("cancel", help="move a pending, delayed or running task to failed")
    cancel.add_argument("task_id")
    purge = sub.add_parser(
        "purge", help="delete every completed or failed record (and its payload)"
    )
    purge.add_argument("state", choices=["completed", "failed"])
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    recover = sub.add_parser(
        "recover",
        help="recover a full etcd (NOSPACE alarm): delete completed records and their "
        "payloads with plain deletes, compact, defragment every member, disarm the alarm",
    )
    recover.add_argument("--include-failed", action="store_true", help="delete failed records too")
    recover.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    sub.add_parser("events", help="print task events as they happen (Ctrl-C stops)")
    pause = sub.add_parser(
        "pause", help="pause a queue cluster-wide: nothing more is assigned from it"
    )
    pause.add_argument("queue")
    resume = sub.add_parser("resume", help="resume a paused queue")
    resume.add_argument("queue")
    sub.add_parser("queues", help="every queue's flow control: paused, limits")
    limit = sub.add_parser(
        "limit",
        help="set a queue's cluster-wide limits (each flag given is set; 'none' lifts it)",
    )
    limit.add_argument("queue")
    limit.add_argument("--max-running", help="tasks of the queue running at once, or none")
    limit.add_argument("--per-key", help="tasks running at once per concurrency key, or none")
    limit.add_argument("--rate", help="starts per period, e.g. 100/60s (or none)")
    limit.add_argument("--key-rate", help="starts per period per concurrency key (or none)")
    add_schedule_parsers(sub)
    return p


class NoEndpoint(Exception):
    """Neither an endpoint nor an embedded etcd to be found."""


def embedded_endpoint(data_dir: str) -> str:
    """The client URL of the embedded etcd a sidecar keeps in ``data_dir``."""
    path = os.path.join(data_dir, PORTS_FILE)
    try:
        with open(path) as f:
            port = int(json.load(f)["client"])
    except FileNotFoundError:
        raise NoEndpoint(
            f"no --etcd (or TM_ETCD), and no embedded etcd in {data_dir} ({PORTS_FILE} is "
            "missing): give the etcd the sidecars use, or the sidecar's --data-dir"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise NoEndpoint(f"cannot read the embedded etcd's port from {path}: {exc}") from exc
    return f"http://127.0.0.1:{port}"


async def _confirm_purge(ctl: Ctl, state: State) -> bool:
    """Ask before deleting for good; refuse when nobody can be asked."""
    if not sys.stdin.isatty():
        print(
            f"tmctl: purge deletes every {state.value} record for good: add --yes to do it "
            "without a terminal to confirm on",
            file=sys.stderr,
        )
        return False
    count = await ctl.count(state)
    return await _ask(
        f"Delete {count} {state.value} records, and their payloads, of namespace "
        f"{ctl.ks.namespace!r}?",
        "nothing purged",
    )


async def _confirm_recover(ctl: Ctl, include_failed: bool) -> bool:
    """Ask before recovering (it deletes records for good); refuse with no terminal."""
    what = "completed and failed" if include_failed else "completed"
    if not sys.stdin.isatty():
        print(
            f"tmctl: recover deletes every {what} record for good: add --yes to do it "
            "without a terminal to confirm on",
            file=sys.stderr,
        )
        return False
    return await _ask(
        f"Delete every {what} record of namespace {ctl.ks.namespace!r} with its payload, "
        "then compact and defragment etcd and disarm its NOSPACE alarm?",
        "nothing done",
    )


async def _ask(question: str, declined: str) -> bool:
    try:
        answer = await trio.to_thread.run_sync(input, f"{question} [y/N] ")
    except EOFError:
        answer = ""
    if answer.strip().lower() in ("y", "yes"):
        return True
    print(f"tmctl: {declined}", file=sys.stderr)
    return False


async def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run one command; answers the exit code."""
    endpoints = settings.endpoints
    embedded = not endpoints
    if embedded:
        try:
            endpoints = (embedded_endpoint(settings.data_dir),)
        except NoEndpoint as exc:
            print(f"tmctl: {exc}", file=sys.stderr)
            return 2
    if args.command == "endpoint":
        print(",".join(endpoints))
        return 0
    cfg = settings.etcd_config(endpoints)
    etcd = connect(cfg)
    ctl = Ctl(etcd, Keyspace(namespace=settings.namespace), args.json)
    try:
        match args.command:
            case "status":
                await ctl.status()
            case "leader":
                leader = await ctl.leader()
                ctl.out({"leader": leader}, [["LEADER"], [leader or "-"]])
            case "ls":
                await ctl.ls(State(args.state), args.limit, args.queue)
            case "show":
                return await ctl.show(args.task_id)
            case "retry":
                return await ctl.retry(args.task_id, args.all_failed)
            case "cancel":
                return await ctl.cancel(args.task_id)
            case "purge":
                if not args.yes and not await _confirm_purge(ctl, State(args.state)):
                    return 1
                await ctl.purge(State(args.state))
            case "recover":
                if not args.yes and not await _confirm_recover(ctl, args.include_failed):
                    return 1
                await ctl.recover(cfg, args.include_failed)
            case "events":
                await ctl.events()
            case "pause" | "resume":
                return await ctl.set_paused(args.queue, args.command == "pause")
            case "queues":
                await ctl.queues()
            case "limit":
                return await ctl.limit(args.queue, args)
            case "schedules":
                await ctl.schedules()
            case "schedule":
                return await ctl.set_schedule(args)
            case "pause-schedule" | "resume-schedule":
                return await ctl.pause_schedule(args.name, args.command == "pause-schedule")
            case "unschedule":
                return await ctl.unschedule(args.name)
            case "run-schedule":
                return await ctl.run_schedule(args.name)
        return 0
    except EtcdUnavailable as exc:
        hint = f" (the embedded etcd of {settings.data_dir}: is its sidecar running?)"
        print(f"tmctl: {exc}{hint if embedded else ''}", file=sys.stderr)
        return 1
    except TaskManagerError as exc:
        print(f"tmctl: {exc}", file=sys.stderr)
        return 1
    finally:
        await etcd.aclose()


def main(argv: Sequence[str] | None = None) -> None:
    """The console script."""
    args, settings = load_settings("tmctl", build_parser(), argv)
    try:
        sys.exit(trio.run(run, args, settings))
    except KeyboardInterrupt:
        sys.exit(130)
