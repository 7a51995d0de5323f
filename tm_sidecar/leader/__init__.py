"""Leading the queue: the election and the leader's duties.

``_election`` is etcd's election recipe (stand, wait for the predecessor, resign); the
turn itself is the core's (``core.predecessor``). ``_leading`` runs what a leader does
while its fence holds: it keeps a view of the queue from the sidecar's feed, asks the
core what to do, commits fenced batches and reads their answers with
``core.interpret_batch``, and sweeps what has expired.

May import: core, etcd.
"""

from ._election import campaign, current_leader, resign, stand, wait_to_lead
from ._layout import namespace_layout, stamp_layout
from ._leading import LeaderSettings, LeaderState, run_leader
from ._sweeps import sweep_payloads

__all__ = [
    "LeaderSettings",
    "LeaderState",
    "campaign",
    "current_leader",
    "namespace_layout",
    "resign",
    "run_leader",
    "stamp_layout",
    "stand",
    "sweep_payloads",
    "wait_to_lead",
]
