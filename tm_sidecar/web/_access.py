"""Who may use the dashboard: the token, browser sessions, and the cross-site checks.

Pure functions and small classes with no I/O but the reading of the token file; the
clock is a parameter. Nothing here logs a token.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections import OrderedDict
from pathlib import Path

import attrs

#: The browser session cookie: a random id naming a server-side session.
COOKIE = "tm_session"
#: Sessions kept at most (the least recently used goes first), and for how long idle.
MAX_SESSIONS = 4096
SESSION_IDLE_S = 12 * 3600.0

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})


class TokenError(ValueError):
    """The configured token cannot be used (an unreadable or empty file)."""


def load_token(
    path: str | None, token: str | None, token_source: str = "setting"
) -> tuple[str | None, str]:
    """The dashboard's token and where it came from: the file (``web_token_file``) wins
    over the token itself (``web_token``, from ``token_source``: ``TM_WEB_TOKEN``, say).

    Answers ``(None, "none")`` when neither is set. Raises :class:`TokenError` for a
    file that cannot be read or holds nothing (a typo must not open the dashboard).
    """
    if path:
        try:
            text = Path(path).read_text().strip()
        except OSError as exc:
            raise TokenError(f"--web-token-file {path}: {exc.strerror or exc}") from None
        if not text:
            raise TokenError(f"--web-token-file {path} is empty")
        return text, "file"
    value = (token or "").strip()
    if value:
        return value, token_source
    return None, "none"


def token_matches(expected: str, given: str) -> bool:
    """Constant-time comparison (of digests, so that not even the length leaks)."""
    a = hashlib.sha256(expected.encode()).digest()
    b = hashlib.sha256(given.encode()).digest()
    return hmac.compare_digest(a, b)


def is_loopback_host(host: str) -> bool:
    """Whether a bind address or a Host header's name is this machine's loopback."""
    name = host.strip("[]").lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_name(host_header: str) -> str:
    """The name part of a Host header (``[::1]:8080`` -> ``::1``, ``a:1`` -> ``a``)."""
    if host_header.startswith("["):
        return host_header[1:].split("]", 1)[0]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def cross_site_refusal(
    *, method: str, host: str, origin: str | None, fetch_site: str | None, scheme: str
) -> str | None:
    """Why a state-changing request looks cross-site, or None if it does not.

    Browsers send ``Sec-Fetch-Site`` and ``Origin`` with every POST; a request that
    carries either must come from this very origin. A client that sends neither is not
    a browser acting for a page, and still needs the session's CSRF token.
    """
    if method != "POST":
        return None
    if fetch_site is not None and fetch_site != "same-origin":
        return f"Sec-Fetch-Site is {fetch_site!r}, not same-origin"
    if origin is not None and origin != f"{scheme}://{host}":
        return f"Origin {origin!r} is not this dashboard's ({scheme}://{host})"
    return None


@attrs.define(eq=False)
class Session:
    """One browser's session: its CSRF token, whether it gave the token, a flash message."""

    id: str
    csrf: str
    authenticated: bool = False
    flash: str | None = None
    seen_at: float = 0.0

    def take_flash(self) -> str | None:
        """The message to show once (after an action), then forgotten."""
        message, self.flash = self.flash, None
        return message

    def csrf_matches(self, given: str) -> bool:
        """Whether a form's CSRF field is this session's (constant time)."""
        return hmac.compare_digest(self.csrf.encode(), given.encode())


@attrs.define(eq=False)
class Sessions:
    """Server-side sessions, bounded in number and idle time."""

    max_sessions: int = MAX_SESSIONS
    idle_s: float = SESSION_IDLE_S
    _by_id: OrderedDict[str, Session] = attrs.Factory(OrderedDict)

    def get(self, session_id: str | None, now: float) -> Session | None:
        """The live session of this id, if any (and mark it used)."""
        if not session_id:
            return None
        session = self._by_id.get(session_id)
        if session is None:
            return None
        if now - session.seen_at > self.idle_s:
            del self._by_id[session_id]
            return None
        session.seen_at = now
        self._by_id.move_to_end(session_id)
        return session

    def new(self, now: float, *, authenticated: bool = False) -> Session:
        """A fresh session with its own random id and CSRF token."""
        while len(self._by_id) >= self.max_sessions:
            self._by_id.popitem(last=False)
        session = Session(
            id=secrets.token_urlsafe(32),
            csrf=secrets.token_urlsafe(32),
            authenticated=authenticated,
            seen_at=now,
        )
        self._by_id[session.id] = session
        return session

    def rotate(self, old: Session, now: float, *, authenticated: bool) -> Session:
        """A new session in place of ``old`` (at login: a session id set before the
        login, by whoever, is worth nothing after it)."""
        self._by_id.pop(old.id, None)
        return self.new(now, authenticated=authenticated)

    def __len__(self) -> int:
        return len(self._by_id)
