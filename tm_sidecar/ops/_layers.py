"""The layering of settings: a flag wins over the environment, which wins over the TOML
file (``--config``, ``TM_CONFIG``), which wins over the default. An empty environment
variable counts as unset (``TM_ETCD=`` in an environment file).

It works on rows of the table (:class:`~._setting.Setting`) and knows no setting by
name: ``_settings.py`` hands it the table and builds :class:`~._settings.Settings` from
what it answers.
"""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Container, Mapping, Sequence
from typing import Any

from ._setting import BOOL, Cli, Setting, SettingsError

#: Neither a setting nor in the file: which file to read.
CONFIG_ENV = "TM_CONFIG"


def add_setting_flags(parser: argparse.ArgumentParser, rows: Sequence[Setting]) -> None:
    """Put the settings ``rows``, and ``--config``, on ``parser``.

    A flag left out is absent from the parsed namespace (no argparse default), so that
    :func:`resolve_values` can tell a flag given from a default; ``--help`` shows the table's
    default, never a value from the environment and never a secret.
    """
    for s in rows:
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
            kwargs["type"] = _flag_parser(s)
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


def _flag_parser(s: Setting) -> Any:
    """``s``'s parser for argparse, whose own message for a bad value names the Python
    function (``invalid _parse_octal value``): say what was expected instead."""

    def parse(text: str) -> Any:
        try:
            return s.kind.parse(text)
        except ValueError as exc:
            # int() and float() say "invalid literal for int() ..."; our parsers say more.
            why = f"expected {s.kind.name}" if s.kind.parse in (int, float) else str(exc)
            shown = "" if s.secret else f" {text!r}"
            raise argparse.ArgumentTypeError(f"{why}, not{shown or ' that'}") from None

    return parse


def read_config(path: str, names: Container[str]) -> dict[str, Any]:
    """The TOML file's table; SettingsError for a file that cannot be read or parsed, or
    for a key that names no setting (a typo must not pass for a default)."""
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"--config {path}: {exc}") from None
    for key in table:
        if key.replace("-", "_") not in names:
            raise SettingsError(f"--config {path}: unknown setting {key!r}")
    return {key.replace("-", "_"): value for key, value in table.items()}


def resolve_values(
    rows: Sequence[Setting],
    cli: Cli,
    flags: argparse.Namespace | Mapping[str, Any],
    environ: Mapping[str, str],
) -> tuple[dict[str, Any], dict[str, str]]:
    """The values in force for ``cli``, and where each came from: each one from its flag
    if given, else its environment variable if set, else the TOML file's key, else the
    default.

    Settings the command does not take keep their defaults. Raises
    :class:`SettingsError` naming the flag, variable or file key of a bad value.
    """
    given = dict(vars(flags)) if isinstance(flags, argparse.Namespace) else dict(flags)
    config_path = given.get("config") or environ.get(CONFIG_ENV) or None
    file = read_config(config_path, {s.name for s in rows}) if config_path else {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for s in rows:
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
    return values, sources


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
            if s.secret:  # the message would echo the value: a secret is never shown
                value = file[s.name]
                raise SettingsError(
                    f"{source}: expected {s.kind.name}, not {type(value).__name__} "
                    "(the value is a secret: not shown)"
                ) from None
            raise SettingsError(f"{source}: {exc}") from None
    return "default", s.default_for(environ)
