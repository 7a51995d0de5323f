"""A blocking face of the gRPC client, for code with no event loop (the property tests).

The same messages, error translation and deadline as the Trio client; one endpoint, no
auth, no watches.
"""

from __future__ import annotations

import contextlib
from typing import Any

import grpc

from .._errors import Compacted
from ..core import KeyValue, Range, RangeResult, Txn, TxnResult
from . import _transport as rpc
from ._codec import decode_range, decode_txn, encode_range, encode_txn
from ._errors import translate
from ._interface import range_end
from ._proto import rpc_pb2 as pb


class SyncEtcd:
    """Blocking calls to one etcd endpoint over gRPC."""

    def __init__(self, endpoint: str, timeout_s: float = 10.0) -> None:
        target, tls = rpc.grpc_target(endpoint)
        if tls:
            raise ValueError("SyncEtcd speaks plain gRPC only")
        self._channel = grpc.insecure_channel(target, options=rpc.CHANNEL_OPTIONS)
        self._timeout_s = timeout_s

    def _call(self, method: rpc.Method, request: Any) -> Any:
        call = self._channel.unary_unary(
            method.path,
            request_serializer=type(request).SerializeToString,
            response_deserializer=method.response.FromString,
        )
        try:
            return call(request, timeout=self._timeout_s)
        except grpc.RpcError as exc:
            raise translate(exc, method.metric) from None

    def txn(self, txn: Txn) -> TxnResult:
        """Run a transaction."""
        return decode_txn(self._call(rpc.TXN, encode_txn(txn)))

    def range(self, r: Range) -> RangeResult:
        """Read a key or a prefix."""
        return decode_range(self._call(rpc.RANGE, encode_range(r)))

    def list(self, prefix: str) -> tuple[tuple[KeyValue, ...], int]:
        """Every key under a prefix (one request), and the revision."""
        raw = prefix.encode()
        answer = self._call(rpc.RANGE, pb.RangeRequest(key=raw, range_end=range_end(raw)))
        result = decode_range(answer)
        return result.kvs, result.revision

    def lease_grant(self, ttl_s: int) -> int:
        """A new lease."""
        return int(self._call(rpc.LEASE_GRANT, pb.LeaseGrantRequest(TTL=ttl_s)).ID)

    def lease_revoke(self, lease: int) -> None:
        """Revoke a lease."""
        self._call(rpc.LEASE_REVOKE, pb.LeaseRevokeRequest(ID=lease))

    def compact(self, revision: int) -> None:
        """Drop history before ``revision`` (already compacted is fine)."""
        with contextlib.suppress(Compacted):
            self._call(rpc.COMPACT, pb.CompactionRequest(revision=revision))

    def revision(self, key: str = "\0") -> int:
        """The current revision, from the header of a one-key read of ``key`` (one the
        caller may read)."""
        return self.range(Range(key, limit=1, count_only=True)).revision

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()
