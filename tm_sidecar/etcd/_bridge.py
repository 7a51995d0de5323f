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
    """

    def __init__(self, open_call: Callable[[Iterator[Req]], Any], buffer: int = 64) -> None:
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._send, self._receive = trio.open_memory_channel[Resp](buffer)
        self._token = trio.lowlevel.current_trio_token()
        self._error: BaseException | None = None
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
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            raise self._error or EOFError("etcd ended the stream") from None

    def close(self) -> None:
        """Cancel the call and let its threads go (non-blocking, idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.ended = True
        self._requests.put(_END)
        self._call.cancel()
        self._receive.close()

    # -- the reader thread --

    def _read(self) -> None:
        error: BaseException | None = None
        try:
            for response in self._call:
                trio.from_thread.run(self._send.send, response, trio_token=self._token)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.RunFinishedError):
            return  # closed from the Trio side, or the run is over
        except trio.Cancelled:
            return  # the run is ending
        except Exception as exc:  # the call's RpcError (or a bug): the receiver raises it
            error = exc
        with contextlib.suppress(trio.RunFinishedError):
            trio.from_thread.run_sync(self._finish, error, trio_token=self._token)

    def _finish(self, error: BaseException | None) -> None:
        self._error = error
        self.ended = True
        self._send.close()
