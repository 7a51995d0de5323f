"""Run a documentation snippet as written: ``python tests/run_snippet.py MODE FILE [ARGS]``.

Snippets may ``await`` at top level, as in ``python -m asyncio``: such a snippet runs in
one asyncio event loop. ``run`` and ``worker`` run it as ``__main__``; ``wsgi METHOD
PATH BODY`` loads it as a module, sends the request to its WSGI ``app`` and then reads
``PATH/<task_id>`` from the answer, printing both answers.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import io
import json
import sys
from typing import Any
from wsgiref.util import setup_testing_defaults


def load(path: str, name: str) -> dict[str, Any]:
    with open(path) as f:
        source = f.read()
    code = compile(source, path, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    namespace: dict[str, Any] = {"__name__": name, "__file__": path}
    if code.co_flags & inspect.CO_COROUTINE:
        asyncio.run(eval(code, namespace))
    else:
        exec(code, namespace)
    return namespace


def call(app: Any, method: str, path: str, body: bytes = b"") -> tuple[str, Any]:
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body),
    }
    setup_testing_defaults(environ)
    status: list[str] = []

    def start_response(line: str, headers: Any, exc_info: Any = None) -> None:
        status.append(line)

    answer = b"".join(app(environ, start_response))
    return status[0], json.loads(answer)


def main() -> None:
    mode, path, *args = sys.argv[1:]
    if mode in ("run", "worker"):
        load(path, "__main__")
        return
    assert mode == "wsgi", mode
    method, url, body = args
    app = load(path, "snippet")["app"]
    status, answer = call(app, method, url, body.encode())
    print(status, json.dumps(answer), flush=True)
    status, answer = call(app, "GET", f"{url}/{answer['task_id']}")
    print(status, json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
