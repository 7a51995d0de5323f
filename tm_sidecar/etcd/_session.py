"""The session: an etcd lease kept alive by hand, and what hangs on it.

etcd3-py's keep-alive helper ignores a dead lease and dies silently, so this loop sends
one keep-alive every TTL/3 and treats a missing or zero TTL as a lost lease. It also
keeps time: the lease is *trusted* only until one third of the TTL before it could
expire, counted from the send time of the last successful keep-alive. A leader stops
leading at that moment even if etcd cannot be reached to say so.
"""

from __future__ import annotations

import logging
import math

import attrs
import trio

from .._errors import EtcdUnavailable, LeaseLost
from ._interface import Etcd
from ._retry import retrying

log = logging.getLogger("tm_sidecar.session")


@attrs.define(eq=False)
class Session:
    """A live lease. ``trusted_until`` is in Trio time."""

    lease: int
    ttl_s: int
    trusted_until: float
    lost: trio.Event = attrs.Factory(trio.Event)

    @property
    def margin_s(self) -> float:
        """How long before the lease could expire we stop trusting it."""
        return self.ttl_s / 3

    def renewed(self, sent_at: float, ttl_s: int) -> None:
        """A keep-alive sent at ``sent_at`` (Trio time) was answered with ``ttl_s``."""
        self.trusted_until = max(self.trusted_until, sent_at + ttl_s - self.margin_s)

    def trusted(self) -> bool:
        """Whether the lease is surely alive now."""
        return not self.lost.is_set() and trio.current_time() < self.trusted_until

    async def wait_untrusted(self) -> None:
        """Return once the lease can no longer be trusted (lost, or not renewed in time)."""
        while self.trusted():
            with trio.move_on_at(self.trusted_until):
                await self.lost.wait()


async def open_session(etcd: Etcd, ttl_s: int) -> Session:
    """Grant a lease, retrying while etcd is unavailable."""
    sent_at = trio.current_time()
    lease, granted = await retrying(lambda: etcd.lease_grant(ttl_s), what="lease grant")
    log.info("session opened", extra={"lease": lease, "ttl_s": granted})
    return Session(lease=lease, ttl_s=granted, trusted_until=sent_at + granted - granted / 3)


async def run_keepalive(
    etcd: Etcd, session: Session, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Renew the lease every TTL/3 until it is lost; then raise :class:`LeaseLost`.
    Started at once: the lease was just granted, the first renewal is due in TTL/3."""
    interval = max(session.ttl_s / 3, 0.2)
    expires_at = session.trusted_until + session.margin_s
    task_status.started()
    while True:
        await trio.sleep(interval)
        sent_at = trio.current_time()
        try:
            with trio.fail_after(max(interval, 0.5)):
                ttl = await etcd.lease_keepalive(session.lease)
        except (EtcdUnavailable, trio.TooSlowError) as exc:
            if sent_at >= expires_at:
                session.lost.set()
                raise LeaseLost(f"lease {session.lease:x} not renewed within its TTL") from exc
            log.warning(
                "keep-alive failed",
                extra={"lease": session.lease, "error": str(exc) or "timed out"},
            )
            continue
        if ttl <= 0:
            session.lost.set()
            raise LeaseLost(f"lease {session.lease:x} has expired")
        session.renewed(sent_at, ttl)
        expires_at = sent_at + ttl


async def close_session(etcd: Etcd, session: Session, timeout_s: float = 2.0) -> bool:
    """Revoke the lease at once (its keys go with it); bounded and shielded. Answers
    whether etcd revoked it (or no longer knew it): False when etcd could not be reached,
    and the lease's keys then stay until it expires."""
    revoked = False
    with trio.move_on_after(timeout_s, shield=True):
        try:
            await etcd.lease_revoke(session.lease)
            log.info("session revoked", extra={"lease": session.lease})
            revoked = True
        except EtcdUnavailable as exc:
            log.warning(
                "could not revoke the session", extra={"lease": session.lease, "error": str(exc)}
            )
    session.lost.set()
    return revoked


@attrs.define(eq=False)
class RetentionLeases:
    """Leases that finished records are attached to, so that they expire on their own.

    A lease granted at t with TTL ``retention * 1.1`` is used until t + retention/10: a
    record lives between ``retention`` and ``1.1 * retention`` (longer if etcd restarts,
    which resets lease TTLs). ``retention_s`` of 0 keeps records for ever.
    """

    etcd: Etcd
    retention_s: float
    _lease: int = 0
    _until: float = -math.inf
    _lock: trio.Lock = attrs.Factory(trio.Lock)

    async def current(self) -> int:
        """The lease to attach a finished record to now (0: no expiry)."""
        if self.retention_s <= 0:
            return 0
        async with self._lock:
            now = trio.current_time()
            if now >= self._until:
                ttl = max(2, math.ceil(self.retention_s * 1.1))
                self._lease, _ = await self.etcd.lease_grant(ttl)
                self._until = now + max(self.retention_s / 10, 1.0)
            return self._lease

    def ready(self) -> int | None:
        """The lease :meth:`current` would answer now without a grant, else None (a
        caller that cannot wait then calls :meth:`current`)."""
        if self.retention_s <= 0:
            return 0
        if trio.current_time() < self._until:
            return self._lease
        return None

    def forget(self) -> None:
        """Grant a new lease next time (the current one may be gone)."""
        self._until = -math.inf
