"""The core's etcd values to and from the JSON gateway's bodies (base64 keys and values,
64-bit integers as strings)."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from ..core import (
    Compare,
    Delete,
    KeyValue,
    Put,
    Range,
    RangeResult,
    Request,
    Touch,
    Txn,
    TxnResult,
    WatchEvent,
)
from ._interface import range_end

Body = dict[str, Any]


def b64(text: str) -> str:
    """A key or value as the gateway takes it."""
    return base64.b64encode(text.encode()).decode()


def range_end_b64(prefix: str) -> str:
    """The end of the range of keys under ``prefix`` (every key, for an empty one)."""
    return base64.b64encode(range_end(prefix.encode())).decode()


def encode_range(r: Range) -> Body:
    """The gateway form of a range request."""
    body: Body = {"key": b64(r.key)}
    if r.prefix:
        body["range_end"] = range_end_b64(r.key)
    if r.limit:
        body["limit"] = r.limit
    if r.revision:
        body["revision"] = r.revision
    if r.keys_only:
        body["keys_only"] = True
    if r.count_only:
        body["count_only"] = True
    if r.min_mod_revision:
        body["min_mod_revision"] = r.min_mod_revision
    return body


def encode_request(req: Request) -> Body:
    """The gateway form of one operation of a transaction."""
    if isinstance(req, Put):
        body: Body = {"key": b64(req.key), "value": b64(req.value)}
        if req.lease:
            body["lease"] = req.lease
        return {"request_put": body}
    if isinstance(req, Touch):
        return {"request_put": {"key": b64(req.key), "lease": req.lease, "ignore_value": True}}
    if isinstance(req, Delete):
        body = {"key": b64(req.key)}
        if req.prefix:
            body["range_end"] = range_end_b64(req.key)
        return {"request_delete_range": body}
    return {"request_range": encode_range(req)}


_TARGET_FIELD = {
    "VERSION": "version",
    "CREATE": "create_revision",
    "MOD": "mod_revision",
    "VALUE": "value",
    "LEASE": "lease",
}


def encode_compare(c: Compare) -> Body:
    """The gateway form of a compare."""
    field = _TARGET_FIELD[c.target.value]
    value: Any = b64(str(c.value)) if field == "value" else int(c.value)
    return {"key": b64(c.key), "target": c.target.value, "result": c.op.value, field: value}


def encode_txn(txn: Txn) -> Body:
    """The gateway form of a transaction."""
    return {
        "compare": [encode_compare(c) for c in txn.compare],
        "success": [encode_request(r) for r in txn.success],
        "failure": [encode_request(r) for r in txn.failure],
    }


def decode_kv(kv: Body) -> KeyValue:
    """A key-value from the gateway's JSON."""
    get = kv.get
    value = get("value")
    lease = get("lease")
    return KeyValue(
        binascii.a2b_base64(kv["key"]).decode(),
        binascii.a2b_base64(value).decode() if value else "",
        int(get("create_revision", 0)),
        int(get("mod_revision", 0)),
        int(get("version", 0)),
        int(lease) if lease else 0,
    )


def decode_range(body: Body, revision: int | None = None) -> RangeResult:
    """A range answer from the gateway's JSON."""
    rev = revision if revision is not None else int(body.get("header", {}).get("revision", 0))
    return RangeResult(
        kvs=tuple(decode_kv(kv) for kv in body.get("kvs", ())),
        count=int(body.get("count", 0)),
        more=bool(body.get("more", False)),
        revision=rev,
    )


def decode_txn(body: Body) -> TxnResult:
    """A transaction answer from the gateway's JSON."""
    revision = int(body.get("header", {}).get("revision", 0))
    ranges = tuple(
        decode_range(r["response_range"], revision)
        for r in body.get("responses", ())
        if "response_range" in r
    )
    return TxnResult(succeeded=bool(body.get("succeeded", False)), revision=revision, ranges=ranges)


def decode_event(ev: Body) -> WatchEvent:
    """A watch event from the gateway's JSON."""
    prev = ev.get("prev_kv")
    return WatchEvent(
        kind=ev.get("type", "PUT"),
        kv=decode_kv(ev["kv"]),
        prev=decode_kv(prev) if prev else None,
    )
