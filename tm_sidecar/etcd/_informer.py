"""The informer: list, then watch from the listing's revision, on any transport.

Written once on top of the adapter's ``list_prefix`` and ``watch_once``: both
transports, and every watcher of the sidecar, share its resume and re-list rules.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import TYPE_CHECKING

from .._errors import Compacted, EtcdUnavailable
from ._interface import Changes, Loader, Reset
from ._retry import Retries
from ._retry import backoff as default_backoff

if TYPE_CHECKING:
    from ._interface import Etcd

log = logging.getLogger("tm_sidecar.etcd")


async def informer(
    client: Etcd,
    prefix: str,
    *,
    range_end: str | None = None,
    backoff: Callable[[int], float] | None = None,
    prev_kv: bool = True,
    loader: Callable[[], Loader] | None = None,
    page: int = 2000,
) -> AsyncGenerator[Reset | Changes, None]:
    """List-then-watch ``prefix`` (or ``[prefix, range_end)``) for ever.

    Yields a :class:`Reset`, then :class:`Changes`. Resumes from the last revision
    delivered when etcd goes away (after ``backoff(failures)`` seconds); lists again, with
    a new :class:`Reset`, when that revision has been compacted. Changes are never
    repeated nor skipped between resets.
    """
    retries = Retries("watch", backoff or default_backoff)
    last: int | None = None
    while True:
        try:
            if last is None:
                loaded = loader() if loader is not None else None
                kvs, revision = await client.list_prefix(
                    prefix,
                    range_end=range_end,
                    consume=loaded.load if loaded is not None else None,
                    page=page,
                )
                last = revision
                retries.reset()
                yield Reset(kvs, revision, loaded)
            watch = client.watch_once(prefix, last + 1, range_end=range_end, prev_kv=prev_kv)
            async with aclosing(watch) as items:
                async for item in items:
                    # A resumed stream may repeat what was delivered before it broke.
                    fresh = tuple(e for e in item.events if e.kv.mod_revision > last)
                    last = max(last, item.revision)
                    retries.reset()
                    if fresh:
                        yield Changes(fresh, last)
        except Compacted:
            log.warning("watch fell behind compaction: listing again", extra={"prefix": prefix})
            last = None
        except EtcdUnavailable as exc:
            await retries.pause(exc, prefix=prefix)
