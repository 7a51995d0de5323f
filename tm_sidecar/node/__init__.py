"""What every sidecar runs on its host.

``_agent`` runs this node's assignments on local handlers and reports their outcomes
(the outcome itself is the core's ``attempt_outcome``); ``_hub`` turns the feed's changes
into task events for subscribers; ``_sidecar`` holds the session, registers the node,
starts each service in dependency order, stands for election and leads when elected, and
offers the in-process API that the socket server and the dashboard wrap.

May import: core, etcd, leader.
"""

from ._agent import (
    AgentState,
    HandedBack,
    Handler,
    HandlerFailed,
    Permanent,
    Registration,
    Registry,
    Snooze,
    TaskContext,
    run_agent,
)
from ._hub import EventHub, Subscription
from ._sidecar import (
    FINAL_STATES,
    Created,
    Sidecar,
    SidecarSettings,
    TaskInfo,
    is_final,
    pausing,
    update_queue,
    update_schedule,
)

__all__ = [
    "FINAL_STATES",
    "AgentState",
    "Created",
    "EventHub",
    "HandedBack",
    "Handler",
    "HandlerFailed",
    "Permanent",
    "Registration",
    "Registry",
    "Sidecar",
    "SidecarSettings",
    "Snooze",
    "Subscription",
    "TaskContext",
    "TaskInfo",
    "is_final",
    "pausing",
    "run_agent",
    "update_queue",
    "update_schedule",
]
