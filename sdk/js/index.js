// tm-sidecar-sdk: create tasks and run workers through the local tm-sidecar, over the
// socket protocol of docs/protocol.md. No dependencies beyond Node's standard library.

export {
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
  Permanent,
  PermissionDenied,
  ProtocolViolation,
  QueueFull,
  Snooze,
  TaskFailed,
  TaskManagerError,
  TaskNotFound,
  Unavailable,
  WaitTimeout,
} from "./lib/errors.js";
export { MalformedFrame } from "./lib/framing.js";
export { PROTOCOL_VERSION } from "./lib/connection.js";
export { DefaultTaskManager, MAX_CREATE_MANY, TaskManager, defaultSocket } from "./lib/manager.js";
export { runWorker } from "./lib/run.js";
export { EVENTS, MANAGER_EVENTS, Task } from "./lib/task.js";
export { TaskCancelled, Worker, WorkerTask } from "./lib/worker.js";
