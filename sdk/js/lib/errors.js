// The errors the sidecar reports, by their wire code (docs/protocol.md, "Error codes"),
// and the SDK's own: the same names, bases, codes and retryability as the Python ones
// (taskmanager.protocol); tests/server/test_protocol_module.py checks that they agree.

/** The root of every error the SDK raises. */
export class TaskManagerError extends Error {
  static code = "internal";
  static retryable = false;

  constructor(message, options) {
    super(message, options);
    this.name = new.target.name;
    this.code = new.target.code;
    this.retryable = new.target.retryable;
  }
}

/** The request cannot be done as asked. */
export class InvalidRequest extends TaskManagerError {
  static code = "invalid_request";
}

/** No task has this id (or its record has expired). */
export class TaskNotFound extends InvalidRequest {
  static code = "task_not_found";
}

/** The payload (or a frame) is over the sidecar's limit. */
export class PayloadTooLarge extends InvalidRequest {
  static code = "payload_too_large";
}

/** The namespace is at its configured limit, or etcd near its quota: try later. */
export class QueueFull extends TaskManagerError {
  static code = "queue_full";
  static retryable = true;
}

/** A passing failure: try again later. */
export class Unavailable extends TaskManagerError {
  static code = "unavailable";
  static retryable = true;
}

/** The sidecar cannot reach etcd. */
export class EtcdUnavailable extends Unavailable {
  static code = "etcd_unavailable";
}

/** etcd's database is at its quota: no task can be created until an operator frees space. */
export class EtcdFull extends Unavailable {
  static code = "etcd_full";
}

/** The operation needs the leader. */
export class NotLeader extends Unavailable {
  static code = "not_leader";
}

/** The sidecar lost its session; retry once it recovers. */
export class LeaseLost extends TaskManagerError {
  static code = "lease_lost";
}

/** A frame broke the protocol (ours, as the sidecar said, or the sidecar's). */
export class ProtocolViolation extends TaskManagerError {
  static code = "protocol_violation";
}

/**
 * This client may not use the sidecar: its uid is not in `--allow-uid`, or the system
 * refused it the socket (EACCES: the socket's mode and group, or a directory on its
 * path). Trying again is refused again until an operator changes that.
 */
export class PermissionDenied extends TaskManagerError {
  static code = "permission_denied";
}

/** etcd refused a request. */
export class EtcdError extends TaskManagerError {
  static code = "etcd_error";
}

/** The lease named in a request does not exist (it expired or was revoked). */
export class LeaseNotFound extends EtcdError {
  static code = "lease_not_found";
}

/** The revision asked for has been compacted away. */
export class Compacted extends EtcdError {
  static code = "compacted";
}

/** The connection to the sidecar closed while a request was in flight, or none could be made. */
export class ConnectionLost extends Unavailable {
  static code = "connection_lost";
}

/**
 * A wait for a task's outcome (`task.result(timeoutMs)`, `manager.wait()`,
 * `manager.result()`) ran out of time; the task goes on. An `Unavailable`, as the
 * protocol's `wait` answers when it times out.
 */
export class WaitTimeout extends Unavailable {
  static code = "wait_timeout";
}

/** The task ended in the failed queue; `error` is what its last attempt reported. */
export class TaskFailed extends TaskManagerError {
  static code = "task_failed";

  constructor(taskId, error) {
    const err = error ?? {};
    super(`task ${taskId} failed: ${err.type}: ${err.message}`);
    this.taskId = taskId;
    this.error = err;
  }
}

/** Throw this (or an error whose `cause` is one) in a handler: the task fails without retries. */
export class Permanent extends Error {
  constructor(message, options) {
    super(message, options);
    this.name = "Permanent";
  }
}

/**
 * Throw this in a handler to run the task again later: `throw new Snooze(30000)` puts it
 * back to delayed for 30 s, and this attempt does not count. A task may snooze
 * `max_snoozes` times (100 unless `withMaxSnoozes` says), then it fails (`SnoozeLimit`).
 */
export class Snooze extends Error {
  constructor(delayMs) {
    if (typeof delayMs !== "number" || !Number.isFinite(delayMs) || delayMs < 0) {
      throw new InvalidRequest("Snooze takes a number of milliseconds, at least 0");
    }
    super(`snooze for ${delayMs} ms`);
    this.name = "Snooze";
    this.delayMs = delayMs;
  }
}

/** The errors a sidecar answers with, by wire code (the SDK's own are never sent). */
export const WIRE_ERRORS = new Map(
  [
    TaskManagerError,
    InvalidRequest,
    TaskNotFound,
    PayloadTooLarge,
    QueueFull,
    Unavailable,
    EtcdUnavailable,
    EtcdFull,
    NotLeader,
    LeaseLost,
    ProtocolViolation,
    PermissionDenied,
    EtcdError,
    LeaseNotFound,
    Compacted,
  ].map((cls) => [cls.code, cls]),
);

/** The error for an error reply: the class the sidecar raised, looked up by its code. */
export function errorFromWire(error) {
  const obj = error !== null && typeof error === "object" ? error : {};
  const Cls = WIRE_ERRORS.get(String(obj.code)) ?? TaskManagerError;
  const err = new Cls(String(obj.message ?? ""));
  if (typeof obj.code === "string") err.code = obj.code;
  // What a request that did part of its work left behind (create_many: task_ids, committed).
  if (obj.details !== null && typeof obj.details === "object") err.details = obj.details;
  return err;
}

/** What a handler's exception is on the wire (`fail`'s `error`). */
export function errorToWire(err) {
  if (err instanceof Error) {
    const named = err.name && err.name !== "Error" ? err.name : err.constructor?.name;
    return {
      type: named || "Error",
      message: err.message,
      traceback: typeof err.stack === "string" ? err.stack : null,
      retryable: !(err instanceof Permanent || err.cause instanceof Permanent),
    };
  }
  return { type: "Error", message: String(err), traceback: null, retryable: true };
}
