"""Admission: the namespace's counts, refreshed each second (tasks by state, live
nodes, queue settings, etcd's size and alarms), and the checks a new task must pass
(payload size, live tasks, etcd's quota)."""

from __future__ import annotations

import logging

import attrs
import trio

from .._errors import EtcdFull, PayloadTooLarge, QueueFull, Unavailable
from ..core import Keyspace, QueueConfig, Range, State, Txn
from ..etcd import Etcd
from ._queues import list_queues
from ._values import SidecarSettings

log = logging.getLogger("tm_sidecar")

_FULL = (
    "etcd's database is full (its NOSPACE alarm is raised): new tasks are refused until an "
    "operator frees space with `tmctl recover`; the tasks already accepted wait, nothing is lost"
)


@attrs.define(eq=False)
class Admission:
    """What a create is checked against, and the counts the metrics and status show."""

    etcd: Etcd
    ks: Keyspace
    settings: SidecarSettings
    #: Tasks by state (``State.value``), as last counted.
    depths: dict[str, int] = attrs.Factory(dict)
    #: Live sidecars registered in the namespace, as last counted.
    node_count: int = 0
    #: Every queue's settings, as last read (for metrics and status).
    queue_configs: dict[str, QueueConfig] = attrs.Factory(dict)
    #: etcd's space in use, as last read.
    db_size: int = 0
    #: Whether etcd's NOSPACE alarm is raised.
    nospace: bool = False
    #: The version etcd's status answered, as last read ("" before the first read).
    etcd_version: str = ""
    _live_tasks: int = 0
    _created: int = 0
    _written: int = 0  # bytes created since db_size was read

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the counts fresh; started once they have been read (or tried) the first
        time."""
        starting = True
        while True:
            await self.refresh()
            if starting:
                starting = False
                task_status.started()
            await trio.sleep(1.0)

    async def refresh(self) -> None:
        """Read the counts once (a failure to read leaves the last ones)."""
        created_before = self._created
        try:
            for s in State:
                r = Range(self.ks.state_prefix(s), prefix=True, count_only=True)
                self.depths[s.value] = (await self.etcd.range(r)).count
            nodes = Range(self.ks.nodes(), prefix=True, count_only=True)
            self.node_count = (await self.etcd.range(nodes)).count
            self.queue_configs = await list_queues(self.etcd, self.ks)
            # Creates that raced the count may be missing from it: count them again
            # (an over-count only makes the limit stricter for a second).
            self._live_tasks = sum(
                self.depths[s.value] for s in (State.PENDING, State.DELAYED, State.PROCESSING)
            ) + (self._created - created_before)
            written_before = self._written
            status = await self.etcd.status()
            # The space in use (freed pages are reused), not the file's size, which
            # shrinks only when an operator defragments.
            self.db_size = int(status.get("dbSizeInUse") or status.get("dbSize") or 0)
            self._written -= written_before
            self.nospace = any("NOSPACE" in str(e) for e in status.get("errors") or ())
            self.etcd_version = str(status.get("version") or "")
        except Unavailable as exc:
            log.debug("limit refresh failed", extra={"error": str(exc)})

    def admit(self, payload_bytes: int) -> None:
        """Raise if a new task with a payload of ``payload_bytes`` may not be created:
        :class:`PayloadTooLarge`, :class:`QueueFull` (too many live tasks, or too little
        room left for the tasks already accepted), :class:`EtcdFull`."""
        settings = self.settings
        if payload_bytes > settings.max_payload_bytes:
            raise PayloadTooLarge(
                f"payload of {payload_bytes} bytes is over the limit of "
                f"{settings.max_payload_bytes} bytes (max_payload_bytes)"
            )
        if self._live_tasks >= settings.max_live_tasks:
            raise QueueFull(
                f"namespace {settings.namespace!r} holds {self._live_tasks} live tasks, "
                f"the limit is {settings.max_live_tasks} (max_live_tasks)"
            )
        if self.nospace:
            raise EtcdFull(_FULL)
        used = self.db_size + self._written
        allowed = settings.quota_bytes * settings.quota_fraction
        if used >= allowed:
            raise QueueFull(
                f"etcd's database holds about {used} bytes of its {settings.quota_bytes}-"
                f"byte quota; new tasks may fill {settings.quota_fraction:.0%} of it "
                "(quota_fraction), the rest is kept for the tasks already accepted: "
                "free space with `tmctl recover`, or raise etcd's quota (etcd_quota)"
            )

    def full(self) -> EtcdFull:
        """etcd refused a create for want of space: refuse the next ones at once, and
        the error to raise for this one."""
        self.nospace = True
        return EtcdFull(_FULL)

    def wrote(self, txn: Txn) -> None:
        """Count the bytes a create sent, until the next read of etcd's size."""
        self._written += sum(len(op.key) + len(getattr(op, "value", "")) for op in txn.success)

    def created(self) -> None:
        """Count a task created here as live, until the next count."""
        self._live_tasks += 1
        self._created += 1
