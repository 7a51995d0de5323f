"""Calling an ASGI application in process, as a browser would, without a socket."""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from http.cookies import SimpleCookie
from typing import Any

import attrs
import trio

App = Callable[..., Any]


@attrs.frozen
class Reply:
    """One response."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)


@attrs.define(eq=False)
class Client:
    """Requests to ``app`` with a cookie jar, like one browser."""

    app: App
    host: str = "127.0.0.1:8080"
    cookies: dict[str, str] = attrs.Factory(dict)
    #: The address the requests come from (the ASGI scope's client).
    address: str = "127.0.0.1"

    async def request(
        self,
        method: str,
        target: str,
        *,
        headers: dict[str, str] | None = None,
        form: dict[str, str] | None = None,
        body: bytes = b"",
        until: Callable[[bytes], bool] | None = None,
        timeout_s: float = 10.0,
    ) -> Reply:
        """Send one request; with ``until``, read a stream until it holds, then hang up."""
        path, _, query = target.partition("?")
        head = {"host": self.host, **(headers or {})}
        if form is not None:
            body = urllib.parse.urlencode(form).encode()
            head.setdefault("content-type", "application/x-www-form-urlencoded")
        if self.cookies:
            head["cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.1"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": urllib.parse.unquote(path),
            "raw_path": path.encode(),
            "query_string": query.encode(),
            "root_path": "",
            "headers": [(k.lower().encode(), v.encode()) for k, v in head.items()],
            "client": (self.address, 50000),
            "server": ("127.0.0.1", 8080),
        }
        sent = False
        hang_up = trio.Event()
        status = 0
        out_headers: list[tuple[str, str]] = []
        chunks: list[bytes] = []

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await hang_up.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                out_headers.extend((k.decode(), v.decode()) for k, v in message["headers"])
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if until is not None and until(b"".join(chunks)):
                    hang_up.set()

        with trio.fail_after(timeout_s):
            await self.app(scope, receive, send)
        hang_up.set()
        for name, value in out_headers:
            if name == "set-cookie":
                cookie = SimpleCookie()
                cookie.load(value)
                for key, morsel in cookie.items():
                    self.cookies[key] = morsel.value
        return Reply(status, out_headers, b"".join(chunks))

    async def get(self, target: str, **kw: Any) -> Reply:
        return await self.request("GET", target, **kw)

    async def post(self, target: str, form: dict[str, str], **kw: Any) -> Reply:
        return await self.request("POST", target, form=form, **kw)
