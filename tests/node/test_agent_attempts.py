"""An attempt starts at most once on a node, whatever the watch delivers (DESIGN.md 3.11).

The watch a node agent reads may deliver an attempt's key again after the attempt has
finished here: its own ``started_at`` or progress rewrite arriving late, a resumed
watch repeating events, a re-list. These tests feed the agent a real etcd's watch in
which every item comes twice, the second time only once the attempt it started is over.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncGenerator
from typing import Any

import attrs
import trio

from tests.helpers import wait_for
from tm_sidecar import EtcdConfig, Sidecar, SidecarSettings, TaskContext
from tm_sidecar.core import AttemptLedger, NodeId, TaskId
from tm_sidecar.etcd import Changes, Reset, connect
from tm_sidecar.etcd._feed import Feed
from tm_sidecar.ops._embedded import EtcdProcess


def test_the_ledger_starts_each_attempt_once_running_or_over() -> None:
    ledger = AttemptLedger()
    a, b = TaskId("a"), TaskId("b")
    assert ledger.begin(a, 10)
    assert ledger.begin(b, 10)  # one leader transaction assigns many tasks at one revision
    assert ledger.running(a, 10)
    assert not ledger.begin(a, 10)  # a rewrite of it while it runs
    ledger.end(a, 10)
    assert not ledger.running(a, 10)
    assert ledger.running(b, 10)
    assert not ledger.begin(a, 10)  # a late or repeated delivery after it finished
    assert ledger.begin(a, 12)  # the task's next attempt is a new incarnation of its key


def test_the_ledger_forgets_the_oldest_behind_a_floor_between_deliveries() -> None:
    ledger = AttemptLedger(max_remembered=2)
    for rev in (5, 7, 9):
        assert ledger.begin(TaskId(f"t{rev}"), rev)
    # Within a delivery nothing is forgotten: another attempt of revision 9 may follow.
    assert ledger.begin(TaskId("u9"), 9)
    ledger.settle()
    # 5 and 7 were forgotten: the floor keeps them (and anything older) from starting again.
    assert not ledger.begin(TaskId("t5"), 5)
    assert not ledger.begin(TaskId("t3"), 3)
    assert not ledger.begin(TaskId("t9"), 9)
    assert ledger.begin(TaskId("t11"), 11)


@attrs.define(eq=False)
class RepeatingFeed(Feed):
    """The sidecar's real one watch, whose assignment tap delivers every item twice: the
    repeat only once the agent is idle, i.e. after the attempt the item started has ended."""

    sidecar: Sidecar | None = None
    assignments: str = ""
    #: Repeats waiting to be delivered or not yet taken in by the agent.
    unsettled: int = 0
    #: Items delivered twice.
    repeats: int = 0

    async def informer(self, prefix: str, **kwargs: Any) -> AsyncGenerator[Reset | Changes, None]:
        inner = super().informer(prefix, **kwargs)
        try:
            async for item in inner:
                yield item
                if prefix != self.assignments or self.sidecar is None:
                    continue
                self.unsettled += 1
                with trio.move_on_after(5):
                    await self.sidecar.agent.idle.wait()
                self.repeats += 1
                yield item
                # The agent asks for the next item only once it has taken this one in.
                self.unsettled -= 1
        finally:
            await inner.aclose()


async def test_a_repeated_or_late_delivery_never_starts_an_attempt_again(
    etcd_server: EtcdProcess, namespace: str
) -> None:
    # The repetition is the test's own, whatever the transport: the gRPC client here.
    cfg = EtcdConfig(endpoints=(etcd_server.endpoint,), timeout_s=3.0, transport="grpc")
    etcd = connect(cfg)
    sidecar = Sidecar(
        etcd,
        SidecarSettings(node_id=NodeId("n1"), namespace=namespace, lease_ttl_s=2, grace_s=1.0),
    )
    feed = RepeatingFeed(etcd, sidecar.ks, assignments=sidecar.ks.assignments("n1"))
    feed.sidecar = sidecar
    # The sidecar, its hub and its session epochs (which start the agent) share one feed.
    sidecar.feed = sidecar.hub.feed = sidecar.membership.feed = feed
    starts: Counter[tuple[str, int]] = Counter()

    async def handler(task: TaskContext) -> Any:
        starts[(task.id, task.attempt)] += 1
        await task.update({"step": 1})  # a rewrite of the attempt's key, watched later
        return task.payload

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(sidecar.run)
            await wait_for(lambda: sidecar.is_leader)
            sidecar.register(handler, concurrency=4)
            specs = [await sidecar.create({"n": i}) for i in range(12)]
            for i, spec in enumerate(specs):
                info = await sidecar.wait(spec.id, timeout_s=20)
                assert info.record is not None
                assert info.record.result == {"n": i}
            # Every repeat delivered and taken in, and nothing started by them.
            await wait_for(lambda: feed.unsettled == 0 and not sidecar.agent.running)
            nursery.cancel_scope.cancel()
    finally:
        await etcd.aclose()
    assert feed.repeats > 0  # the agent did read the repeating tap
    assert sum(starts.values()) == len(specs)
    assert all(n == 1 for n in starts.values()), starts
