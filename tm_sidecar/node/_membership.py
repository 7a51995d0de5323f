"""This node in the cluster: its session epochs (a lease kept alive; a new one when it
is lost), its registration (rewritten whenever its capacity changes), the agent run
for each epoch, and its candidacy, leading when elected and standing again after each
term."""

from __future__ import annotations

import functools
import logging
import os
import random
import socket
import time
from collections.abc import Callable

import attrs
import trio

from .. import __version__
from .._errors import EtcdError, LeaseLost, LeaseNotFound, NotLeader, Unavailable
from ..core import Keyspace, LeaderPolicy, NodeInfo, Records
from ..etcd import Etcd, retrying
from ..etcd._feed import Feed
from ..etcd._session import RetentionLeases, Session, close_session, open_session, run_keepalive
from ..leader._election import resign, stand, wait_to_lead
from ..leader._leading import LeaderSettings, LeaderState, run_leader
from ._agent import run_agent
from ._agent_state import AgentState
from ._registry import Registry
from ._values import SidecarSettings

log = logging.getLogger("tm_sidecar")


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
    _node_dirty: trio.Event = attrs.Factory(trio.Event)
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
        first = True
        unrevoked: Session | None = None
        while True:
            session = await open_session(self.etcd, self.settings.lease_ttl_s)
            self.session = session
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
                    await self._register(session)
                    await epoch.start(self._run_registration, session)
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
                    await epoch.start(self._run_election, session)
                    if first:
                        first = False
                        task_status.started()
            except* LeaseLost as group:
                log.error(
                    "session lost: starting a new one",
                    extra={"lease": session.lease, "error": str(group.exceptions[0])},
                )
            finally:
                if not await close_session(self.etcd, session):
                    unrevoked = session

    async def _register(self, session: Session) -> None:
        info = NodeInfo(
            id=self.settings.node_id,
            session=session.lease,
            capacity=self.registry.capacity(),
            host=socket.gethostname(),
            pid=os.getpid(),
            version=__version__,
            started_at=self._started_at,
        )
        self._node_dirty = trio.Event()
        try:
            await retrying(
                lambda: self.etcd.put(
                    self.ks.node(self.settings.node_id), info.to_json(), lease=session.lease
                ),
                what="node registration",
            )
        except LeaseNotFound as exc:
            session.lost.set()
            raise LeaseLost(f"lease {session.lease:x} is gone") from exc

    async def _run_registration(
        self, session: Session, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Register the node again whenever its capacity changes."""
        task_status.started()
        while True:
            await self._node_dirty.wait()
            await self._register(session)

    async def _run_election(
        self, session: Session, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Stand for election, lead when elected, and stand again after each term;
        started once the candidate key is in place."""
        node_id = self.settings.node_id
        settings = LeaderSettings(
            policy=LeaderPolicy(
                grace_s=self.settings.grace_s, requeue_stalled=self.settings.requeue_stalled
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
