"""The leader's sweeps of unique guards and rate windows (tm_sidecar/leader/_leading.py)
on a real etcd: each deletes what has passed, keeps what has not, and keeps a key that
changed between its listing and its delete."""

from __future__ import annotations

import json
import time
from typing import Any

from tm_sidecar.core import Keyspace, RateWindow
from tm_sidecar.etcd import Etcd
from tm_sidecar.leader._sweeps import sweep_rate_windows, sweep_unique_guards


def _guard(until_at: float | None) -> str:
    return json.dumps({"task_id": "t1", "until_at": until_at})


class Racing:
    """etcd, but ``key`` is written again between the sweep's listing and its deletes."""

    def __init__(self, etcd: Etcd, key: str, value: str) -> None:
        self.etcd, self.key, self.value = etcd, key, value

    async def list_prefix(self, *args: Any, **kwargs: Any) -> Any:
        listing = await self.etcd.list_prefix(*args, **kwargs)
        await self.etcd.put(self.key, self.value)
        return listing

    def __getattr__(self, name: str) -> Any:
        return getattr(self.etcd, name)


async def test_passed_guards_go_and_the_others_stay(etcd: Etcd, namespace: str) -> None:
    ks = Keyspace(namespace=namespace)
    now = time.time()
    for key, until in (("passed", now - 10), ("later", now + 100), ("held", None)):
        await etcd.put(ks.unique(key), _guard(until))
    await etcd.put(ks.unique("taken"), _guard(now - 10))
    # "taken" is taken over meanwhile (its new holder's window has passed too).
    racing = Racing(etcd, ks.unique("taken"), _guard(now - 5))
    assert await sweep_unique_guards(racing, ks, now) == 1  # type: ignore[arg-type]
    kvs, _ = await etcd.list_prefix(ks.uniques())
    assert sorted(kv.key.rsplit("/", 1)[-1] for kv in kvs) == ["held", "later", "taken"]
    assert await sweep_unique_guards(etcd, ks, now) == 1  # now it goes


async def test_empty_rate_windows_go_and_the_others_stay(etcd: Etcd, namespace: str) -> None:
    ks = Keyspace(namespace=namespace)
    now = time.time()
    await etcd.put(ks.rate("old"), RateWindow(starts=[now - 100]).to_json(10.0))
    await etcd.put(ks.rate("busy"), RateWindow(starts=[now - 1]).to_json(10.0))
    await etcd.put(ks.rate("again"), RateWindow(starts=[now - 100]).to_json(10.0))
    racing = Racing(etcd, ks.rate("again"), RateWindow(starts=[now - 90]).to_json(10.0))
    assert await sweep_rate_windows(racing, ks, now) == 1  # type: ignore[arg-type]
    kvs, _ = await etcd.list_prefix(ks.rates())
    assert sorted(kv.key.rsplit("/", 1)[-1] for kv in kvs) == ["again", "busy"]
