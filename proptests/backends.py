"""Two synchronous etcd backends for the state machines: an in-memory one, fast, and the
real etcd through the etcd package's blocking face (:class:`tm_sidecar.etcd.SyncEtcd`,
over gRPC). ``test_fake_vs_etcd.py`` replays the same operations on both and checks that
they agree, so the fast one may stand in for the real one.
"""

from __future__ import annotations

from typing import Protocol

import attrs

from tm_sidecar.core import (
    Compare,
    Delete,
    KeyValue,
    Op,
    Put,
    Range,
    RangeResult,
    Request,
    Target,
    Touch,
    Txn,
    TxnResult,
)


class Backend(Protocol):
    """What a state machine needs of etcd."""

    def txn(self, txn: Txn) -> TxnResult: ...
    def list(self, prefix: str) -> tuple[tuple[KeyValue, ...], int]: ...
    def lease_grant(self, ttl_s: int) -> int: ...
    def lease_revoke(self, lease: int) -> None: ...


def _in_range(key: str, start: str, prefix: bool) -> bool:
    return key.startswith(start) if prefix else key == start


@attrs.define
class MemoryEtcd:
    """etcd's KV semantics that tm-sidecar relies on: revisions, versions, compares,
    transactions, leases. No history: ranges at old revisions are not supported."""

    revision: int = 1
    kvs: dict[str, KeyValue] = attrs.Factory(dict)
    leases: dict[int, set[str]] = attrs.Factory(dict)
    next_lease: int = 0x1000

    def _compare(self, c: Compare) -> bool:
        kv = self.kvs.get(c.key)
        if c.target is Target.VERSION:
            actual: int | str = kv.version if kv else 0
        elif c.target is Target.CREATE:
            actual = kv.create_revision if kv else 0
        elif c.target is Target.MOD:
            actual = kv.mod_revision if kv else 0
        elif c.target is Target.LEASE:
            actual = kv.lease if kv else 0
        else:
            actual = kv.value if kv else ""
        expected = c.value
        if c.op is Op.EQUAL:
            return actual == expected
        if c.op is Op.NOT_EQUAL:
            return actual != expected
        if c.op is Op.GREATER:
            return actual > expected  # type: ignore[operator]
        return actual < expected  # type: ignore[operator]

    def _range(self, r: Range) -> RangeResult:
        found = sorted(
            (kv for k, kv in self.kvs.items() if _in_range(k, r.key, r.prefix)),
            key=lambda kv: kv.key,
        )
        count = len(found)
        if r.limit:
            found = found[: r.limit]
        return RangeResult(
            tuple(found) if not r.count_only else (), count, len(found) < count, self.revision
        )

    def _check_duplicates(self, ops: tuple[Request, ...]) -> None:
        written: set[str] = set()
        for op in ops:
            if isinstance(op, Put | Touch):
                if op.key in written:
                    raise ValueError("etcdserver: duplicate key given in txn request")
                written.add(op.key)
        for op in ops:
            if isinstance(op, Delete):
                for key in written:
                    if _in_range(key, op.key, op.prefix):
                        raise ValueError("etcdserver: duplicate key given in txn request")

    def _check_writes(self, ops: tuple[Request, ...]) -> None:
        for op in ops:
            if isinstance(op, Put | Touch) and op.lease and op.lease not in self.leases:
                raise ValueError("etcdserver: requested lease not found")
            if isinstance(op, Touch) and op.key not in self.kvs:
                raise ValueError("etcdserver: key not found")

    def _changes(self, op: Request) -> bool:
        if isinstance(op, Put | Touch):
            return True
        return isinstance(op, Delete) and any(_in_range(k, op.key, op.prefix) for k in self.kvs)

    def _write(self, op: Request, revision: int) -> None:
        if isinstance(op, Put | Touch):
            old = self.kvs.get(op.key)
            if old is not None and old.lease and old.lease in self.leases:
                self.leases[old.lease].discard(op.key)
            value = op.value if isinstance(op, Put) else (old.value if old else "")
            self.kvs[op.key] = KeyValue(
                op.key,
                value,
                old.create_revision if old else revision,
                revision,
                (old.version if old else 0) + 1,
                op.lease,
            )
            if op.lease:
                self.leases[op.lease].add(op.key)
        elif isinstance(op, Delete):
            for key in [k for k in self.kvs if _in_range(k, op.key, op.prefix)]:
                kv = self.kvs.pop(key)
                if kv.lease in self.leases:
                    self.leases[kv.lease].discard(key)

    def txn(self, txn: Txn) -> TxnResult:
        """Run a transaction atomically; one revision for all its writes."""
        # etcd checks both branches for duplicate writes before it evaluates anything.
        self._check_duplicates(txn.success)
        self._check_duplicates(txn.failure)
        ok = all(self._compare(c) for c in txn.compare)
        ops = txn.success if ok else txn.failure
        self._check_writes(ops)
        ranges = []
        # A delete that removes nothing is not a write: the revision stays.
        revision = self.revision + 1 if any(self._changes(op) for op in ops) else self.revision
        for op in ops:
            if isinstance(op, Range):
                ranges.append(self._range(op))
            else:
                self._write(op, revision)
        self.revision = revision
        return TxnResult(ok, self.revision, tuple(ranges))

    def list(self, prefix: str) -> tuple[tuple[KeyValue, ...], int]:
        """Every key under a prefix, and the revision."""
        r = self._range(Range(prefix, prefix=True))
        return r.kvs, r.revision

    def lease_grant(self, ttl_s: int) -> int:
        """A new lease (it never expires on its own here)."""
        self.next_lease += 1
        self.leases[self.next_lease] = set()
        return self.next_lease

    def lease_revoke(self, lease: int) -> None:
        """Revoke a lease: its keys go in one revision."""
        keys = self.leases.pop(lease, set())
        if keys:
            self.revision += 1
            for key in keys:
                self.kvs.pop(key, None)
