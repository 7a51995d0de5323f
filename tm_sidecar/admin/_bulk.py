"""Repairs by filter: retry, cancel or purge the tasks of a queue and state that match
a filter (an error type, an age, a text in the error), for the dashboard (and tmctl).

A namespace may hold millions of records: the matches are read a page at a time
(``etcd.page``, key order) and repaired page by page, so nothing holds more than one
page; a :class:`Progress` says how far it got. A count of the matches (the preview)
reads the same pages and repairs nothing.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

import attrs

from ..core import Keyspace, KeyValue, Record, State, check_name
from ..etcd import Etcd, prefix_end
from ._repairs import cancel_record, purge_records, retry_failed

#: Records read per etcd request.
PAGE = 500
#: What each repair takes: the states it applies to.
REPAIR_STATES = {
    "retry": (State.FAILED,),
    "cancel": (State.PENDING, State.DELAYED),
    "purge": (State.COMPLETED, State.FAILED),
}


@attrs.frozen(kw_only=True)
class RepairFilter:
    """Which records a repair by filter takes: those of ``queue`` in ``state`` whose error
    type is ``error_type`` (exactly), whose error message holds ``text``, and that have
    been in their state at least ``older_than_s``; an empty criterion takes every one."""

    queue: str
    state: State
    error_type: str = ""
    text: str = ""
    older_than_s: float = 0.0

    def __attrs_post_init__(self) -> None:
        check_name("queue", self.queue)
        if self.older_than_s < 0:
            raise ValueError("an age is a number of seconds >= 0")
        if len(self.text) > 200 or len(self.error_type) > 200:
            raise ValueError("a filter's texts are at most 200 characters")

    def matches(self, record: Record, now: float) -> bool:
        """Whether ``record`` (of this filter's state) is one the repair takes."""
        if record.options.queue != self.queue:
            return False
        if self.older_than_s and now - record.since_at < self.older_than_s:
            return False
        error = record.error
        if self.error_type and (error is None or error.type != self.error_type):
            return False
        return not self.text or (error is not None and self.text in error.message)

    def describe(self) -> str:
        """The filter in words, for a confirmation and a log line."""
        parts = [f"{self.state.value} tasks of queue {self.queue}"]
        if self.error_type:
            parts.append(f"with error type {self.error_type}")
        if self.text:
            parts.append(f"whose error says {self.text!r}")
        if self.older_than_s:
            parts.append(f"{self.state.value} for at least {self.older_than_s:g} s")
        return " ".join(parts)


@attrs.define
class Progress:
    """How far a repair by filter got: records read, matched, repaired."""

    scanned: int = 0
    matched: int = 0
    done: int = 0
    finished: bool = False
    error: str | None = None


async def matching_pages(
    etcd: Etcd,
    ks: Keyspace,
    where: RepairFilter,
    *,
    page: int = PAGE,
    clock: Callable[[], float] = time.time,
    progress: Progress | None = None,
) -> AsyncIterator[list[KeyValue]]:
    """The records that match, a page of reads at a time (a page may yield none). The
    next page starts after the last key read, so records that a repair moved out of
    the state are not read again, and the ones it left are not repaired twice."""
    prefix = ks.state_prefix(where.state)
    start, end = prefix, prefix_end(prefix)
    while True:
        result = await etcd.page(start, end, page)
        now = clock()
        found = [
            kv for kv in result.kvs if where.matches(Record.from_json(where.state, kv.value), now)
        ]
        if progress is not None:
            progress.scanned += len(result.kvs)
            progress.matched += len(found)
        yield found
        if not result.more or not result.kvs:
            return
        start = result.kvs[-1].key + "\0"


async def count_matching(etcd: Etcd, ks: Keyspace, where: RepairFilter) -> Progress:
    """The preview of a repair: how many records it would take (nothing is changed)."""
    progress = Progress()
    async for _ in matching_pages(etcd, ks, where, progress=progress):
        pass
    progress.finished = True
    return progress


async def repair_matching(
    etcd: Etcd, ks: Keyspace, action: str, where: RepairFilter, progress: Progress, *, by: str
) -> None:
    """Retry, cancel or purge every record that matches, page by page, counting in
    ``progress`` (``finished`` at the end; ``error`` if a read or a move failed)."""
    if where.state not in REPAIR_STATES[action]:
        raise ValueError(f"{action} takes {' or '.join(s.value for s in REPAIR_STATES[action])}")
    try:
        async for found in matching_pages(etcd, ks, where, progress=progress):
            if action == "retry":
                progress.done += await retry_failed(etcd, ks, found)
            elif action == "purge":
                progress.done += await purge_records(etcd, ks, found)
            else:
                for kv in found:
                    progress.done += await cancel_record(etcd, ks, kv, where.state, by=by)
    finally:
        progress.finished = True
