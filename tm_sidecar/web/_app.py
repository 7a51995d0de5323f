"""The dashboard's web application: the service, its routes and the guard in front of them.

Every request passes :class:`Dashboard.__call__` first: the Host check (a loopback
dashboard answers to loopback names only, against DNS rebinding), the browser session,
the token, and the security headers. Then a route: the pages that read are
``_pages.py``'s, the ones that take a form (actions, the token) are ``_forms.py``'s;
both render through :meth:`Dashboard.render`. Actions are POST only, confirmed on a page
of their own, and checked against cross-site requests (Origin and Sec-Fetch-Site, and
the session's CSRF token); each one calls tmctl's function for it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from http.cookies import SimpleCookie
from typing import Any

import attrs
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import Receive, Scope, Send

from .._errors import TaskNotFound, Unavailable
from ..admin import Progress, repair_matching
from ..node._sidecar import Sidecar
from . import _forms, _pages
from ._access import (
    COOKIE,
    Guesses,
    Session,
    Sessions,
    client_address,
    host_name,
    is_loopback_host,
    token_matches,
    who,
)
from ._actions import HTTPError, repair_filter
from ._census import Census
from ._data import STATES, Overview, read_overview
from ._http import SECURITY_HEADERS, plain, session_cookie, with_headers
from ._journal import Journal
from ._templates import HERE, page_templates

log = logging.getLogger("tm_sidecar.web")

#: How long one overview read is shared by every page that asks for it.
OVERVIEW_TTL_S = 1.0
#: The navigation: each feature that brings a page of its own adds it here (workflows,
#: fair shares and held keys are to come).
NAV = (("/", "Overview"), ("/schedules", "Schedules"), ("/events", "Live events"))
#: Repairs by filter kept for their pages (the oldest finished one goes first).
MAX_JOBS = 50


@attrs.define(eq=False)
class Job:
    """A repair by filter running (or done) in the dashboard's background: what it does,
    and how far it got."""

    id: str
    action: str
    fields: dict[str, str]
    what: str
    started_at: float
    progress: Progress = attrs.Factory(Progress)


@attrs.frozen(kw_only=True)
class WebSettings:
    """How the dashboard is served. ``token`` never appears in a repr."""

    host: str = "127.0.0.1"
    port: int = 0
    actions: bool = False
    token: str | None = attrs.field(default=None, repr=False)

    @classmethod
    def parse_bind(cls, value: str) -> tuple[str, int]:
        """``[HOST:]PORT`` (``[::1]:8080`` for IPv6) to (host, port); loopback by default."""
        host, _, port = value.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        try:
            number = int(port)
        except ValueError:
            raise ValueError(f"--web {value!r}: expected [HOST:]PORT") from None
        if not 0 <= number <= 65535:
            raise ValueError(f"--web {value!r}: the port must be 0-65535")
        return host, number

    @property
    def loopback(self) -> bool:
        """Whether it listens on loopback only."""
        return is_loopback_host(self.host)


@attrs.define(eq=False)
class Dashboard:
    """The dashboard of one sidecar: an ASGI application and the services behind it."""

    sidecar: Sidecar
    settings: WebSettings
    clock: Callable[[], float] = time.time
    sessions: Sessions = attrs.Factory(Sessions)
    guesses: Guesses = attrs.Factory(Guesses)
    journal: Journal = attrs.Factory(Journal)
    census: Census = attrs.field(init=False)
    templates: Jinja2Templates = attrs.field(init=False)
    app: Starlette = attrs.field(init=False)
    streams: int = 0
    page_size: int = 50
    _overview: tuple[float, Overview] | None = None
    _overview_lock: trio.Lock = attrs.Factory(trio.Lock)
    jobs: dict[str, Job] = attrs.Factory(dict)
    _nursery: trio.Nursery | None = None

    def __attrs_post_init__(self) -> None:
        self.census = Census(self.sidecar.etcd, self.sidecar.ks)
        self.templates = page_templates(lambda: self.clock())
        self.app = Starlette(
            routes=[
                Route("/", partial(_pages.overview_page, self)),
                Route("/fragments/overview", partial(_pages.overview_fragment, self)),
                Route("/queues/{queue}", partial(_pages.queue_page, self)),
                Route("/tasks/{task_id}", partial(_pages.task_page, self)),
                Route("/search", partial(_pages.search, self)),
                Route("/schedules", partial(_pages.schedules_page, self)),
                Route("/jobs/{job}", partial(_pages.job_page, self)),
                Route("/events", partial(_pages.events_page, self)),
                Route("/api/events", partial(_pages.events_stream, self)),
                Route("/confirm", partial(_forms.confirm_page, self)),
                Route("/actions/{action}", partial(_forms.action, self), methods=["POST"]),
                Route("/login", partial(_forms.login_page, self)),
                Route("/login", partial(_forms.login, self), methods=["POST"]),
                Route("/logout", partial(_forms.logout, self), methods=["POST"]),
                Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
            ],
        )

    # -- running ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; started with the dashboard's URL."""
        from hypercorn.config import Config
        from hypercorn.trio import serve

        config = Config()
        host = f"[{self.settings.host}]" if ":" in self.settings.host else self.settings.host
        config.bind = [f"{host}:{self.settings.port}"]
        config.accesslog = None  # requests are not logged: nothing to leak
        config.errorlog = logging.getLogger("tm_sidecar.web.server")
        config.include_server_header = False
        config.graceful_timeout = 1.0
        with self.sidecar.subscribe(deliver=self.journal.see):
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self.census.run)
                binds = await nursery.start(serve, self, config)
                url = binds[0] + "/"
                log.info(
                    "dashboard listening",
                    extra={
                        "url": url,
                        "actions": self.settings.actions,
                        "token": "required" if self.settings.token else "none",
                    },
                )
                task_status.started(url)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The guard in front of every route."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        extra: list[tuple[bytes, bytes]] = list(SECURITY_HEADERS)
        if self.settings.loopback and not is_loopback_host(host_name(host)):
            # A page elsewhere whose name resolves to 127.0.0.1 must not read or act.
            await plain(421, f"this dashboard answers to loopback names only, not {host!r}\n")(
                scope, receive, with_headers(send, extra)
            )
            return
        now = self.clock()
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:  # a mangled Cookie header is no session
            cookie = SimpleCookie()
        morsel = cookie.get(COOKIE)
        session = self.sessions.get(morsel.value if morsel else None, now)
        if session is None:
            session = self.sessions.new(now, client=client_address(scope))
            extra.append((b"set-cookie", session_cookie(session.id)))
        scope["tm_session"] = session
        path = scope["path"]
        if self.settings.token and not session.authenticated:
            bearer = headers.get("authorization", "")
            given = bearer[7:] if bearer[:7].lower() == "bearer " else None
            if given is not None:
                await self.wait_turn(scope)
            if given is not None and token_matches(self.settings.token, given):
                scope["tm_bearer"] = True
            elif not (path.startswith("/static/") or path == "/login"):
                if given is not None:
                    self.wrong_token(scope, via="bearer")
                    response: Response = plain(401, "wrong token\n")
                elif scope["method"] == "GET" and path != "/api/events":
                    response = self.render(
                        Request(scope, receive), "login.html", {"wrong": False}, status=401
                    )
                else:
                    response = plain(401, "this dashboard needs its token: log in first\n")
                await response(scope, receive, with_headers(send, extra))
                return
        await self.app(scope, receive, with_headers(send, extra))

    # -- helpers ---------------------------------------------------------------------

    def start_job(self, action: str, fields: dict[str, str]) -> Job:
        """Start a repair by filter in the background (the same form sent twice starts
        it once: its confirmation's id is the job's)."""
        job = self.jobs.get(fields["job"])
        if job is not None:
            return job
        if self._nursery is None:
            raise HTTPError(503, "the dashboard is not running: nothing was done")
        where = repair_filter(fields)
        job = Job(fields["job"], action, dict(fields), where.describe(), self.clock())
        while len(self.jobs) >= MAX_JOBS:
            done = [j for j in self.jobs.values() if j.progress.finished]
            if not done:
                raise HTTPError(429, "too many repairs running: try again when one is done")
            del self.jobs[done[0].id]
        self.jobs[job.id] = job
        self._nursery.start_soon(self._run_job, job, where)
        return job

    async def _run_job(self, job: Job, where: Any) -> None:
        repair = job.action.removeprefix("bulk-")
        try:
            await repair_matching(
                self.sidecar.etcd, self.sidecar.ks, repair, where, job.progress, by="dashboard"
            )
        except Exception as exc:
            # Told on the job's page and logged: a failed repair must not take the
            # dashboard down with it; what was done stays done.
            log.exception("dashboard repair by filter failed", extra={"action": job.action})
            job.progress.error = str(exc) or type(exc).__name__
        log.info(
            "dashboard repair by filter done",
            extra={"action": job.action, "filter": job.what, "done": job.progress.done},
        )

    async def wait_turn(self, scope: Scope) -> None:
        """Before checking a token: wait this client's turn, if it guessed wrong lately
        (see :class:`Guesses`)."""
        wait = self.guesses.turn(client_address(scope), trio.current_time())
        if wait > 0:
            await trio.sleep(wait)

    def wrong_token(self, scope: Scope, *, via: str) -> None:
        """A wrong token, on the login form or as a bearer token: logged with where it
        came from, and this client's next token waits (see :class:`Guesses`)."""
        log.warning("dashboard token refused", extra={"via": via, **who(scope)})
        self.guesses.wrong_token(client_address(scope), trio.current_time())

    def render(
        self, request: Request, name: str, context: dict[str, Any], status: int = 200
    ) -> Response:
        """A page, with what every page needs."""
        session: Session = request.scope["tm_session"]
        context = {
            "ns_name": self.sidecar.settings.namespace,
            "node": self.sidecar.node_id,
            "is_leader": self.sidecar.is_leader,
            "actions": self.settings.actions,
            "token_required": bool(self.settings.token),
            "csrf": session.csrf,
            "flash": session.take_flash() if status == 200 else None,
            "states": [s.value for s in STATES],
            "nav": NAV,
            "starts_within": self.census.starts_within,
            **context,
        }
        return self.templates.TemplateResponse(request, name, context, status_code=status)

    def error(self, request: Request, status: int, message: str) -> Response:
        """An error page with a message for the person."""
        return self.render(request, "error.html", {"status": status, "message": message}, status)

    async def guarded(
        self, request: Request, handler: Callable[[], Awaitable[Response]]
    ) -> Response:
        """Run a handler; refusals and etcd's unavailability become error pages."""
        try:
            return await handler()
        except HTTPError as exc:
            return self.error(request, exc.status, exc.message)
        except TaskNotFound as exc:
            return self.error(request, 404, str(exc))
        except Unavailable as exc:
            return self.error(request, 503, f"etcd is unavailable: {exc}")

    async def overview_data(self) -> Overview:
        """The overview, read at most once a second however many pages look."""
        await self.census.want_fresh(0.5)
        async with self._overview_lock:
            now = trio.current_time()
            if self._overview is None or now - self._overview[0] >= OVERVIEW_TTL_S:
                self._overview = (
                    now,
                    await read_overview(self.sidecar, self.journal, self.census),
                )
            return self._overview[1]

    # -- pages -----------------------------------------------------------------------
