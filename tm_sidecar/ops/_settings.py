"""The settings of both command lines (``tm-sidecar`` and ``tmctl``), defined once.

:class:`Settings` is the one table: each of its fields is a setting, and the field's
metadata says everything else about it (kind, default, environment variable, TOML key,
command-line flag, help, whether it is a secret, which commands take it).
:data:`SETTINGS` lists them. :func:`add_flags` puts a command's settings on its argument
parser; :func:`resolve` layers them: a flag wins over the environment, which wins over
the TOML file (``--config``, ``TM_CONFIG``), which wins over the default. An empty
environment variable counts as unset (``TM_ETCD=`` in an environment file).

Over 400 lines because most of it is the table itself, one entry per setting with its
help; the loader below it is short.

A small table and argparse rather than a library (pydantic-settings, say): the layering
is twenty lines, argparse already gives both commands their flags and help, and the
table stays a plain attrs class that mypy types field by field.
"""

from __future__ import annotations

import argparse
import os
import tomllib
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, cast

import attrs

from ..core import check_name
from ..etcd import EtcdConfig

#: The two commands that take settings.
Cli = Literal["tm-sidecar", "tmctl"]
BOTH: frozenset[Cli] = frozenset(("tm-sidecar", "tmctl"))
DAEMON: frozenset[Cli] = frozenset(("tm-sidecar",))

_META = "tm_setting"


class SettingsError(ValueError):
    """A setting that cannot be used, with where it came from (a flag, a variable, a file)."""


# -- kinds: how a setting is read from text (flags, environment) and from TOML -------------


def _parse_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false (1/0, yes/no, on/off), not {text!r}")


def _parse_octal(text: str) -> int:
    value = int(text, 8)
    if not 0 <= value <= 0o7777:
        raise ValueError(f"{text!r} is not a file mode")
    return value


@attrs.frozen
class Kind:
    """How the values of one kind of setting are read and shown."""

    name: str
    #: Text (a flag's argument, an environment variable) to a value; raises ValueError.
    parse: Callable[[str], Any]
    #: TOML types taken as they are (a TOML string always goes through ``parse``).
    native: tuple[type, ...]
    #: A value as text that ``parse`` reads back (for ``--help``, the docs, the tests).
    text: Callable[[Any], str] = str
    #: A list of items (repeat the flag; comma-separated in the environment).
    many: bool = False

    def from_text(self, text: str) -> Any:
        """The value of an environment variable or a flag's argument."""
        if self.many:
            return [self.parse(item.strip()) for item in text.split(",") if item.strip()]
        return self.parse(text)

    def from_toml(self, value: Any) -> Any:
        """The value of a TOML key."""
        if self.many:
            items = value if isinstance(value, list) else [value]
            return [self._one_from_toml(item) for item in items]
        return self._one_from_toml(value)

    def _one_from_toml(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.parse(value)
        # bool is an int to Python, not to TOML: ``lease_ttl = true`` is a mistake.
        if isinstance(value, self.native) and (bool in self.native or not isinstance(value, bool)):
            return float(cast(float, value)) if self.parse is float else value
        raise ValueError(f"expected {self.name}, not {type(value).__name__} {value!r}")

    def show(self, value: Any) -> str:
        """A value as text (a list comma-separated)."""
        if self.many:
            return ",".join(self.text(v) for v in value)
        return self.text(value)


TEXT = Kind("a string", str, (str,))
#: A name from a short list, in any case (``TM_LOG_LEVEL=INFO``).
WORD = Kind("a string", lambda text: text.strip().lower(), (str,))
INT = Kind("an integer", int, (int,))
FLOAT = Kind("a number", float, (int, float), text=lambda v: f"{v:.0f}" if v == int(v) else repr(v))
BOOL = Kind("true or false", _parse_bool, (bool,), text=lambda v: "true" if v else "false")
OCTAL = Kind("an octal file mode", _parse_octal, (int,), text=lambda v: f"{v:04o}")
INTS = Kind("integers", int, (int,), many=True)
TEXTS = Kind("strings", str, (str,), many=True)


# -- the table -----------------------------------------------------------------------------


@attrs.frozen
class Setting:
    """One setting: its name (also its TOML key) and everything the loader needs."""

    name: str
    kind: Kind
    #: The value, or a function of the environment for a host-dependent default.
    default: Any
    help: str
    env: str
    flag: str
    secret: bool
    clis: frozenset[Cli]
    choices: tuple[str, ...] | None
    #: How ``--help`` and the docs show the default, where the value itself would not do.
    default_text: str | None
    metavar: str | None
    check: Callable[[Any], None] | None

    @property
    def toml(self) -> str:
        """Its key in the TOML file."""
        return self.name

    def default_for(self, environ: Mapping[str, str]) -> Any:
        """The default, on a host with this environment."""
        value = self.default(environ) if callable(self.default) else self.default
        return list(value) if isinstance(value, list) else value

    def shown_default(self) -> str | None:
        """The default as ``--help`` and the docs show it (None: nothing to show)."""
        if self.secret:
            return None
        if self.default_text is not None:
            return self.default_text
        if self.default is None or self.default == "" or self.default == []:
            return None
        return self.kind.show(self.default)


def _setting(
    default: Any,
    help: str,
    *,
    kind: Kind = TEXT,
    env: str | None = None,
    flag: str | None = None,
    secret: bool = False,
    clis: frozenset[Cli] = DAEMON,
    choices: Sequence[str] | None = None,
    default_text: str | None = None,
    metavar: str | None = None,
    check: Callable[[Any], None] | None = None,
) -> Any:
    """A field of :class:`Settings` and its row of the table (the name is the field's)."""
    meta = {
        "default": default,
        "help": help,
        "kind": kind,
        "env": env,
        "flag": flag,
        "secret": secret,
        "clis": clis,
        "choices": tuple(choices) if choices is not None else None,
        "default_text": default_text,
        "metavar": metavar,
        "check": check,
    }
    return attrs.field(metadata={_META: meta}, repr=_masked if secret else repr)


def _masked(value: Any) -> str:
    return "'***'" if value else repr(value)


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


def _name_check(kind: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if value:
            check_name(kind, value)

    return check


def _more_than(low: float) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if not value > low:
            raise ValueError(f"must be more than {low:g}")

    return check


def _at_least(low: float) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if value < low:
            raise ValueError(f"must be at least {low:g}")

    return check


def _fraction(value: Any) -> None:
    if not 0 < value <= 1:
        raise ValueError("must be more than 0 and at most 1")


def _bind(value: Any) -> None:
    if value:
        port = str(value).rpartition(":")[2]
        if not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{value!r}: expected [HOST:]PORT")


@attrs.frozen(kw_only=True)
class Settings:
    """The settings in force: every field is one setting, described by its metadata.

    Build it with :func:`resolve` (or :func:`load_settings`), which fills every field.
    Secrets are masked in the repr.
    """

    etcd: str = _setting(
        "",
        "comma-separated etcd endpoints, e.g. http://10.0.0.1:2379; empty: the embedded "
        "etcd (tm-sidecar starts it; tmctl finds it by --data-dir)",
        clis=BOTH,
        default_text="embedded",
        metavar="URLS",
    )
    socket: str = _setting(
        default_socket,
        "Unix socket path for the SDK",
        default_text="$XDG_RUNTIME_DIR/tm-sidecar.sock, else /tmp/tm-sidecar.sock",
        metavar="PATH",
    )
    socket_mode: int = _setting(
        0o660, "permissions of the socket, octal", kind=OCTAL, metavar="MODE"
    )
    socket_group: str | None = _setting(None, "group of the socket", metavar="GROUP")
    # RUF009: these calls are attrs fields (without defaults), not shared default values.
    allow_uid: list[int] = _setting(  # noqa: RUF009
        [],
        "accept clients with this uid only (repeat the flag; comma-separated in the "
        "environment); default: anyone the socket lets in",
        kind=INTS,
        metavar="UID",
    )
    node_id: str = _setting(
        "",
        "this node's id, unique in the cluster",
        default_text="the host name",
        check=_name_check("node id"),
    )
    namespace: str = _setting(
        "default",
        "namespace: keys live under /tm/<namespace>/",
        clis=BOTH,
        check=_name_check("namespace"),
    )
    data_dir: str = _setting(
        default_data_dir,
        "data directory of the embedded etcd (tmctl: where it finds the embedded etcd's "
        "port, in tm-ports.json)",
        clis=BOTH,
        default_text="$XDG_DATA_HOME/tm-sidecar, else ~/.local/share/tm-sidecar",
        metavar="DIR",
    )
    lease_ttl: int = _setting(
        5,
        "session lease TTL in seconds (at least 2, etcd's minimum): failover and dead-node "
        "recovery take about this long",
        kind=INT,
        metavar="SECONDS",
        check=_at_least(2),
    )
    retention: float = _setting(
        24 * 3600.0,
        "seconds to keep completed and failed records; 0 keeps them for ever",
        kind=FLOAT,
        metavar="SECONDS",
        check=_at_least(0),
    )
    max_payload: int = _setting(
        256 * 1024, "largest task payload in bytes", kind=INT, metavar="BYTES", check=_at_least(1)
    )
    etcd_quota: int = _setting(
        2 * 1024**3,
        "etcd's database quota in bytes (its --quota-backend-bytes; the embedded etcd is "
        "started with it)",
        kind=INT,
        metavar="BYTES",
        check=_at_least(1),
    )
    quota_fraction: float = _setting(
        0.8,
        "refuse new tasks once etcd's database fills this fraction of the quota, so that "
        "the tasks already accepted can still be assigned and finished",
        kind=FLOAT,
        metavar="FRACTION",
        check=_fraction,
    )
    create_deadline: float = _setting(
        3.0,
        "seconds a create may wait for etcd before it fails with etcd_unavailable (the task "
        "may exist or not: repeat it with its task_id)",
        kind=FLOAT,
        metavar="SECONDS",
        check=_more_than(0),
    )
    max_live_tasks: int = _setting(
        1_000_000,
        "refuse creates while the namespace holds this many unfinished tasks",
        kind=INT,
        metavar="COUNT",
        check=_at_least(1),
    )
    etcd_ca: str | None = _setting(
        None, "CA file to verify etcd's certificate", clis=BOTH, metavar="FILE"
    )
    etcd_cert: str | None = _setting(None, "client certificate for etcd", clis=BOTH, metavar="FILE")
    etcd_key: str | None = _setting(None, "client key for etcd", clis=BOTH, metavar="FILE")
    etcd_user: str | None = _setting(None, "etcd user name", clis=BOTH, metavar="USER")
    etcd_password: str | None = _setting(
        None,
        "etcd password; prefer the environment variable (a flag shows in ps)",
        clis=BOTH,
        secret=True,
        metavar="PASSWORD",
    )
    etcd_transport: str = _setting(
        "grpc",
        "how to reach etcd: its native gRPC API (grpc, the default), or its JSON gateway, "
        "for when only the gateway can be reached",
        kind=WORD,
        clis=BOTH,
        choices=_transports() or None,
    )
    etcd_binary: str | None = _setting(
        None, "etcd binary for the embedded etcd; default: etcd on PATH", metavar="PATH"
    )
    handler: list[str] = _setting(  # noqa: RUF009
        [],
        "run tasks in-process with this async function (for tests and demos; applications "
        "use the SDK); repeat the flag, comma-separated in the environment",
        kind=TEXTS,
        metavar="MODULE:FUNCTION[@QUEUE]",
    )
    concurrency: int = _setting(
        4, "concurrency of each --handler", kind=INT, metavar="N", check=_at_least(1)
    )
    drain_timeout: float = _setting(
        10.0,
        "on SIGTERM, seconds to let running tasks finish before handing them back",
        kind=FLOAT,
        metavar="SECONDS",
        check=_at_least(0),
    )
    demo: bool = _setting(
        False, "create a few example tasks per second and run them, logging every event", kind=BOOL
    )
    demo_tasks: int = _setting(
        0, "with --demo: stop after this many tasks (0: run on)", kind=INT, metavar="N"
    )
    log_level: str = _setting(
        "info", "the least level logged", kind=WORD, choices=("debug", "info", "warning", "error")
    )
    log_format: str = _setting(
        "logfmt", "one line per event, as logfmt or JSON", kind=WORD, choices=("logfmt", "json")
    )
    metrics: str = _setting(
        "",
        "serve Prometheus metrics at http://HOST:PORT/metrics (HOST defaults to 127.0.0.1); "
        "empty: off",
        default_text="off",
        metavar="[HOST:]PORT",
        check=_bind,
    )
    web: str = _setting(
        "",
        "serve the web dashboard at http://HOST:PORT/ (HOST defaults to 127.0.0.1); empty: off",
        default_text="off",
        metavar="[HOST:]PORT",
    )
    web_actions: bool = _setting(
        False,
        "let the dashboard retry, cancel and purge (each confirmed); default: read-only",
        kind=BOOL,
    )
    web_token_file: str | None = _setting(
        None,
        "a file holding the token the dashboard asks for (it wins over --web-token); "
        "default: no token",
        metavar="FILE",
    )
    web_token: str | None = _setting(
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


def _table() -> tuple[Setting, ...]:
    rows = []
    for field in attrs.fields(Settings):
        if field.name == "sources":
            continue
        meta = field.metadata.get(_META)
        # Every field is a setting: one without a row would escape the loader and its test.
        assert meta is not None, f"Settings.{field.name} has no row in the settings table"
        rows.append(
            Setting(
                name=field.name,
                kind=meta["kind"],
                default=meta["default"],
                help=meta["help"],
                env=meta["env"] or "TM_" + field.name.upper(),
                flag=meta["flag"] or "--" + field.name.replace("_", "-"),
                secret=meta["secret"],
                clis=meta["clis"],
                choices=meta["choices"],
                default_text=meta["default_text"],
                metavar=meta["metavar"],
                check=meta["check"],
            )
        )
    return tuple(rows)


#: Every setting, in the order of ``--help``.
SETTINGS: tuple[Setting, ...] = _table()
BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}

#: Neither a setting nor in the file: which file to read.
CONFIG_ENV = "TM_CONFIG"


def settings_of(cli: Cli) -> tuple[Setting, ...]:
    """The settings one command takes."""
    return tuple(s for s in SETTINGS if cli in s.clis)


def add_flags(parser: argparse.ArgumentParser, cli: Cli) -> None:
    """Put ``cli``'s settings, and ``--config``, on ``parser``.

    A flag left out is absent from the parsed namespace (no argparse default), so that
    :func:`resolve` can tell a flag given from a default; ``--help`` shows the table's
    default, never a value from the environment and never a secret.
    """
    for s in settings_of(cli):
        extra = f" [{s.env}]"
        shown = s.shown_default()
        if shown is not None:
            extra += f" (default: {shown})"
        kwargs: dict[str, Any] = {
            "dest": s.name,
            "default": argparse.SUPPRESS,
            "help": (s.help + extra).replace("%", "%%"),
        }
        if s.kind is BOOL:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = s.kind.parse
            choices = "{" + ",".join(s.choices) + "}" if s.choices else None
            kwargs["metavar"] = s.metavar or choices
            if s.kind.many:
                kwargs["action"] = "append"
        parser.add_argument(s.flag, **kwargs)
    parser.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        metavar="FILE",
        help='a TOML file of settings, keyed by the names of the flags (etcd = "...", '
        "lease_ttl = 5); flags win over the environment, which wins over the file "
        f"[{CONFIG_ENV}]",
    )


def read_config(path: str) -> dict[str, Any]:
    """The TOML file's table; SettingsError for a file that cannot be read or parsed, or
    for a key that names no setting (a typo must not pass for a default)."""
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"--config {path}: {exc}") from None
    for key in table:
        if key.replace("-", "_") not in BY_NAME:
            raise SettingsError(f"--config {path}: unknown setting {key!r}")
    return {key.replace("-", "_"): value for key, value in table.items()}


def resolve(
    cli: Cli, flags: argparse.Namespace | Mapping[str, Any], environ: Mapping[str, str]
) -> Settings:
    """The settings in force for ``cli``: each one from its flag if given, else its
    environment variable if set, else the TOML file's key, else the default.

    Settings the command does not take keep their defaults. Raises
    :class:`SettingsError` naming the flag, variable or file key of a bad value.
    """
    given = dict(vars(flags)) if isinstance(flags, argparse.Namespace) else dict(flags)
    config_path = given.get("config") or environ.get(CONFIG_ENV) or None
    file = read_config(config_path) if config_path else {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for s in SETTINGS:
        source, value = _layer(s, cli, given, environ, file, config_path)
        if s.choices is not None and value not in s.choices:
            raise SettingsError(f"{source}: {value!r} is not one of {', '.join(s.choices)}")
        if s.check is not None:
            try:
                s.check(value)
            except ValueError as exc:
                raise SettingsError(f"{source}: {exc}") from None
        values[s.name] = value
        sources[s.name] = source
    return Settings(**values, sources=sources)


def _layer(
    s: Setting,
    cli: Cli,
    given: Mapping[str, Any],
    environ: Mapping[str, str],
    file: Mapping[str, Any],
    config_path: str | None,
) -> tuple[str, Any]:
    """Where one setting's value comes from, and the value."""
    if cli not in s.clis:
        return "default", s.default_for(environ)
    if s.name in given:
        return s.flag, given[s.name]
    text = environ.get(s.env, "")
    if text:
        try:
            return s.env, s.kind.from_text(text)
        except ValueError as exc:
            raise SettingsError(f"{s.env}: {exc}") from None
    if s.name in file:
        source = f"--config {config_path}: {s.toml}"
        try:
            return source, s.kind.from_toml(file[s.name])
        except ValueError as exc:
            raise SettingsError(f"{source}: {exc}") from None
    return "default", s.default_for(environ)


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
    "SETTINGS",
    "Setting",
    "Settings",
    "SettingsError",
    "add_flags",
    "default_data_dir",
    "default_socket",
    "load_settings",
    "resolve",
    "settings_of",
]


if __name__ == "__main__":  # python -m tm_sidecar.ops._settings: the table for the docs
    print(markdown_table(), end="")
