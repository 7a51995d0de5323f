"""Group commit: requests that arrive while a batch is in flight go together in the next.

One etcd request per task step cannot reach the throughput etcd itself allows: most of
the cost is per request (HTTP framing, JSON, a raft round), not per key. A
:class:`GroupCommit` sends the first request at once (no added latency when idle) and,
while it is in flight, collects the ones that arrive; those go out together as soon as a
slot frees up. Under load batches grow by themselves; idle, a request goes alone.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from typing import Generic, TypeVar

import attrs
import trio

from .._errors import EtcdError, EtcdUnavailable
from ..core import MAX_TXN_OPS, Txn, TxnResult, merge_txns, merge_with_reads, split_refused
from ._interface import Etcd

#: ``merge_txns`` is the core's, named here too for the callers that merge by hand.
__all__ = ["MAX_BATCH_BYTES", "GroupCommit", "GroupStats", "merge_txns", "txn_group"]

log = logging.getLogger("tm_sidecar.group")

T = TypeVar("T")
R = TypeVar("R")

#: What one batch sends at most, in raw key and value bytes: etcd refuses requests over
#: 1.5 MiB by default (--max-request-bytes), and leaves room for the keys and framing.
MAX_BATCH_BYTES = 1024 * 1024


@attrs.define(eq=False)
class GroupStats:
    """Batches a group sent and the items in them (their ratio is the batching won)."""

    batches: int = 0
    items: int = 0


@attrs.define(eq=False)
class _Waiter(Generic[T, R]):
    item: T
    size: int
    keys: frozenset[Hashable]
    #: How the submitter learns the answer: an event it waits on (``submit``), or a
    #: function called with the result or the error (``post``).
    done: trio.Event | None = None
    on_done: Callable[[R | None, BaseException | None], None] | None = None
    result: R | None = None
    error: BaseException | None = None
    abandoned: bool = False

    def answered(self) -> None:
        if self.on_done is not None:
            try:
                self.on_done(self.result, self.error)
            except Exception:
                log.exception("a group commit's answer was not taken")
        elif self.done is not None:
            self.done.set()


class GroupCommit(Generic[T, R]):
    """Batches concurrent submissions; ``commit`` answers one result (or error) per item.

    ``commit`` receives at most ``max_items`` items of at most ``max_bytes`` together
    (an item bigger than that goes alone) and never two items that share one of their
    ``keys`` (etcd refuses a transaction that names a key twice). With ``max_waiting``,
    a submitter finds that many items waiting and waits for room (backpressure), as a
    batch completer does, rather than queueing without bound.
    Run :meth:`run` in a nursery; without it (before start or after stop),
    :meth:`submit` commits its item alone, so that shutdown paths still work.
    """

    def __init__(
        self,
        commit: Callable[[Sequence[T]], Awaitable[Sequence[R | BaseException]]],
        *,
        max_items: int,
        max_bytes: int = MAX_BATCH_BYTES,
        in_flight: int = 2,
        max_waiting: int | None = None,
        size: Callable[[T], int] = lambda item: 0,
        keys: Callable[[T], Iterable[Hashable]] = lambda item: (id(item),),
        name: str = "batch",
        stats: GroupStats | None = None,
    ) -> None:
        self._commit = commit
        self._max_items = max_items
        self._max_bytes = max_bytes
        self._size = size
        self._keys = keys
        self._name = name
        self._slots = trio.Semaphore(in_flight)
        self._queue: deque[_Waiter[T, R]] = deque()
        self._wake = trio.Event()
        self._running = False
        self._max_waiting = max_waiting
        self._room = trio.Event()
        self._room.set()
        #: Batches committed and items in them, for metrics and benchmarks.
        self.stats = stats or GroupStats()

    async def submit(self, item: T) -> R:
        """Commit ``item`` with whatever else is waiting; its result, or its error raised."""
        if not self._running:
            answer = (await self._commit([item]))[0]
            if isinstance(answer, BaseException):
                raise answer
            return answer
        while not self._room.is_set():
            # Backpressure: this many are waiting already; the submitter waits its turn.
            await self._room.wait()
        waiter: _Waiter[T, R] = _Waiter(
            item, self._size(item), frozenset(self._keys(item)), done=trio.Event()
        )
        self._queue_up(waiter)
        try:
            await waiter.done.wait()  # type: ignore[union-attr]
        except trio.Cancelled:
            waiter.abandoned = True  # still queued: it is dropped; in flight: it lands
            raise
        if waiter.error is not None:
            raise waiter.error
        return waiter.result  # type: ignore[return-value]

    def post(self, item: T, on_done: Callable[[R | None, BaseException | None], None]) -> bool:
        """Queue ``item`` without waiting: ``on_done`` is called with its result (or its
        error) once its batch is answered. For callers that drive many items from one
        task (the remote attempts): no task and no event per item. Not bounded by
        ``max_waiting`` (such callers bound their items themselves). False when the
        group does not run (before start, after stop): ``submit`` the item instead."""
        if not self._running:
            return False
        waiter: _Waiter[T, R] = _Waiter(
            item, self._size(item), frozenset(self._keys(item)), on_done=on_done
        )
        self._queue_up(waiter)
        return True

    def _queue_up(self, waiter: _Waiter[T, R]) -> None:
        self._queue.append(waiter)
        if self._max_waiting is not None and len(self._queue) >= self._max_waiting:
            self._room = trio.Event()
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send batches until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._running = True
                task_status.started()
                while True:
                    while not self._queue:
                        self._wake = trio.Event()
                        await self._wake.wait()
                    await self._slots.acquire()
                    batch = self._take()
                    if batch:
                        nursery.start_soon(self._send, batch)
                    else:
                        self._slots.release()
        finally:
            self._running = False
            for waiter in self._queue:
                waiter.error = EtcdUnavailable(f"{self._name}: the sidecar is stopping")
                waiter.answered()
            self._queue.clear()

    def _take(self) -> list[_Waiter[T, R]]:
        batch: list[_Waiter[T, R]] = []
        keys: set[Hashable] = set()
        size = 0
        deferred: list[_Waiter[T, R]] = []
        while self._queue and len(batch) < self._max_items:
            waiter = self._queue.popleft()
            if waiter.abandoned:
                continue
            if batch and (size + waiter.size > self._max_bytes or not keys.isdisjoint(waiter.keys)):
                deferred.append(waiter)
                if size + waiter.size > self._max_bytes:
                    break
                continue
            batch.append(waiter)
            keys |= waiter.keys
            size += waiter.size
        self._queue.extendleft(reversed(deferred))
        if self._max_waiting is None or len(self._queue) < self._max_waiting:
            self._room.set()
        return batch

    async def _send(self, batch: list[_Waiter[T, R]]) -> None:
        try:
            answers = await self._commit([w.item for w in batch])
            for waiter, answer in zip(batch, answers, strict=True):
                if isinstance(answer, BaseException):
                    waiter.error = answer
                else:
                    waiter.result = answer
        except Exception as exc:
            for waiter in batch:
                waiter.error = exc
        except BaseException:
            # Stopping with the batch in flight: it may or may not land.
            for waiter in batch:
                if waiter.result is None and waiter.error is None:
                    waiter.error = EtcdUnavailable(f"{self._name}: interrupted, outcome unknown")
            raise
        finally:
            self.stats.batches += 1
            self.stats.items += len(batch)
            for waiter in batch:
                waiter.answered()
            self._slots.release()


#: A batch whose guards change between its check and its retry is tried this many times
#: whole before its parts go alone.
_RETRIES = 3


def txn_group(
    etcd: Etcd,
    *,
    ops_per_item: int,
    name: str,
    in_flight: int = 2,
    max_waiting: int | None = None,
    stats: GroupStats | None = None,
) -> GroupCommit[Txn, TxnResult]:
    """Group commit of independent guarded transactions (creates, reports).

    The batch is one transaction. If a compare does not hold, its failure branch has
    read every compared key: the parts whose compares held go again together, the
    others are answered failed (a part with a failure branch of its own goes alone, for
    its answer); so one stale part costs one more transaction, not one per part. If etcd
    refuses the batch (a missing key, say), each part is committed alone, so that every
    item gets its own answer; unavailability is every item's answer, for the caller to
    retry.
    """

    async def commit(txns: Sequence[Txn]) -> Sequence[TxnResult | BaseException]:
        if len(txns) == 1:
            return [await etcd.txn(txns[0])]
        answers: list[TxnResult | BaseException | None] = [None] * len(txns)
        together = list(range(len(txns)))
        alone: list[int] = []
        for _ in range(_RETRIES):
            if len(together) < 2:
                break
            merged, keys = merge_with_reads([txns[i] for i in together])
            try:
                result = await etcd.txn(merged)
            except EtcdUnavailable:
                raise
            except EtcdError as exc:
                log.debug(
                    "group commit refused: committing each alone",
                    extra={"group": name, "count": len(together), "error": str(exc)},
                )
                break
            if result.succeeded:
                for i in together:
                    answers[i] = result
                together = []
                break
            if not keys:
                break
            parts = [txns[i] for i in together]
            split = split_refused(parts, keys, result)
            for j in split.refused:
                answers[together[j]] = TxnResult(succeeded=False, revision=result.revision)
            alone.extend(together[j] for j in split.alone)
            together = [together[j] for j in split.held]
        for i in sorted(together + alone):
            try:
                answers[i] = await etcd.txn(txns[i])
            except Exception as exc:
                answers[i] = exc
        return [a if a is not None else EtcdUnavailable(f"{name}: no answer") for a in answers]

    def size(txn: Txn) -> int:
        return sum(len(getattr(op, "value", "")) + len(op.key) for op in txn.success)

    return GroupCommit(
        commit,
        max_items=MAX_TXN_OPS // ops_per_item,
        in_flight=in_flight,
        max_waiting=max_waiting,
        size=size,
        keys=lambda txn: [op.key for op in txn.success],
        name=name,
        stats=stats,
    )
