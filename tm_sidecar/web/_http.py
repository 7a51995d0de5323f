"""The dashboard's small HTTP pieces: the security headers every answer carries, reading a
posted form (bounded), the session cookie, plain-text answers.
"""

from __future__ import annotations

import urllib.parse
from contextlib import aclosing

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import Message, Send

from ._access import COOKIE
from ._actions import HTTPError

MAX_FORM_BYTES = 16 * 1024

SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        b"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    # Not no-referrer: with it, browsers send "Origin: null" with the pages' own forms.
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]


async def read_form(request: Request) -> dict[str, str]:
    """A small urlencoded form (the only kind the pages send)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip()
    if kind != "application/x-www-form-urlencoded":
        raise HTTPError(415, "send the form as application/x-www-form-urlencoded")
    body = b""
    async with aclosing(request.stream()) as chunks:
        async for chunk in chunks:
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                raise HTTPError(413, "that form is too large")
    try:
        pairs = urllib.parse.parse_qsl(body.decode("utf-8"), max_num_fields=20)
    except (UnicodeDecodeError, ValueError):
        raise HTTPError(400, "that form cannot be read") from None
    return dict(pairs)


def session_cookie(session_id: str) -> bytes:
    """The Set-Cookie value of a browser session."""
    return f"{COOKIE}={session_id}; Path=/; HttpOnly; SameSite=Strict".encode()


def plain(status: int, text: str) -> Response:
    """A plain-text answer."""
    return PlainTextResponse(text, status_code=status)


def with_headers(send: Send, extra: list[tuple[bytes, bytes]]) -> Send:
    """``send``, adding ``extra`` to the response's headers."""

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return wrapped
