"""The dashboard's pages that take a form: an action's confirmation and the action
itself (POST only, checked against cross-site requests and the session's CSRF token,
done by ``_actions.py`` with tmctl's functions), and logging in and out with the token.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from ..admin import count_matching
from ._access import Session, cross_site_refusal, token_matches, who
from ._actions import ACTIONS, HTTPError, action_fields, back_to, perform, repair_filter
from ._http import read_form, session_cookie

if TYPE_CHECKING:
    from ._app import Dashboard

log = logging.getLogger("tm_sidecar.web")


async def confirm_page(board: Dashboard, request: Request) -> Response:
    """What an action will do, with the one button that does it."""

    async def page() -> Response:
        check_actions(board)
        params = request.query_params
        action = params.get("action", "")
        if action not in ACTIONS:
            raise HTTPError(400, f"no such action {action!r}")
        fields = action_fields(action, dict(params))
        preview = None
        if action.startswith("bulk-"):
            # The count first: what the confirmation will do, read a page at a time.
            where = repair_filter(fields)
            preview = await count_matching(board.sidecar.etcd, board.sidecar.ks, where)
            preview_of = where.describe()
        return board.render(
            request,
            "confirm.html",
            {
                "action": action,
                "what": ACTIONS[action],
                "fields": fields,
                "back": back_to(action, fields),
                "preview": preview,
                "preview_of": preview_of if preview is not None else "",
            },
        )

    return await board.guarded(request, page)


def check_actions(board: Dashboard) -> None:
    """Refuse unless the dashboard was started with actions (``--web-actions``)."""
    if not board.settings.actions:
        raise HTTPError(403, "this dashboard is read-only: actions are enabled with --web-actions")


async def action(board: Dashboard, request: Request) -> Response:
    """Run a confirmed action; back to where it was asked for, with what it did."""

    async def run() -> Response:
        session: Session = request.scope["tm_session"]
        check_actions(board)
        refusal = cross_site_refusal(
            method=request.method,
            host=request.headers.get("host", ""),
            origin=request.headers.get("origin"),
            fetch_site=request.headers.get("sec-fetch-site"),
            scheme=request.url.scheme,
        )
        if refusal is not None:
            raise HTTPError(403, f"cross-site request refused ({refusal}): nothing was done")
        form = await read_form(request)
        if not request.scope.get("tm_bearer") and not session.csrf_matches(form.get("csrf", "")):
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
        if action.startswith("bulk-"):
            job = board.start_job(action, fields)
            log.info(
                "dashboard action",
                extra={
                    "action": action,
                    "fields": fields,
                    "result": job.what,
                    **who(request.scope),
                },
            )
            return RedirectResponse(f"/jobs/{job.id}", status_code=303)
        message, back = await perform(board.sidecar, action, fields)
        log.info(
            "dashboard action",
            extra={"action": action, "fields": fields, "result": message, **who(request.scope)},
        )
        session.flash = message
        return RedirectResponse(back, status_code=303)

    return await board.guarded(request, run)


async def login_page(board: Dashboard, request: Request) -> Response:
    """The form that takes the token."""
    if not board.settings.token:
        return RedirectResponse("/", status_code=303)
    return board.render(request, "login.html", {"wrong": False})


async def login(board: Dashboard, request: Request) -> Response:
    """Check the token; a session that gave it needs it no more."""
    session: Session = request.scope["tm_session"]
    if not board.settings.token:
        return RedirectResponse("/", status_code=303)
    refusal = cross_site_refusal(
        method="POST",
        host=request.headers.get("host", ""),
        origin=request.headers.get("origin"),
        fetch_site=request.headers.get("sec-fetch-site"),
        scheme=request.url.scheme,
    )
    try:
        form = await read_form(request)
    except HTTPError as exc:
        return board.error(request, exc.status, exc.message)
    if refusal is not None or not session.csrf_matches(form.get("csrf", "")):
        return board.error(request, 403, "this login form is not from this session")
    await board.wait_turn(request.scope)
    if not token_matches(board.settings.token, form.get("token", "")):
        board.wrong_token(request.scope, via="login")
        return board.render(request, "login.html", {"wrong": True}, status=401)
    fresh = board.sessions.rotate(session, board.clock(), authenticated=True)
    response = RedirectResponse("/", status_code=303)
    response.raw_headers.append((b"set-cookie", session_cookie(fresh.id)))
    return response


async def logout(board: Dashboard, request: Request) -> Response:
    """Forget this session."""
    session: Session = request.scope["tm_session"]
    form = await read_form(request)
    if session.csrf_matches(form.get("csrf", "")):
        board.sessions.rotate(session, board.clock(), authenticated=False)
    return RedirectResponse("/login", status_code=303)
