"""tmctl's schedules against a real etcd: every option the SDK sets, and running a
schedule now (issue 20 item 5)."""

from __future__ import annotations

import json

import pytest

from tm_sidecar.core import Keyspace, KeyValue, Record, Schedule, State, TaskId, TaskSpec
from tm_sidecar.etcd import SyncEtcd
from tm_sidecar.ops._embedded import EtcdProcess

from .test_tmctl import tmctl


def get(db: SyncEtcd, key: str) -> KeyValue | None:
    """The one key ``key``, or None."""
    return next((kv for kv in db.list(key)[0] if kv.key == key), None)


def test_tmctl_schedule_sets_every_option_the_sdk_can(
    etcd_server: EtcdProcess, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ep, ks = etcd_server.endpoint, Keyspace(namespace=namespace)
    code, _ = tmctl(
        capsys,
        ep,
        namespace,
        *("schedule", "nightly", "--cron", "0 3 * * *", "--tz", "Europe/Berlin"),
        *("--payload", '{"job": "report"}', "--missed", "skip", "--grace", "5"),
        *("--max-catch-up", "7", "--paused", "--queue", "reports", "--priority", "4"),
        *("--retries", "5", "--timeout", "30", "--concurrency-key", "tenant-1"),
        *("--max-snoozes", "2", "--options", '{"backoff": {"base_s": 2, "max_s": 60}}'),
    )
    assert code == 0
    kv = get(SyncEtcd(ep), ks.schedule("nightly"))
    assert kv is not None
    s = Schedule.from_json(kv.value)
    assert (s.cron, s.timezone, s.payload) == ("0 3 * * *", "Europe/Berlin", {"job": "report"})
    assert (s.missed, s.grace_s, s.max_catch_up, s.paused) == ("skip", 5.0, 7, True)
    o = s.options
    assert (o.queue, o.priority, o.max_attempts, o.timeout_s) == ("reports", 4, 5, 30.0)
    assert (o.concurrency_key, o.max_snoozes) == ("tenant-1", 2)
    assert (o.backoff.base_s, o.backoff.max_s) == (2.0, 60.0)

    code, _ = tmctl(capsys, ep, namespace, "schedule", "bad", "--every", "5", "--grace", "-1")
    assert code == 2
    assert get(SyncEtcd(ep), ks.schedule("bad")) is None


def test_tmctl_run_schedule_creates_one_task_now_and_leaves_the_slots(
    etcd_server: EtcdProcess, namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ep, ks = etcd_server.endpoint, Keyspace(namespace=namespace)
    db = SyncEtcd(ep)
    args = ("schedule", "tick", "--every", "3600", "--payload", '{"n": 1}', "--priority", "2")
    assert tmctl(capsys, ep, namespace, *args)[0] == 0
    before = get(db, ks.schedule("tick"))
    assert before is not None

    code, out = tmctl(capsys, ep, namespace, "--json", "run-schedule", "tick")
    assert code == 0
    task_id = TaskId(json.loads(out)["task_id"])
    spec_kv = get(db, ks.task(task_id))
    assert spec_kv is not None
    spec = TaskSpec.from_json(spec_kv.value)
    assert spec.payload == {"n": 1}
    assert spec.options.priority == 2
    pending = get(db, ks.state(State.PENDING, task_id))
    assert pending is not None
    assert Record.from_json(State.PENDING, pending.value).options.priority == 2
    # The schedule itself is untouched: same value, same slots.
    after = get(db, ks.schedule("tick"))
    assert after is not None
    assert after.mod_revision == before.mod_revision

    code, _ = tmctl(capsys, ep, namespace, "run-schedule", "nosuch")
    assert code == 1
