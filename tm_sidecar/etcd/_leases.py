"""Lease keep-alives over one LeaseKeepAlive stream per client.

etcd renews leases only through a stream. The stream opens on first use and carries the
keep-alives of every lease of the client, one at a time (a session renews every TTL/3:
there is no queue to speak of); it is opened again after etcd or the connection goes
away. A keep-alive that gets no answer within the deadline fails as unavailable; one
left without an answer for any reason (the caller cancelled it too) drops the stream, so
that a late answer cannot be taken for the next request's.
"""

from __future__ import annotations

import trio

from .._errors import EtcdUnavailable
from ._proto import rpc_pb2 as pb
from ._transport import LEASE_KEEPALIVE, OpenStream, Transport


class KeepAlives:
    """Renew leases once each, on a shared stream (see the module docstring)."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._lock = trio.Lock()
        self._opened: OpenStream | None = None

    async def once(self, lease: int) -> int:
        """Renew ``lease`` once; answers its TTL, 0 when the lease is gone."""
        transport = self._transport
        started = trio.current_time()
        outcome = "error"
        try:
            async with self._lock:
                opened = self._opened
                reused = opened is not None and not opened.stream.ended
                try:
                    ttl = await self._exchange(lease)
                except _StreamEnded as ended:
                    # A stream can die while idle (etcd restarted) before its reader has
                    # told us: a keep-alive is safe to repeat, on a fresh stream, once.
                    if not reused:
                        raise ended.error from None
                    try:
                        ttl = await self._exchange(lease)
                    except _StreamEnded as again:
                        raise again.error from None
                outcome = "ok"
                return ttl
        finally:
            if transport.report is not None:
                transport.report(LEASE_KEEPALIVE.metric, trio.current_time() - started, outcome)

    async def _exchange(self, lease: int) -> int:
        transport = self._transport
        opened = self._opened
        if opened is None or opened.stream.ended:
            self._drop()
            opened = self._opened = await transport.open_stream(LEASE_KEEPALIVE)
        opened.stream.send(pb.LeaseKeepAliveRequest(ID=lease))
        answered = False
        try:
            with trio.move_on_after(transport.timeout_s):
                while True:
                    try:
                        answer = await opened.stream.receive()
                    except Exception as exc:
                        raise _StreamEnded(
                            transport.stream_error(exc, opened, "lease keep-alive")
                        ) from None
                    if lease == answer.ID:
                        answered = True
                        # etcd answers a lease it does not know (expired, revoked) with TTL 0.
                        return max(int(answer.TTL), 0)
            raise EtcdUnavailable(f"lease keep-alive: no answer within {transport.timeout_s} s")
        finally:
            if not answered:
                # No answer (our deadline, the caller's, or a broken stream): drop the
                # stream, so that a late answer is not taken for the next request's (its
                # TTL would count from the wrong time), and so that the next keep-alive
                # goes to the endpoint in use now rather than to one that stopped answering.
                self._drop()

    def _drop(self) -> None:
        opened, self._opened = self._opened, None
        if opened is not None:
            opened.stream.close()

    def close(self) -> None:
        """Close the stream."""
        self._drop()


class _StreamEnded(Exception):
    """The keep-alive stream ended under a request; ``error`` is what to raise."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error
