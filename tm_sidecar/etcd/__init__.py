"""Everything that talks to etcd, for Trio code: one interface, two transports.

:func:`connect` makes the client for ``cfg.transport``: ``grpc`` (the default, etcd's
native API over grpcio) or ``gateway`` (etcd's JSON gateway through etcd3-py, for a
deployment that can reach only the gateway). Both implement :class:`Etcd` and pass the
same adapter tests. No other module of tm-sidecar imports ``grpc``, ``etcd3`` or the
generated messages; this package imports only :mod:`tm_sidecar.core` and
:mod:`tm_sidecar._errors` of the rest (``tests/test_etcd_grpc.py`` checks the arrows).

Modules, one job each:

- ``_config``: :class:`EtcdConfig` and the transports' names;
- ``_interface``: :class:`Etcd` (the adapter's interface), and what it deals in:
  :class:`Reset`, :class:`Changes`, :class:`Loader`, :class:`KeyValue` (the core's),
  the end of a prefix's range (``range_end``, ``prefix_end``);
- ``_retry``: the one backoff, ``Retries`` (count, pause and log the failures of any
  loop against etcd) and :func:`retrying`;
- ``_informer``: list, then watch from the listing's revision, on any transport;
- ``_limits``: what an etcd allows (``--max-txn-ops``), learned from its answers;
- ``_errors``: failures as our exceptions by gRPC status code (the gateway's JSON
  ``code`` is the same code);
- gRPC: ``_bridge`` (grpcio's futures and streams driven from Trio), ``_codec`` (the
  core's values to and from protobuf), ``_transport`` (channels, TLS, auth token,
  deadlines, failover, metrics), ``_leases`` (keep-alives on one stream), ``_watch``
  (watch streams), ``_client`` (:class:`GrpcEtcd`), ``_sync`` (a blocking face, for the
  property tests);
- the gateway: ``_gateway_codec`` (the core's values to and from the gateway's JSON),
  ``_gateway`` (:class:`GatewayEtcd`: etcd3-py's ``call_rpc`` in threads, one reader
  thread per watch stream).

Built on the interface, for the rest of the sidecar: ``_session`` (the session lease
kept alive by hand, and retention leases), ``_group`` (group commit: concurrent
transactions of one kind sent together), ``_feed`` (the sidecar's one watch on its
namespace, fanned out to taps), ``_lookup`` (one task wherever it is: its keys at one
revision).

May import: core.

The messages are generated from ``_proto/rpc.proto``, a minimal copy of etcd's
definitions; regenerate them (grpcio-tools, the ``protos`` extra) from the repository's
root with::

    python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. tm_sidecar/etcd/_proto/rpc.proto
"""

from __future__ import annotations

import os

# grpc's C core writes its own unstructured lines to stderr (a failed TLS handshake gave
# one per retry, issue 21): silenced unless the operator sets GRPC_VERBOSITY; our own
# log line carries grpc's error. grpc reads the variable when it is first imported.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

from collections.abc import Callable

from ._client import GrpcEtcd
from ._config import TRANSPORTS, EtcdConfig, transport_arg
from ._feed import Feed
from ._gateway import GatewayEtcd
from ._group import GroupCommit, GroupStats, txn_group
from ._interface import Changes, Etcd, KeyValue, Loader, Reset, prefix_end, range_end
from ._limits import learn_max_txn_ops
from ._lookup import TaskKeys, read_task_keys
from ._retry import backoff, retrying
from ._session import RetentionLeases, Session, close_session, open_session, run_keepalive
from ._sync import SyncEtcd


def connect(
    cfg: EtcdConfig, *, on_request: Callable[[str, float, str], None] | None = None
) -> Etcd:
    """The etcd client for ``cfg.transport``: gRPC (the default), or the JSON gateway.
    ``on_request`` hears each call's (path, seconds, "ok" or "error"), for metrics."""
    client: Etcd
    if cfg.transport == "grpc":
        client = GrpcEtcd(cfg)
    elif cfg.transport == "gateway":
        client = GatewayEtcd(cfg)
    else:
        # EtcdConfig refuses any other name; this is for a config built around its checks.
        raise ValueError(f"unknown etcd transport {cfg.transport!r}: choose one of {TRANSPORTS}")
    client.on_request = on_request
    return client
    # EtcdConfig refuses any other name; this is for a config built around its checks.
    raise ValueError(f"unknown etcd transport {cfg.transport!r}: choose one of {TRANSPORTS}")


__all__ = [
    "TRANSPORTS",
    "Changes",
    "Etcd",
    "EtcdConfig",
    "Feed",
    "GatewayEtcd",
    "GroupCommit",
    "GroupStats",
    "GrpcEtcd",
    "KeyValue",
    "Loader",
    "Reset",
    "RetentionLeases",
    "Session",
    "SyncEtcd",
    "TaskKeys",
    "backoff",
    "close_session",
    "connect",
    "learn_max_txn_ops",
    "open_session",
    "prefix_end",
    "range_end",
    "read_task_keys",
    "retrying",
    "run_keepalive",
    "transport_arg",
    "txn_group",
]
