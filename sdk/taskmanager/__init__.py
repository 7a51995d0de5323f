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
"""

from ._client import (
    EVENTS,
    MANAGER_EVENTS,
    DefaultTaskManager,
    Task,
    TaskManager,
    Worker,
    WorkerTask,
    default_socket,
)
from ._errors import (
    ConnectionLost,
    EtcdError,
    EtcdFull,
    EtcdUnavailable,
    InvalidRequest,
    LeaseLost,
    NotLeader,
    PayloadTooLarge,
    Permanent,
    ProtocolViolation,
    QueueFull,
    Snooze,
    TaskFailed,
    TaskManagerError,
    TaskNotFound,
    Unavailable,
)
from ._run import run_worker
from ._sync import BlockingTask, BlockingTaskManager

__all__ = [
    "EVENTS",
    "MANAGER_EVENTS",
    "BlockingTask",
    "BlockingTaskManager",
    "ConnectionLost",
    "DefaultTaskManager",
    "EtcdError",
    "EtcdFull",
    "EtcdUnavailable",
    "InvalidRequest",
    "LeaseLost",
    "NotLeader",
    "PayloadTooLarge",
    "Permanent",
    "ProtocolViolation",
    "QueueFull",
    "Snooze",
    "Task",
    "TaskFailed",
    "TaskManager",
    "TaskManagerError",
    "TaskNotFound",
    "Unavailable",
    "Worker",
    "WorkerTask",
    "default_socket",
    "run_worker",
]
