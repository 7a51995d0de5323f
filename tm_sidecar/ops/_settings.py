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

Size: the table itself, one field per setting with its help, is most of it; the docs'
table and the systemd unit's environment file are generated from it here.

A small table and argparse rather than a library (pydantic-settings, say): the layering
is twenty lines, argparse already gives both commands their flags and help, and the
table stays a plain attrs class that mypy types field by field.
"""

from __future__ import annotations

import argparse
import os
import textwrap
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


def _otel_check(value: Any) -> None:
    """``--otel`` needs the extra: say so at start-up, not at the first span."""
    from ._otel import MISSING, otel_installed

    if value and not otel_installed():
        raise ValueError(MISSING)


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
    result_room: int = setting(
        0,
        "bytes of etcd kept free for the outcome of each accepted task at least; 0: room "
        "for results like the largest of the latest ones. Set it to the result limit "
        "(262144) and a full etcd is survivable whatever size the results are, at the cost "
        "of fewer waiting tasks",
        kind=INT,
        metavar="BYTES",
        check=at_least(0),
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
    etcd_password_file: str | None = setting(
        None,
        "a file holding the etcd password (it wins over --etcd-password; under systemd, "
        "LoadCredential= and $CREDENTIALS_DIRECTORY/NAME)",
        clis=BOTH,
        metavar="FILE",
    )
    etcd_wait: float = setting(
        0.0,
        "at start-up, give up (one line, exit 1) if etcd has not answered within this many "
        "seconds; 0: wait for ever, logging each retry",
        kind=FLOAT,
        metavar="SECONDS",
        check=at_least(0),
    )
    compact: bool | None = setting(
        None,
        "let the leader compact etcd's history every 5 minutes: the whole cluster's history, "
        "not only the queue's, so on an etcd shared with other software leave it off and "
        "use etcd's --auto-compaction-*",
        kind=BOOL,
        default_text="on for the embedded etcd, off for an external one",
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
    otel: bool = setting(
        False,
        "export the sidecar's own spans of traced tasks (the create's commit, the wait in "
        "the queue, the assignment) over OTLP, as the standard OTEL_* environment "
        "variables configure it; needs pip install 'tm-sidecar[otel]'",
        kind=BOOL,
        check=_otel_check,
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
            password=self.password(),
            # A string checked against EtcdConfig's own names when loaded.
            transport=cast(Any, self.etcd_transport),
        )

    def password(self) -> str | None:
        """The etcd password: the file's (``etcd_password_file``) if one is named, else
        ``etcd_password``. Raises :class:`SettingsError` for a file that cannot be read."""
        if self.etcd_password_file:
            return _read_secret(self.sources.get("etcd_password_file", ""), self.etcd_password_file)
        return self.etcd_password

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


def _read_secret(source: str, path: str) -> str:
    """The secret a file holds (its last newline dropped); SettingsError naming the
    file, never its content, if it cannot be read or is empty."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise SettingsError(f"{source} {path}: cannot read it: {why}") from None
    if not text:
        raise SettingsError(f"{source} {path}: the file is empty")
    return text


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
        settings.password()  # a password file that cannot be read is a bad setting: say so now
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
    "env_file",
    "load_settings",
    "markdown_table",
    "resolve",
    "settings_of",
]


#: What the systemd unit sets in its ``Environment=`` lines (the environment file, read
#: after them, overrides them): its socket and its state directory.
UNIT_VALUES = {"socket": "/run/tm-sidecar/tm.sock", "data_dir": "/var/lib/tm-sidecar"}

_ENV_HEADER = """\
# /etc/tm-sidecar/tm-sidecar.env: the settings of the tm-sidecar service, as environment
# variables. Every setting tm-sidecar takes is here, commented out at its default:
# uncomment and set the ones you change. An empty value counts as unset.
#
# Generated from the settings table (python -m tm_sidecar.ops._settings --env-file;
# tests/ops/test_startup.py holds them equal): `tm-sidecar --help` and the table in
# docs/operations.md say the same. Keep this file readable by root only (0600) when it
# holds a password; better, give the password as a credential (see the unit).
"""


def env_file(rows: Iterable[Setting] = SETTINGS) -> str:
    """The systemd unit's environment file: every setting of tm-sidecar, each with its
    help and its default (``systemd/tm-sidecar.env`` is this text)."""
    out = [_ENV_HEADER]
    for s in rows:
        if "tm-sidecar" not in s.clis:
            continue
        meaning = s.help + (f" (one of {', '.join(s.choices)})" if s.choices else "")
        if s.name in UNIT_VALUES:
            value = UNIT_VALUES[s.name]
            default = f"the unit sets {value}"
        else:
            shown = s.shown_default()
            value = "" if s.secret or shown is None or s.default_text else shown
            default = f"default: {shown}" if shown is not None else ""
        note = "; ".join(x for x in (default, "a secret" if s.secret else "") if x)
        text = f"{meaning}" + (f" ({note})" if note else "")
        out.append("\n" + "".join(f"# {line}\n" for line in _wrap(text)) + f"#{s.env}={value}\n")
    return "".join(out)


def _wrap(text: str, width: int = 88) -> list[str]:
    return textwrap.wrap(text, width - 2, break_long_words=False, break_on_hyphens=False)


if __name__ == "__main__":  # python -m tm_sidecar.ops._settings: the table for the docs
    import sys

    print(env_file() if "--env-file" in sys.argv else markdown_table(), end="")
