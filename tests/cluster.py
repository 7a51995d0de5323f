"""A three-member etcd cluster on loopback for the fault tests, and a TCP proxy that can
partition a sidecar from it.

Each member has free ports and a data directory of its own, and can be SIGKILLed,
stopped, paused and started again. Blocking methods: call them from a thread in Trio
code (``trio.to_thread.run_sync``).

The partition is a proxy per member in front of the cluster: a sidecar given the
proxies' endpoints can be cut off (the proxy stops moving bytes either way but keeps
every connection open, as a network that drops packets would; traffic resumes where it
stopped when the partition heals, as TCP's retransmission would). It needs no root and
no network namespace, so it runs on every machine; the one difference from a real
partition is that the proxy's kernel still answers TCP keep-alive probes, so a cut-off
client notices by its own deadlines, which tm-sidecar has on every request.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import attrs
import trio

from tm_sidecar.ops._embedded import find_etcd_binary, free_port


@attrs.define(eq=False)
class Member:
    """One etcd member."""

    name: str
    data_dir: Path
    client_port: int
    peer_port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _call(endpoint: str, path: str, body: dict[str, Any], timeout_s: float = 2.0) -> Any:
    request = urllib.request.Request(f"{endpoint}/v3{path}", data=json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=timeout_s) as answer:
        return json.loads(answer.read())


@attrs.define(eq=False)
class EtcdCluster:
    """Three etcd members on loopback (no auto-compaction: the checker reads history)."""

    base: Path
    size: int = 3
    members: list[Member] = attrs.Factory(list)
    binary: str = attrs.Factory(find_etcd_binary)

    def __attrs_post_init__(self) -> None:
        for i in range(self.size):
            self.members.append(Member(f"m{i}", self.base / f"m{i}", free_port(), free_port()))

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(m.endpoint for m in self.members)

    def _args(self, m: Member) -> list[str]:
        initial = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        return [
            self.binary,
            f"--name={m.name}",
            f"--data-dir={m.data_dir}",
            f"--listen-client-urls={m.endpoint}",
            f"--advertise-client-urls={m.endpoint}",
            f"--listen-peer-urls={m.peer_url}",
            f"--initial-advertise-peer-urls={m.peer_url}",
            f"--initial-cluster={initial}",
            "--initial-cluster-state=new",
            "--initial-cluster-token=tm-faults",
            "--log-level=warn",
            "--logger=zap",
        ]

    def launch(self, i: int) -> None:
        """Start member ``i`` (again: it rejoins with its data)."""
        m = self.members[i]
        m.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.base / f"{m.name}.log", "ab") as log:
            m.proc = subprocess.Popen(
                self._args(m), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def start(self, timeout_s: float = 30.0) -> None:
        """Start every member and wait until the cluster has a leader."""
        for i in range(self.size):
            self.launch(i)
        self.wait_leader(timeout_s)

    def healthy(self, i: int) -> bool:
        """Whether member ``i`` answers and sees a leader."""
        try:
            with urllib.request.urlopen(f"{self.members[i].endpoint}/health", timeout=1) as r:
                return bool(json.loads(r.read()).get("health") == "true")
        except (OSError, ValueError):
            return False

    def leader(self) -> int | None:
        """The index of the raft leader, as the running members see it."""
        ids: dict[str, int] = {}
        leaders = set()
        for i, m in enumerate(self.members):
            if not m.running:
                continue
            try:
                status = _call(m.endpoint, "/maintenance/status", {}, timeout_s=1.0)
            except (OSError, ValueError):
                continue
            ids[str(status["header"]["member_id"])] = i
            leaders.add(str(status.get("leader", "0")))
        found = [ids[x] for x in leaders if x in ids]
        return found[0] if len(found) == 1 else None

    def wait_leader(self, timeout_s: float = 30.0) -> int:
        """Wait until the running members agree on a leader and a write goes through."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            leader = self.leader()
            if leader is not None and self.healthy(leader):
                return leader
            time.sleep(0.05)
        raise TimeoutError(f"the etcd cluster had no leader within {timeout_s} s")

    def kill(self, i: int) -> None:
        """SIGKILL member ``i``."""
        m = self.members[i]
        if m.proc is not None:
            m.proc.kill()
            m.proc.wait()
            m.proc = None

    def pause(self, i: int) -> None:
        """SIGSTOP member ``i`` (a hung member: its sockets stay open)."""
        assert self.members[i].proc is not None
        self.members[i].proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]

    def resume(self, i: int) -> None:
        assert self.members[i].proc is not None
        self.members[i].proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]

    def stop(self) -> None:
        """Stop every member."""
        for m in self.members:
            if m.proc is not None:
                if m.proc.poll() is None:
                    m.proc.send_signal(signal.SIGCONT)
                    m.proc.terminate()
                    try:
                        m.proc.wait(10)
                    except subprocess.TimeoutExpired:
                        m.proc.kill()
                        m.proc.wait()
                m.proc = None

    def hashkv(self, i: int, revision: int) -> tuple[int, int]:
        """Member ``i``'s hash of the key-value store up to ``revision``, and its
        compaction revision (members agree on both when their stores agree).

        With etcdctl (it ships beside etcd): the JSON gateway has no HashKV.
        """
        etcdctl = str(Path(self.binary).with_name("etcdctl"))
        endpoint = self.members[i].endpoint
        out = subprocess.run(
            [
                etcdctl,
                "endpoint",
                "hashkv",
                f"--endpoints={endpoint}",
                f"--rev={revision}",
                "-wjson",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
            env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"},
        ).stdout
        (answer,) = json.loads(out)
        found = answer["HashKV"]
        return int(found["hash"]), int(found.get("compact_revision", 0))

    def revision(self) -> int:
        for m in self.members:
            if m.running:
                try:
                    answer = _call(m.endpoint, "/kv/range", {"key": "AA==", "count_only": True})
                    return int(answer["header"]["revision"])
                except (OSError, ValueError):
                    continue
        raise RuntimeError("no member answers")

    def log(self) -> str:
        return "\n".join(
            f"== {m.name}\n" + (self.base / f"{m.name}.log").read_text(errors="replace")[-3000:]
            for m in self.members
            if (self.base / f"{m.name}.log").exists()
        )


@attrs.define(eq=False)
class Proxy:
    """A TCP proxy in front of one address that can be cut and healed (Trio)."""

    target_port: int
    port: int = attrs.Factory(free_port)
    _open: trio.Event = attrs.Factory(trio.Event)
    cut_at: float | None = None
    _dropped: bool = False
    _conns: set[trio.CancelScope] = attrs.Factory(set)

    def __attrs_post_init__(self) -> None:
        self._open.set()

    def cut(self) -> None:
        """Stop moving bytes, either way, on every connection (they stay open)."""
        if self._open.is_set():
            self._open = trio.Event()
            self.cut_at = trio.current_time()

    def drop(self) -> None:
        """Close every connection, and every new one at once, until healed (a peer that
        is gone, where :meth:`cut` is one that went silent)."""
        self._dropped = True
        for scope in self._conns:
            scope.cancel()

    def heal(self) -> None:
        self._open.set()
        self._dropped = False
        self.cut_at = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        task_status.started()
        await trio.serve_listeners(self._serve, listeners)

    async def _serve(self, client: trio.SocketStream) -> None:
        await self._open.wait()  # a cut network takes no new connection either
        if self._dropped:
            await client.aclose()
            return
        with trio.CancelScope() as scope:
            self._conns.add(scope)
            try:
                await self._pump(client)
            finally:
                self._conns.discard(scope)
                await trio.aclose_forcefully(client)

    async def _pump(self, client: trio.SocketStream) -> None:
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        except OSError:
            await client.aclose()
            return
        async with client, upstream, trio.open_nursery() as nursery:

            async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
                try:
                    while True:
                        await self._open.wait()
                        data = await src.receive_some(65536)
                        if not data:
                            break
                        await self._open.wait()  # bytes read as the cut came are held
                        await dst.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(pump, client, upstream)
            nursery.start_soon(pump, upstream, client)


class StartLog:
    """The handler starts the sidecars write (tests/proc_handlers.py ``chaos``): one line
    of JSON per start, appended by every process to one file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.touch()

    def read(self) -> list[dict[str, Any]]:
        """The starts logged so far. A reader can see a line another process is still
        writing (a write is atomic against other writers, not against readers), so only
        lines ended by a newline count: the fragment is read whole next time."""
        *complete, _partial = self.path.read_bytes().split(b"\n")
        return [json.loads(line) for line in complete if line.strip()]

    @property
    def env(self) -> dict[str, str]:
        return {"TM_TEST_STARTS": str(self.path)}
