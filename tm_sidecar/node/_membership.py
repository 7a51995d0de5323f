"""This node in the cluster: its session epochs (a lease kept alive; a new one when it
is lost), its registration (rewritten whenever its capacity changes), the agent run
for each epoch, and its candidacy, leading when elected and standing again after each
term.

Size: the session's epochs, the node's registration (now a claim, with its
takeover rules), the election and the terms, which all turn on one session.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import socket
import time
from collections.abc import Callable
from contextlib import aclosing

import attrs
import trio

from .. import __version__
from .._errors import EtcdError, LeaseLost, LeaseNotFound, NotLeader, Unavailable
from ..core import Compare, Keyspace, LeaderPolicy, NodeInfo, Put, Range, Records, Txn
from ..etcd import Changes, Etcd, KeyValue, Reset, retrying
from ..etcd._feed import Feed
from ..etcd._session import RetentionLeases, Session, close_session, open_session, run_keepalive
from ..leader import namespace_layout
from ..leader._election import resign, stand, wait_to_lead
from ..leader._leading import LeaderSettings, LeaderState, run_leader
from ._agent import run_agent
from ._agent_state import AgentState
from ._registry import Registry
from ._values import SidecarSettings

log = logging.getLogger("tm_sidecar")


class NodeIdTaken(Exception):
    """Another live sidecar holds this node id: this one must not start."""

    def __init__(self, node_id: str, holder: NodeInfo) -> None:
        super().__init__(
            f"node id {node_id!r} is held by a live sidecar on host {holder.host or '?'} "
            f"(pid {holder.pid or '?'}, started {_utc(holder.started_at)}): give each "
            f"sidecar its own --node-id, or stop that one first"
        )
        self.node_id = node_id
        self.holder = holder


@attrs.define(eq=False, kw_only=True)
class Membership:
    """Runs the session epochs; says whether this node leads, and when that changes."""

    etcd: Etcd
    settings: SidecarSettings
    registry: Registry
    retention: RetentionLeases
    #: The sidecar's one watch, and the parser of what it carries (shared by the
    #: agent, the leader and the hub).
    feed: Feed
    records: Records
    agent: AgentState
    leader: LeaderState
    clock: Callable[[], float] = time.time
    rng: random.Random = attrs.Factory(random.Random)
    #: The session of the current epoch.
    session: Session | None = None
    is_leader: bool = False
    #: Set (and replaced) whenever ``is_leader`` changes.
    role_changed: trio.Event = attrs.Factory(trio.Event)
    #: Another sidecar's registration under this node id, while it holds it (this one
    #: then gets no new work): logged, and shown in ``Sidecar.status()``.
    taken_by: NodeInfo | None = None
    _node_dirty: trio.Event = attrs.Factory(trio.Event)
    # The carried sessions the last registration named.
    _carries_registered: tuple[int, ...] = ()
    _started_at: float = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._started_at = self.clock()

    @property
    def ks(self) -> Keyspace:
        """The key layout of the namespace."""
        return self.settings.keyspace

    def capacity_changed(self) -> None:
        """Register the node again (its capacity, or whether it takes tasks, changed)."""
        self._node_dirty.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run session epochs until cancelled; started once the first is registered and
        its agent and candidacy are in place. In each epoch, in dependency order: the
        keep-alive, the registration, the agent (once it holds its assignments) and the
        election (once its candidate key is in place)."""
        # A namespace of a newer layout than this release knows: refused before this
        # node registers, takes work or stands (LayoutRefused ends the sidecar).
        await namespace_layout(self.etcd, self.ks)
        first = True
        unrevoked: Session | None = None
        lost = False
        while True:
            session = await open_session(self.etcd, self.settings.lease_ttl_s)
            self.session = session
            # After a session lost while etcd was away, every node's registration may have
            # gone with etcd's leases: as leader, give live nodes a while to register again
            # (with the outcomes they carry) before reaping their tasks.
            hold_until = self.clock() + self.settings.lease_ttl_s + 1.0 if lost else 0.0
            lost = False
            if unrevoked is not None:
                # The last session ended while etcd was away, so its revoke failed. etcd
                # renews every lease when it elects a leader, so that lease (and with it
                # this node's old candidate key, which every campaign waits behind) would
                # outlive the outage by a whole TTL: revoke it now that etcd answers.
                await close_session(self.etcd, unrevoked)
                unrevoked = None
            try:
                async with trio.open_nursery() as epoch:
                    await epoch.start(run_keepalive, self.etcd, session)
                    await self._claim(session)
                    await epoch.start(self._run_registration, session)
                    epoch.start_soon(self._follow_carried)
                    await epoch.start(
                        functools.partial(
                            run_agent,
                            self.etcd,
                            self.ks,
                            self.settings.node_id,
                            session,
                            self.registry,
                            self.retention,
                            self.agent,
                            one_watch=self.feed,
                            records=self.records,
                        )
                    )
                    await epoch.start(self._run_election, session, hold_until)
                    if first:
                        first = False
                        task_status.started()
            except* LeaseLost as group:
                lost = True
                log.error(
                    "session lost: starting a new one",
                    extra={"lease": session.lease, "error": str(group.exceptions[0])},
                )
            finally:
                if not await close_session(self.etcd, session):
                    unrevoked = session

    def _info(self, session: Session) -> NodeInfo:
        self._carries_registered = self.agent.carried_sessions()
        return NodeInfo(
            id=self.settings.node_id,
            session=session.lease,
            capacity=self.registry.capacity(),
            host=socket.gethostname(),
            pid=os.getpid(),
            version=__version__,
            started_at=self._started_at,
            carries=self._carries_registered,
        )

    async def _txn(self, session: Session, txn: Txn) -> tuple[bool, KeyValue | None]:
        """Run a registration transaction: whether it succeeded, and the registration it
        read on failure (None: there is none)."""
        try:
            result = await retrying(lambda: self.etcd.txn(txn), what="node registration")
        except LeaseNotFound as exc:
            session.lost.set()
            raise LeaseLost(f"lease {session.lease:x} is gone") from exc
        kvs = result.ranges[0].kvs if result.ranges else ()
        return result.succeeded, kvs[0] if kvs else None

    async def _claim(self, session: Session) -> None:
        """Register this node under its id, which must be free: absent, this process's
        own (an earlier session's), or a sidecar's on this host that is no longer
        running. Another holder must lose its lease within a TTL (it was not live);
        if it keeps it, raises :class:`NodeIdTaken`."""
        key = self.ks.node(self.settings.node_id)
        waited_since: float | None = None
        while True:
            self._node_dirty = trio.Event()
            info = self._info(session)
            put = Put(key, info.to_json(), session.lease)
            done, kv = await self._txn(
                session, Txn(compare=(Compare.absent(key),), success=(put,), failure=(Range(key),))
            )
            if done:
                return
            if kv is None:
                continue  # it went meanwhile
            try:
                holder = NodeInfo.from_json(kv.value)
            except (ValueError, KeyError, TypeError):
                holder = NodeInfo(id=self.settings.node_id, session=kv.lease)
            if holder.session == session.lease or self._gone_or_mine(holder):
                # Ours, or a dead process's: take it over, unless it changed meanwhile.
                txn = Txn(compare=(Compare.modified_at(key, kv.mod_revision),), success=(put,))
                if (await self._txn(session, txn))[0]:
                    if holder.session != session.lease and holder.pid != os.getpid():
                        log.info(
                            "node id taken over from a sidecar that is no longer running",
                            extra={"node": self.settings.node_id, "pid": holder.pid},
                        )
                    return
                continue
            now = trio.current_time()
            if waited_since is None:
                waited_since = now
                log.warning(
                    "node id held by another sidecar: waiting for its lease to lapse",
                    extra={
                        "node": self.settings.node_id,
                        "host": holder.host,
                        "pid": holder.pid,
                        "wait_s": self.settings.lease_ttl_s + 1,
                    },
                )
            elif now - waited_since > self.settings.lease_ttl_s + 1:
                # Its lease was renewed past a whole TTL: that sidecar is alive.
                raise NodeIdTaken(self.settings.node_id, holder)
            await trio.sleep(0.2)

    def _gone_or_mine(self, holder: NodeInfo) -> bool:
        """Whether a registration is this process's own (an earlier session of this
        sidecar), or that of a process on this host that no longer runs."""
        if holder.host != socket.gethostname() or holder.pid <= 0:
            return False
        if holder.pid == os.getpid():
            return holder.started_at == self._started_at
        try:
            os.kill(holder.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False  # alive, under another user
        return False

    async def _register(self, session: Session) -> None:
        """Register again (capacity or carried sessions changed), if the registration is
        still this session's; if it is gone, claim it again; if another sidecar took it,
        leave it and say so (see :meth:`_watch_registration`)."""
        key = self.ks.node(self.settings.node_id)
        self._node_dirty = trio.Event()
        put = Put(key, self._info(session).to_json(), session.lease)
        txn = Txn(
            compare=(Compare.leased(key, session.lease),), success=(put,), failure=(Range(key),)
        )
        done, kv = await self._txn(session, txn)
        if not done and kv is None:
            await self._claim(session)

    async def _run_registration(
        self, session: Session, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Register the node again whenever its capacity (or what it carries) changes,
        and watch that the registration stays this session's."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self._watch_registration, session)
            task_status.started()
            while True:
                await self._node_dirty.wait()
                await self._register(session)

    async def _watch_registration(
        self, session: Session, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Follow this node's registration: if another sidecar with the same node id
        takes it, this one gets no new work; say so (once per taker), and register
        again once it is gone."""
        key = self.ks.node(self.settings.node_id)
        started = False
        stream = self.feed.informer(key, range_end=key + "\x00")
        async with aclosing(stream) as items:
            async for item in items:
                if isinstance(item, Reset):
                    current = item.kvs[0] if item.kvs else None
                elif isinstance(item, Changes) and item.events:
                    last = item.events[-1]
                    current = last.kv if last.kind == "PUT" else None
                else:
                    continue
                if not started:
                    started = True
                    task_status.started()
                self._registration_seen(session, current)

    def _registration_seen(self, session: Session, kv: KeyValue | None) -> None:
        if kv is None:
            if self.taken_by is not None:
                log.warning(
                    "the other sidecar with this node id is gone: registering again",
                    extra={"node": self.settings.node_id},
                )
            self.taken_by = None
            if not session.lost.is_set():
                self._node_dirty.set()
            return
        try:
            info = NodeInfo.from_json(kv.value)
        except (ValueError, KeyError, TypeError):
            info = NodeInfo(id=self.settings.node_id, session=kv.lease)
        if info.session == session.lease:
            self.taken_by = None
            return
        if self.taken_by is None or self.taken_by.session != info.session:
            log.error(
                "registration taken by another sidecar with the same node id: this one "
                "gets no new work while it holds it; give each sidecar its own --node-id",
                extra={"node": self.settings.node_id, "host": info.host, "pid": info.pid},
            )
        self.taken_by = info

    async def _follow_carried(self) -> None:
        """Register again whenever the outcomes this node carries change (the leader
        leaves their assignments alone only while the registration names them)."""
        while True:
            changed = self.agent.carried_changed
            if self.agent.carried_sessions() != self._carries_registered:
                self._node_dirty.set()
            await changed.wait()

    async def _run_election(
        self,
        session: Session,
        hold_until: float = 0.0,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Stand for election, lead when elected, and stand again after each term;
        started once the candidate key is in place. ``hold_until``: see
        ``LeaderPolicy.hold_lost_until``."""
        node_id = self.settings.node_id
        settings = LeaderSettings(
            policy=LeaderPolicy(
                grace_s=self.settings.grace_s,
                requeue_stalled=self.settings.requeue_stalled,
                hold_lost_until=hold_until,
            ),
            compact_interval_s=self.settings.compact_interval_s,
            compact=self.settings.compact,
        )
        candidacy = await stand(self.etcd, self.ks, session, node_id)
        task_status.started()
        while True:
            fence = await wait_to_lead(self.etcd, self.ks, candidacy)
            if not session.trusted():
                await trio.sleep(0.1)
                candidacy = await stand(self.etcd, self.ks, session, node_id)
                continue
            self._set_role(True)
            log.info("became leader", extra={"node": node_id})
            try:
                async with trio.open_nursery() as term:
                    await term.start(
                        functools.partial(
                            run_leader,
                            self.etcd,
                            self.ks,
                            fence,
                            session,
                            self.retention,
                            settings,
                            self.leader,
                            clock=self.clock,
                            rng=self.rng,
                            one_watch=self.feed,
                            records=self.records,
                        )
                    )
                    log.info("leading: the view is listed", extra={"node": node_id})
            except* NotLeader as group:
                log.warning("stepped down", extra={"node": node_id, "error": str(_first(group))})
            except* (EtcdError, Unavailable, ValueError, KeyError) as group:
                # A refusal by etcd or a bad record: step down rather than take the node
                # with us; another candidate (or we, later) will lead.
                first = _first(group)
                log.error(
                    "leader failed, stepping down",
                    extra={
                        "node": node_id,
                        "error": str(first),
                        "error_type": type(first).__name__,
                    },
                )
                await trio.sleep(1.0)
            finally:
                self._set_role(False)
                await resign(self.etcd, fence)
            if session.lost.is_set():
                raise LeaseLost("lease lost while leading")
            await session_trusted(session)
            candidacy = await stand(self.etcd, self.ks, session, node_id)

    def _set_role(self, leader: bool) -> None:
        if leader != self.is_leader:
            self.is_leader = leader
            self.leader.hooks.on_role(leader)
            self.role_changed.set()
            self.role_changed = trio.Event()


def _utc(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at)) if at else "?"


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first exception in a (nested) group: what a log line should tell."""
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first


async def session_trusted(session: Session) -> None:
    """Wait until the session is trusted again (a keep-alive got through)."""
    while not session.trusted():
        if session.lost.is_set():
            raise LeaseLost("lease lost")
        await trio.sleep(0.1)
