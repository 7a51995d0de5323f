"""taskmanager: create tasks and run workers through the local tm-sidecar.

from taskmanager import TaskManager

manager = TaskManager()            # socket: argument, $TM_SOCKET, or the default
worker = await manager.process(handler, concurrency=4)
task = await manager.create({"TaskSpecificKey": "TaskSpecificValue"})
task.with_timeout(10).on("success", print)
await task.commit()
print(await task.result(timeout=30))
await manager.shutdown()

A worker process in one call (until SIGTERM or Ctrl-C, then a graceful shutdown):

run_worker(handler, concurrency=4)

The protocol itself (framing, version, event kinds, the errors and their wire codes) is
:mod:`taskmanager.protocol`, free of I/O: the sidecar's server uses it too.
"""

from ._callbacks import EVENTS, MANAGER_EVENTS
from ._client import DefaultTaskManager, TaskManager
from ._connection import default_socket
from ._outcomes import Permanent, Snooze
from ._run import run_worker
from ._sync import BlockingTask, BlockingTaskManager
from ._tasks import Task
from ._worker import Worker, WorkerTask
from .protocol import (
    Compacted,
    ConnectionLost,
    EtcdError,
    EtcdFull,
    EtcdUnavailable,
    InvalidRequest,
    LeaseLost,
    LeaseNotFound,
    NotLeader,
    PayloadTooLarge,
    PermissionDenied,
    ProtocolViolation,
    QueueFull,
    TaskFailed,
    TaskManagerError,
    TaskNotFound,
    Unavailable,
    WaitTimeout,
)

__all__ = [
    "EVENTS",
    "MANAGER_EVENTS",
    "BlockingTask",
    "BlockingTaskManager",
    "Compacted",
    "ConnectionLost",
    "DefaultTaskManager",
    "EtcdError",
    "EtcdFull",
    "EtcdUnavailable",
    "InvalidRequest",
    "LeaseLost",
    "LeaseNotFound",
    "NotLeader",
    "PayloadTooLarge",
    "Permanent",
    "PermissionDenied",
    "ProtocolViolation",
    "QueueFull",
    "Snooze",
    "Task",
    "TaskFailed",
    "TaskManager",
    "TaskManagerError",
    "TaskNotFound",
    "Unavailable",
    "WaitTimeout",
    "Worker",
    "WorkerTask",
    "default_socket",
    "run_worker",
]
