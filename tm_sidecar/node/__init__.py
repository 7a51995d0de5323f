"""What every sidecar runs on its host, one job per module.

The sidecar: ``_sidecar`` builds the services, starts them in dependency order and
offers the in-process API that the socket server and the dashboard wrap, handing each
call to the module that owns it: ``_creates`` (a new task's checks and commit, unique
keys), ``_reads`` (one task at one revision, waits, cancels), ``_queues`` (queue and
schedule settings, shared with tmctl), ``_admission`` (the counts refreshed each second
and the checks a create passes), ``_membership`` (session epochs, registration, the
election and terms as leader); ``_values`` holds the values the API speaks.

The agent: ``_agent`` follows this node's assignments and starts an attempt for each;
``_attempt`` runs one on its handler and reports its outcome (the outcome itself is the
core's ``attempt_outcome``); ``_remote`` drives the attempts of SDK workers taking
batches from one task, none each; ``_handlers`` is what a handler sees and may raise;
``_registry`` keeps the local handlers; ``_agent_state`` what the agent remembers.

``_hub`` turns the feed's changes into task events for subscribers.

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
    NewTask,
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
    "NewTask",
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
