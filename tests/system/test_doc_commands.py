"""Every ``etcdctl`` and ``tmctl`` line of the README and the docs runs, as written,
against a live sidecar with its embedded etcd (operators copy these during incidents).

The lines are read from the Markdown at collection time, so a line added to the docs
later is tested too: each line of a shell block (after the block's own ``export`` and
``NAME=`` lines), and each inline code span that starts with ``etcdctl`` or ``tmctl``.
What an operator would fill in is filled in: ``ID`` (a task in the state the command
needs), ``<ns>``; ``a|b`` runs once for each; ``purge`` and ``recover`` get ``--yes``,
the answer to the question they ask on a terminal. Live tails (``watch``, ``events``)
must show a change.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from tests.procs import ROOT
from tests.tools import require
from tm_sidecar.core import (
    Keyspace,
    Put,
    Record,
    State,
    TaskError,
    TaskId,
    TaskOptions,
    TaskSpec,
    Txn,
    initial_record,
    plan_create,
)
from tm_sidecar.etcd import SyncEtcd
from tm_sidecar.ops._embedded import find_etcd_binary

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "systemd" / "README.md"]
TOOLS = ("etcdctl", "tmctl")
#: The docs' example task id: the live namespace has a task by that id.
EXAMPLE_ID = "01a2230865b6-0025deadbeef"
NODE = "web-1"  # the docs' example node
SHELLS = {"", "sh", "bash", "shell", "console"}


@attrs.frozen
class DocCommand:
    """One command line of the docs, and the lines of its block that set its variables."""

    source: str  # file:line
    line: str
    prelude: tuple[str, ...] = ()


def _is_command(text: str) -> bool:
    """``tmctl status`` is a command; ``tmctl`` or ``tmctl --etcd`` in prose is a name."""
    words = text.split()
    return bool(words) and words[0] in TOOLS and any(not w.startswith("-") for w in words[1:])


def _expand(source: str, text: str) -> list[tuple[str, str]]:
    """``purge completed|failed`` is two commands (a shell pipe has spaces around it)."""
    found = re.search(r"(?<![\w|])(\w+(?:\|\w+)+)(?![\w|])", text)
    if found is None:
        return [(source, text)]
    out = []
    for choice in found.group(1).split("|"):
        variant = text[: found.start()] + choice + text[found.end() :]
        out += _expand(f"{source}[{choice}]", variant)
    return out


def doc_commands() -> list[DocCommand]:
    """Every etcdctl and tmctl line of the docs, in order."""
    commands: list[DocCommand] = []
    for path in DOCS:
        if not path.exists():
            continue
        name = path.relative_to(ROOT).as_posix()
        fence: str | None = None
        prelude: list[str] = []
        for number, raw in enumerate(path.read_text().splitlines(), 1):
            stripped = raw.strip()
            if stripped.startswith("```"):
                fence = stripped[3:].strip() if fence is None else None
                prelude = []
                continue
            if fence is not None:
                if fence not in SHELLS:
                    continue
                line = stripped.removeprefix("$ ")
                if re.match(r"(export\s+)?[A-Za-z_]\w*=", line):
                    prelude.append(line)
                elif _is_command(line):
                    commands.append(DocCommand(f"{name}:{number}", line, tuple(prelude)))
                continue
            for span in re.findall(r"`([^`]+)`", raw):
                if _is_command(span):
                    for source, text in _expand(f"{name}:{number}", span):
                        commands.append(DocCommand(source, text))
    return commands


COMMANDS = doc_commands()


def test_the_docs_have_the_commands_this_test_runs() -> None:
    # A guard on the reader itself: it finds the recipes of keys.md and operations.md.
    sources = {c.source.split(":")[0] for c in COMMANDS}
    assert {"docs/keys.md", "docs/operations.md"} <= sources
    assert len(COMMANDS) >= 20
    assert any("--count-only" in c.line for c in COMMANDS)
    assert any(c.line.startswith("tmctl purge failed") for c in COMMANDS)
    assert all(c.prelude for c in COMMANDS if c.line.startswith("etcdctl get --prefix $NS"))


# -- the live sidecar ------------------------------------------------------------------------


@attrs.frozen
class Live:
    """A tm-sidecar with its embedded etcd, everything at its defaults under ``root``."""

    root: Path
    env: dict[str, str]
    endpoint: str
    ks: Keyspace


def _served(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


SIDECAR = [sys.executable, "-m", "tm_sidecar", "--handler", "tests.proc_handlers:work"]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("docs")
    bin_dirs = [str(Path(sys.executable).parent), str(Path(find_etcd_binary()).parent)]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("TM_", "ETCDCTL_"))},
        "PATH": os.pathsep.join([*bin_dirs, os.environ.get("PATH", "")]),
        "PYTHONPATH": str(ROOT),
        # The defaults an operator has: the data directory and the socket come from these.
        "XDG_DATA_HOME": str(root / "share"),
        "XDG_RUNTIME_DIR": str(root),
    }
    log = root / "sidecar.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [*SIDECAR, "--node-id", NODE, "--lease-ttl", "2"],
            env=env,
            stdout=out,
            stderr=out,
        )
    try:
        deadline = time.monotonic() + 30
        while not _served(root / "tm-sidecar.sock"):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        ports = json.loads((root / "share" / "tm-sidecar" / "tm-ports.json").read_text())
        ks = Keyspace(namespace="default")
        live = Live(root, env, f"http://127.0.0.1:{ports['client']}", ks)
        db = SyncEtcd(live.endpoint)
        _create(db, ks, EXAMPLE_ID, delay_s=86400)
        for i in range(3):
            _create(db, ks, f"done-{i}")
        while len(db.list(ks.state_prefix(State.COMPLETED))[0]) < 3:
            assert time.monotonic() < deadline + 30, log.read_text()[-3000:]
            time.sleep(0.05)
        yield live
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _create(db: SyncEtcd, ks: Keyspace, tid: str, delay_s: float = 0) -> None:
    now = time.time()
    spec = TaskSpec(
        id=TaskId(tid),
        payload={"work_s": 0.01},
        options=TaskOptions(max_attempts=1),
        created_at=now,
        run_at=now + delay_s if delay_s else None,
    )
    rec = initial_record(
        Record(state=State.PENDING, options=spec.options, since_at=now), now=now, run_at=spec.run_at
    )
    assert db.txn(plan_create(ks, spec, rec)).succeeded


def _fail(db: SyncEtcd, ks: Keyspace, tid: str) -> None:
    now = time.time()
    spec = TaskSpec(id=TaskId(tid), payload={"work_s": 0.01}, created_at=now)
    error = TaskError(type="Boom", message="seeded for the docs test")
    rec = Record(state=State.FAILED, attempts=3, since_at=now, error=error)
    ops = (
        Put(ks.task(spec.id), spec.to_json()),
        Put(ks.state(State.FAILED, spec.id), rec.to_json()),
    )
    assert db.txn(Txn(success=ops)).succeeded


_serial = iter(range(1_000_000))


def _fill_in(command: DocCommand, live: Live) -> str:
    """The command as an operator would type it here: placeholders filled in."""
    db = SyncEtcd(live.endpoint)
    n = next(_serial)
    failed, delayed = f"failed-{n}", f"delayed-{n}"
    _fail(db, live.ks, failed)
    _create(db, live.ks, delayed, delay_s=86400)
    words = command.line.split()
    task = failed if "retry" in words else delayed
    text = re.sub(r"\bID\b", task, command.line).replace("<ns>", live.ks.namespace)
    if words[0] == "tmctl" and {"purge", "recover"} & set(words) and "--yes" not in words:
        text += " --yes"
    return text


def _script(command: DocCommand, text: str) -> str:
    prelude = list(command.prelude)
    if not any("ETCDCTL_ENDPOINTS=" in line for line in prelude):
        # What the docs tell an operator to do first.
        prelude.insert(0, "export ETCDCTL_ENDPOINTS=$(tmctl endpoint)")
    return "\n".join(["set -euo pipefail", *prelude, text])


def _is_tail(words: list[str]) -> bool:
    return (words[0] == "etcdctl" and "watch" in words) or (
        words[0] == "tmctl" and "events" in words
    )


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{c.source} {c.line}" for c in COMMANDS])
def test_a_doc_command_runs_as_written(command: DocCommand, live: Live, tmp_path: Path) -> None:
    words = command.line.split()
    if "jq" in command.line.split("|", 1)[-1].split():
        require("jq", package="jq")
    text = _fill_in(command, live)
    script = _script(command, text)
    if _is_tail(words):
        _run_tail(script, live, tmp_path)
        return
    run = subprocess.run(
        ["bash", "-c", script],
        cwd=tmp_path,
        env=live.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, (
        f"{command.source}: {text}\n{run.stdout[-2000:]}{run.stderr[-2000:]}"
    )


def _run_tail(script: str, live: Live, cwd: Path) -> None:
    """A live tail runs until stopped, and shows a change made meanwhile."""
    out = cwd / "out.txt"
    with open(out, "wb") as sink:
        proc = subprocess.Popen(
            ["bash", "-c", script],
            cwd=cwd,
            env=live.env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        db = SyncEtcd(live.endpoint)
        deadline = time.monotonic() + 20
        n = 0
        while not out.read_text().strip():
            assert proc.poll() is None, out.read_text()
            assert time.monotonic() < deadline, "the tail showed nothing"
            # Keep making changes until the tail has started and shows one.
            _create(db, live.ks, f"tail-{next(_serial)}")
            n += 1
            time.sleep(0.2)
        assert proc.poll() is None, out.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
