"""Who may use a sidecar, and what a client is told when it may not (issue 20 item 10,
issue 21 item 11): a refusal is a :class:`PermissionDenied` at once, in both SDKs, never
"is tm-sidecar running?" after a wait, nor a retry for ever; the sidecar logs the
refusals it makes; the systemd unit's runtime directory lets a socket group work.

The users are real: run as root (as CI's container is), the clients run as ``nobody``;
otherwise the socket is made unreadable to its own user instead."""

from __future__ import annotations

import configparser
import grp
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from taskmanager import PermissionDenied, TaskManager, Unavailable, WaitTimeout

from tests.procs import ROOT, sidecars
from tests.tools import require
from tm_sidecar.ops._embedded import EtcdProcess

ROOTED = os.geteuid() == 0
NOBODY = pwd.getpwnam("nobody") if ROOTED else None
UNIT = ROOT / "systemd" / "tm-sidecar.service"

#: Becomes the user $TM_TEST_BECOME names (uid:gid), once what it runs is imported: the
#: interpreter and the checkout may live where that user cannot read them (root's pyenv,
#: a CI clone in a 0700 temporary folder). anyio imports its parts on first use: every
#: module of anyio and of the SDK is imported first.
BECOME = """
import os, sys, anyio, anyio._backends._asyncio, signal, logging, taskmanager
import importlib, pkgutil
for _pkg in (anyio, taskmanager):
    for _mod in pkgutil.walk_packages(_pkg.__path__, _pkg.__name__ + "."):
        try:
            importlib.import_module(_mod.name)
        except ImportError:  # an optional part (a backend, a plugin): not what runs here
            pass
if os.environ.get("TM_TEST_BECOME"):
    uid, gid = map(int, os.environ["TM_TEST_BECOME"].split(":"))
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
"""

#: A worker that waits for its sidecar as long as it takes: only a refusal ends it.
PY_WORKER = (
    BECOME
    + """
from taskmanager import PermissionDenied, run_worker
try:
    run_worker(lambda task: None, socket_path=sys.argv[1], connect_timeout_s=3600)
except PermissionDenied as exc:
    print(f"PermissionDenied: {exc}")
    sys.exit(3)
"""
)

#: The same in Node.js: process() waits for the sidecar (connectTimeoutMs) unless refused.
JS_WORKER = """
const { PermissionDenied, TaskManager } = await import("./index.js");
if (process.env.TM_TEST_BECOME) {
  // As the Python worker: become that user once the SDK is loaded (the checkout may be
  // where it cannot read).
  const [uid, gid] = process.env.TM_TEST_BECOME.split(":").map(Number);
  process.setgroups([]);
  process.setgid(gid);
  process.setuid(uid);
}
const socket = process.argv[1];
const manager = new TaskManager({ socket, connectTimeoutMs: 3600000, logger: { warn() {} } });
try {
  await manager.process(async () => null);
  console.log("registered");
  process.exit(0);
} catch (err) {
  console.log(`${err instanceof PermissionDenied ? "PermissionDenied" : err.name}: ${err.message}`);
  process.exit(err instanceof PermissionDenied ? 3 : 1);
}
"""

#: A client's status() call: it works when the socket lets the user in.
PY_STATUS = (
    BECOME
    + """
from taskmanager import TaskManager
async def main():
    async with TaskManager(sys.argv[1], connect_timeout_s=30) as manager:
        print("node", (await manager.status())["node"])
anyio.run(main)
"""
)


def _unit_runtime_mode() -> int:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(UNIT)
    return int(unit["Service"]["RuntimeDirectoryMode"], 8)


@pytest.fixture
def runtime_dir() -> Iterator[Path]:
    """A directory like the unit's ``RuntimeDirectory=`` (its mode, owned by the
    sidecar's user), where another user can be refused or let in; not under the test's
    own tmp_path, whose parents no other user may enter."""
    path = Path(tempfile.mkdtemp(prefix="tm-run-"))
    os.chmod(path, _unit_runtime_mode())
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _as_client(
    args: list[str], sock: Path, *, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    """Run a client as another user (``nobody``) when root; else as this one, with the
    socket made unopenable to it. Bounded: a client that waits for ever is a failure."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": "/tmp"}
    if NOBODY is not None:
        # Each client becomes nobody itself, once it has loaded what it runs.
        env["TM_TEST_BECOME"] = f"{NOBODY.pw_uid}:{NOBODY.pw_gid}"
    else:
        os.chmod(sock, 0)
    try:
        return subprocess.run(
            [*args, str(sock)],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the client was not told it may not connect: {exc}") from exc


def _node() -> str:
    return require("node", package="nodejs")[0]


async def test_a_socket_the_user_may_not_open_is_a_permission_denied_at_once(
    etcd_server: EtcdProcess, namespace: str, runtime_dir: Path
) -> None:
    async with sidecars(etcd_server, namespace, runtime_dir, "n1") as (sc,):
        run = await trio.to_thread.run_sync(
            _as_client, [sys.executable, "-c", PY_WORKER], sc.socket_path
        )
        assert run.returncode == 3, run.stdout + run.stderr
        assert "PermissionDenied" in run.stdout
        assert str(sc.socket_path) in run.stdout
        assert "may not open" in run.stdout
        assert "--socket-group" in run.stdout
        assert "is tm-sidecar running" not in run.stdout + run.stderr

        js = await trio.to_thread.run_sync(
            lambda: _as_client(
                [_node(), "--input-type=module", "-e", JS_WORKER, "--"],
                sc.socket_path,
                cwd=ROOT / "sdk" / "js",
            )
        )
        assert js.returncode == 3, js.stdout + js.stderr
        assert "PermissionDenied" in js.stdout
        assert str(sc.socket_path) in js.stdout


@pytest.mark.skipif(not ROOTED, reason="needs root, to run the client as another user")
async def test_the_units_runtime_directory_lets_a_socket_group_in(
    etcd_server: EtcdProcess, namespace: str, runtime_dir: Path
) -> None:
    # docs/operations.md: TM_SOCKET_GROUP names the applications' group. With the unit's
    # RuntimeDirectoryMode, a member of that group (and of no other) reaches the socket.
    assert NOBODY is not None
    group = grp.getgrgid(NOBODY.pw_gid).gr_name
    async with sidecars(
        etcd_server, namespace, runtime_dir, "n1", extra=("--socket-group", group)
    ) as (sc,):
        run = await trio.to_thread.run_sync(
            lambda: subprocess.run(
                [sys.executable, "-c", PY_STATUS, str(sc.socket_path)],
                env={
                    **os.environ,
                    "PYTHONPATH": str(ROOT),
                    "HOME": "/tmp",
                    "TM_TEST_BECOME": f"{NOBODY.pw_uid}:{NOBODY.pw_gid}",
                },
                capture_output=True,
                text=True,
                timeout=60,
            )
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert run.stdout.strip() == "node n1"


async def test_an_allow_uid_refusal_is_permission_denied_and_logged(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    async with sidecars(etcd_server, namespace, tmp_path, "n1", extra=("--allow-uid", "54321")) as (
        sc,
    ):
        async with TaskManager(str(sc.socket_path), connect_timeout_s=3600) as manager:
            with trio.fail_after(30), pytest.raises(PermissionDenied) as refused:
                await manager.status()
        assert f"uid {os.getuid()} is not allowed" in str(refused.value)
        assert "--allow-uid" in str(refused.value)
        assert not isinstance(refused.value, Unavailable)  # not to be retried
        # The Node.js SDK: the same refusal, at once, not retried.
        js = await trio.to_thread.run_sync(
            lambda: subprocess.run(
                [_node(), "--input-type=module", "-e", JS_WORKER, "--", str(sc.socket_path)],
                cwd=ROOT / "sdk" / "js",
                capture_output=True,
                text=True,
                timeout=60,
            )
        )
        assert js.returncode == 3, js.stdout + js.stderr
        assert f"uid {os.getuid()} is not allowed" in js.stdout
        line = next(x for x in sc.log().splitlines() if "client refused" in x)
        assert f"uid={os.getuid()}" in line
        assert "54321" in line


async def test_a_wait_that_times_out_is_unavailable_as_the_protocol_says(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    # docs/protocol.md: a `wait` that runs out of `timeout_s` answers `unavailable`; the
    # SDK's wait says the same (and stays a TimeoutError for code that caught that).
    async with (
        sidecars(etcd_server, namespace, tmp_path, "n1") as (sc,),
        TaskManager(str(sc.socket_path)) as manager,
    ):
        task = await (await manager.create({"n": 1})).with_queue("nobody-works-here").commit()
        for wait in (
            lambda: manager.wait(task.id, timeout=0.2),
            lambda: manager.result(task.id, timeout=0.2),
            lambda: task.result(timeout=0.2),
        ):
            with pytest.raises(WaitTimeout) as caught:
                await wait()
            assert isinstance(caught.value, Unavailable)
            assert isinstance(caught.value, TimeoutError)
            assert caught.value.code == "wait_timeout"
            assert caught.value.retryable
            assert task.id in str(caught.value)
        assert (await manager.get(task.id))["state"] == "pending"  # it goes on
