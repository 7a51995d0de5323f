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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

#: The browser session cookie: a random id naming a server-side session.
COOKIE = "tm_session"
#: Sessions kept at most (the least recently used goes first), and for how long idle.
MAX_SESSIONS = 4096
SESSION_IDLE_S = 12 * 3600.0
#: Sessions kept at most for one client address (see :class:`Sessions`).
MAX_SESSIONS_PER_CLIENT = 64
#: What a wrong token costs its client, on the login form or as a bearer token.
GUESS_DELAY_S = 0.5

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
    #: The address it was made for (the client of the request that had no session).
    client: str = ""

    def take_flash(self) -> str | None:
        """The message to show once (after an action), then forgotten."""
        message, self.flash = self.flash, None
        return message

    def csrf_matches(self, given: str) -> bool:
        """Whether a form's CSRF field is this session's (constant time)."""
        return hmac.compare_digest(self.csrf.encode(), given.encode())


@attrs.define(eq=False)
class Sessions:
    """Server-side sessions, bounded per client and in all, and in idle time.

    A client (an address) that asks for more than ``per_client`` sessions pushes out its
    own least recently used ones, never another client's; and a session without the
    token goes before any session that gave it, both within a client and when the
    table as a whole is full. So requests without a cookie, however many and from
    wherever, never log anyone out (behind a reverse proxy, where every request comes
    from the proxy's address, the second rule is the one that holds).
    """

    max_sessions: int = MAX_SESSIONS
    per_client: int = MAX_SESSIONS_PER_CLIENT
    idle_s: float = SESSION_IDLE_S
    _by_id: OrderedDict[str, Session] = attrs.Factory(OrderedDict)
    _by_client: dict[str, OrderedDict[str, Session]] = attrs.Factory(dict)

    def get(self, session_id: str | None, now: float) -> Session | None:
        """The live session of this id, if any (and mark it used)."""
        if not session_id:
            return None
        session = self._by_id.get(session_id)
        if session is None:
            return None
        if now - session.seen_at > self.idle_s:
            self._drop(session)
            return None
        session.seen_at = now
        self._by_id.move_to_end(session_id)
        self._by_client[session.client].move_to_end(session_id)
        return session

    def new(self, now: float, *, client: str = "", authenticated: bool = False) -> Session:
        """A fresh session for ``client`` (its address) with its own random id and CSRF
        token."""
        own = self._by_client.get(client)
        while own and len(own) >= self.per_client:
            self._drop(_first_anonymous(own))
        while len(self._by_id) >= self.max_sessions:
            self._drop(_first_anonymous(self._by_id))
        session = Session(
            id=secrets.token_urlsafe(32),
            csrf=secrets.token_urlsafe(32),
            authenticated=authenticated,
            seen_at=now,
            client=client,
        )
        self._by_id[session.id] = session
        self._by_client.setdefault(client, OrderedDict())[session.id] = session
        return session

    def rotate(self, old: Session, now: float, *, authenticated: bool) -> Session:
        """A new session in place of ``old`` (at login: a session id set before the
        login, by whoever, is worth nothing after it)."""
        if self._by_id.get(old.id) is old:
            self._drop(old)
        return self.new(now, client=old.client, authenticated=authenticated)

    def _drop(self, session: Session) -> None:
        del self._by_id[session.id]
        own = self._by_client[session.client]
        del own[session.id]
        if not own:
            del self._by_client[session.client]

    def __len__(self) -> int:
        return len(self._by_id)


def _first_anonymous(sessions: OrderedDict[str, Session]) -> Session:
    """The least recently used session without the token, else the least recently used."""
    for session in sessions.values():
        if not session.authenticated:
            return session
    return next(iter(sessions.values()))


@attrs.define(eq=False)
class Guesses:
    """Token checks, by client: after a wrong token, that client's tokens are checked
    one at a time, ``delay_s`` apart, however many it sends at once.

    The wait comes before the check, so that a guess sent in parallel with others learns
    nothing sooner; a client that never gave a wrong token never waits. The login form
    and the ``Authorization`` header share this. Time is the caller's (Trio's clock),
    so a test can drive it.
    """

    delay_s: float = GUESS_DELAY_S
    max_clients: int = MAX_SESSIONS
    #: Wrong tokens counted so far.
    wrong: int = 0
    #: When each client that guessed wrong may have its next token checked.
    _free_at: dict[str, float] = attrs.Factory(dict)

    def turn(self, client: str, now: float) -> float:
        """How long ``client``'s token waits before it is checked (0 unless the client
        gave a wrong one lately); the slot is taken, so the next one waits longer."""
        free_at = self._free_at.get(client)
        if free_at is None or free_at <= now:
            return 0.0
        self._free_at[client] = free_at + self.delay_s
        return free_at - now

    def wrong_token(self, client: str, now: float) -> None:
        """``client``'s token was wrong: its next check waits ``delay_s`` at least."""
        if client not in self._free_at and len(self._free_at) >= self.max_clients:
            # Forget the clients that wait no more; if none, the oldest.
            self._free_at = {c: t for c, t in self._free_at.items() if t > now}
            while len(self._free_at) >= self.max_clients:
                del self._free_at[next(iter(self._free_at))]
        self._free_at[client] = max(now + self.delay_s, self._free_at.get(client, now))
        self.wrong += 1

    def __len__(self) -> int:
        return len(self._free_at)


def session_tag(session: Session) -> str:
    """A short name of a session for logs: follows one browser's actions without
    writing its cookie (which would let a log reader act as it)."""
    return hashlib.sha256(session.id.encode()).hexdigest()[:12]


def client_address(scope: Mapping[str, Any]) -> str:
    """The address a request came from (a reverse proxy's, behind one)."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def who(scope: Mapping[str, Any]) -> dict[str, str]:
    """Who sent a request, for a log line: how it was let in (``bearer``: the token in
    the request; ``login``: a session that gave the token; ``anonymous``: a dashboard
    without a token, or not yet given), the session's tag (never its cookie), the
    address, and the ``X-Forwarded-For`` a proxy may have added (as told, unchecked)."""
    session: Session | None = scope.get("tm_session")
    if scope.get("tm_bearer"):
        actor = "bearer"
    elif session is not None and session.authenticated:
        actor = "login"
    else:
        actor = "anonymous"
    fields = {"actor": actor, "address": client_address(scope)}
    if session is not None:
        fields["session"] = session_tag(session)
    for name, value in scope.get("headers") or ():
        if name == b"x-forwarded-for":
            fields["forwarded_for"] = value.decode("latin-1")[:200]
    return fields
