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
import signal
import sys
from collections.abc import Sequence

import attrs
import trio

from .._errors import EtcdUnavailable, TaskManagerError
from ..core import Keyspace, LayoutRefused, State, check_layout, read_layout
from ..etcd import Etcd, EtcdConfig, connect
from ._embedded import PORTS_FILE
from ._settings import Settings, add_flags, load_settings
from ._tmctl_commands import Ctl
from ._tmctl_format import parse_duration
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
        "workers",
        help="the live sidecars and the workers each registered: concurrency per queue "
        "(in-process and SDK workers), tasks in flight",
    )
    sub.add_parser(
        "endpoint",
        help="print the etcd URL tmctl uses (the embedded etcd's, found by --data-dir, or "
        "--etcd): export ETCDCTL_ENDPOINTS=$(tmctl endpoint); warns on stderr when it "
        "does not answer",
    )
    ls = sub.add_parser("ls", help="tasks in one state")
    ls.add_argument("state", choices=STATES)
    ls.add_argument("--limit", type=int, default=100)
    ls.add_argument("--queue", help="only the tasks of this queue")
    ls.add_argument(
        "--older-than",
        type=parse_duration,
        metavar="DURATION",
        help="only the tasks in this state for longer than this (90s, 10m, 2h, 7d)",
    )
    show = sub.add_parser("show", help="one task: payload, options, state")
    show.add_argument("task_id")
    retry = sub.add_parser("retry", help="send failed tasks back to pending with fresh attempts")
    group = retry.add_mutually_exclusive_group(required=True)
    group.add_argument("task_id", nargs="?")
    group.add_argument("--all-failed", action="store_true")
    group.add_argument("--queue", help="every failed task of this queue")
    cancel = sub.add_parser("cancel", help="move a pending, delayed or running task to failed")
    cancel.add_argument("task_id")
    purge = sub.add_parser(
        "purge", help="delete every completed or failed record (and its payload)"
    )
    purge.add_argument("state", choices=["completed", "failed"])
    purge.add_argument("--queue", help="only the records of this queue")
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    recover = sub.add_parser(
        "recover",
        help="recover a full etcd (NOSPACE alarm): delete completed records and their "
        "payloads with plain deletes, compact, defragment every member, disarm the alarm; "
        "with etcd auth on it needs read-write on the namespace's prefix and, to "
        "defragment, etcd's root role (tmctl --etcd-user root recover)",
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
    limit.add_argument(
        "--rate",
        help="starts per period, e.g. 100/60s (or none); +SLACK, e.g. 5/2s+50ms, counts "
        "each window that much longer, for the delay from an assignment to its start",
    )
    limit.add_argument("--key-rate", help="starts per period per concurrency key (or none)")
    add_schedule_parsers(sub)
    # --json after the verb too (tmctl ls failed --json); SUPPRESS keeps the top-level
    # flag's value when the verb's is not given.
    for command in sub.choices.values():
        command.add_argument(
            "--json", action="store_true", default=argparse.SUPPRESS, help="JSON output"
        )
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


async def _confirm_purge(ctl: Ctl, state: State, queue: str | None) -> bool:
    """Ask before deleting for good; refuse when nobody can be asked."""
    of_queue = f" of queue {queue!r}" if queue is not None else ""
    if not sys.stdin.isatty():
        print(
            f"tmctl: purge deletes every {state.value} record{of_queue} for good: add --yes "
            "to do it without a terminal to confirm on",
            file=sys.stderr,
        )
        return False
    count = len(await ctl.records(state, queue))
    return await _ask(
        f"Delete {count} {state.value} records{of_queue}, and their payloads, of namespace "
        f"{ctl.ks.namespace!r}?",
        "nothing purged",
    )


async def _warn_if_silent(cfg: EtcdConfig, data_dir: str | None) -> None:
    """Warn on stderr when the endpoint found does not answer (a stale ports file, a
    sidecar that is not running, a wrong --etcd): the URL alone would not say so."""
    etcd = connect(attrs.evolve(cfg, timeout_s=min(cfg.timeout_s, 2.0)))
    error = "no answer within 3 s"
    try:
        with trio.move_on_after(3.0):
            await etcd.status()
            return
    except TaskManagerError as exc:
        error = str(exc)
    finally:
        await etcd.aclose()
    hint = f" (the embedded etcd of {data_dir}: is its sidecar running?)" if data_dir else ""
    print(
        f"tmctl: warning: {','.join(cfg.endpoints)} does not answer: {error}{hint}", file=sys.stderr
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


#: The commands that write to the namespace: refused on a layout newer than this
#: release knows, whose records it might rewrite wrongly (reads still work).
WRITES = frozenset(
    {
        "retry",
        "cancel",
        "purge",
        "recover",
        "pause",
        "resume",
        "limit",
        "schedule",
        "pause-schedule",
        "resume-schedule",
        "unschedule",
    }
)


async def _check_layout(etcd: Etcd, ks: Keyspace) -> None:
    kv = await etcd.get(ks.layout())
    try:
        layout = read_layout(None if kv is None else kv.value)
    except ValueError as exc:
        raise LayoutRefused(f"{ks.layout()}: {exc}") from exc
    check_layout(layout, key=ks.layout(), refusal="tmctl will not write to it")


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
    cfg = settings.etcd_config(endpoints)
    if args.command == "endpoint":
        print(",".join(endpoints), flush=True)
        await _warn_if_silent(cfg, settings.data_dir if embedded else None)
        return 0
    etcd = connect(cfg)
    ctl = Ctl(etcd, Keyspace(namespace=settings.namespace), args.json)
    try:
        if args.command in WRITES:
            await _check_layout(etcd, ctl.ks)
        match args.command:
            case "status":
                await ctl.status()
            case "workers":
                await ctl.workers()
            case "leader":
                leader = await ctl.leader()
                ctl.out({"leader": leader}, [["LEADER"], [leader or "-"]])
            case "ls":
                await ctl.ls(State(args.state), args.limit, args.queue, args.older_than)
            case "show":
                return await ctl.show(args.task_id)
            case "retry":
                return await ctl.retry(args.task_id, args.all_failed, args.queue)
            case "cancel":
                return await ctl.cancel(args.task_id)
            case "purge":
                state = State(args.state)
                if not args.yes and not await _confirm_purge(ctl, state, args.queue):
                    return 1
                await ctl.purge(state, args.queue)
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
    except LayoutRefused as exc:
        print(f"tmctl: {exc}", file=sys.stderr)
        return 2
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
        code = trio.run(run, args, settings)
        sys.stdout.flush()  # here, so that a closed pipe is met inside the try
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        code = _pipe_closed()
    except BaseExceptionGroup as group:
        _, rest = group.split(BrokenPipeError)
        if rest is not None:
            raise
        code = _pipe_closed()
    sys.exit(code)


def _pipe_closed() -> int:
    """The reader of stdout went away (``tmctl ls pending | head``): stop quietly, as a
    tool killed by SIGPIPE would, without a traceback or a second error at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 128 + signal.SIGPIPE
