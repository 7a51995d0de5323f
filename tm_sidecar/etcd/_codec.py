"""The core's etcd values to and from etcd's protobuf messages."""

from __future__ import annotations

from collections.abc import Iterable

from ..core import (
    Compare,
    Delete,
    KeyValue,
    Op,
    Put,
    Range,
    RangeResult,
    Request,
    Target,
    Touch,
    Txn,
    TxnResult,
    WatchEvent,
)
from ._interface import range_end
from ._proto import rpc_pb2 as pb


def encode_range(r: Range) -> pb.RangeRequest:
    """A range request."""
    key = r.key.encode()
    return pb.RangeRequest(
        key=key,
        range_end=range_end(key) if r.prefix else b"",
        limit=r.limit,
        revision=r.revision,
        keys_only=r.keys_only,
        count_only=r.count_only,
        min_mod_revision=r.min_mod_revision,
    )


def encode_request(req: Request) -> pb.RequestOp:
    """One operation of a transaction."""
    if isinstance(req, Put):
        put = pb.PutRequest(key=req.key.encode(), value=req.value.encode(), lease=req.lease)
        return pb.RequestOp(request_put=put)
    if isinstance(req, Touch):
        return pb.RequestOp(
            request_put=pb.PutRequest(key=req.key.encode(), lease=req.lease, ignore_value=True)
        )
    if isinstance(req, Delete):
        key = req.key.encode()
        return pb.RequestOp(
            request_delete_range=pb.DeleteRangeRequest(
                key=key, range_end=range_end(key) if req.prefix else b""
            )
        )
    return pb.RequestOp(request_range=encode_range(req))


_TARGET = {
    Target.VERSION: pb.Compare.VERSION,
    Target.CREATE: pb.Compare.CREATE,
    Target.MOD: pb.Compare.MOD,
    Target.VALUE: pb.Compare.VALUE,
    Target.LEASE: pb.Compare.LEASE,
}
_RESULT = {
    Op.EQUAL: pb.Compare.EQUAL,
    Op.NOT_EQUAL: pb.Compare.NOT_EQUAL,
    Op.GREATER: pb.Compare.GREATER,
    Op.LESS: pb.Compare.LESS,
}


def encode_compare(c: Compare) -> pb.Compare:
    """A compare of a transaction."""
    out = pb.Compare(key=c.key.encode(), target=_TARGET[c.target], result=_RESULT[c.op])
    if c.target is Target.VALUE:
        out.value = str(c.value).encode()
    elif c.target is Target.VERSION:
        out.version = int(c.value)
    elif c.target is Target.CREATE:
        out.create_revision = int(c.value)
    elif c.target is Target.MOD:
        out.mod_revision = int(c.value)
    else:
        out.lease = int(c.value)
    return out


def encode_txn(txn: Txn) -> pb.TxnRequest:
    """A transaction."""
    return pb.TxnRequest(
        compare=[encode_compare(c) for c in txn.compare],
        success=[encode_request(r) for r in txn.success],
        failure=[encode_request(r) for r in txn.failure],
    )


def decode_kv(kv: pb.KeyValue) -> KeyValue:
    """A key-value."""
    return KeyValue(
        kv.key.decode(),
        kv.value.decode(),
        kv.create_revision,
        kv.mod_revision,
        kv.version,
        kv.lease,
    )


def decode_kvs(kvs: Iterable[pb.KeyValue]) -> tuple[KeyValue, ...]:
    """Key-values, in order."""
    return tuple(decode_kv(kv) for kv in kvs)


def decode_range(resp: pb.RangeResponse, revision: int | None = None) -> RangeResult:
    """A range answer (at ``revision`` when it came inside a transaction)."""
    return RangeResult(
        kvs=decode_kvs(resp.kvs),
        count=resp.count,
        more=resp.more,
        revision=resp.header.revision if revision is None else revision,
    )


def decode_txn(resp: pb.TxnResponse) -> TxnResult:
    """A transaction answer."""
    revision = resp.header.revision
    ranges = tuple(
        decode_range(r.response_range, revision)
        for r in resp.responses
        if r.HasField("response_range")
    )
    return TxnResult(succeeded=resp.succeeded, revision=revision, ranges=ranges)


def decode_event(ev: pb.Event) -> WatchEvent:
    """A watch event."""
    return WatchEvent(
        kind="DELETE" if ev.type == pb.Event.DELETE else "PUT",
        kv=decode_kv(ev.kv),
        prev=decode_kv(ev.prev_kv) if ev.HasField("prev_kv") else None,
    )
