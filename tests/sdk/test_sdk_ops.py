"""Both SDKs send every operation a sidecar serves (issue 20 item 11): the ``ops`` list
that ``hello`` answers is held against the requests written in the Python SDK
(``sdk/taskmanager``) and the Node.js SDK (``sdk/js/lib``), so that an operation cannot
land in the sidecar and one SDK only. The failure says which op is missing where.

An SDK sends an op where its source names it as a request's first argument
(``request("get", ...)``, ``_request("pause", ...)``, ``send_items("report", ...)``), as
the op of a frame built by hand (``{"op":"report",...``), as the op of an (op, fields) pair
it sends later (``("complete", {"result": ...})``), or as a kind of a delivery's outcome
in the table of the single ops a sidecar without batched reports takes.
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import trio

from tests.procs import ROOT, sidecars
from tm_sidecar.ops._embedded import EtcdProcess

SDKS = {
    "the Python SDK (sdk/taskmanager)": (ROOT / "sdk" / "taskmanager", "*.py"),
    "the Node.js SDK (sdk/js/lib, with its types in sdk/js/index.d.ts)": (
        ROOT / "sdk" / "js" / "lib",
        "*.js",
    ),
}

#: Ops that no SDK sends, each with why. Keep it short: an op here is one that a client
#: of the SDKs cannot reach.
NOT_SENT = {
    "wait": "the SDKs wait for an outcome on the task's own subscription (one round trip, "
    "resumed after a reconnect), not with a wait request held open",
}

_REQUEST = re.compile(r"""(?:request|send_items)\(\s*["']([a-z_]+)["']""")
#: A frame built by hand (``{"id":7,"op":"report",...`` in a template), its op named.
_FRAME_OP = re.compile(r"""["']op["']\s*:\s*["']([a-z_]+)["']""")
#: A table of a delivery's outcomes as the single ops they are sent as (``_SINGLE`` in
#: Python: ``"complete": ("complete", "result")``; ``SINGLE`` in Node.js: one line of
#: ``kind: field``): each kind is an op sent where the sidecar does not batch reports.
_SINGLE_PY = re.compile(r"""["']([a-z_]+)["']\s*:\s*\(\s*["']\1["']""")
_SINGLE_JS = re.compile(r"""^const SINGLE = \{(.*)\};$""", re.M)
_PAIR = re.compile(r"""(?<!\.get)(?<!\.pop)(?<!setdefault)[(\[]\s*["']([a-z_]+)["']\s*,\s*\{""")


def sent_ops(folder: Path, pattern: str, *, pairs: bool = True) -> dict[str, list[str]]:
    """The ops the SDK's source sends, each with where (file:line); with ``pairs``, the
    (op, fields) pairs too (which may name other things: only ops served count)."""
    found: dict[str, list[str]] = {}
    for path in sorted(folder.glob(pattern)):
        text = path.read_text()
        regexes = (_REQUEST, _PAIR, _FRAME_OP, _SINGLE_PY) if pairs else (_REQUEST, _FRAME_OP)
        for regex in regexes:
            for match in regex.finditer(text):
                line = text.count("\n", 0, match.start()) + 1
                found.setdefault(match.group(1), []).append(f"{path.name}:{line}")
        if pairs:
            for table in _SINGLE_JS.finditer(text):
                line = text.count("\n", 0, table.start()) + 1
                for kind in re.findall(r"(\w+)\s*:", table.group(1)):
                    found.setdefault(kind, []).append(f"{path.name}:{line}")
    return found


def hello_ops(path: Path) -> list[str]:
    """The ``ops`` a sidecar's ``hello`` answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        sock.sendall(b'{"id": 1, "op": "hello", "version": 1}\n')
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            assert chunk, "the sidecar closed the connection before answering hello"
            data += chunk
    answer = json.loads(data)
    assert answer["ok"], answer
    return list(answer["result"]["ops"])


def missing_where(ops: list[str]) -> list[str]:
    """What each SDK lacks against ``ops``, and sends beyond them, in words."""
    problems = []
    for sdk, (folder, pattern) in SDKS.items():
        sent = sent_ops(folder, pattern)
        for op in ops:
            if op not in sent and op not in NOT_SENT:
                problems.append(
                    f"op {op!r} (in the ops hello answers) is sent nowhere in {sdk}: add a "
                    "method for it there, and in the other SDK too"
                )
        for op, where in sorted(sent_ops(folder, pattern, pairs=False).items()):
            if op not in ops:
                problems.append(
                    f"{sdk} sends op {op!r} ({', '.join(where)}), which no sidecar serves"
                )
            elif op in NOT_SENT:
                problems.append(
                    f"{sdk} sends op {op!r} ({', '.join(where)}): drop it from NOT_SENT"
                )
    return problems


async def test_both_sdks_send_every_op_the_sidecar_serves(
    etcd_server: EtcdProcess, namespace: str, tmp_path: Path
) -> None:
    async with sidecars(etcd_server, namespace, tmp_path, "n1") as (sc,):
        ops = await trio.to_thread.run_sync(hello_ops, sc.socket_path)
    assert "create" in ops  # the list is what it claims to be
    assert set(NOT_SENT) <= set(ops), "NOT_SENT names an op no sidecar serves"
    problems = missing_where(ops)
    assert not problems, "\n".join(problems)


def test_the_check_names_the_op_missing_and_where() -> None:
    # The check itself: an op only the sidecar has is named for each SDK, and one an SDK
    # sends that the sidecar lacks is named with the lines that send it.
    ops = ["create_many_for_this_test", *sent_ops(*SDKS[next(iter(SDKS))], pairs=False)]
    problems = missing_where([op for op in ops if op != "ping"])
    assert any("'create_many_for_this_test'" in p and "Node.js SDK" in p for p in problems), (
        problems
    )
    assert any("'create_many_for_this_test'" in p and "Python SDK" in p for p in problems)
    assert any("sends op 'ping' (" in p and "_client.py:" in p for p in problems), problems
    assert any("sends op 'ping' (" in p and "manager.js:" in p for p in problems), problems
