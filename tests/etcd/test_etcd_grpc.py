"""The transports against real etcds, part two: failover, deadlines, cancellation,
refusals by status code and a full etcd, through both transports; then what only the gRPC
client has (the keep-alive stream across a restart, reconnecting often), what only the
gateway has (a watch's reader thread), and the package's shape. The rest of the shared
behaviour is in test_etcd_adapter.py."""

from __future__ import annotations

import ast
import contextlib
import itertools
import os
import signal
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from pathlib import Path

import attrs
import pytest
import trio
from taskmanager import TaskManager, WorkerTask

from tests.helpers import stop_process, wait_for
from tests.procs import SidecarProcess
from tm_sidecar import Compacted, Etcd, EtcdConfig, EtcdFull, EtcdUnavailable
from tm_sidecar._errors import LeaseNotFound, Unavailable
from tm_sidecar.core import Range
from tm_sidecar.etcd import TRANSPORTS, GatewayEtcd, GrpcEtcd, connect
from tm_sidecar.ops._embedded import EtcdProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "tm_sidecar" / "etcd"


def _grpc(*endpoints: str, timeout_s: float = 5.0) -> Etcd:
    return connect(EtcdConfig(endpoints=endpoints, timeout_s=timeout_s, transport="grpc"))


def _client(transport: str, *endpoints: str, timeout_s: float = 5.0) -> Etcd:
    cfg = EtcdConfig(endpoints=endpoints, timeout_s=timeout_s, transport=transport)  # type: ignore[arg-type]
    return connect(cfg)


#: What the sidecar, tmctl and the dashboard call on the adapter, whatever the transport.
INTERFACE = [
    *("range", "get", "list_prefix", "page", "put", "delete", "txn", "compact", "status"),
    *("alarms", "disarm", "member_urls", "defragment", "revision", "aclose", "endpoint"),
    *("lease_grant", "lease_keepalive", "lease_revoke", "lease_ttl", "watch_once", "informer"),
]


@pytest.mark.parametrize("cls", [GrpcEtcd, GatewayEtcd])
def test_both_transports_implement_the_whole_interface(cls: type[GrpcEtcd | GatewayEtcd]) -> None:
    assert set(INTERFACE) <= set(dir(Etcd))
    assert not getattr(cls, "__abstractmethods__", None)  # nothing left abstract
    client = cls(EtcdConfig())
    assert client.on_request is None
    for name in INTERFACE:
        assert hasattr(client, name), name


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = path.relative_to(ROOT).with_suffix("").parts
                base = ".".join((*parts[: len(parts) - node.level], base)).rstrip(".")
            names.add(base)
    return names


def test_the_package_imports_only_what_its_docstring_allows() -> None:
    allowed_own = (
        "tm_sidecar.etcd",
        "tm_sidecar.core",
        "tm_sidecar._errors",
        "tm_sidecar._repeats",
    )
    for path in PACKAGE.rglob("*.py"):
        if path.name == "rpc_pb2.py":
            continue
        for name in _imports(path):
            if name.startswith("tm_sidecar"):
                assert name.startswith(allowed_own), f"{path.name} imports {name}"
    clients = ("grpc", "etcd3", "requests")
    for path in [*(ROOT / "tm_sidecar").rglob("*.py"), *(ROOT / "bench").rglob("*.py")]:
        if PACKAGE in path.parents:
            continue
        foreign = {n for n in _imports(path) if n.split(".")[0] in clients}
        assert not foreign, f"{path} imports {foreign} outside tm_sidecar/etcd/"
    assert not (ROOT / "tm_sidecar" / "_etcd.py").exists()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_dead_endpoint_is_passed_over(
    etcd_server: EtcdProcess, namespace: str, transport: str
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    etcd = _client(transport, dead, etcd_server.endpoint)
    key = f"/{namespace}/k"
    # A read goes on to the next endpoint within its deadline: no error at all.
    assert await etcd.get(key) is None
    assert etcd.endpoint == etcd_server.endpoint
    await etcd.put(key, "v")
    # A write is never repeated by the client (it may have committed); one that finds
    # its endpoint dead fails as unavailable and the next goes to the other one.
    back = _client(transport, etcd_server.endpoint, dead)
    await back.put(key, "w")
    etcd_server_index = back.endpoint
    assert etcd_server_index == etcd_server.endpoint
    await etcd.aclose()
    await back.aclose()
    lone = _client(transport, dead, etcd_server.endpoint)
    with pytest.raises(EtcdUnavailable):
        await lone.put(key, "x")
    assert lone.endpoint == etcd_server.endpoint
    await lone.put(key, "x")
    kv = await lone.get(key)
    assert kv is not None
    assert kv.value == "x"
    await lone.aclose()


@pytest.fixture
def silent_endpoint() -> Iterator[str]:
    """A TCP port that accepts connections and never answers (a hung etcd)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_every_call_has_a_deadline(silent_endpoint: str, transport: str) -> None:
    etcd = _client(transport, silent_endpoint, timeout_s=0.5)
    for call in (etcd.get("/x"), etcd.put("/x", "1"), etcd.lease_keepalive(1)):
        started = trio.current_time()
        with trio.fail_after(5), pytest.raises(EtcdUnavailable):
            await call  # it ends (the fail_after), and not before its deadline:
        assert trio.current_time() - started > 0.4
    started = trio.current_time()
    # The gateway's client cannot even be made without an answer to its probe.
    with trio.fail_after(5), pytest.raises(EtcdUnavailable, match=r"confirm the watch|0\.5 s"):
        async for _ in etcd.watch_once("/x", 1):
            pass
    assert trio.current_time() - started > 0.4
    await etcd.aclose()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_cancelled_call_returns_at_once_and_the_client_goes_on(
    silent_endpoint: str, etcd_server: EtcdProcess, namespace: str, transport: str
) -> None:
    stuck = _client(transport, silent_endpoint, timeout_s=30)
    with trio.fail_after(5), trio.move_on_after(0.2) as scope:
        await stuck.get("/x")
    assert scope.cancelled_caught
    await stuck.aclose()
    etcd = _client(transport, etcd_server.endpoint)
    async with trio.open_nursery() as nursery:
        for i in range(20):  # cancel some of many calls in flight
            nursery.start_soon(etcd.put, f"/{namespace}/{i}", str(i))
        nursery.cancel_scope.cancel()
    await etcd.put(f"/{namespace}/after", "ok")
    kvs, _ = await etcd.list_prefix(f"/{namespace}/")
    assert f"/{namespace}/after" in {kv.key for kv in kvs}
    await etcd.aclose()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_refusals_by_status_code(
    etcd_server: EtcdProcess, namespace: str, transport: str
) -> None:
    etcd = _client(transport, etcd_server.endpoint)
    key = f"/{namespace}/k"
    old = await etcd.put(key, "1")
    await etcd.put(key, "2")
    await etcd.compact(old + 1)
    await etcd.compact(old)  # already compacted: not an error
    with pytest.raises(Compacted):
        await etcd.range(Range(key, revision=old))
    with pytest.raises(LeaseNotFound):
        await etcd.put(key, "3", lease=0x7EADBEEF)
    assert await etcd.lease_ttl(0x7EADBEEF) == -1
    assert await etcd.lease_keepalive(0x7EADBEEF) == 0
    seen: list[tuple[str, str]] = []
    etcd.on_request = lambda path, s, outcome: seen.append((path, outcome))  # as connect() sets it
    await etcd.get(key)
    with pytest.raises(LeaseNotFound):
        await etcd.put(key, "3", lease=0x7EADBEEF)
    await etcd.lease_keepalive(0x7EADBEEF)
    assert seen == [("/kv/range", "ok"), ("/kv/put", "error"), ("/lease/keepalive", "ok")]
    await etcd.aclose()


async def _until_up(etcd: Etcd) -> None:
    with trio.fail_after(15):
        while True:
            try:
                await etcd.get("/up")
                return
            except EtcdUnavailable:
                await trio.sleep(0.05)


async def test_the_keepalive_stream_comes_back_after_an_etcd_restart(
    own_etcd: EtcdProcess,
) -> None:
    etcd = _grpc(own_etcd.endpoint, timeout_s=2.0)
    lease, _ = await etcd.lease_grant(30)
    assert await etcd.lease_keepalive(lease) == 30
    # The stream dies while idle: the next keep-alive gets a new one, with no error.
    await trio.to_thread.run_sync(own_etcd.kill)
    await trio.to_thread.run_sync(own_etcd.start)
    await _until_up(etcd)
    assert await etcd.lease_keepalive(lease) == 30
    # A keep-alive while etcd is down fails as unavailable, and the next one works.
    await trio.to_thread.run_sync(own_etcd.kill)
    with pytest.raises(EtcdUnavailable):
        await etcd.lease_keepalive(lease)
    await trio.to_thread.run_sync(own_etcd.start)
    await _until_up(etcd)
    assert await etcd.lease_keepalive(lease) == 30  # a new stream, at the first call
    await etcd.aclose()


async def test_a_keepalive_cancelled_by_its_caller_leaves_no_answer_behind(
    own_etcd: EtcdProcess,
) -> None:
    etcd = _grpc(own_etcd.endpoint, timeout_s=5.0)
    assert isinstance(etcd, GrpcEtcd)
    lease, _ = await etcd.lease_grant(30)
    other, _ = await etcd.lease_grant(30)
    assert await etcd.lease_keepalive(lease) == 30
    stream = etcd._keepalives._opened
    assert stream is not None
    pid = own_etcd.pid
    assert pid is not None
    await stop_process(pid)  # etcd hangs: the keep-alive gets no answer in time
    try:
        with trio.fail_after(5), trio.move_on_after(0.3) as scope:
            await etcd.lease_keepalive(lease)
        assert scope.cancelled_caught
    finally:
        os.kill(pid, signal.SIGCONT)
    # The stream that may still carry the late answer is gone: the next keep-alive gets
    # its own answer on a fresh stream, not the one etcd now sends for the cancelled one.
    assert stream.stream.ended
    assert await etcd.lease_keepalive(other) == 30
    assert etcd._keepalives._opened is not stream
    await etcd.aclose()


async def test_a_down_endpoint_is_tried_again_often(refusing_endpoint: RefusingEndpoint) -> None:
    """grpc-core waits longer and longer between connection attempts to an endpoint
    that is down; it must not wait so long that a returning etcd goes unused (the
    default grows to two minutes, and even one second shows in the fault test's figure
    for an etcd cluster restart)."""
    etcd = _grpc(refusing_endpoint.endpoint, timeout_s=0.5)
    async with trio.open_nursery() as nursery:

        async def keep_calling() -> None:
            while True:
                with contextlib.suppress(EtcdUnavailable):
                    await etcd.get("/x")
                await trio.sleep(0.02)

        nursery.start_soon(refusing_endpoint.serve)
        nursery.start_soon(keep_calling)
        await trio.sleep(3.0)  # long enough for the default backoff to pass one second
        nursery.cancel_scope.cancel()
    await etcd.aclose()
    attempts = refusing_endpoint.attempts
    # grpc's own backoff (1 s growing by 1.6) makes three attempts in 3 s; ours, at least
    # twice that, however loaded the machine (the gaps themselves are a figure, not a test).
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(attempts)]
    assert len(attempts) >= 6, gaps


@attrs.define(eq=False)
class RefusingEndpoint:
    """A port that takes TCP connections and closes them at once: an etcd that is not
    serving yet. Records when each connection attempt came."""

    listener: trio.socket.SocketType
    attempts: list[float] = attrs.Factory(list)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    async def serve(self) -> None:
        while True:
            conn, _ = await self.listener.accept()
            self.attempts.append(trio.current_time())
            conn.close()


@pytest.fixture
async def refusing_endpoint() -> AsyncIterator[RefusingEndpoint]:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    with listener:
        yield RefusingEndpoint(listener)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_full_etcd_is_etcd_full_and_the_maintenance_calls_recover_it(
    tmp_path: Path, transport: str
) -> None:
    proc = EtcdProcess(
        data_dir=tmp_path / "small", quota_bytes=4 * 1024 * 1024, auto_compaction="0"
    )
    proc.start()
    try:
        etcd = _client(transport, proc.endpoint)
        refused: EtcdFull | None = None
        with trio.fail_after(60):
            for i in range(10_000):
                try:
                    await etcd.put(f"/fill/{i}", "x" * 100_000)
                except EtcdFull as exc:
                    refused = exc
                    break
        assert isinstance(refused, Unavailable)  # retryable, once space is freed
        assert [alarm for _, alarm in await etcd.alarms()] == ["NOSPACE"]
        status = await etcd.status()
        assert int(status["dbSize"]) > 0
        assert any("NOSPACE" in str(e) for e in status.get("errors", ()))
        assert await etcd.get("/fill/0") is not None  # reads go on
        assert await etcd.delete("/fill/", prefix=True) > 0
        await etcd.compact(await etcd.revision())
        assert await etcd.member_urls() == [proc.endpoint]
        await etcd.defragment()
        for member_id, alarm in await etcd.alarms():
            await etcd.disarm(member_id, alarm)
        assert await etcd.alarms() == []
        await etcd.put("/fill/again", "ok")
        await etcd.aclose()
    finally:
        proc.stop()


async def test_sidecars_on_grpc_run_tasks_end_to_end(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    """Two real sidecars with ``--etcd-transport grpc``: election, sessions, watches,
    assignment and results all over gRPC; an SDK producer on one, a worker on the other."""
    procs = [
        SidecarProcess(
            name,
            etcd_server.endpoint,
            namespace,
            tmp_path / f"{name}.log",
            handler=None,
            extra=("--etcd-transport", "grpc"),
        )
        for name in ("g1", "g2")
    ]
    try:
        for proc in procs:
            proc.start()
            await proc.wait_serving()
        async with (
            TaskManager(str(procs[0].socket_path)) as producer,
            TaskManager(str(procs[1].socket_path)) as worker,
        ):

            async def double(task: WorkerTask) -> int:
                return int(task.data["n"]) * 2

            await worker.process(double, concurrency=4)
            tasks = [await (await producer.create({"n": n})).commit() for n in range(30)]
            with trio.fail_after(30):
                results = [await task.result(timeout=30) for task in tasks]
        assert results == [n * 2 for n in range(30)]
    finally:
        for proc in procs:
            proc.stop()
    for proc in procs:
        log = proc.log()
        assert "client=GrpcEtcd" in log
        assert "Traceback" not in log, log[-3000:]


def test_grpc_is_the_default_transport_and_the_gateway_the_other() -> None:
    assert isinstance(connect(EtcdConfig()), GrpcEtcd)
    # The gateway stays one flag away, for a deployment that can reach only it.
    assert isinstance(connect(EtcdConfig(transport="gateway")), GatewayEtcd)
    # The gateway's two old clients are gone: naming one says what to choose instead.
    for old in ("native", "etcd3", "grpcc"):
        with pytest.raises(ValueError, match="choose one of grpc, gateway"):
            EtcdConfig(transport=old)  # type: ignore[arg-type]


def _watch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "tm-etcd-watch"]


async def test_a_gateway_watch_ends_its_reader_thread_when_closed(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    """Each gateway watch is read by a thread blocked on its socket: closing the watch
    (here, leaving it while nothing changes) must wake and end that thread, or every
    re-watch would leak one."""
    etcd = _client("gateway", etcd_server.endpoint)
    key = f"/{namespace}/w"
    rev = await etcd.put(key, "1")
    before = set(_watch_threads())
    for _ in range(3):
        async with aclosing(etcd.watch_once(key, rev, prefix=False)) as changes:
            async for item in changes:
                assert [e.kv.value for e in item.events] == ["1"]
                break  # the stream is now idle: its thread waits on the socket
    await wait_for(lambda: not set(_watch_threads()) - before, timeout_s=5)
    # A watch cancelled from outside before etcd confirmed anything goes the same way.
    with trio.move_on_after(0):
        async for _ in etcd.watch_once(key, rev + 1, prefix=False):
            pass
    await wait_for(lambda: not set(_watch_threads()) - before, timeout_s=5)
    await etcd.aclose()


@pytest.mark.parametrize("where", ["flag", "env"])
def test_a_removed_transport_name_is_a_usage_error_that_lists_the_choices(
    where: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tm_sidecar.ops._cli import parse_args
    from tm_sidecar.ops._tmctl import main as tmctl

    argv = ["--etcd-transport", "native"] if where == "flag" else []
    if where == "env":
        monkeypatch.setenv("TM_ETCD_TRANSPORT", "etcd3")
    for run in (lambda: parse_args(argv), lambda: tmctl([*argv, "status"])):
        with pytest.raises(SystemExit) as exit_:
            run()
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "is not one of grpc, gateway" in err, err
    monkeypatch.setenv("TM_ETCD_TRANSPORT", "gateway")
    assert parse_args([])[1].etcd_transport == "gateway"
