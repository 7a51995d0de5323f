"""Reads of one namespace straight from etcd (counts, the leader, nodes, queue depths,
one task wherever it is), for ``tmctl`` and the dashboard."""

from __future__ import annotations

import json
from collections.abc import Sequence

from ..core import (
    Keyspace,
    KeyValue,
    NodeInfo,
    QueueConfig,
    Range,
    Record,
    State,
    TaskId,
    TaskSpec,
)
from ..etcd import Etcd, read_task_keys

#: The states a queue's depth counts.
QUEUE_STATES = ("pending", "delayed", "processing")


class Queries:
    """Reads of one namespace over one etcd connection."""

    def __init__(self, etcd: Etcd, ks: Keyspace) -> None:
        self.etcd, self.ks = etcd, ks

    async def count(self, state: State) -> int:
        return (
            await self.etcd.range(Range(self.ks.state_prefix(state), prefix=True, count_only=True))
        ).count

    async def leader(self) -> str | None:
        kvs, _ = await self.etcd.list_prefix(self.ks.election())
        if not kvs:
            return None
        return str(json.loads(min(kvs, key=lambda kv: kv.create_revision).value).get("node"))

    async def nodes(self) -> list[NodeInfo]:
        nodes_kv, _ = await self.etcd.list_prefix(self.ks.nodes())
        return [NodeInfo.from_json(kv.value) for kv in nodes_kv]

    async def queue_depths(self, procs: Sequence[KeyValue]) -> dict[str, dict[str, int]]:
        """Unfinished tasks per queue and state (finished ones are only counted)."""
        queues: dict[str, dict[str, int]] = {}
        listed = {State.PROCESSING: procs}
        for state in (State.PENDING, State.DELAYED):
            listed[state], _ = await self.etcd.list_prefix(self.ks.state_prefix(state))
        for state, kvs in listed.items():
            for kv in kvs:
                queue = Record.from_json(state, kv.value).options.queue
                row = queues.setdefault(queue, dict.fromkeys(QUEUE_STATES, 0))
                row[state.value] += 1
        return dict(sorted(queues.items()))

    async def queue_configs(self) -> dict[str, QueueConfig]:
        """Every queue that has settings (paused, limits), by name."""
        kvs, _ = await self.etcd.list_prefix(self.ks.queues())
        configs = {}
        for kv in kvs:
            parsed = self.ks.parse(kv.key)
            if parsed is not None and parsed.name:
                configs[parsed.name] = QueueConfig.from_json(kv.value)
        return configs

    async def paused_queues(self) -> set[str]:
        """The queues paused now."""
        return {name for name, config in (await self.queue_configs()).items() if config.paused}

    async def find(self, task_id: str) -> tuple[TaskSpec | None, State | None, KeyValue | None]:
        """The task's spec (None once its payload is gone), its state and its state key
        (None, None for none), as of one revision: ``etcd.read_task_keys``, as the sidecar
        reads a task."""
        keys = await read_task_keys(self.etcd, self.ks, TaskId(task_id))
        spec = TaskSpec.from_json(keys.payload.value) if keys.payload else None
        for kv in keys.states:
            parsed = self.ks.parse(kv.key)
            if parsed is not None and parsed.state is not None:
                return spec, parsed.state, kv
        return spec, None, None
