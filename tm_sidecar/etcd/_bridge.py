"""grpcio's synchronous stubs driven from Trio, without a thread per call.

A unary call is a gRPC future: its done-callback, run on a grpc-core thread, wakes the
waiting Trio task through the run's token. A stream (Watch, LeaseKeepAlive) is read by
one thread of its own that hands whole responses to a bounded Trio channel, so a slow
consumer slows the reader rather than filling memory; requests go in through a
thread-safe queue that the stream's request iterator reads.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import trio

Req = TypeVar("Req")
Resp = TypeVar("Resp")


async def wait_future(future: Any) -> Any:
    """The result of a gRPC future, awaited from Trio; raises its ``grpc.RpcError``.

    Cancelling the waiting task cancels the call; a write cancelled this way may still
    have committed (every move is guarded, so a retry is safe).
    """
    token = trio.lowlevel.current_trio_token()
    task = trio.lowlevel.current_task()
    aborted = False

    def wake() -> None:  # in the Trio thread, so no race with abort() below
        if not aborted:
            trio.lowlevel.reschedule(task)

    def done(_: Any) -> None:  # on a grpc-core thread, or here if already done
        # A run that ended while the call was in flight has nobody waiting.
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(wake)

    def abort(_: Any) -> trio.lowlevel.Abort:
        nonlocal aborted
        aborted = True
        future.cancel()
        return trio.lowlevel.Abort.SUCCEEDED

    future.add_done_callback(done)
    await trio.lowlevel.wait_task_rescheduled(abort)
    return future.result()


_END = object()


class Stream(Generic[Req, Resp]):
    """One bidirectional gRPC stream, bridged to Trio.

    ``open_call`` takes the request iterator and answers the stream's call object (an
    iterator of responses that can be cancelled). :meth:`receive` raises what ended the
    stream: the call's ``grpc.RpcError``, or :class:`EOFError` when etcd closed it.

    The reader thread appends responses to a locked deque and wakes the Trio side with
    one ``run_sync_soon`` per burst, not one ``trio.from_thread.run`` per response: that
    call starts a system task and blocks the thread on a condition for each message, and
    was a tenth of the sidecar's CPU with three watches. The reader waits for room once
    ``buffer`` responses are unread, so a slow consumer slows etcd's stream, not memory.
    """

    def __init__(self, open_call: Callable[[Iterator[Req]], Any], buffer: int = 64) -> None:
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._token = trio.lowlevel.current_trio_token()
        self._buffer = buffer
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._items: deque[Resp] = deque()
        #: A wake-up is queued in the Trio run and has not run yet (under ``_lock``).
        self._wake_queued = False
        #: The reader is over (under ``_lock``); ``_error`` is what ended it.
        self._finished = False
        self._error: BaseException | None = None
        self._arrived: trio.Event | None = None
        self._closed = False
        #: Set (in the Trio thread) once the stream has ended, by either side.
        self.ended = False
        self._call = open_call(self._iter_requests())
        threading.Thread(target=self._read, name="tm-etcd-stream", daemon=True).start()

    def _iter_requests(self) -> Iterator[Req]:
        while True:
            item = self._requests.get()
            if item is _END:
                return
            yield item

    def send(self, request: Req) -> None:
        """Queue one request on the stream (non-blocking)."""
        if not self._closed:
            self._requests.put(request)

    async def receive(self) -> Resp:
        """The next response; raises what ended the stream."""
        while True:
            with self._lock:
                if self._closed:
                    raise trio.ClosedResourceError("the stream was closed")
                if self._items:
                    if len(self._items) == self._buffer:
                        self._room.notify()
                    return self._items.popleft()
                if self._finished:
                    raise self._error or EOFError("etcd ended the stream")
                arrived = self._arrived = trio.Event()
            try:
                await arrived.wait()
            finally:
                self._arrived = None

    def close(self) -> None:
        """Cancel the call and let its threads go (non-blocking, idempotent)."""
        if self._closed:
            return
        with self._lock:
            self._closed = True
            self._items.clear()
            self._room.notify_all()
        self.ended = True
        self._requests.put(_END)
        self._call.cancel()
        if self._arrived is not None:
            self._arrived.set()

    # -- the reader thread --

    def _read(self) -> None:
        error: BaseException | None = None
        try:
            for response in self._call:
                with self._lock:
                    while len(self._items) >= self._buffer and not self._closed:
                        self._room.wait()
                    if self._closed:
                        return
                    self._items.append(response)
                    wake = not self._wake_queued
                    self._wake_queued = True
                if wake:
                    self._token.run_sync_soon(self._wake)
        except trio.RunFinishedError:
            return  # the run is over: nobody is left to read
        except Exception as exc:  # the call's RpcError (or a bug): the receiver raises it
            error = exc
        with self._lock:
            self._finished = True
            self._error = error
            self._wake_queued = True
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._wake)

    def _wake(self) -> None:  # in the Trio thread
        with self._lock:
            self._wake_queued = False
            if self._finished:
                self.ended = True
        if self._arrived is not None:
            self._arrived.set()
