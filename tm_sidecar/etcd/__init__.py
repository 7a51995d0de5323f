"""etcd's native gRPC API for Trio: one client, behind the adapter's interface.

Owns everything that speaks gRPC to etcd; no other module imports ``grpc`` or the
generated messages. It may import :mod:`tm_sidecar.core`, :mod:`tm_sidecar._errors` and,
until the interface moves here, the adapter's shared names in :mod:`tm_sidecar._etcd`
(``Etcd``, ``EtcdConfig``, ``Reset``, ``Changes``, ``Loader``); nothing else of the
sidecar (``tests/test_etcd_grpc.py`` checks the arrows).

Modules, one job each: ``_bridge`` (grpcio's futures and streams driven from Trio),
``_errors`` (gRPC status to our exceptions), ``_codec`` (the core's values to and from
protobuf), ``_transport`` (channels, TLS, auth token, deadlines, failover, metrics),
``_leases`` (keep-alives on one stream), ``_watch`` (watches and the informer),
``_client`` (the facade), ``_sync`` (a blocking face, for the property tests). The
messages are generated from ``_proto/rpc.proto``, a minimal copy of etcd's definitions;
regenerate them (grpcio-tools, the ``protos`` extra) from the repository's root with::

    python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. tm_sidecar/etcd/_proto/rpc.proto
"""

from __future__ import annotations

from .._etcd import Etcd, EtcdConfig
from ._client import GrpcEtcd
from ._sync import SyncEtcd


def connect(cfg: EtcdConfig) -> Etcd:
    """The etcd client for ``cfg.transport``: gRPC (the default), or the JSON gateway."""
    if cfg.transport == "grpc":
        return GrpcEtcd(cfg)
    return Etcd(cfg)


__all__ = ["GrpcEtcd", "SyncEtcd", "connect"]
