"""The settings of both command lines (``tm-sidecar`` and ``tmctl``), defined once.

:class:`Settings` is the one table: each of its fields is a setting, and the field's
metadata says everything else about it (kind, default, environment variable, TOML key,
command-line flag, help, whether it is a secret, which commands take it).
:data:`SETTINGS` lists them. :func:`add_flags` puts a command's settings on its argument
parser; :func:`resolve` layers them: a flag wins over the environment, which wins over
the TOML file (``--config``, ``TM_CONFIG``), which wins over the default. An empty
environment variable counts as unset (``TM_ETCD=`` in an environment file).

This module is the table and the face of the settings; what one setting is (its kind,
its row, its checks) is ``_setting.py``, and the layering is ``_layers.py``.

A small table and argparse rather than a library (pydantic-settings, say): the layering
is twenty lines, argparse already gives both commands their flags and help, and the
table stays a plain attrs class that mypy types field by field.
"""

from __future__ import annotations

import argparse
import os
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import attrs

from ..etcd import EtcdConfig
from ._layers import CONFIG_ENV, add_setting_flags, resolve_values
from ._setting import (
    BOOL,
    BOTH,
    FLOAT,
    INT,
    INTS,
    OCTAL,
    TEXTS,
    WORD,
    Cli,
    Kind,
    Setting,
    SettingsError,
    at_least,
    bind_address,
    fraction,
    more_than,
    name_check,
    rows_of,
    setting,
)


def default_data_dir(environ: Mapping[str, str] | None = None) -> str:
    """Where the embedded etcd keeps its data unless told otherwise."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_DATA_HOME") or str(Path(env.get("HOME") or Path.home()) / ".local/share")
    return str(Path(base) / "tm-sidecar")


def default_socket(environ: Mapping[str, str] | None = None) -> str:
    """The documented default socket path."""
    env = os.environ if environ is None else environ
    runtime = env.get("XDG_RUNTIME_DIR")
    return str(Path(runtime) / "tm-sidecar.sock") if runtime else "/tmp/tm-sidecar.sock"


def _transports() -> tuple[str, ...]:
    """The transport names ``EtcdConfig`` takes, read from its type (one place says them)."""
    try:
        hint = typing.get_type_hints(EtcdConfig)["transport"]
    except Exception:  # an unreadable hint only costs the early check
        return ()
    return tuple(str(a) for a in typing.get_args(hint))


@attrs.frozen(kw_only=True)
class Settings:
    """The settings in force: every field is one setting, described by its metadata.

    Build it with :func:`resolve` (or :func:`load_settings`), which fills every field.
    Secrets are masked in the repr.
    """

    etcd: str = setting(
        "",
        "comma-separated etcd endpoints, e.g. http://10.0.0.1:2379; empty: the embedded "
        "etcd (tm-sidecar starts it; tmctl finds it by --data-dir)",
        clis=BOTH,
        default_text="embedded",
        metavar="URLS",
    )
    socket: str = setting(
        default_socket,
        "Unix socket path for the SDK",
        default_text="$XDG_RUNTIME_DIR/tm-sidecar.sock, else /tmp/tm-sidecar.sock",
        metavar="PATH",
    )
    socket_mode: int = setting(
        0o660, "permissions of the socket, octal", kind=OCTAL, metavar="MODE"
    )
    socket_group: str | None = setting(None, "group of the socket", metavar="GROUP")
    # RUF009: these calls are attrs fields (without defaults), not shared default values.
    allow_uid: list[int] = setting(  # noqa: RUF009
        [],
        "accept clients with this uid only (repeat the flag; comma-separated in the "
        "environment); default: anyone the socket lets in",
        kind=INTS,
        metavar="UID",
    )
    node_id: str = setting(
        "",
        "this node's id, unique in the cluster",
        default_text="the host name",
        check=name_check("node id"),
    )
    namespace: str = setting(
        "default",
        "namespace: keys live under /tm/<namespace>/",
        clis=BOTH,
        check=name_check("namespace"),
    )
    data_dir: str = setting(
        default_data_dir,
        "data directory of the embedded etcd (tmctl: where it finds the embedded etcd's "
        "port, in tm-ports.json)",
        clis=BOTH,
        default_text="$XDG_DATA_HOME/tm-sidecar, else ~/.local/share/tm-sidecar",
        metavar="DIR",
    )
    lease_ttl: int = setting(
        5,
        "session lease TTL in seconds (at least 2, etcd's minimum): failover and dead-node "
        "recovery take about this long",
        kind=INT,
        metavar="SECONDS",
        check=at_least(2),
    )
    retention: float = setting(
        24 * 3600.0,
        "seconds to keep completed and failed records; 0 keeps them for ever",
        kind=FLOAT,
        metavar="SECONDS",
        check=at_least(0),
    )
    max_payload: int = setting(
        256 * 1024, "largest task payload in bytes", kind=INT, metavar="BYTES", check=at_least(1)
    )
    etcd_quota: int = setting(
        2 * 1024**3,
        "etcd's database quota in bytes (its --quota-backend-bytes; the embedded etcd is "
        "started with it)",
        kind=INT,
        metavar="BYTES",
        check=at_least(1),
    )
    quota_fraction: float = setting(
        0.8,
        "refuse new tasks once etcd's database fills this fraction of the quota, so that "
        "the tasks already accepted can still be assigned and finished",
        kind=FLOAT,
        metavar="FRACTION",
        check=fraction,
    )
    create_deadline: float = setting(
        3.0,
        "seconds a create may wait for etcd before it fails with etcd_unavailable (the task "
        "may exist or not: repeat it with its task_id)",
        kind=FLOAT,
        metavar="SECONDS",
        check=more_than(0),
    )
    max_live_tasks: int = setting(
        1_000_000,
        "refuse creates while the namespace holds this many unfinished tasks",
        kind=INT,
        metavar="COUNT",
        check=at_least(1),
    )
    etcd_ca: str | None = setting(
        None, "CA file to verify etcd's certificate", clis=BOTH, metavar="FILE"
    )
    etcd_cert: str | None = setting(None, "client certificate for etcd", clis=BOTH, metavar="FILE")
    etcd_key: str | None = setting(None, "client key for etcd", clis=BOTH, metavar="FILE")
    etcd_user: str | None = setting(None, "etcd user name", clis=BOTH, metavar="USER")
    etcd_password: str | None = setting(
        None,
        "etcd password; prefer the environment variable (a flag shows in ps)",
        clis=BOTH,
        secret=True,
        metavar="PASSWORD",
    )
    etcd_transport: str = setting(
        "grpc",
        "how to reach etcd: its native gRPC API (grpc, the default), or its JSON gateway, "
        "for when only the gateway can be reached",
        kind=WORD,
        clis=BOTH,
        choices=_transports() or None,
    )
    etcd_binary: str | None = setting(
        None, "etcd binary for the embedded etcd; default: etcd on PATH", metavar="PATH"
    )
    handler: list[str] = setting(  # noqa: RUF009
        [],
        "run tasks in-process with this async function (for tests and demos; applications "
        "use the SDK); repeat the flag, comma-separated in the environment",
        kind=TEXTS,
        metavar="MODULE:FUNCTION[@QUEUE]",
    )
    concurrency: int = setting(
        4, "concurrency of each --handler", kind=INT, metavar="N", check=at_least(1)
    )
    drain_timeout: float = setting(
        10.0,
        "on SIGTERM, seconds to let running tasks finish before handing them back",
        kind=FLOAT,
        metavar="SECONDS",
        check=at_least(0),
    )
    demo: bool = setting(
        False, "create a few example tasks per second and run them, logging every event", kind=BOOL
    )
    demo_tasks: int = setting(
        0, "with --demo: stop after this many tasks (0: run on)", kind=INT, metavar="N"
    )
    log_level: str = setting(
        "info", "the least level logged", kind=WORD, choices=("debug", "info", "warning", "error")
    )
    log_format: str = setting(
        "logfmt", "one line per event, as logfmt or JSON", kind=WORD, choices=("logfmt", "json")
    )
    metrics: str = setting(
        "",
        "serve Prometheus metrics at http://HOST:PORT/metrics (HOST defaults to 127.0.0.1); "
        "empty: off",
        default_text="off",
        metavar="[HOST:]PORT",
        check=bind_address,
    )
    web: str = setting(
        "",
        "serve the web dashboard at http://HOST:PORT/ (HOST defaults to 127.0.0.1); empty: off",
        default_text="off",
        metavar="[HOST:]PORT",
    )
    web_actions: bool = setting(
        False,
        "let the dashboard retry, cancel and purge (each confirmed); default: read-only",
        kind=BOOL,
    )
    web_public_without_token: bool = setting(
        False,
        "let a read-only dashboard on an address that is not loopback run without a token, "
        "so that anyone who reaches it reads every task's payload and result; default: "
        "such a dashboard refuses to start",
        kind=BOOL,
    )
    web_token_file: str | None = setting(
        None,
        "a file holding the token the dashboard asks for (it wins over --web-token); "
        "default: no token",
        metavar="FILE",
    )
    web_token: str | None = setting(
        None,
        "the token the dashboard asks for; prefer --web-token-file or the environment "
        "variable (a flag shows in ps)",
        secret=True,
        metavar="TOKEN",
    )
    #: Where each value came from: ``--flag``, ``TM_VAR``, ``FILE: key`` or ``default``.
    sources: Mapping[str, str] = attrs.field(factory=dict, repr=False, eq=False)

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The etcd endpoints given (none: the embedded etcd)."""
        return tuple(e.strip() for e in self.etcd.split(",") if e.strip())

    def etcd_config(self, endpoints: Sequence[str]) -> EtcdConfig:
        """How to reach etcd at ``endpoints``: the one place both commands build it, so
        that tmctl speaks to etcd exactly as the daemon does."""
        return EtcdConfig(
            endpoints=tuple(endpoints),
            ca_file=self.etcd_ca,
            cert_file=self.etcd_cert,
            key_file=self.etcd_key,
            username=self.etcd_user,
            password=self.etcd_password,
            # A string checked against EtcdConfig's own names when loaded.
            transport=cast(Any, self.etcd_transport),
        )

    def shown(self) -> dict[str, Any]:
        """The settings in force, secrets masked (``--print-config``)."""
        out: dict[str, Any] = {}
        for s in SETTINGS:
            value = getattr(self, s.name)
            if s.kind is OCTAL:
                value = s.kind.show(value)  # a mode reads in octal: "0660", not 432
            out[s.name] = "***" if s.secret and value else value
        return out


#: Every setting, in the order of ``--help``.
SETTINGS: tuple[Setting, ...] = rows_of(Settings)
BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


def settings_of(cli: Cli) -> tuple[Setting, ...]:
    """The settings one command takes."""
    return tuple(s for s in SETTINGS if cli in s.clis)


def add_flags(parser: argparse.ArgumentParser, cli: Cli) -> None:
    """Put ``cli``'s settings, and ``--config``, on ``parser`` (see
    :func:`~._layers.add_setting_flags`)."""
    add_setting_flags(parser, settings_of(cli))


def resolve(
    cli: Cli, flags: argparse.Namespace | Mapping[str, Any], environ: Mapping[str, str]
) -> Settings:
    """The settings in force for ``cli``: each one from its flag if given, else its
    environment variable if set, else the TOML file's key, else the default.

    Settings the command does not take keep their defaults. Raises
    :class:`SettingsError` naming the flag, variable or file key of a bad value.
    """
    values, sources = resolve_values(SETTINGS, cli, flags, environ)
    return Settings(**values, sources=sources)


def load_settings(
    cli: Cli,
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[argparse.Namespace, Settings]:
    """Parse ``argv`` with ``parser`` (built with :func:`add_flags`) and resolve the
    settings; a bad setting ends the program with argparse's usage error."""
    args = parser.parse_args(argv)
    try:
        settings = resolve(cli, args, os.environ if environ is None else environ)
    except SettingsError as exc:
        parser.error(str(exc))
    return args, settings


def markdown_table(rows: Iterable[Setting] = SETTINGS) -> str:
    """The settings as docs/operations.md shows them (its test compares the two)."""
    lines = [
        "| setting (TOML key) | flag | environment | default | commands | meaning |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for s in rows:
        default = s.shown_default()
        meaning = s.help + (f" (one of {', '.join(s.choices)})" if s.choices else "")
        # A value in code; a description of one (the host name, say) as prose.
        shown = "" if default is None else default if s.default_text else f"`{default}`"
        commands = ", ".join(c for c in ("tm-sidecar", "tmctl") if c in s.clis)
        secret = " Secret: never logged or shown." if s.secret else ""
        lines.append(
            f"| `{s.name}` | `{s.flag}` | `{s.env}` | {shown} | {commands} | {meaning}.{secret} |"
        )
    return "\n".join(lines) + "\n"


__all__ = [
    "BOOL",
    "CONFIG_ENV",
    "SETTINGS",
    "Cli",
    "Kind",
    "Setting",
    "Settings",
    "SettingsError",
    "add_flags",
    "default_data_dir",
    "default_socket",
    "load_settings",
    "markdown_table",
    "resolve",
    "settings_of",
]


if __name__ == "__main__":  # python -m tm_sidecar.ops._settings: the table for the docs
    print(markdown_table(), end="")
