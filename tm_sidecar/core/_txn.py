"""etcd operations as values: the core builds them, the shell executes them."""

from __future__ import annotations

import enum
from typing import NewType

import attrs

Revision = NewType("Revision", int)
LeaseId = NewType("LeaseId", int)

#: etcd refuses a transaction with more operations than this in one branch, unless it
#: runs with a larger ``--max-txn-ops`` (the leader learns an etcd's own limit).
MAX_TXN_OPS = 128
#: The most operations a transaction of ours may hold in one branch, whatever etcd
#: allows: the embedded etcd's ``--max-txn-ops`` (a guard against a runaway batch).
TXN_OPS_CEILING = 1024


class Target(enum.Enum):
    """What a :class:`Compare` looks at."""

    VERSION = "VERSION"
    CREATE = "CREATE"
    MOD = "MOD"
    VALUE = "VALUE"
    LEASE = "LEASE"


class Op(enum.Enum):
    """How a :class:`Compare` compares."""

    EQUAL = "EQUAL"
    NOT_EQUAL = "NOT_EQUAL"
    GREATER = "GREATER"
    LESS = "LESS"


@attrs.frozen
class Compare:
    """A guard of a transaction: ``target(key) op value``."""

    key: str
    target: Target
    op: Op
    value: int | str

    @classmethod
    def absent(cls, key: str) -> Compare:
        """The key does not exist."""
        return cls(key, Target.VERSION, Op.EQUAL, 0)

    @classmethod
    def created_at(cls, key: str, revision: int) -> Compare:
        """The key exists with this create revision (the same incarnation of it)."""
        return cls(key, Target.CREATE, Op.EQUAL, revision)

    @classmethod
    def modified_at(cls, key: str, revision: int) -> Compare:
        """The key is unchanged since this mod revision."""
        return cls(key, Target.MOD, Op.EQUAL, revision)

    @classmethod
    def leased(cls, key: str, lease: int) -> Compare:
        """The key exists, attached to this lease (an absent key has lease 0)."""
        return cls(key, Target.LEASE, Op.EQUAL, lease)


def compare_holds(compare: Compare, kv: KeyValue | None) -> bool:
    """Whether ``compare`` holds of its key as ``kv`` (None: absent) shows it, as etcd
    decides it: an absent key has version, revisions and lease 0 and an empty value."""
    if compare.target is Target.VERSION:
        actual: int | str = kv.version if kv else 0
    elif compare.target is Target.CREATE:
        actual = kv.create_revision if kv else 0
    elif compare.target is Target.MOD:
        actual = kv.mod_revision if kv else 0
    elif compare.target is Target.LEASE:
        actual = kv.lease if kv else 0
    else:
        actual = kv.value if kv else ""
    expected = compare.value
    if compare.op is Op.EQUAL:
        return actual == expected
    if compare.op is Op.NOT_EQUAL:
        return actual != expected
    if isinstance(actual, int) != isinstance(expected, int):
        return False
    if compare.op is Op.GREATER:
        return actual > expected  # type: ignore[operator]
    return actual < expected  # type: ignore[operator]


@attrs.frozen
class Put:
    """Write ``value`` at ``key``, optionally attached to a lease."""

    key: str
    value: str
    lease: int = 0


@attrs.frozen
class Touch:
    """Attach an existing key to another lease without rewriting its value."""

    key: str
    lease: int


@attrs.frozen
class Delete:
    """Delete ``key``, or every key under it when ``prefix`` is true."""

    key: str
    prefix: bool = False


@attrs.frozen
class Range:
    """Read ``key``, or every key under it when ``prefix`` is true."""

    key: str
    prefix: bool = False
    limit: int = 0
    revision: int = 0
    keys_only: bool = False
    count_only: bool = False
    min_mod_revision: int = 0  # only keys last changed at or after this revision


Request = Put | Touch | Delete | Range


@attrs.frozen
class Txn:
    """An etcd transaction: if every compare holds, run ``success``, else ``failure``."""

    compare: tuple[Compare, ...] = ()
    success: tuple[Request, ...] = ()
    failure: tuple[Request, ...] = ()

    def __attrs_post_init__(self) -> None:
        for branch in (self.compare, self.success, self.failure):
            if len(branch) > TXN_OPS_CEILING:
                raise ValueError(f"transaction branch has {len(branch)} ops > {TXN_OPS_CEILING}")


@attrs.frozen
class KeyValue:
    """One key as etcd returns it."""

    key: str
    value: str
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0


@attrs.frozen
class RangeResult:
    """The answer to a :class:`Range`."""

    kvs: tuple[KeyValue, ...]
    count: int
    more: bool
    revision: int


@attrs.frozen
class TxnResult:
    """The answer to a :class:`Txn`: which branch ran, and the ranges it read."""

    succeeded: bool
    revision: int
    ranges: tuple[RangeResult, ...] = ()


@attrs.frozen
class WatchEvent:
    """A change to one key, with the previous value when there was one."""

    kind: str  # "PUT" or "DELETE"
    kv: KeyValue
    prev: KeyValue | None
