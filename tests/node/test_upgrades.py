"""Upgrades (issue 21 item 15): the namespace's layout version key, a sidecar that refuses
a newer layout, and records that keep the fields of a newer release when this one
rewrites them, so that an older sidecar in a rolling upgrade drops nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.helpers import running_sidecars
from tests.procs import ROOT
from tm_sidecar import EtcdConfig, Sidecar, SidecarSettings, TaskContext
from tm_sidecar.core import LAYOUT, Keyspace, LayoutRefused, NodeId, State, TaskId, TaskSpec
from tm_sidecar.etcd import Etcd, connect
from tm_sidecar.ops._embedded import EtcdProcess

#: A pending task as the previous release wrote it: no layout key, today's fields only.
OLD = (
    '{"attempts":0,"since_at":1.0,"options":{"queue":"default","priority":0,"max_attempts":3,'
    '"backoff":{"base_s":1.0,"factor":2.0,"max_s":300.0,"jitter":0.5}},"reason":"created"}'
)
#: The same from a newer release: a field of the record and an option this one does not know.
NEW = (
    '{"attempts":0,"since_at":1.0,"lineage":[{"node":"old-1","outcome":"lost"}],'
    '"options":{"queue":"default","priority":0,"max_attempts":3,"shard":7,'
    '"backoff":{"base_s":1.0,"factor":2.0,"max_s":300.0,"jitter":0.5}},"reason":"created"}'
)


async def _seed(etcd: Etcd, ks: Keyspace, task_id: str, record: str) -> None:
    spec = TaskSpec(id=TaskId(task_id), payload={"n": task_id}, created_at=1.0)
    await etcd.put(ks.task(task_id), spec.to_json())
    await etcd.put(ks.state(State.PENDING, task_id), record)


async def test_two_releases_records_run_through_one_sidecar_and_keep_their_fields(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    """A namespace of the previous release (no layout key) holding a record of that
    release and one of a newer release: one sidecar runs both; the newer record's
    unknown fields (of the record and of its options) survive every move this release
    makes (assign, the started rewrite, the outcome), and the leader writes the layout."""
    ks = Keyspace(namespace=namespace)
    etcd = connect(EtcdConfig(endpoints=(etcd_server.endpoint,)))
    try:
        await _seed(etcd, ks, "old", OLD)
        await _seed(etcd, ks, "new", NEW)
        assert await etcd.get(ks.layout()) is None
        async with running_sidecars(etcd_server.endpoint, namespace, "n1") as (sc,):
            seen: dict[str, str] = {}

            async def handler(task: TaskContext) -> Any:
                # The processing record, rewritten by progress, still carries the fields.
                assert await task.update({"step": 1})
                kv = await etcd.get(ks.state(State.PROCESSING, task.id, "n1"))
                assert kv is not None
                seen[task.id] = kv.value
                return task.payload

            sc.register(handler)
            for task_id in ("old", "new"):
                info = await sc.wait(TaskId(task_id), timeout_s=15)
                assert info.state is State.COMPLETED, info
            layout = await etcd.get(ks.layout())
            assert layout is not None
            assert json.loads(layout.value) == {"layout": LAYOUT}
        for task_id in ("old", "new"):
            kv = await etcd.get(ks.state(State.COMPLETED, task_id))
            assert kv is not None
            done = json.loads(kv.value)
            running = json.loads(seen[task_id])
            assert done["result"] == {"n": task_id}
            assert running["progress"] == {"step": 1}
            for obj in (done, running):
                if task_id == "new":
                    assert obj["lineage"] == [{"node": "old-1", "outcome": "lost"}]
                    assert obj["options"]["shard"] == 7
                else:
                    assert "lineage" not in obj
                    assert "shard" not in obj["options"]
    finally:
        await etcd.aclose()


async def test_a_sidecar_refuses_a_namespace_of_a_newer_layout(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    """Before it registers, takes work or stands: nothing of it lands in the namespace."""
    ks = Keyspace(namespace=namespace)
    etcd = connect(EtcdConfig(endpoints=(etcd_server.endpoint,)))
    try:
        await etcd.put(ks.layout(), json.dumps({"layout": LAYOUT + 1}))
        sidecar = Sidecar(etcd, SidecarSettings(node_id=NodeId("n1"), namespace=namespace))
        with pytest.RaisesGroup(
            pytest.RaisesExc(LayoutRefused, match=f"layout is {LAYOUT + 1}"),
            flatten_subgroups=True,
            allow_unwrapped=True,
        ):
            async with trio.open_nursery() as nursery:
                await nursery.start(sidecar.run)
        keys, _ = await etcd.list_prefix(ks.prefix)
        assert [kv.key for kv in keys] == [ks.layout()]
    finally:
        await etcd.aclose()


async def test_a_leader_refuses_a_newer_layout_written_before_its_term(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    """A namespace upgraded while this sidecar was already running (a newer release led
    and wrote its layout): when this one's turn to lead comes, it refuses, and the
    sidecar ends rather than lead what it cannot read."""
    ks = Keyspace(namespace=namespace)
    etcd = connect(EtcdConfig(endpoints=(etcd_server.endpoint,)))
    try:
        with pytest.RaisesGroup(
            pytest.RaisesExc(LayoutRefused, match="will not lead it; upgrade it"),
            flatten_subgroups=True,
            allow_unwrapped=True,
        ):
            async with running_sidecars(
                etcd_server.endpoint, namespace, "a", "b", lease_ttl_s=30
            ) as (a, b):
                assert a.is_leader
                assert not b.is_leader
                await etcd.put(ks.layout(), json.dumps({"layout": LAYOUT + 1}))
                a.stop()  # resigns: b's turn comes at once, and b refuses
                await trio.sleep_forever()
    finally:
        await etcd.aclose()


def test_the_command_refuses_a_newer_layout_in_one_line_and_exits_non_zero(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    async def seed() -> None:
        etcd = connect(EtcdConfig(endpoints=(etcd_server.endpoint,)))
        try:
            await etcd.put(Keyspace(namespace=namespace).layout(), '{"layout":99}')
        finally:
            await etcd.aclose()

    trio.run(seed)
    log = tmp_path / "sidecar.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TM_DATA_DIR": str(tmp_path / "data")}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tm_sidecar",
                "--etcd",
                etcd_server.endpoint,
                "--namespace",
                namespace,
                "--socket",
                str(tmp_path / "s.sock"),
            ],
            env=env,
            stdout=out,
            stderr=out,
        )
    try:
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert code == 2, text
    assert "Traceback" not in text
    refused = [line for line in text.splitlines() if "namespace refused" in line]
    assert len(refused) == 1, text
    assert "layout is 99" in refused[0]
    assert "docs/operations.md" in refused[0]
