"""How to reach etcd: :class:`EtcdConfig`, and the transports it may name."""

from __future__ import annotations

import argparse
from typing import Any, Literal

import attrs

#: The transports, the default first: etcd's native gRPC API, and etcd's JSON gateway
#: through etcd3-py (for a deployment that can reach only the gateway).
TRANSPORTS = ("grpc", "gateway")

Transport = Literal["grpc", "gateway"]


def check_transport(value: str) -> Transport:
    """``value`` if it names a transport; a :class:`ValueError` that lists them if not."""
    if value == "grpc":
        return "grpc"
    if value == "gateway":
        return "gateway"
    # "native" and "etcd3" were the gateway's two clients before issue 12.
    raise ValueError(
        f"unknown etcd transport {value!r}: choose one of {', '.join(TRANSPORTS)}"
        + (" (the JSON gateway is now 'gateway')" if value in ("native", "etcd3") else "")
    )


def transport_arg(value: str) -> Transport:
    """An ``--etcd-transport`` value, for argparse (which applies it to a default taken
    from the environment too, and reports a bad one as a usage error)."""
    try:
        return check_transport(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _check_transport(_: Any, attribute: attrs.Attribute[str], value: str) -> None:
    check_transport(value)


@attrs.frozen(kw_only=True)
class EtcdConfig:
    """How to reach etcd. ``password`` never appears in a repr or a log."""

    endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=lambda v: "***" if v else "None")
    #: The deadline of every call (and of a watch's creation).
    timeout_s: float = 5.0
    #: "grpc", the default, is etcd's native API; "gateway" is its JSON gateway through
    #: etcd3-py. ``tm_sidecar.etcd.connect(cfg)`` makes the client for it.
    transport: Transport = attrs.field(default="grpc", validator=_check_transport)
    #: Worker threads for the gateway's blocking calls (its watch streams have their own).
    threads: int = 16

    @property
    def tls(self) -> bool:
        """Whether the endpoints use TLS."""
        return any(e.startswith("https://") for e in self.endpoints) or self.ca_file is not None
