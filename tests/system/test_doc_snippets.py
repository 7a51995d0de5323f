"""Every Python snippet of README.md and docs/*.md runs as written, against a real sidecar.

A snippet is marked by the HTML comment just above its fence (invisible once rendered):
``<!-- snippet: run -->`` runs to its end; ``<!-- snippet: worker -->`` is a worker
process, given a task and then SIGTERM; ``<!-- snippet: wsgi METHOD PATH BODY -->``
defines a WSGI ``app`` that is sent the request; ``<!-- snippet: not run: why -->``
is a fragment. An unmarked Python snippet fails the suite.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
import trio
from taskmanager import TaskManager

from tests.procs import ROOT, sidecars
from tests.sdk.test_sdk import _env
from tm_sidecar.ops._embedded import EtcdProcess

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(
    r"(?:<!-- snippet: (?P<mode>[^\n]*?) -->\n)?```python\n(?P<code>.*?)^```", re.S | re.M
)


@attrs.frozen
class Snippet:
    doc: str
    line: int
    mode: str | None
    code: str

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}"


def snippets() -> list[Snippet]:
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start("code"))
            found.append(Snippet(doc.name, line, match.group("mode"), match.group("code")))
    return found


RUNNABLE = [s for s in snippets() if s.mode and not s.mode.startswith("not run:")]


def test_every_python_snippet_is_marked_and_some_run() -> None:
    unmarked = [str(s) for s in snippets() if s.mode is None]
    assert unmarked == [], "mark each Python snippet (see this module's docstring)"
    assert {s.mode.split()[0] for s in RUNNABLE if s.mode} == {"run", "worker", "wsgi"}


@pytest.mark.parametrize("snippet", RUNNABLE, ids=str)
async def test_the_snippet_runs_as_written(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path, snippet: Snippet
) -> None:
    assert snippet.mode is not None
    mode, *args = snippet.mode.split(maxsplit=3)
    path = tmp_path / "snippet.py"
    path.write_text(snippet.code)
    command = [sys.executable, str(ROOT / "tests" / "run_snippet.py"), mode, str(path), *args]
    async with sidecars(etcd_server, namespace, tmp_path, "n1") as (sc,):
        env = {**_env(sc.socket_path), "ETCD_URL": etcd_server.endpoint}
        if mode == "worker":
            stdout, stderr, code = await _run_worker(command, env, str(sc.socket_path))
        else:
            with trio.fail_after(60):
                run = await trio.run_process(
                    command, env=env, capture_stdout=True, capture_stderr=True, check=False
                )
            stdout, stderr, code = run.stdout.decode(), run.stderr.decode(), run.returncode
    assert code == 0, f"{snippet}: {stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    if mode == "wsgi":
        created, read = stdout.splitlines()[:2]
        assert created.startswith("202 "), created
        assert read.startswith("200 "), read
        assert '"state": "pending"' in read, read


async def _run_worker(command: list[str], env: dict[str, str], sock: str) -> tuple[str, str, int]:
    """Give the worker a task, wait for its result, then SIGTERM it."""
    proc = await trio.lowlevel.open_process(
        command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    out: list[bytes] = []
    err: list[bytes] = []

    async def drain(stream: trio.abc.ReceiveStream, into: list[bytes]) -> None:
        while chunk := await stream.receive_some(65536):
            into.append(bytes(chunk))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain, proc.stdout, out)
            nursery.start_soon(drain, proc.stderr, err)
            async with TaskManager(sock) as producer:
                task = await (await producer.create({"to": "ann@example.com"})).commit()
                assert await task.result(timeout=30) is not None
            proc.send_signal(signal.SIGTERM)
            with trio.fail_after(30):
                code = await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    return b"".join(out).decode(), b"".join(err).decode(), code
