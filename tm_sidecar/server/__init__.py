"""The socket server: the documented protocol (docs/protocol.md) over a Unix socket.

Framing, the protocol version, event kinds and the error codes come from
``taskmanager.protocol``, shared with the SDK. One job per module: the listener, the
handshake and the op table (``_server.py``); one client's connection, its peer's
credentials (the one place ``SO_PEERCRED`` is read), outbox and framing
(``_connection.py``); reading a request, where a bad one is the caller's fault
(``_requests.py``); and the ops by theme: tasks (``_tasks.py``), queues and schedules
(``_queues.py``), subscriptions (``_subscriptions.py``), and the remote workers' runtime,
deliveries to SDK workers (``_workers.py``).

May import: core, etcd, node.
"""

from ._server import ServerSettings, SocketServer

__all__ = ["ServerSettings", "SocketServer"]
