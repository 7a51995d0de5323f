"""The socket server: the documented protocol (docs/protocol.md) over a Unix socket.

Framing, the protocol version, event kinds and the error codes come from
``taskmanager.protocol``, shared with the SDK. The server holds the connections, the op
table and the remote workers' runtime (deliveries to SDK workers).

May import: core, etcd, node.
"""

from ._server import ServerSettings, SocketServer

__all__ = ["ServerSettings", "SocketServer"]
