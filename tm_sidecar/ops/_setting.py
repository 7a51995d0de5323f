"""One setting: how its values are read (its :class:`Kind`), its row of the table
(:class:`Setting`), the field that declares it (:func:`setting`), and the checks a value
must pass. The table itself is ``_settings.py``; how the layers are stacked is
``_layers.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, cast

import attrs

from ..core import check_name

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
    try:
        value = int(text, 8)
    except ValueError:
        value = -1
    if not 0 <= value <= 0o7777:
        raise ValueError("expected an octal file mode from 0 to 7777 (0660, say)")
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


def setting(
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
    """A field of a settings class and its row of the table (the name is the field's)."""
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


# -- checks: what a value must be, beyond its kind -----------------------------------------


def name_check(kind: str) -> Callable[[Any], None]:
    """A check that a value, if given, is a valid name (``check_name``) of ``kind``."""

    def check(value: Any) -> None:
        if value:
            check_name(kind, value)

    return check


def more_than(low: float) -> Callable[[Any], None]:
    """A check that a value is more than ``low``."""

    def check(value: Any) -> None:
        if not value > low:
            raise ValueError(f"must be more than {low:g}")

    return check


def at_least(low: float) -> Callable[[Any], None]:
    """A check that a value is at least ``low``."""

    def check(value: Any) -> None:
        if value < low:
            raise ValueError(f"must be at least {low:g}")

    return check


def fraction(value: Any) -> None:
    """Check that ``value`` is in (0, 1]."""
    if not 0 < value <= 1:
        raise ValueError("must be more than 0 and at most 1")


def bind_address(value: Any) -> None:
    """Check that ``value``, if given, is ``[HOST:]PORT``."""
    if value:
        port = str(value).rpartition(":")[2]
        if not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{value!r}: expected [HOST:]PORT")


def rows_of(cls: type) -> tuple[Setting, ...]:
    """The table's rows: one per field of the attrs class ``cls`` made with :func:`setting`
    (a field named ``sources`` is where the values came from, not a setting)."""
    rows = []
    for field in attrs.fields(cls):
        if field.name == "sources":
            continue
        meta = field.metadata.get(_META)
        # Every field is a setting: one without a row would escape the loader and its test.
        assert meta is not None, f"{cls.__name__}.{field.name} has no row in the settings table"
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
