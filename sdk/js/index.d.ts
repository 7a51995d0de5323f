// Types for tm-sidecar-sdk (hand-written: the package is plain ES modules, no build step).
// The wire shapes are those of docs/protocol.md.

/** Any JSON value: payloads, results, progress. */
export type JSONValue = null | boolean | number | string | JSONValue[] | { [key: string]: JSONValue };

/** The event kinds the sidecar pushes. */
export type LifecycleEvent = "queued" | "assigned" | "started" | "updated" | "failed" | "completed";
/** What `on()` takes: the pushed kinds, and the outcome as "success" or "failure". */
export type EventName = LifecycleEvent | "success" | "failure";
export declare const EVENTS: readonly EventName[];
/** What a manager's `on()` takes: `EVENTS` and "gap" (and "error"). */
export declare const MANAGER_EVENTS: readonly (EventName | "gap")[];
export declare const PROTOCOL_VERSION: 1;
/** The most tasks one `createMany` carries. */
export declare const MAX_CREATE_MANY: number;

/** What an attempt reported when it failed (`fail`'s `error`). */
export interface TaskError {
  type: string;
  message: string;
  traceback?: string | null;
  retryable: boolean;
}

/** A task event, as pushed (docs/protocol.md, "Events"). */
export interface TaskEvent {
  event: LifecycleEvent;
  task_id: string;
  revision?: number;
  attempt?: number;
  node?: string;
  /** The result (completed) or the progress (updated). */
  data?: JSONValue;
  error?: TaskError;
  will_retry?: boolean;
}

/** A task as `get` answers it. */
export interface TaskInfo {
  task_id: string;
  state: "pending" | "delayed" | "processing" | "completed" | "failed" | null;
  payload: JSONValue;
  options: TaskOptions;
  created_at: number;
  attempts: number | null;
  result?: JSONValue;
  error?: TaskError;
  node?: string;
  due_at?: number;
}

/** The protocol's task options. */
export interface TaskOptions {
  queue?: string;
  priority?: number;
  max_attempts?: number;
  timeout_s?: number;
  backoff?: { base_s?: number; factor?: number; max_s?: number; jitter?: number };
  unique_key?: string;
  unique_for_s?: number;
  concurrency_key?: string;
  max_snoozes?: number;
  /** W3C trace context of the creating span (set by the SDK when OpenTelemetry is installed). */
  traceparent?: string;
  tracestate?: string;
}

/** Events missed and not replayed (docs/protocol.md, "Resuming a subscription"). */
export interface Gap {
  from_revision: number;
  to_revision: number;
  reason: "compacted" | "watch_reset" | string;
  /** The tasks changed in the gap, to read again; null when the sidecar could not list them. */
  task_ids: string[] | null;
  truncated: boolean;
}

/** A queue's settings, cluster-wide (`queues/<queue>` in etcd). */
export interface QueueSettings {
  paused: boolean;
  max_running?: number;
  key_max_running?: number;
  rate?: { limit: number; period_s: number };
  key_rate?: { limit: number; period_s: number };
  updated_at?: number;
}

/** A start-rate limit: at most `limit` starts in any window of `periodMs`. */
export interface RateLimit {
  limit: number;
  periodMs: number;
}

/** What `setLimits` takes; null lifts a limit. */
export interface Limits {
  maxRunning?: number | null;
  keyMaxRunning?: number | null;
  rate?: RateLimit | null;
  keyRate?: RateLimit | null;
}

export interface ScheduleOptions {
  /** 5 fields, or 6 with seconds; or `everyMs`. */
  cron?: string;
  everyMs?: number;
  /** IANA time zone of the cron slots (default UTC). */
  timezone?: string;
  /** Task options of each slot's task. */
  options?: TaskOptions;
  missed?: "skip" | "one" | "all";
  maxCatchUp?: number;
  graceMs?: number;
  paused?: boolean;
}

/** A schedule, as the sidecar answers it. */
export interface ScheduleInfo {
  name: string;
  payload: JSONValue;
  options: TaskOptions;
  cron?: string;
  every_s?: number;
  timezone: string;
  missed: "skip" | "one" | "all";
  max_catch_up: number;
  grace_s: number;
  paused: boolean;
  anchor_at: number;
  next_at: number | null;
  created_at: number;
  fired: number;
  last_slot_at: number | null;
  last_task_id: string | null;
}

export interface Backoff {
  baseMs?: number;
  factor?: number;
  maxMs?: number;
  jitter?: number;
}

export interface TaskManagerOptions {
  /** The sidecar's socket; default `defaultSocket()`. */
  socket?: string;
  /** How long a call waits for a connection to the sidecar (default 30000 ms). */
  connectTimeoutMs?: number;
  /** Where the SDK's errors go when nobody listens to "error" (default: console). */
  logger?: { warn(message: string): void };
  /** The client name told to the sidecar. */
  client?: string;
  /** Read a task not heard of for this long, in case the sidecar missed its events (30000). */
  resyncMs?: number;
}

type Awaitable<T> = T | Promise<T>;

interface TaskCallbacks {
  queued: (event: TaskEvent) => Awaitable<unknown>;
  assigned: (event: TaskEvent) => Awaitable<unknown>;
  started: (event: TaskEvent) => Awaitable<unknown>;
  updated: (progress: JSONValue, event: TaskEvent) => Awaitable<unknown>;
  failed: (error: TaskError | null, willRetry: boolean, event: TaskEvent) => Awaitable<unknown>;
  completed: (result: JSONValue, event: TaskEvent) => Awaitable<unknown>;
  success: (result: JSONValue) => Awaitable<unknown>;
  failure: (error: TaskError | null) => Awaitable<unknown>;
}

interface ManagerCallbacks {
  queued: (event: TaskEvent) => Awaitable<unknown>;
  assigned: (event: TaskEvent) => Awaitable<unknown>;
  started: (event: TaskEvent) => Awaitable<unknown>;
  updated: (event: TaskEvent) => Awaitable<unknown>;
  failed: (event: TaskEvent) => Awaitable<unknown>;
  completed: (event: TaskEvent) => Awaitable<unknown>;
  success: (result: JSONValue, event: TaskEvent) => Awaitable<unknown>;
  failure: (error: TaskError | null, event: TaskEvent) => Awaitable<unknown>;
  /** Events were missed and not replayed: read again the tasks named (the SDK does for its own). */
  gap: (gap: Gap) => Awaitable<unknown>;
  /** The SDK's own errors (a malformed frame, a lost connection, a callback that threw). */
  error: (error: Error) => unknown;
}

/** A task being built, then committed, then waited for. Methods chain. */
export declare class Task<T extends JSONValue = JSONValue> {
  readonly manager: TaskManager;
  readonly id: string;
  readonly data: T;
  readonly options: TaskOptions;
  /** UTC epoch seconds before which it does not start, or null. */
  readonly runAt: number | null;
  readonly committed: boolean;
  /** True when a unique key's live task answered the commit: this follows that task. */
  readonly existing: boolean;
  readonly state: LifecycleEvent | null;
  readonly resultValue: JSONValue | undefined;
  readonly error: TaskError | null;
  /** Fail an attempt that runs longer than `ms` milliseconds. */
  withTimeout(ms: number): this;
  /** Do not start before `when` (a Date, or epoch milliseconds as Date.parse answers). */
  withDelayUntil(when: Date | number): this;
  withDelay(ms: number): this;
  /** At most `maxAttempts` attempts (attempts, not retries, as in the Python SDK). */
  withRetries(maxAttempts: number, backoff?: Backoff): this;
  withPriority(priority: number): this;
  withQueue(queue: string): this;
  /** At most one live task per `key`; `forMs` keeps the key taken after it finished. */
  withUnique(key: string, options?: { forMs?: number }): this;
  /** Count it against the queue's per-key limits under `key`. */
  withConcurrencyKey(key: string): this;
  /** At most `count` snoozes (default 100). */
  withMaxSnoozes(count: number): this;
  /** Cancel it (pending, delayed or running); false if it had finished. */
  cancel(reason?: string): Promise<boolean>;
  on<E extends EventName>(event: E, callback: TaskCallbacks[E]): this;
  /** Queue it; durable in etcd once this resolves. */
  commit(): Promise<this>;
  /** The result; rejects with TaskFailed if it fails for good, WaitTimeout after `timeoutMs`. */
  result(timeoutMs?: number): Promise<JSONValue>;
}

/** What a handler receives. */
export declare class WorkerTask<T extends JSONValue = JSONValue> {
  readonly id: string;
  readonly data: T;
  readonly payload: T;
  readonly attempt: number;
  readonly options: TaskOptions;
  readonly createdAt: number | null;
  readonly delivery: number | string;
  /** True once the attempt must stop; what the handler returns after that is dropped. */
  readonly cancelled: boolean;
  /** Aborted when the attempt must stop (its timeout, a withdrawn assignment, shutdown). */
  readonly signal: AbortSignal;
  /** Publish progress (any JSON, at most 64 KiB); false if the attempt is over. */
  update(progress: JSONValue): Promise<boolean>;
}

export type Handler<T extends JSONValue = JSONValue> = (task: WorkerTask<T>) => Awaitable<JSONValue | undefined | void>;

/** Handlers registered with `process()`. */
export declare class Worker {
  readonly manager: TaskManager;
  readonly queue: string;
  readonly concurrency: number;
  /** The sidecar's id for this registration (a new one after a reconnect). */
  readonly id: number | string | null;
  readonly node: string | null;
  readonly closed: boolean;
  /**
   * Deliveries waiting for a slot: a handler whose attempt ended (a timeout) keeps its
   * slot until its promise settles, so its retry never runs beside it.
   */
  readonly waiting: number;
  /** Take no new tasks (running ones finish). */
  close(): Promise<void>;
}

/** `createMany`'s options: the ids, a delay, and the protocol's task options for all. */
export interface CreateManyOptions {
  taskIds?: string[];
  delayMs?: number;
  queue?: string;
  priority?: number;
  timeout_s?: number;
  max_attempts?: number;
  max_snoozes?: number;
  backoff?: { base_s?: number; factor?: number; max_s?: number; jitter?: number };
  concurrency_key?: string;
}

/** What a request that did part of its work left behind (`createMany`). */
export interface ErrorDetails {
  task_ids?: string[];
  committed?: number;
  [key: string]: JSONValue | undefined;
}

/** A connection to the local sidecar, made on first use and again after it is lost. */
export declare class TaskManager {
  constructor(options?: TaskManagerOptions);
  readonly socketPath: string;
  /** The sidecar's node id and namespace, once connected. */
  readonly node: string | null;
  readonly namespace: string | null;
  create<T extends JSONValue>(
    data: T,
    options?: { taskId?: string; uniqueKey?: string; uniqueForMs?: number },
  ): Promise<Task<T>>;
  /** Create and commit in one call, with the protocol's options. */
  submit<T extends JSONValue>(data: T, options?: TaskOptions): Promise<Task<T>>;
  /** A Task for a task committed elsewhere; rejects with TaskNotFound. */
  task(taskId: string): Promise<Task>;
  /** Its result once it completes; TaskFailed, TaskNotFound, WaitTimeout after `timeoutMs`. */
  result(taskId: string, timeoutMs?: number): Promise<JSONValue>;
  /** The task once completed or failed for good; WaitTimeout after `timeoutMs`. */
  wait(taskId: string, timeoutMs?: number): Promise<TaskInfo>;
  /** Cancel a task by id; false if it had finished. */
  cancel(taskId: string, options?: { reason?: string }): Promise<boolean>;
  pauseQueue(queue?: string): Promise<QueueSettings>;
  resumeQueue(queue?: string): Promise<QueueSettings>;
  setLimits(queue: string, limits: Limits): Promise<QueueSettings>;
  queues(): Promise<Record<string, QueueSettings>>;
  schedule(name: string, payload: JSONValue, options: ScheduleOptions): Promise<ScheduleInfo>;
  schedules(): Promise<ScheduleInfo[]>;
  pauseSchedule(name: string): Promise<ScheduleInfo>;
  resumeSchedule(name: string): Promise<ScheduleInfo>;
  /** Delete a schedule (its tasks stay); false if there was none. */
  deleteSchedule(name: string): Promise<boolean>;
  /** "pong" once the sidecar answers. */
  ping(): Promise<"pong">;
  /**
   * A task for each of `items` in one request; their ids in order, once all are durable.
   * On a failure midway the error's `details` say which exist (docs/protocol.md).
   */
  createMany(items: JSONValue[], options?: CreateManyOptions): Promise<string[]>;
  process<T extends JSONValue = JSONValue>(
    handler: Handler<T>,
    options?: { concurrency?: number; queue?: string },
  ): Promise<Worker>;
  on<E extends keyof ManagerCallbacks>(event: E, callback: ManagerCallbacks[E]): this;
  /** Resolves once manager-level callbacks receive events. */
  waitSubscribed(): Promise<void>;
  /** Whether the local sidecar is the cluster's leader (as last told). */
  isMaster(): boolean;
  isLeader(): boolean;
  get(taskId: string): Promise<TaskInfo>;
  status(): Promise<Record<string, JSONValue>>;
  /** Run the workers until SIGTERM or SIGINT, then shut down gracefully. */
  serve(options?: { shutdownTimeoutMs?: number }): Promise<void>;
  /** Stop taking tasks, let running ones finish within `timeoutMs` (30000), disconnect. */
  shutdown(timeoutMs?: number): Promise<void>;
}

export interface RunWorkerOptions {
  concurrency?: number;
  queue?: string;
  socket?: string;
  /** What running tasks get to finish after the signal (30000). */
  shutdownTimeoutMs?: number;
  /** How long each try waits for the sidecar (5000); it tries again until a signal. */
  connectTimeoutMs?: number;
  logger?: { warn(message: string): void };
}

/**
 * Run `handler` until SIGTERM or SIGINT, then shut down gracefully; waits for a sidecar
 * not up yet, rejects at once with PermissionDenied if refused.
 */
export declare function runWorker<T extends JSONValue = JSONValue>(
  handler: Handler<T>,
  options?: RunWorkerOptions,
): Promise<void>;

/** The seed's name for the task manager. */
export declare const DefaultTaskManager: typeof TaskManager;
export type DefaultTaskManager = TaskManager;

/** `$TM_SOCKET`, else `$XDG_RUNTIME_DIR/tm-sidecar.sock`, else `/tmp/tm-sidecar.sock`. */
export declare function defaultSocket(env?: Record<string, string | undefined>): string;

export declare class TaskManagerError extends Error {
  static readonly code: string;
  static readonly retryable: boolean;
  code: string;
  retryable: boolean;
  /** Set when a request did part of its work (`createMany`). */
  details?: ErrorDetails;
}
export declare class InvalidRequest extends TaskManagerError {}
export declare class TaskNotFound extends InvalidRequest {}
export declare class PayloadTooLarge extends InvalidRequest {}
export declare class QueueFull extends TaskManagerError {}
export declare class Unavailable extends TaskManagerError {}
export declare class EtcdUnavailable extends Unavailable {}
export declare class EtcdFull extends Unavailable {}
export declare class NotLeader extends Unavailable {}
export declare class LeaseLost extends TaskManagerError {}
export declare class ProtocolViolation extends TaskManagerError {}
/** This client may not use the sidecar (`--allow-uid`, or the socket's mode and group). */
export declare class PermissionDenied extends TaskManagerError {}
export declare class EtcdError extends TaskManagerError {}
export declare class LeaseNotFound extends EtcdError {}
export declare class Compacted extends EtcdError {}
export declare class ConnectionLost extends Unavailable {}
/** A wait for an outcome ran out of time (the task goes on). */
export declare class WaitTimeout extends Unavailable {}
export declare class TaskFailed extends TaskManagerError {
  constructor(taskId: string, error: TaskError | null);
  readonly taskId: string;
  readonly error: TaskError;
}
/** Throw this in a handler to run the task again `delayMs` from now (the attempt not counted). */
export declare class Snooze extends Error {
  constructor(delayMs: number);
  readonly delayMs: number;
}
/** Throw this (or an error whose `cause` is one) in a handler: no more retries. */
export declare class Permanent extends Error {}
/** A handler's `signal` is aborted with this. */
export declare class TaskCancelled extends Error {}
/** A frame from the sidecar that broke the framing (reported; the SDK reconnects). */
export declare class MalformedFrame extends Error {}
