"""The dashboard's pages, which read and show: the overview (and its fragment), a queue's
tasks, one task, the search, the events page and its live stream (server-sent events).

Each is a function of the :class:`~._app.Dashboard` and the request; what they show is
read by ``_data.py`` and rendered by the dashboard's templates. The pages that take a
form (actions, the token) are ``_forms.py``'s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse

from ..admin import Queries
from ..core import QueueConfig, State, TaskId, check_name
from ._actions import HTTPError, valid_name
from ._data import queue_tasks, read_schedules, read_task, valid_partial_name
from ._http import plain
from ._live import EventBatcher
from ._stats import WINDOWS, queue_stats

if TYPE_CHECKING:
    from ._app import Dashboard


async def overview_page(board: Dashboard, request: Request) -> Response:
    """The leader, the nodes, the queues, the chart, etcd's health, the latest events."""

    async def page() -> Response:
        recent = [{"at": t, "event": e} for t, e in reversed(board.journal.recent)][:20]
        return board.render(
            request, "overview.html", {"o": await board.overview_data(), "recent": recent}
        )

    return await board.guarded(request, page)


async def overview_fragment(board: Dashboard, request: Request) -> Response:
    """The overview's body alone, which the page fetches again every few seconds."""

    async def page() -> Response:
        return board.render(request, "_overview.html", {"o": await board.overview_data()})

    return await board.guarded(request, page)


async def queue_page(board: Dashboard, request: Request) -> Response:
    """A queue's tasks in one state, a page at a time, searchable by id."""

    async def page() -> Response:
        queue = valid_name(request.path_params["queue"], "queue")
        params = request.query_params
        state = parse_state(params.get("state", "pending"))
        query = params.get("q", "").strip()
        if query and not valid_partial_name(query):
            raise HTTPError(400, "search by the start of a task id: A-Z a-z 0-9 _ . : -")
        after = params.get("after", "")
        if after and not all(valid_partial_name(p) for p in after.split("/", 1)):
            raise HTTPError(400, "that is not a page of this listing (after=)")
        listing = await queue_tasks(
            board.sidecar.etcd,
            board.sidecar.ks,
            queue,
            state,
            after=after,
            query=query,
            limit=board.page_size,
        )
        window = params.get("window", "30m")
        if window not in WINDOWS:
            raise HTTPError(400, f"no window {window!r}: {', '.join(WINDOWS)}")
        board.census.want()
        counts = board.census.counts.get(queue, {})
        configs = await Queries(board.sidecar.etcd, board.sidecar.ks).queue_configs()
        return board.render(
            request,
            "queue.html",
            {
                "queue": queue,
                "state": state.value,
                "page": listing,
                "counts": counts,
                "census_age_s": board.census.age_s(),
                "now": board.clock(),
                "config": configs.get(queue, QueueConfig()),
                "busiest_key": board.census.busiest_key.get(queue),
                "stats": queue_stats(board.census, board.journal, queue, window, board.clock()),
                "windows": list(WINDOWS),
            },
        )

    return await board.guarded(request, page)


async def task_page(board: Dashboard, request: Request) -> Response:
    """One task: payload, options, every attempt, its live events."""

    async def page() -> Response:
        task_id = TaskId(valid_name(request.path_params["task_id"], "task id"))
        seq = board.journal.events_seen
        detail = await read_task(board.sidecar, board.journal, task_id)
        # The page fetches its upper part again while the task is not finished.
        name = "_task.html" if request.query_params.get("fragment") else "task.html"
        events = [
            {"at": t, "event": e} for _, t, e in reversed(board.journal.events(task_id, upto=seq))
        ]
        context = {"t": detail, "now": board.clock(), "seq": seq, "events": events}
        return board.render(request, name, context)

    return await board.guarded(request, page)


async def schedules_page(board: Dashboard, request: Request) -> Response:
    """Every schedule: cron or interval, time zone, next and last slot, missed policy,
    paused; with its actions."""

    async def page() -> Response:
        schedules = await read_schedules(board.sidecar.etcd, board.sidecar.ks)
        return board.render(request, "schedules.html", {"schedules": schedules})

    return await board.guarded(request, page)


async def job_page(board: Dashboard, request: Request) -> Response:
    """A repair by filter: what it does and how far it got (the page refreshes itself
    until it is done)."""

    async def page() -> Response:
        job = board.jobs.get(request.path_params["job"])
        if job is None:
            raise HTTPError(404, "no such repair (the dashboard keeps the latest ones only)")
        name = "_job.html" if request.query_params.get("fragment") else "job.html"
        return board.render(request, name, {"job": job})

    return await board.guarded(request, page)


async def search(board: Dashboard, request: Request) -> Response:
    """Go to the task with this id."""

    async def page() -> Response:
        query = request.query_params.get("q", "").strip()
        if not query:
            raise HTTPError(400, "give a task id to look for")
        task_id = TaskId(valid_name(query, "task id"))
        await read_task(board.sidecar, board.journal, task_id)  # 404 if there is none
        return RedirectResponse(f"/tasks/{task_id}", status_code=303)

    return await board.guarded(request, page)


async def events_page(board: Dashboard, request: Request) -> Response:
    """Every task event of the namespace as it happens."""
    return board.render(request, "events.html", {})


async def events_stream(board: Dashboard, request: Request) -> Response:
    """Server-sent events: every task's (``?task=`` for one), batched."""
    task = request.query_params.get("task")
    if task is not None:
        try:
            check_name("task id", task)
        except ValueError as exc:
            return plain(400, f"{exc}\n")
    after = request.query_params.get("after", "")
    if after and not after.isdigit():
        return plain(400, "after= takes the event number the page was drawn at\n")
    batcher = EventBatcher(keep=200 if task is None else 500, tracebacks=task is not None)

    async def body() -> Any:
        # Subscribed here, not before: a client gone before the body starts must
        # leave no subscription behind (an unstarted generator runs no finally).
        subscription = board.sidecar.subscribe(
            TaskId(task) if task else None, deliver=batcher.deliver, on_gap=batcher.gap
        )
        board.streams += 1
        try:
            if task and after:
                # What happened between the page and this stream, from the journal,
                # up to the last event before the subscription (later ones come live).
                gap = board.journal.events(
                    TaskId(task), after=int(after), upto=board.journal.events_seen
                )
                batcher.replay([(t, e) for _, t, e in gap])
            async for chunk in batcher.stream():
                yield chunk
        finally:
            board.streams -= 1
            subscription.close()

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"x-accel-buffering": "no"},
    )


def parse_state(value: str) -> State:
    """A state named in a query (``?state=``); a 400 for a name that is none."""
    try:
        return State(value)
    except ValueError:
        raise HTTPError(
            400, f"no state {value!r}: pending, delayed, processing, completed or failed"
        ) from None
