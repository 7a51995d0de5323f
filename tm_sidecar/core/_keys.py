"""The key layout: every key string of the project is built and parsed here.

Under ``<root><namespace>/``::

    task/<id>                 the task: payload and options, written once
    pending/<id>              waiting for a worker
    delayed/<id>              waiting for its due time (a delay, or a retry's backoff)
    processing/<node>/<id>    assigned to <node>; its create revision names the attempt
    completed/<id>            the result (expires with the retention lease)
    failed/<id>               the last error (expires with the retention lease)
    nodes/<node>              a live sidecar, attached to its session lease
    election/<lease-hex>      a leadership candidate; the lowest create revision leads
    queues/<queue>            a queue's flow control: paused, concurrency and rate limits
    unique/<key>              the task that holds a unique key (see _unique.py)
    rates/<queue>[/<key>]     the leader's rate window of a queue (or of one of its keys)
    schedules/<name>          a cron or interval schedule and its next slot
    layout                    the layout version of the namespace (see _layout.py)

Every key the leader needs sorts between ``delayed/`` and ``task/`` (its watch's range).

A task is in exactly one of pending, delayed, processing, completed, failed.
"""

from __future__ import annotations

import enum
import re
from typing import NewType

import attrs

TaskId = NewType("TaskId", str)
NodeId = NewType("NodeId", str)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


def check_name(kind: str, name: str) -> str:
    """Return ``name`` if it is safe as one path segment of a key, else raise ValueError."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"invalid {kind} {name!r}: use 1-128 characters from A-Z a-z 0-9 _ . : -, "
            "starting with a letter or digit"
        )
    return name


class State(enum.Enum):
    """Where a task is. Each state is a key prefix."""

    PENDING = "pending"
    DELAYED = "delayed"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"


def _root_converter(root: str) -> str:
    return root if root.endswith("/") else root + "/"


@attrs.frozen
class Keyspace:
    """Builds and parses the keys of one namespace."""

    namespace: str = attrs.field(
        default="default", validator=lambda _i, _a, v: check_name("namespace", v)
    )
    root: str = attrs.field(default="/tm/", converter=_root_converter)

    @property
    def prefix(self) -> str:
        """Every key of the namespace starts with this."""
        return f"{self.root}{self.namespace}/"

    def task(self, task_id: str) -> str:
        """The task's payload and options."""
        return f"{self.prefix}task/{task_id}"

    def tasks(self) -> str:
        """Prefix of every task record."""
        return f"{self.prefix}task/"

    def state_prefix(self, state: State) -> str:
        """Prefix of one queue."""
        return f"{self.prefix}{state.value}/"

    def state(self, state: State, task_id: str, node: str | None = None) -> str:
        """The state key of a task (processing keys also name the node)."""
        if state is State.PROCESSING:
            if node is None:
                raise ValueError("a processing key names its node")
            return f"{self.prefix}processing/{node}/{task_id}"
        return f"{self.prefix}{state.value}/{task_id}"

    def assignments(self, node: str) -> str:
        """Prefix of one node's assignments."""
        return f"{self.prefix}processing/{node}/"

    def node(self, node: str) -> str:
        """A live node's registration."""
        return f"{self.prefix}nodes/{node}"

    def nodes(self) -> str:
        """Prefix of every node registration."""
        return f"{self.prefix}nodes/"

    def queue(self, queue: str) -> str:
        """A queue's flow-control settings."""
        return f"{self.prefix}queues/{queue}"

    def queues(self) -> str:
        """Prefix of every queue's settings."""
        return f"{self.prefix}queues/"

    def rate(self, queue: str, key: str | None = None) -> str:
        """A queue's rate window, or one concurrency key's."""
        return f"{self.prefix}rates/{queue}" + ("" if key is None else f"/{key}")

    def rates(self) -> str:
        """Prefix of every rate window."""
        return f"{self.prefix}rates/"

    def schedule(self, name: str) -> str:
        """A cron or interval schedule."""
        return f"{self.prefix}schedules/{name}"

    def schedules(self) -> str:
        """Prefix of every schedule."""
        return f"{self.prefix}schedules/"

    def embedded_mark(self) -> str:
        """Outside every namespace: the sidecar that started this etcd as its embedded one
        (host, pid, data directory), so that a sidecar connecting to it can tell."""
        return f"{self.root}.embedded"

    def unique(self, key: str) -> str:
        """The guard of a unique key: which task holds it."""
        return f"{self.prefix}unique/{key}"

    def uniques(self) -> str:
        """Prefix of every unique key's guard."""
        return f"{self.prefix}unique/"

    def election(self) -> str:
        """Prefix of the leadership candidates."""
        return f"{self.prefix}election/"

    def candidate(self, lease: int) -> str:
        """One candidate's key, named after its lease as in etcd's own recipe."""
        return f"{self.prefix}election/{lease:x}"

    def layout(self) -> str:
        """The namespace's layout version (absent in a namespace of an older release)."""
        return f"{self.prefix}layout"

    def parse(self, key: str) -> ParsedKey | None:
        """Say what a key of this namespace is, or None for a key we do not know."""
        if not key.startswith(self.prefix):
            return None
        parts = key[len(self.prefix) :].split("/")
        kind = parts[0]
        if kind == "task" and len(parts) == 2:
            return ParsedKey("task", TaskId(parts[1]))
        if kind == "processing" and len(parts) == 3:
            return ParsedKey("state", TaskId(parts[2]), State.PROCESSING, NodeId(parts[1]))
        if kind in {"pending", "delayed", "completed", "failed"} and len(parts) == 2:
            return ParsedKey("state", TaskId(parts[1]), State(kind))
        if kind == "nodes" and len(parts) == 2:
            return ParsedKey("node", node=NodeId(parts[1]))
        if kind == "election" and len(parts) == 2:
            return ParsedKey("election", name=parts[1])
        if kind == "queues" and len(parts) == 2:
            return ParsedKey("queue", name=parts[1])
        if kind == "rates" and len(parts) in (2, 3):
            return ParsedKey(
                "rate",
                name=parts[1],
                node=None,
                task_id=None,
                key=parts[2] if len(parts) == 3 else None,
            )
        if kind == "schedules" and len(parts) == 2:
            return ParsedKey("schedule", name=parts[1])
        if kind == "unique" and len(parts) == 2:
            return ParsedKey("unique", name=parts[1])
        return None


@attrs.frozen
class ParsedKey:
    """A key of the namespace, taken apart."""

    kind: str  # "task", "state", "node", "election" or "queue"
    task_id: TaskId | None = None
    state: State | None = None
    node: NodeId | None = None
    name: str | None = None
    key: str | None = None  # a rate window's concurrency key


def make_task_id(now_ms: int, counter: int, entropy: int) -> TaskId:
    """A unique id that sorts by creation time: ``<ms hex 12>-<counter hex 4><entropy hex 8>``."""
    return TaskId(f"{now_ms:012x}-{counter & 0xFFFF:04x}{entropy & 0xFFFFFFFF:08x}")
