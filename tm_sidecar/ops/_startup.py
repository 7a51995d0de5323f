"""Start-up's checks and its fatal errors, each one line (issue 21 items 5 to 7, issue 20
item 8).

- :func:`precheck`: what can be known wrong before etcd is asked anything (unreadable
  TLS files, a socket group that does not exist or that this user is not in, a
  ``--handler`` that cannot be imported), as one sentence.
- :func:`wait_for_etcd`: the first call to etcd, repeated while etcd is only
  unavailable, with one log line per change of error (or every
  :data:`REPEAT_S` seconds, with the count) naming the endpoints, a ``STATUS=`` line for
  systemd on each, and an end: ``--etcd-wait``'s limit, or a failure that waiting does
  not cure (TLS, a password, a permission), told at once.
- :func:`one_line`: any exception, exception groups included, as one sentence, for the
  one log line a fatal error gets instead of a traceback.
"""

from __future__ import annotations

import grp
import importlib
import logging
import math
import os
import signal
from collections.abc import AsyncIterator, Callable, Sequence

import attrs
import trio

from .._errors import EtcdError, EtcdUnavailable
from ..core import check_name
from ..etcd import Etcd, backoff
from ._settings import Settings

log = logging.getLogger("tm_sidecar.cli")

NOT_READY = "signal received before the sidecar was ready: stopping"

#: While the error stays the same, one line every this many seconds.
REPEAT_S = 10.0

#: Words of a connection failure that waiting does not cure: the TLS handshake failed
#: (a wrong CA, a missing or refused client certificate). gRPC and ``requests`` both
#: report it as unavailability, with OpenSSL's words in the detail.
_TLS_WORDS = ("handshake failed", "ssl", "certificate")


class FatalStartup(Exception):
    """A start-up that cannot succeed, with the one sentence that says why."""


def etcd_failure_is_fatal(exc: Exception) -> bool:
    """Whether a failed first call to etcd will fail the same way however long we wait:
    a refusal (a password, a permission, an empty user name), or a TLS handshake."""
    if isinstance(exc, EtcdUnavailable):
        text = str(exc).lower()
        return any(word in text for word in _TLS_WORDS)
    return isinstance(exc, EtcdError)


def explain_etcd_failure(exc: Exception, namespace_prefix: str) -> str:
    """A fatal etcd failure as one sentence, with what to check."""
    text = str(exc)
    lower = text.lower()
    if "permission denied" in lower:
        return (
            f"etcd refused a request ({text}): the etcd user needs read-write on the prefix "
            f"{namespace_prefix} (see docs/operations.md, 'etcd with authentication')"
        )
    if "commonname of client sending a request against gateway" in lower:
        return (
            f"etcd refused the gateway's request ({text}): etcd refuses gateway requests "
            "made with a client certificate that has a CommonName; use --etcd-transport grpc, "
            "or a client certificate without a CommonName"
        )
    if "authentication failed" in lower or "user name is empty" in lower:
        return f"etcd refused the credentials ({text}): check --etcd-user and the password"
    if isinstance(exc, EtcdUnavailable):
        return (
            f"the TLS handshake with etcd failed ({text}): check --etcd-ca against etcd's "
            "certificate, and --etcd-cert/--etcd-key if etcd asks for client certificates"
        )
    return f"etcd refused the first request: {text}"


def one_line(exc: BaseException) -> str:
    """``exc`` as one sentence: the first real failure inside exception groups, its
    type and message, with newlines folded."""
    leaf = _first_leaf(exc)
    message = " ".join(str(leaf).split())
    if isinstance(leaf, FatalStartup):
        return message
    if isinstance(leaf, EtcdError) and "permission denied" in message:
        # A permission removed while running (issue 21): say which one is needed.
        return (
            f"etcd refused a request ({message}): the etcd user needs read-write on the "
            "namespace's prefix, /tm/<namespace>/"
        )
    return f"{type(leaf).__name__}: {message}" if message else type(leaf).__name__


def _first_leaf(exc: BaseException) -> BaseException:
    if isinstance(exc, BaseExceptionGroup):
        leaves = [_first_leaf(e) for e in exc.exceptions]
        real = [e for e in leaves if not isinstance(e, trio.Cancelled)]
        return (real or leaves)[0]
    return exc


# -- before etcd ---------------------------------------------------------------------------


def _readable(flag: str, path: str | None) -> str | None:
    if not path:
        return None
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        return f"{flag} {path}: cannot read it as uid {os.geteuid()}: {exc.strerror}"
    return None


def _group_problem(group: str | None) -> str | None:
    if not group:
        return None
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        return f"--socket-group {group}: no such group"
    if os.geteuid() != 0 and gid != os.getegid() and gid not in os.getgroups():
        return (
            f"--socket-group {group}: this user (uid {os.geteuid()}) is not in that group, "
            "so it cannot give the socket to it (add it, or start it with that group)"
        )
    return None


def check_handler(spec: str) -> str | None:
    """Why a ``--handler`` spec cannot be loaded, or None."""
    target, _, queue = spec.partition("@")
    module_name, _, func_name = target.partition(":")
    if not module_name or not func_name:
        return f"--handler {spec}: expected MODULE:FUNCTION[@QUEUE]"
    try:
        check_name("queue", queue or "default")
        module = importlib.import_module(module_name)
    except ImportError as exc:
        return f"--handler {spec}: cannot import {module_name}: {exc}"
    except ValueError as exc:
        return f"--handler {spec}: {exc}"
    except Exception as exc:  # the module itself failed while importing
        return f"--handler {spec}: importing {module_name} failed: {one_line(exc)}"
    if not callable(getattr(module, func_name, None)):
        return f"--handler {spec}: {module_name} has no function {func_name}"
    return None


@attrs.frozen(kw_only=True)
class Prechecks:
    """What start-up checks before it asks etcd anything."""

    #: Files to read, each with the flag that names it.
    files: Sequence[tuple[str, str | None]] = ()
    socket_group: str | None = None
    handlers: Sequence[str] = ()

    @classmethod
    def of(cls, settings: Settings) -> Prechecks:
        """The daemon's checks for ``settings``."""
        return cls(
            files=(
                ("--etcd-ca", settings.etcd_ca),
                ("--etcd-cert", settings.etcd_cert),
                ("--etcd-key", settings.etcd_key),
            ),
            socket_group=settings.socket_group,
            handlers=settings.handler,
        )


def precheck(checks: Prechecks) -> str | None:
    """The first problem found, as one sentence, or None."""
    for flag, path in checks.files:
        problem = _readable(flag, path)
        if problem:
            return problem
    problem = _group_problem(checks.socket_group)
    if problem:
        return problem
    for spec in checks.handlers:
        problem = check_handler(spec)
        if problem:
            return problem
    return None


# -- the first call to etcd ----------------------------------------------------------------


@attrs.define(eq=False, kw_only=True)
class EtcdWait:
    """Waits for etcd's first answer (see the module's docstring)."""

    etcd: Etcd
    endpoints: Sequence[str]
    #: A key of the namespace: the probe reads it, so a role without read on the prefix
    #: is told at once rather than after the sidecar's services started.
    key: str
    #: Give up after this long (0: never).
    limit_s: float = 0.0
    #: Each waiting line, for systemd (``STATUS=...``).
    status: Callable[[str], None] = lambda _: None
    backoff: Callable[[int], float] = backoff

    def starting(self, send: Callable[..., None]) -> None:
        """Tell systemd (``send``: the notifier's) that start-up waits for etcd, and, with
        a limit, to allow the start that long (its start timeout must not cut the wait the
        operator asked for)."""
        lines = [f"STATUS=connecting to etcd at {','.join(self.endpoints)}"]
        if self.limit_s > 0:
            lines.append(f"EXTEND_TIMEOUT_USEC={int((self.limit_s + 30) * 1e6)}")
        send(*lines)

    async def run_or_signal(self, signals: AsyncIterator[int]) -> bool:
        """:meth:`run`, unless SIGTERM or SIGINT comes first (then False). Raises
        :class:`FatalStartup` outside any exception group."""
        outcome: list[FatalStartup | None] = []
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    log.warning(NOT_READY, extra={"signal": name})
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(on_signal)
            try:
                await self.run()
                outcome.append(None)
            except FatalStartup as exc:
                outcome.append(exc)
            nursery.cancel_scope.cancel()
        if not outcome:
            return False
        if outcome[0] is not None:
            raise outcome[0]
        return True

    async def run(self) -> int:
        """The revision etcd answered with; raises :class:`FatalStartup`."""
        started = trio.current_time()
        deadline = started + self.limit_s if self.limit_s > 0 else math.inf
        failures = 0
        last_error = ""
        last_line = -math.inf
        where = ",".join(self.endpoints)
        while True:
            try:
                with trio.move_on_at(deadline):
                    return await self.etcd.revision(self.key)
                error = last_error or f"no answer within {self.limit_s:g} s"
            except (EtcdUnavailable, EtcdError) as exc:
                if etcd_failure_is_fatal(exc):
                    raise FatalStartup(explain_etcd_failure(exc, self.key)) from exc
                error = str(exc)
            failures += 1
            now = trio.current_time()
            if now >= deadline:
                raise FatalStartup(
                    f"etcd at {where} did not answer within --etcd-wait {self.limit_s:g} s "
                    f"({failures} tries; last error: {error})"
                )
            wait = self.backoff(failures)
            if error != last_error or now - last_line >= REPEAT_S:
                last_error, last_line = error, now
                log.warning(
                    "waiting for etcd",
                    extra={
                        "etcd": where,
                        "error": error,
                        "tries": failures,
                        "waited_s": round(now - started, 1),
                        "retry_in_s": round(wait, 3),
                    },
                )
                self.status(f"waiting for etcd at {where}: {error}")
            await trio.sleep(min(wait, max(deadline - now, 0)))


__all__ = [
    "REPEAT_S",
    "EtcdWait",
    "FatalStartup",
    "Prechecks",
    "check_handler",
    "etcd_failure_is_fatal",
    "explain_etcd_failure",
    "one_line",
    "precheck",
]
