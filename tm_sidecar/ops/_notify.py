"""systemd's notify protocol (sd_notify), spoken directly over ``$NOTIFY_SOCKET``.

READY=1 once the sidecar is registered and serving its socket, STATUS= lines with its
role, WATCHDOG=1 at half of ``$WATCHDOG_USEC``, STOPPING=1 on shutdown. Without
``$NOTIFY_SOCKET`` every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

import trio

log = logging.getLogger("tm_sidecar.notify")


class Notifier:
    """Sends notifications to systemd, if it is listening."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = env.get("NOTIFY_SOCKET") or None
        if self.address and self.address.startswith("@"):
            self.address = "\0" + self.address[1:]  # an abstract socket
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        mine = pid is None or pid == str(os.getpid())
        self.watchdog_s = int(usec) / 1e6 if usec and usec.isdigit() and mine else None
        self._sock: socket.socket | None = None

    def send(self, *lines: str) -> None:
        """Send one datagram of ``KEY=value`` lines; errors are logged, never raised."""
        if not self.address:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            log.warning("sd_notify failed", extra={"error": str(exc)})

    async def keep_watchdog(self) -> None:
        """Send WATCHDOG=1 at half the interval systemd asked for, until cancelled."""
        if self.watchdog_s is None:
            return
        while True:
            self.send("WATCHDOG=1")
            await trio.sleep(self.watchdog_s / 2)

    def close(self) -> None:
        """Release the socket."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
