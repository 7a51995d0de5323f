"""Protocol robustness: whatever a client sends, the sidecar answers with an error or
closes that one connection, stays up for everyone else, and loses no task."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from taskmanager.protocol import (
    InvalidRequest,
    PayloadTooLarge,
    ProtocolViolation,
    TaskNotFound,
    Unavailable,
)

from tests.procs import SidecarProcess
from tm_sidecar.ops._embedded import EtcdProcess

#: What garbage may be answered with: the caller's fault, or the sidecar's unavailability
#: (codes from the one table, taskmanager.protocol).
CODES = {
    cls.code
    for cls in (InvalidRequest, ProtocolViolation, TaskNotFound, PayloadTooLarge, Unavailable)
}


class Raw:
    """A blocking client that speaks the protocol by hand."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(str(path))
        except OSError:
            self.sock.close()
            raise
        self.sock.settimeout(10)
        self.buffer = b""
        self.next_id = 0
        self.pushed: list[dict[str, Any]] = []  # pushes that came while call() waited

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def frame(self, timeout: float = 10.0) -> dict[str, Any] | None:
        """The next frame, or None if the server closed the connection."""
        self.sock.settimeout(timeout)
        while b"\n" not in self.buffer:
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                return None
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return dict(json.loads(line))

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        self.next_id += 1
        self.send(json.dumps({"id": self.next_id, "op": op, **fields}).encode() + b"\n")
        while True:
            frame = self.frame()
            assert frame is not None, "the server closed a well-behaved connection"
            if frame.get("id") == self.next_id:
                return frame
            if "push" in frame:
                self.pushed.append(frame)


@pytest.fixture(scope="module")
def sidecar(
    etcd_server: EtcdProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarProcess]:
    d = tmp_path_factory.mktemp("proto")
    proc = SidecarProcess("fuzz", etcd_server.endpoint, "protofuzz", d / "fuzz.log", lease_ttl_s=5)
    proc.start()
    deadline = time.monotonic() + 20
    while True:
        try:
            Raw(proc.socket_path).close()
            break
        except OSError:
            assert time.monotonic() < deadline, proc.log()[-2000:]
            time.sleep(0.05)
    yield proc
    proc.stop()


def hello(path: Path) -> Raw:
    raw = Raw(path)
    answer = raw.call("hello", version=1)
    assert answer["ok"], answer
    return raw


def assert_healthy(proc: SidecarProcess) -> None:
    assert proc.proc is not None
    assert proc.proc.poll() is None, proc.log()[-3000:]
    raw = hello(proc.socket_path)
    assert raw.call("ping")["result"] == "pong"
    raw.close()


valid_requests = st.sampled_from(
    [
        {"op": "hello", "version": 1},
        {"op": "ping"},
        {"op": "create", "payload": {"a": 1}},
        {"op": "get", "task_id": "nope"},
        {"op": "subscribe"},
        {"op": "status"},
    ]
)
junk_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
wrong_types = st.fixed_dictionaries(
    {
        "op": st.sampled_from(
            [
                "create",
                "get",
                "wait",
                "register",
                "progress",
                "complete",
                "fail",
                "release",
                "unsubscribe",
            ]
        )
    },
    optional={
        "id": junk_values,
        "payload": junk_values,
        "options": junk_values,
        "task_id": junk_values,
        "run_at": junk_values,
        "concurrency": junk_values,
        "delivery": junk_values,
        "subscribe": junk_values,
        "events": junk_values,
        "until_final": junk_values,
        "timeout_s": st.floats(0, 0.2) | junk_values,
    },
)
frames = st.one_of(
    st.binary(max_size=300),  # random bytes
    valid_requests.map(lambda r: json.dumps(r).encode()).flatmap(
        lambda b: st.integers(0, len(b)).map(lambda n: b[:n])  # truncated JSON
    ),
    st.text(min_size=1, max_size=12).map(
        lambda op: json.dumps({"id": 1, "op": op}).encode()
    ),  # unknown ops
    wrong_types.map(lambda f: json.dumps(f).encode()),
    junk_values.map(lambda v: json.dumps(v).encode()),  # JSON that is not an object
)
INPUTS = {"count": 0}


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    say_hello=st.booleans(), batch=st.lists(frames, min_size=1, max_size=4), newline=st.booleans()
)
def test_any_input_gets_an_error_or_a_close_and_harms_no_one(
    sidecar: SidecarProcess, say_hello: bool, batch: list[bytes], newline: bool
) -> None:
    raw = hello(sidecar.socket_path) if say_hello else Raw(sidecar.socket_path)
    try:
        for data in batch:
            INPUTS["count"] += 1
            raw.send(data + (b"\n" if newline else b""))
        raw.send(b"\n")
        # Every answer is a well-formed frame; an error names a known code.
        while (frame := raw.frame(timeout=0.3 if newline else 0.1)) is not None:
            if frame.get("ok") is False:
                assert frame["error"]["code"] in CODES, frame
    except (TimeoutError, BrokenPipeError, ConnectionResetError):
        pass
    finally:
        raw.close()
    assert_healthy(sidecar)


def test_an_oversized_frame_closes_only_that_connection(sidecar: SidecarProcess) -> None:
    bystander = hello(sidecar.socket_path)
    big = hello(sidecar.socket_path)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        big.send(b'{"id": 9, "op": "create", "payload": "' + b"x" * (1100 * 1024))
    error = big.frame()
    assert error is not None
    assert error["error"]["code"] == "protocol_violation"
    assert "over" in error["error"]["message"]
    assert big.frame() is None  # closed
    assert bystander.call("ping")["result"] == "pong"
    bystander.close()
    big.close()


def test_a_slow_client_blocks_no_one_and_no_task_is_lost(sidecar: SidecarProcess) -> None:
    slow = hello(sidecar.socket_path)
    slow.send(b'{"id": 1, "op": "cre')  # half a frame, then silence
    producer = hello(sidecar.socket_path)
    ids = []
    for i in range(20):
        answer = producer.call("create", payload={"i": i})
        assert answer["ok"], answer
        ids.append(answer["result"]["task_id"])
    for task_id in ids:
        done = producer.call("wait", task_id=task_id, timeout_s=30)
        assert done["result"]["state"] == "completed", done
    slow.close()
    producer.close()
    print(f"\nprotocol fuzzing sent {INPUTS['count']} generated frames")


def test_a_create_that_subscribes_sees_every_event_and_the_subscription_ends(
    sidecar: SidecarProcess,
) -> None:
    raw = hello(sidecar.socket_path)
    answer = raw.call("create", payload={"work_s": 0.2}, subscribe=True)
    assert answer["ok"], answer
    sid, tid = answer["result"]["subscription"], answer["result"]["task_id"]
    seen: list[str] = []
    while "completed" not in seen:
        # Events may overtake the create's answer.
        frame = raw.pushed.pop(0) if raw.pushed else raw.frame()
        assert frame is not None
        assert frame.get("push") == "event", frame
        assert frame["subscription"] == sid
        assert frame["event"]["task_id"] == tid
        seen.append(frame["event"]["event"])
    # The slow attempt announced its start while it ran.
    assert seen == ["queued", "assigned", "started", "completed"]
    # The subscription ended with the final event: nothing left to unsubscribe.
    assert raw.call("unsubscribe", subscription=sid)["result"] is False
    refused = raw.call("subscribe", until_final=True)
    assert refused["error"]["code"] == "invalid_request"
    # Only the kinds asked for are pushed.
    answer = raw.call("create", payload={"work_s": 0.2}, subscribe=True, events=["completed"])
    frame = raw.pushed.pop(0) if raw.pushed else raw.frame()
    assert frame is not None
    assert frame["event"]["event"] == "completed"
    assert frame["event"]["task_id"] == answer["result"]["task_id"]
    for bad in (["finished"], [], "completed"):
        refused = raw.call("create", payload={}, subscribe=True, events=bad)
        assert refused["error"]["code"] == "invalid_request", bad
    raw.close()


def test_requests_before_hello_and_bad_versions_are_refused(sidecar: SidecarProcess) -> None:
    raw = Raw(sidecar.socket_path)
    early = raw.call("ping")
    assert early["error"]["code"] == "invalid_request"
    assert "hello" in early["error"]["message"]
    assert raw.call("hello", version=99)["error"]["code"] == "invalid_request"
    assert raw.call("hello", version=1)["ok"]
    raw.close()


def test_frames_that_once_crashed_the_sidecar_are_refused(sidecar: SidecarProcess) -> None:
    raw = hello(sidecar.socket_path)
    # Numbers JSON allows but int() does not; and nesting deeper than the parser goes.
    for text in (
        b'{"id": 2, "op": "unsubscribe", "subscription": 1e400}',
        b'{"id": 3, "op": "unregister", "worker": Infinity}',
        b'{"id": 4, "op": "progress", "delivery": -Infinity, "data": 1}',
    ):
        raw.send(text + b"\n")
        answer = raw.frame()
        assert answer is not None
        assert answer["ok"] is False
    raw.send(b"[" * 100_000 + b"\n")
    closing = raw.frame()
    assert closing is not None
    assert closing["error"]["code"] == "protocol_violation"
    raw.close()
    again = hello(sidecar.socket_path)
    assert again.call("hello", version=1)["error"]["code"] == "invalid_request"  # one hello
    again.close()
    assert_healthy(sidecar)


async def test_the_uid_allow_list(etcd_server: EtcdProcess, tmp_path: Path) -> None:
    from tests.procs import SidecarProcess as Proc

    others = Proc(
        "allow",
        etcd_server.endpoint,
        "allowlist",
        tmp_path / "a.log",
        handler=None,
        extra=("--allow-uid", "54321"),
    )
    mine = Proc(
        "mine",
        etcd_server.endpoint,
        "allowlist2",
        tmp_path / "m.log",
        handler=None,
        extra=("--allow-uid", str(os.getuid())),
    )
    try:
        for p in (others, mine):
            p.start()
            await p.wait_serving()
        refused = Raw(others.socket_path)
        frame = refused.frame()
        assert frame is not None
        assert frame["error"]["code"] == "permission_denied"
        assert "not allowed" in frame["error"]["message"]
        assert refused.frame() is None  # closed
        refused.close()
        hello(mine.socket_path).close()
    finally:
        others.stop()
        mine.stop()


async def test_socket_mode_and_group(etcd_server: EtcdProcess, tmp_path: Path) -> None:
    import grp
    import stat

    from tests.procs import SidecarProcess as Proc

    group = grp.getgrgid(os.getgid()).gr_name  # a group this user may hand the socket to
    p = Proc(
        "perm",
        etcd_server.endpoint,
        "perms",
        tmp_path / "p.log",
        handler=None,
        extra=("--socket-mode", "640", "--socket-group", group),
    )
    try:
        p.start()
        await p.wait_serving()
        info = os.stat(p.socket_path)
        assert stat.S_IMODE(info.st_mode) == 0o640
        assert info.st_gid == grp.getgrnam(group).gr_gid
    finally:
        p.stop()
