"""taskmanager: create tasks and run workers through the local tm-sidecar.

from taskmanager import TaskManager

manager = TaskManager()            # socket: argument, $TM_SOCKET, or the default
worker = await manager.process(handler, concurrency=4)
task = await manager.create({"TaskSpecificKey": "TaskSpecificValue"})
task.with_timeout(10).on("success", print)
await task.commit()
print(await task.result(timeout=30))
await manager.shutdown()
"""

from ._client import (
    EVENTS,
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
from ._sync import BlockingTask, BlockingTaskManager

__all__ = [
    "EVENTS",
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
]
