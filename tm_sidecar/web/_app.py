"""The dashboard's web application: Starlette routes, the access guard, the actions.

Every request passes :class:`Dashboard.__call__` first: the Host check (a loopback
dashboard answers to loopback names only, against DNS rebinding), the browser session,
the token, and the security headers. Actions are POST only, confirmed on a page of their
own, and checked against cross-site requests (Origin and Sec-Fetch-Site, and the
session's CSRF token); each one calls tmctl's function for it.
"""

from __future__ import annotations

import json
import logging
import math
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import attrs
import jinja2
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import Message, Receive, Scope, Send

from .._errors import TaskNotFound, Unavailable
from ..core import State, TaskId, check_name
from ..node._sidecar import Sidecar
from ._access import (
    COOKIE,
    Session,
    Sessions,
    cross_site_refusal,
    host_name,
    is_loopback_host,
    token_matches,
)
from ._actions import ACTIONS, HTTPError, action_fields, back_to, perform, valid_name
from ._data import (
    STATES,
    Census,
    Journal,
    Overview,
    pretty,
    queue_tasks,
    read_overview,
    read_task,
    valid_partial_name,
)
from ._live import EventBatcher

log = logging.getLogger("tm_sidecar.web")

HERE = Path(__file__).parent
MAX_FORM_BYTES = 16 * 1024
#: How long one overview read is shared by every page that asks for it.
OVERVIEW_TTL_S = 1.0

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
    journal: Journal = attrs.Factory(Journal)
    census: Census = attrs.field(init=False)
    templates: Jinja2Templates = attrs.field(init=False)
    app: Starlette = attrs.field(init=False)
    streams: int = 0
    page_size: int = 50
    _overview: tuple[float, Overview] | None = None
    _overview_lock: trio.Lock = attrs.Factory(trio.Lock)

    def __attrs_post_init__(self) -> None:
        self.census = Census(self.sidecar.etcd, self.sidecar.ks)
        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        env.filters["when"] = _when
        env.filters["ago"] = lambda t: _ago(t, self.clock())
        env.filters["size"] = _size
        env.filters["pretty"] = pretty
        env.filters["duration"] = _duration
        env.filters["fromjson"] = json.loads
        self.templates = Jinja2Templates(env=env)
        self.app = Starlette(
            routes=[
                Route("/", self.overview_page),
                Route("/fragments/overview", self.overview_fragment),
                Route("/queues/{queue}", self.queue_page),
                Route("/tasks/{task_id}", self.task_page),
                Route("/search", self.search),
                Route("/events", self.events_page),
                Route("/api/events", self.events_stream),
                Route("/confirm", self.confirm_page),
                Route("/actions/{action}", self.action, methods=["POST"]),
                Route("/login", self.login_page),
                Route("/login", self.login, methods=["POST"]),
                Route("/logout", self.logout, methods=["POST"]),
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
                nursery.start_soon(self.census.run)
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
            await _plain(421, f"this dashboard answers to loopback names only, not {host!r}\n")(
                scope, receive, _with_headers(send, extra)
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
            session = self.sessions.new(now)
            extra.append((b"set-cookie", _cookie(session.id)))
        scope["tm_session"] = session
        path = scope["path"]
        if self.settings.token and not session.authenticated:
            bearer = headers.get("authorization", "")
            given = bearer[7:] if bearer[:7].lower() == "bearer " else None
            if given is not None and token_matches(self.settings.token, given):
                scope["tm_bearer"] = True
            elif not (path.startswith("/static/") or path == "/login"):
                if given is not None:
                    response: Response = _plain(401, "wrong token\n")
                elif scope["method"] == "GET" and path != "/api/events":
                    response = self.render(
                        Request(scope, receive), "login.html", {"wrong": False}, status=401
                    )
                else:
                    response = _plain(401, "this dashboard needs its token: log in first\n")
                await response(scope, receive, _with_headers(send, extra))
                return
        await self.app(scope, receive, _with_headers(send, extra))

    # -- helpers ---------------------------------------------------------------------

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

    async def overview_page(self, request: Request) -> Response:
        """The leader, the nodes, the queues, the chart, etcd's health, the latest events."""

        async def page() -> Response:
            recent = [{"at": t, "event": e} for t, e in reversed(self.journal.recent)][:20]
            return self.render(
                request, "overview.html", {"o": await self.overview_data(), "recent": recent}
            )

        return await self.guarded(request, page)

    async def overview_fragment(self, request: Request) -> Response:
        """The overview's body alone, which the page fetches again every few seconds."""

        async def page() -> Response:
            return self.render(request, "_overview.html", {"o": await self.overview_data()})

        return await self.guarded(request, page)

    async def queue_page(self, request: Request) -> Response:
        """A queue's tasks in one state, a page at a time, searchable by id."""

        async def page() -> Response:
            queue = valid_name(request.path_params["queue"], "queue")
            params = request.query_params
            state = _state(params.get("state", "pending"))
            query = params.get("q", "").strip()
            if query and not valid_partial_name(query):
                raise HTTPError(400, "search by the start of a task id: A-Z a-z 0-9 _ . : -")
            after = params.get("after", "")
            if after and not all(valid_partial_name(p) for p in after.split("/", 1)):
                raise HTTPError(400, "that is not a page of this listing (after=)")
            listing = await queue_tasks(
                self.sidecar.etcd,
                self.sidecar.ks,
                queue,
                state,
                after=after,
                query=query,
                limit=self.page_size,
            )
            self.census.want()
            counts = self.census.counts.get(queue, {})
            return self.render(
                request,
                "queue.html",
                {
                    "queue": queue,
                    "state": state.value,
                    "page": listing,
                    "counts": counts,
                    "census_age_s": self.census.age_s(),
                    "now": self.clock(),
                },
            )

        return await self.guarded(request, page)

    async def task_page(self, request: Request) -> Response:
        """One task: payload, options, every attempt, its live events."""

        async def page() -> Response:
            task_id = TaskId(valid_name(request.path_params["task_id"], "task id"))
            seq = self.journal.events_seen
            detail = await read_task(self.sidecar, self.journal, task_id)
            # The page fetches its upper part again while the task is not finished.
            name = "_task.html" if request.query_params.get("fragment") else "task.html"
            events = [
                {"at": t, "event": e}
                for _, t, e in reversed(self.journal.events(task_id, upto=seq))
            ]
            context = {"t": detail, "now": self.clock(), "seq": seq, "events": events}
            return self.render(request, name, context)

        return await self.guarded(request, page)

    async def search(self, request: Request) -> Response:
        """Go to the task with this id."""

        async def page() -> Response:
            query = request.query_params.get("q", "").strip()
            if not query:
                raise HTTPError(400, "give a task id to look for")
            task_id = TaskId(valid_name(query, "task id"))
            await read_task(self.sidecar, self.journal, task_id)  # 404 if there is none
            return RedirectResponse(f"/tasks/{task_id}", status_code=303)

        return await self.guarded(request, page)

    async def events_page(self, request: Request) -> Response:
        """Every task event of the namespace as it happens."""
        return self.render(request, "events.html", {})

    async def events_stream(self, request: Request) -> Response:
        """Server-sent events: every task's (``?task=`` for one), batched."""
        task = request.query_params.get("task")
        if task is not None:
            try:
                check_name("task id", task)
            except ValueError as exc:
                return _plain(400, f"{exc}\n")
        after = request.query_params.get("after", "")
        if after and not after.isdigit():
            return _plain(400, "after= takes the event number the page was drawn at\n")
        batcher = EventBatcher(keep=200 if task is None else 500, tracebacks=task is not None)

        async def body() -> Any:
            # Subscribed here, not before: a client gone before the body starts must
            # leave no subscription behind (an unstarted generator runs no finally).
            subscription = self.sidecar.subscribe(
                TaskId(task) if task else None, deliver=batcher.deliver
            )
            self.streams += 1
            try:
                if task and after:
                    # What happened between the page and this stream, from the journal,
                    # up to the last event before the subscription (later ones come live).
                    gap = self.journal.events(
                        TaskId(task), after=int(after), upto=self.journal.events_seen
                    )
                    batcher.replay([(t, e) for _, t, e in gap])
                async for chunk in batcher.stream():
                    yield chunk
            finally:
                self.streams -= 1
                subscription.close()

        return StreamingResponse(
            body(),
            media_type="text/event-stream",
            headers={"x-accel-buffering": "no"},
        )

    async def confirm_page(self, request: Request) -> Response:
        """What an action will do, with the one button that does it."""

        async def page() -> Response:
            self._check_actions()
            params = request.query_params
            action = params.get("action", "")
            if action not in ACTIONS:
                raise HTTPError(400, f"no such action {action!r}")
            fields = action_fields(action, dict(params))
            return self.render(
                request,
                "confirm.html",
                {
                    "action": action,
                    "what": ACTIONS[action],
                    "fields": fields,
                    "back": back_to(action, fields),
                },
            )

        return await self.guarded(request, page)

    # -- actions ---------------------------------------------------------------------

    def _check_actions(self) -> None:
        if not self.settings.actions:
            raise HTTPError(
                403, "this dashboard is read-only: actions are enabled with --web-actions"
            )

    async def action(self, request: Request) -> Response:
        """Run a confirmed action; back to where it was asked for, with what it did."""

        async def run() -> Response:
            session: Session = request.scope["tm_session"]
            self._check_actions()
            refusal = cross_site_refusal(
                method=request.method,
                host=request.headers.get("host", ""),
                origin=request.headers.get("origin"),
                fetch_site=request.headers.get("sec-fetch-site"),
                scheme=request.url.scheme,
            )
            if refusal is not None:
                raise HTTPError(403, f"cross-site request refused ({refusal}): nothing was done")
            form = await _form(request)
            if not request.scope.get("tm_bearer") and not session.csrf_matches(
                form.get("csrf", "")
            ):
                raise HTTPError(
                    403,
                    "this form is not from this session (the CSRF token does not match): "
                    "nothing was done; reload the page and try again",
                )
            action = request.path_params["action"]
            if action not in ACTIONS:
                raise HTTPError(404, f"no such action {action!r}")
            fields = action_fields(action, form)
            if form.get("confirm") != "yes":
                raise HTTPError(400, "actions run only once confirmed: nothing was done")
            message, back = await perform(self.sidecar, action, fields)
            log.info(
                "dashboard action",
                extra={"action": action, "fields": fields, "result": message},
            )
            session.flash = message
            return RedirectResponse(back, status_code=303)

        return await self.guarded(request, run)

    # -- the token -------------------------------------------------------------------

    async def login_page(self, request: Request) -> Response:
        """The form that takes the token."""
        if not self.settings.token:
            return RedirectResponse("/", status_code=303)
        return self.render(request, "login.html", {"wrong": False})

    async def login(self, request: Request) -> Response:
        """Check the token; a session that gave it needs it no more."""
        session: Session = request.scope["tm_session"]
        if not self.settings.token:
            return RedirectResponse("/", status_code=303)
        refusal = cross_site_refusal(
            method="POST",
            host=request.headers.get("host", ""),
            origin=request.headers.get("origin"),
            fetch_site=request.headers.get("sec-fetch-site"),
            scheme=request.url.scheme,
        )
        try:
            form = await _form(request)
        except HTTPError as exc:
            return self.error(request, exc.status, exc.message)
        if refusal is not None or not session.csrf_matches(form.get("csrf", "")):
            return self.error(request, 403, "this login form is not from this session")
        if not token_matches(self.settings.token, form.get("token", "")):
            log.warning("dashboard login refused: a wrong token was given")
            await trio.sleep(0.5)  # guessing costs time
            return self.render(request, "login.html", {"wrong": True}, status=401)
        fresh = self.sessions.rotate(session, self.clock(), authenticated=True)
        response = RedirectResponse("/", status_code=303)
        response.raw_headers.append((b"set-cookie", _cookie(fresh.id)))
        return response

    async def logout(self, request: Request) -> Response:
        """Forget this session."""
        session: Session = request.scope["tm_session"]
        form = await _form(request)
        if session.csrf_matches(form.get("csrf", "")):
            self.sessions.rotate(session, self.clock(), authenticated=False)
        return RedirectResponse("/login", status_code=303)


# -- small pieces ------------------------------------------------------------------------


def _state(value: str) -> State:
    try:
        return State(value)
    except ValueError:
        raise HTTPError(
            400, f"no state {value!r}: pending, delayed, processing, completed or failed"
        ) from None


async def _form(request: Request) -> dict[str, str]:
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


def _cookie(session_id: str) -> bytes:
    return f"{COOKIE}={session_id}; Path=/; HttpOnly; SameSite=Strict".encode()


def _plain(status: int, text: str) -> Response:
    return PlainTextResponse(text, status_code=status)


def _with_headers(send: Send, extra: list[tuple[bytes, bytes]]) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return wrapped


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch)) + f".{int(epoch % 1 * 1000):03d}Z"


def _ago(epoch: float | None, now: float) -> str:
    if epoch is None:
        return "-"
    delta = now - epoch
    suffix = "ago" if delta >= 0 else "from now"
    return f"{_duration(abs(delta))} {suffix}"


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
