"""The in-memory etcd agrees with the real one on every operation the core uses.

Random programs of transactions (compares on version, create and mod revision; puts
with leases, lease touches, deletes, prefix deletes, ranges) and lease grants and
revokes run on both; each answer and the final contents must match, revisions and lease
ids translated.
"""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from proptests.backends import MemoryEtcd
from tm_sidecar._errors import EtcdError
from tm_sidecar.core import Compare, Delete, KeyValue, Op, Put, Range, Target, Touch, Txn
from tm_sidecar.etcd import SyncEtcd
from tm_sidecar.ops._embedded import EtcdProcess

KEYS = ["a", "b", "c/1", "c/2"]
_runs = itertools.count()

key_i = st.integers(0, len(KEYS) - 1)
compare = st.tuples(
    key_i,
    st.sampled_from(["VERSION", "CREATE", "MOD", "LEASE"]),
    st.sampled_from(["EQUAL", "NOT_EQUAL", "GREATER", "LESS"]),
    st.integers(0, 6),  # small values hit both "absent" and real revisions (offset below)
    st.booleans(),  # compare against the key's current value of that field
)
write = st.one_of(
    st.tuples(st.just("put"), key_i, st.text("xyz", max_size=3), st.integers(-1, 2)),
    st.tuples(st.just("touch"), key_i, st.integers(0, 2)),
    st.tuples(st.just("delete"), key_i, st.booleans()),
    st.tuples(st.just("range"), key_i, st.booleans()),
)
program = st.lists(
    st.one_of(
        st.tuples(
            st.just("txn"),
            st.lists(compare, max_size=3),
            st.lists(write, max_size=4),
            st.lists(write, max_size=2),
        ),
        st.tuples(st.just("grant")),
        st.tuples(st.just("revoke"), st.integers(0, 2)),
    ),
    max_size=25,
)


class Pair:
    """Runs each operation on both backends and compares the answers."""

    def __init__(self, real: SyncEtcd) -> None:
        self.fake = MemoryEtcd()
        self.real = real
        self.prefix = f"/fv{next(_runs)}/"
        self.offset = real.revision() - self.fake.revision
        self.leases: list[tuple[int, int]] = []  # (fake, real)

    def k(self, i: int) -> str:
        return self.prefix + KEYS[i]

    def lease(self, i: int, side: int) -> int:
        if i < 0 or not self.leases:
            return 0
        return self.leases[i % len(self.leases)][side]

    def compare(self, spec: tuple[int, str, str, int, bool], side: int) -> Compare:
        i, target, op, value, current = spec
        if target == "LEASE":
            # A small value names one of the run's leases (or none), as on both sides.
            if current:
                kv = self.fake.kvs.get(self.k(i))
                fake_lease = kv.lease if kv else 0
                pair = next((p for p in self.leases if p[0] == fake_lease), None)
                lease = pair[side] if pair else 0
            else:
                lease = self.lease(value - 1, side)
            return Compare(
                self.k(i), Target.LEASE, Op.EQUAL if op != "NOT_EQUAL" else Op.NOT_EQUAL, lease
            )
        if current:
            kv = self.fake.kvs.get(self.k(i))
            field = {"VERSION": "version", "CREATE": "create_revision", "MOD": "mod_revision"}[
                target
            ]
            value = getattr(kv, field) if kv else 0
        if target != "VERSION" and value and side == 1:
            value += self.offset
        return Compare(self.k(i), Target(target), Op(op), value)

    def request(self, spec: tuple[Any, ...], side: int) -> Put | Touch | Delete | Range:
        kind = spec[0]
        if kind == "put":
            return Put(self.k(spec[1]), spec[2], self.lease(spec[3], side))
        if kind == "touch":
            return Touch(self.k(spec[1]), self.lease(spec[2], side))
        if kind == "delete":
            return Delete(self.prefix + "c/" if spec[2] else self.k(spec[1]), prefix=spec[2])
        return Range(self.prefix + "c/" if spec[2] else self.k(spec[1]), prefix=spec[2])

    def txn(self, compares: list[Any], success: list[Any], failure: list[Any], side: int) -> Txn:
        return Txn(
            compare=tuple(self.compare(c, side) for c in compares),
            success=tuple(self.request(w, side) for w in success),
            failure=tuple(self.request(w, side) for w in failure),
        )

    def norm(self, kv: KeyValue, side: int) -> tuple[Any, ...]:
        off = self.offset if side == 1 else 0
        lease = (
            next((i for i, pair in enumerate(self.leases) if pair[side] == kv.lease), -1)
            if kv.lease
            else None
        )
        return (
            kv.key,
            kv.value,
            kv.create_revision - off,
            kv.mod_revision - off,
            kv.version,
            lease,
        )

    def run(self, op: tuple[Any, ...]) -> None:
        if op[0] == "grant":
            self.leases.append((self.fake.lease_grant(60), self.real.lease_grant(60)))
            return
        if op[0] == "revoke":
            if self.leases:
                fake_id, real_id = self.leases[op[1] % len(self.leases)]
                self.fake.lease_revoke(fake_id)
                self.real.lease_revoke(real_id)
                self.leases.remove((fake_id, real_id))
            return
        outcomes: list[tuple[Any, ...]] = []
        backends: tuple[MemoryEtcd | SyncEtcd, ...] = (self.fake, self.real)
        # Both transactions are built before either runs: compares read the current state.
        txns = [self.txn(op[1], op[2], op[3], side) for side in (0, 1)]
        for side, backend in enumerate(backends):
            try:
                result = backend.txn(txns[side])
            except (ValueError, EtcdError) as exc:
                outcomes.append(("error", str(exc).split(":")[-1].strip()))
            else:
                off = self.offset if side == 1 else 0
                ranges = [(r.count, [self.norm(kv, side) for kv in r.kvs]) for r in result.ranges]
                outcomes.append(("ok", result.succeeded, result.revision - off, ranges))
        assert outcomes[0] == outcomes[1], f"fake {outcomes[0]} != real {outcomes[1]} for {op}"

    def check_contents(self) -> None:
        fake_kvs, fake_rev = self.fake.list(self.prefix)
        real_kvs, real_rev = self.real.list(self.prefix)
        assert [self.norm(kv, 0) for kv in fake_kvs] == [self.norm(kv, 1) for kv in real_kvs]
        assert fake_rev == real_rev - self.offset


@settings(max_examples=60)
@given(program)
def test_the_memory_etcd_agrees_with_etcd(
    prop_etcd: EtcdProcess, ops: list[tuple[Any, ...]]
) -> None:
    pair = Pair(SyncEtcd(prop_etcd.endpoint))
    for op in ops:
        pair.run(op)
        pair.check_contents()
