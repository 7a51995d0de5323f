"""The dashboard as the operator's cockpit (issue 26), in process against a real etcd and
a real sidecar: queues' flow control, schedules, repairs by filter, the pictures of a
queue, and the refusals of every new action (cross-site, unconfirmed, read-only)."""

from __future__ import annotations

import html
import re
import time
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from tests.asgi import Client, Reply
from tests.helpers import poll_until, running_sidecars
from tm_sidecar import Sidecar, TaskContext, TaskOptions
from tm_sidecar.admin import RepairFilter, matching_pages
from tm_sidecar.core import QueueConfig, RateLimit, State, TaskEvent, TaskId
from tm_sidecar.ops._embedded import EtcdProcess
from tm_sidecar.web import Dashboard, WebSettings
from tm_sidecar.web._census import Census
from tm_sidecar.web._data import trace_of
from tm_sidecar.web._journal import Journal
from tm_sidecar.web._stats import percentile, queue_stats


class Failing:
    """Fails a task with the error its payload names (ValueError, KeyError) until healed."""

    def __init__(self) -> None:
        self.healed: set[str] = set()

    async def run(self, task: TaskContext) -> Any:
        kind = task.payload.get("fail")
        if kind and kind not in self.healed:
            if kind == "key":
                raise KeyError(f"no key {task.payload.get('i')}")
            raise ValueError(f"bad value {task.payload.get('i')}")
        return {"ok": task.payload.get("i")}


@asynccontextmanager
async def cockpit(
    etcd_server: EtcdProcess, namespace: str, **settings: Any
) -> AsyncIterator[tuple[Sidecar, Dashboard, Failing]]:
    """A sidecar with a handler for the default queue, and its dashboard serving."""
    async with running_sidecars(etcd_server.endpoint, namespace, "web-1") as (sidecar,):
        handlers = Failing()
        sidecar.register(handlers.run, concurrency=4)
        board = Dashboard(sidecar, WebSettings(**settings))
        async with trio.open_nursery() as nursery:
            await nursery.start(board.run)
            yield sidecar, board, handlers
            nursery.cancel_scope.cancel()


def hidden_fields(page: Reply) -> dict[str, str]:
    """The form a confirmation page posts (its hidden fields)."""
    found = re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', page.text)
    assert found, page.text[:500]
    return {k: html.unescape(v) for k, v in found}


async def confirmed(client: Client, action: str, **params: str) -> tuple[dict[str, str], Reply]:
    """Open an action's confirmation and post its form, as a person clicking would."""
    page = await client.get(f"/confirm?{urllib.parse.urlencode({'action': action, **params})}")
    assert page.status == 200, page.text[:500]
    form = hidden_fields(page)
    return form, await client.post(f"/actions/{action}", form)


async def ids_in(sidecar: Sidecar, state: State) -> list[str]:
    """The ids of the tasks in ``state``, read from etcd."""
    kvs, _ = await sidecar.etcd.list_prefix(sidecar.ks.state_prefix(state))
    return [kv.key.rsplit("/", 1)[-1] for kv in kvs]


async def config_of(sidecar: Sidecar, queue: str) -> QueueConfig:
    return (await sidecar.queues()).get(queue, QueueConfig())


async def test_a_queue_is_paused_resumed_and_limited_from_its_page(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    async with cockpit(etcd_server, namespace, actions=True) as (sidecar, board, _):
        client = Client(board)
        await sidecar.create({"i": 1}, options=TaskOptions(queue="flowq"))
        page = await client.get("/queues/flowq")
        assert 'id="queue-pause"' in page.text
        _, done = await confirmed(client, "queue-pause", queue="flowq")
        assert (done.status, done.header("location")) == (303, "/queues/flowq")
        assert (await config_of(sidecar, "flowq")).paused
        page = await client.get("/queues/flowq")
        assert "Queue flowq paused." in page.text  # the flash
        assert 'id="queue-resume"' in page.text
        board._overview = None  # the overview is cached for a second
        overview = await client.get("/fragments/overview")
        row = re.search(r'<tr id="queue-flowq">.*?</tr>', overview.text, re.S)
        assert row is not None, overview.text
        assert "paused" in row.group(0), overview.text

        _, done = await confirmed(client, "queue-resume", queue="flowq")
        assert done.status == 303
        assert not (await config_of(sidecar, "flowq")).paused

        limits = {"queue": "flowq", "max_running": "2", "key_max_running": "", "rate": "5/2s"}
        _, done = await confirmed(client, "queue-limits", **limits, key_rate="1/10")
        assert done.status == 303
        config = await config_of(sidecar, "flowq")
        assert (config.max_running, config.key_max_running) == (2, None)
        assert (config.rate, config.key_rate) == (
            RateLimit(limit=5, period_s=2.0),
            RateLimit(limit=1, period_s=10.0),
        )
        page = await client.get("/queues/flowq")
        assert "0/2 running" in page.text
        assert "0/5 in 2s" in page.text  # no task of flowq started lately
        assert "1/10s per key" in page.text

        # Lifting: the form sent empty.
        lift = {"queue": "flowq", "max_running": "", "rate": "", "key_rate": ""}
        _, done = await confirmed(client, "queue-limits", **lift, key_max_running="")
        assert done.status == 303
        assert not (await config_of(sidecar, "flowq")).limited

        for bad in ({"max_running": "0"}, {"max_running": "two"}, {"rate": "5 per s"}):
            reply = await client.get(
                "/confirm?"
                + urllib.parse.urlencode({"action": "queue-limits", "queue": "flowq", **bad})
            )
            assert reply.status == 400, reply.text[:300]
        assert not (await config_of(sidecar, "flowq")).limited


async def test_schedules_are_listed_paused_resumed_run_once_and_deleted(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    async with cockpit(etcd_server, namespace, actions=True) as (sidecar, board, _):
        client = Client(board)
        await sidecar.schedule(
            {
                "name": "nightly",
                "cron": "0 3 * * *",
                "timezone": "Europe/Berlin",
                "payload": {"i": 7},
            }
        )
        await sidecar.schedule({"name": "hourly", "every_s": 3600, "missed": "all"})
        page = await client.get("/schedules")
        assert page.status == 200
        nightly = re.search(r'<tr id="schedule-nightly">.*?</tr>', page.text, re.S)
        assert nightly is not None
        row = nightly.group(0)
        assert "cron 0 3 * * *" in row
        assert "Europe/Berlin" in row
        assert "active" in row
        assert "one" in row
        assert "never" in row
        assert "every 60 min" in page.text
        assert "all (≤50)" in page.text
        assert 'href="/schedules"' in (await client.get("/")).text  # in the navigation

        _, done = await confirmed(client, "schedule-pause", schedule="nightly")
        assert done.status == 303
        paused = {s.name: s.paused for s in await sidecar.schedules()}
        assert paused == {"nightly": True, "hourly": False}
        assert "paused" in (await client.get("/schedules")).text
        _, done = await confirmed(client, "schedule-resume", schedule="nightly")
        assert not {s.name: s.paused for s in await sidecar.schedules()}["nightly"]

        # Run now: one task, however often the same confirmation is posted.
        form, done = await confirmed(client, "schedule-run", schedule="nightly")
        assert done.status == 303
        location = done.header("location") or ""
        task_id = TaskId(location.removeprefix("/tasks/"))
        assert task_id.startswith(f"nightly.run.{form['run']}.")
        again = await client.post("/actions/schedule-run", form)
        assert (again.status, again.header("location")) == (303, location)
        assert "was run already" in (await client.get(location)).text
        info = await sidecar.wait(task_id, timeout_s=10)
        assert info.state is State.COMPLETED
        assert info.record is not None
        assert info.record.result == {"ok": 7}
        runs = [t for t in await ids_in(sidecar, State.COMPLETED) if t.startswith("nightly.run.")]
        assert runs == [task_id]
        schedule = {s.name: s for s in await sidecar.schedules()}["nightly"]
        assert schedule.fired == 0  # its slots are left alone

        _, done = await confirmed(client, "schedule-delete", schedule="nightly")
        assert done.status == 303
        assert [s.name for s in await sidecar.schedules()] == ["hourly"]
        gone = await client.post("/actions/schedule-run", form)
        assert gone.status == 409
        assert "no schedule" in gone.text


async def wait_job(client: Client, location: str) -> str:
    """The job's page once it says it finished."""
    text = ""

    async def finished() -> bool:
        nonlocal text
        text = (await client.get(location + "?fragment=1")).text
        return "data-final" in text

    await poll_until(finished)
    return text


async def test_failed_tasks_of_one_error_type_are_retried_by_filter_with_a_preview(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    async with cockpit(etcd_server, namespace, actions=True) as (sidecar, board, handlers):
        client = Client(board)
        once = TaskOptions(max_attempts=1)
        values = [await sidecar.create({"fail": "value", "i": i}, options=once) for i in range(3)]
        keys = [await sidecar.create({"fail": "key", "i": i}, options=once) for i in range(2)]
        for spec in values + keys:
            assert (await sidecar.wait(spec.id, timeout_s=10)).state is State.FAILED

        params = {"queue": "default", "state": "failed", "error_type": "ValueError"}
        preview = await client.get(
            "/confirm?" + urllib.parse.urlencode({"action": "bulk-retry", **params})
        )
        assert preview.status == 200
        assert re.search(r'<span id="preview-count">3</span> of 5 records read', preview.text)
        texts = {"text": "bad value 1"}
        one = await client.get(
            "/confirm?" + urllib.parse.urlencode({"action": "bulk-retry", **params, **texts})
        )
        assert '<span id="preview-count">1</span>' in one.text
        young = await client.get(
            "/confirm?"
            + urllib.parse.urlencode({"action": "bulk-retry", **params, "older_than_s": "3600"})
        )
        assert '<span id="preview-count">0</span>' in young.text

        for bad, words in (
            ({"older_than_s": "soon"}, "bad filter"),
            ({"older_than_s": "-5"}, "bad filter"),
            ({"state": "processing"}, "retry by filter takes state=failed"),
            ({"job": "not/an/id"}, "4 to 12 letters and digits"),
        ):
            reply = await client.get(
                "/confirm?" + urllib.parse.urlencode({"action": "bulk-retry", **params, **bad})
            )
            assert reply.status == 400, reply.text[:300]
            assert words in reply.text
        assert (await client.get("/jobs/nosuchjob")).status == 404

        form = hidden_fields(preview)
        handlers.healed.add("value")
        done = await client.post("/actions/bulk-retry", form)
        assert done.status == 303
        location = done.header("location") or ""
        assert location == f"/jobs/{form['job']}"
        again = await client.post("/actions/bulk-retry", form)  # a double click
        assert again.header("location") == location
        assert len(board.jobs) == 1
        page = await wait_job(client, location)
        assert re.search(r'id="job-done">3<', page), page
        for spec in values:
            assert (await sidecar.wait(spec.id, timeout_s=10)).state is State.COMPLETED
        for spec in keys:
            assert (await sidecar.get(spec.id)).state is State.FAILED  # another error type

        # Purge by filter: the failed KeyError ones, whatever their text.
        form, done = await confirmed(
            client, "bulk-purge", queue="default", state="failed", error_type="KeyError"
        )
        page = await wait_job(client, done.header("location") or "")
        assert re.search(r'id="job-done">2<', page)
        assert await ids_in(sidecar, State.FAILED) == []

        # Cancel by filter: the delayed tasks of a queue.
        later = [
            await sidecar.create(
                {"i": i}, options=TaskOptions(queue="later"), run_at=time.time() + 3600
            )
            for i in range(2)
        ]
        form, done = await confirmed(client, "bulk-cancel", queue="later", state="delayed")
        await wait_job(client, done.header("location") or "")
        for spec in later:
            assert (await sidecar.get(spec.id)).state is State.FAILED


async def test_a_filter_reads_a_page_at_a_time(etcd_server: EtcdProcess, namespace: str) -> None:
    async with cockpit(etcd_server, namespace) as (sidecar, _board, _):
        for i in range(7):
            await sidecar.create({"i": i}, options=TaskOptions(queue="paged"))
        await sidecar.create({"i": 0}, options=TaskOptions(queue="other"))
        where = RepairFilter(queue="paged", state=State.PENDING)
        pages = [len(kvs) async for kvs in matching_pages(sidecar.etcd, sidecar.ks, where, page=3)]
        assert len(pages) == 3
        assert sum(pages) == 7
        assert max(pages) <= 3


async def test_every_new_action_is_refused_cross_site_unconfirmed_or_read_only(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    async with cockpit(etcd_server, namespace, actions=True) as (sidecar, board, _):
        client = Client(board)
        await sidecar.schedule({"name": "tick", "every_s": 3600})
        once = TaskOptions(max_attempts=1, queue="rq")
        bad = await sidecar.create({"fail": "value"}, options=once)
        sidecar.register(Failing().run, queue="rq", concurrency=1)
        assert (await sidecar.wait(bad.id, timeout_s=10)).state is State.FAILED
        cases = {
            "queue-pause": {"queue": "rq"},
            "queue-limits": {"queue": "rq", "max_running": "1"},
            "schedule-run": {"schedule": "tick"},
            "schedule-delete": {"schedule": "tick"},
            "bulk-retry": {"queue": "rq", "state": "failed"},
        }
        for action, params in cases.items():
            page = await client.get(
                "/confirm?" + urllib.parse.urlencode({"action": action, **params})
            )
            form = hidden_fields(page)
            unconfirmed = await client.post(f"/actions/{action}", {**form, "confirm": ""})
            assert unconfirmed.status == 400, action
            evil = await client.post(
                f"/actions/{action}", form, headers={"origin": "http://evil.example"}
            )
            assert evil.status == 403, action
            assert "cross-site" in evil.text, action
            forged = await client.post(f"/actions/{action}", {**form, "csrf": "x"})
            assert forged.status == 403, action
            assert "CSRF" in forged.text, action
        # Nothing was done.
        assert await sidecar.queues() == {}
        assert [s.name for s in await sidecar.schedules()] == ["tick"]
        assert (await sidecar.get(bad.id)).state is State.FAILED
        assert board.jobs == {}

    async with cockpit(etcd_server, namespace) as (sidecar, board, _):
        client = Client(board)
        page = await client.get("/queues/rq?state=failed")
        assert 'id="queue-pause"' not in page.text
        assert 'id="repair"' not in page.text
        assert "Run now" not in (await client.get("/schedules")).text
        csrf = board.sessions.get(client.cookies["tm_session"], time.time())
        assert csrf is not None
        for action, params in cases.items():
            form = {**params, "csrf": csrf.csrf, "confirm": "yes", "run": "abcd", "job": "abcd"}
            reply = await client.post(f"/actions/{action}", form)
            assert reply.status == 403, action
            assert "read-only" in reply.text, action
        assert await sidecar.queues() == {}
        assert [s.name for s in await sidecar.schedules()] == ["tick"]


async def test_a_queue_page_draws_its_finished_tasks_and_waits(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    async with cockpit(etcd_server, namespace) as (sidecar, board, _):
        client = Client(board)
        once = TaskOptions(max_attempts=1)
        specs = [await sidecar.create({"i": i}) for i in range(4)]
        specs.append(await sidecar.create({"fail": "value"}, options=once))
        for spec in specs:
            await sidecar.wait(spec.id, timeout_s=10)
        await board.census.take()
        page = await client.get("/queues/default?state=completed&window=2h")
        assert page.status == 200
        assert '<svg class="chart" id="queue-chart"' in page.text
        stats = re.search(r'<p class="muted small" id="queue-stats">(.*?)</p>', page.text, re.S)
        assert stats is not None
        words = " ".join(stats.group(1).split())
        assert "4 completed" in words, words
        assert "1 failed" in words, words
        assert re.search(r"p50 \d", words), words
        assert "(5 tasks this sidecar saw)" in words, words
        assert (await client.get("/queues/default?window=1y")).status == 400


def test_queue_stats_bucket_the_census_and_take_waits_from_the_journal() -> None:
    now = 1_800_000_000.0
    clock = [now - 600]
    journal = Journal(clock=lambda: clock[0])
    census = Census(etcd=None, ks=None)  # type: ignore[arg-type]  # only its counts are read
    minute = int(now // 60)
    census.finished = {"q": {minute: [3, 1], minute - 10: [2, 0], minute - 500: [9, 9]}}
    census.finished_ids = {"q": [(minute, "a"), (minute, "b"), (minute - 10, "c")]}
    for task, wait in (("a", 1.0), ("b", 3.0), ("c", 10.0)):
        clock[0] = now - 600
        journal.see(TaskEvent(kind="queued", task_id=TaskId(task), revision=1, attempt=0))
        clock[0] += wait
        journal.see(TaskEvent(kind="started", task_id=TaskId(task), revision=2, attempt=1))
    stats = queue_stats(census, journal, "q", "30m", now)
    assert (stats.completed, stats.failed) == (5, 1)  # the minute 500 ago is outside
    assert (stats.buckets[-1].completed, stats.buckets[-1].failed) == (3, 1)
    assert (stats.wait_p50, stats.wait_p90, stats.waits) == (3.0, 10.0, 3)
    assert stats.buckets[-1].wait_p90 == 3.0
    wide = queue_stats(census, journal, "q", "24h", now)
    assert (wide.completed, wide.minutes_per_bar) == (14, 48)
    assert percentile([], 0.5) is None


def test_a_task_shows_its_trace_wherever_it_keeps_it() -> None:
    @attrs.frozen
    class Spec:
        options: Any
        trace_id: str | None = None

    @attrs.frozen
    class Info:
        spec: Any
        record: Any = None

    assert trace_of(Info(Spec(options=None))) is None  # type: ignore[arg-type]
    assert trace_of(Info(Spec(options=None, trace_id="4bf92f"))) == "4bf92f"  # type: ignore[arg-type]


async def test_a_queue_shows_how_close_its_busiest_key_is_to_the_per_key_limit(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    async with cockpit(etcd_server, namespace) as (sidecar, board, _):
        client = Client(board)
        release = trio.Event()
        started: list[str] = []

        async def hold(task: TaskContext) -> Any:
            started.append(task.id)
            await release.wait()
            return None

        rate = {"limit": 10, "period_s": 600}
        await sidecar.set_limits("keyed", {"key_max_running": 3, "rate": rate})
        sidecar.register(hold, queue="keyed", concurrency=4)
        keyed = TaskOptions(queue="keyed", concurrency_key="acct-1")
        for i in range(2):
            await sidecar.create({"i": i}, options=keyed)
        await sidecar.create({"i": 9}, options=TaskOptions(queue="keyed", concurrency_key="acct-2"))

        async def running() -> bool:
            return len(await ids_in(sidecar, State.PROCESSING)) == 3

        await poll_until(running)
        await board.census.take()
        page = await client.get("/queues/keyed")
        assert "2/3 per key" in page.text
        assert "the busiest key now: acct-1" in page.text
        assert "3/10 in 600s" in page.text  # the attempts the records tell
        board._overview = None
        overview = await client.get("/fragments/overview")
        assert "2/3 per key" in overview.text
        release.set()


def test_a_task_page_shows_the_attempt_history_its_record_keeps() -> None:
    """Records keep a ``history`` (issue 20's liveness work): the task page's attempts
    table draws it, across nodes, with each attempt's error."""
    from tm_sidecar.core import AttemptEnd, NodeId, Record, TaskError, TaskOptions, TaskSpec
    from tm_sidecar.web._data import TaskDetail, merge_attempts
    from tm_sidecar.web._templates import page_templates

    @attrs.frozen
    class Info:
        spec: TaskSpec
        record: Any
        state: State

    spec = TaskSpec(id=TaskId("t1"), payload={}, options=TaskOptions(), created_at=1e9)
    history = (
        AttemptEnd(
            attempt=1,
            node=NodeId("web-1"),
            started_at=1e9 + 1,
            ended_at=1e9 + 2,
            outcome="failed",
            error=TaskError(type="ValueError", message="first try"),
        ),
        AttemptEnd(
            attempt=2,
            node=NodeId("web-2"),
            started_at=1e9 + 3,
            ended_at=1e9 + 4,
            outcome="completed",
        ),
    )
    record = Record(
        state=State.COMPLETED, options=TaskOptions(), since_at=1e9 + 4, attempts=2, history=history
    )
    attempts = merge_attempts(record, State.COMPLETED, [])
    detail = TaskDetail(
        Info(spec, record, State.COMPLETED),  # type: ignore[arg-type]
        tuple(attempts),
        history,
        "4bf92f3577b34da6",
    )
    text = (
        page_templates(lambda: 1e9 + 10)
        .env.get_template("_task.html")
        .render(t=detail, actions=False)
    )
    assert text.count('class="outcome-') == 2  # one row an attempt
    assert "<b>ValueError</b>: first try" in text
    assert "web-1" in text
    assert "web-2" in text
    assert '<dd class="mono" id="trace-id">4bf92f3577b34da6</dd>' in text
