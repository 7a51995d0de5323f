// The task manager: one connection to the local sidecar, the seed's API on top of it.

import { Connector } from "./connection.js";
import { ConnectionLost, InvalidRequest, TaskFailed, WaitTimeout } from "./errors.js";
import { MalformedFrame } from "./framing.js";
import { CallQueue, EVENTS, LIFECYCLE, MANAGER_EVENTS, Task, checkEvent, newTaskId } from "./task.js";
import { Worker, WorkerTask, currentDelivery, releaseDelivery, runDelivery } from "./worker.js";
import { withProducerSpan } from "./otel.js";

const CLIENT = "tm-sidecar-sdk-js/0.1.0";
/** The most tasks one `createMany` carries (the sidecar refuses more). */
export const MAX_CREATE_MANY = 10000;
/** How long result() trusts the event stream alone before it reads the task once. */
const RESYNC_MS = 30000;

/** `$TM_SOCKET`, else `$XDG_RUNTIME_DIR/tm-sidecar.sock`, else `/tmp/tm-sidecar.sock`. */
export function defaultSocket(env = process.env) {
  if (env.TM_SOCKET) return env.TM_SOCKET;
  if (env.XDG_RUNTIME_DIR) return `${env.XDG_RUNTIME_DIR.replace(/\/$/, "")}/tm-sidecar.sock`;
  return "/tmp/tm-sidecar.sock";
}

function check(condition, message) {
  if (!condition) throw new MalformedFrame(message);
}

function within(promise, ms) {
  let timer;
  return Promise.race([
    promise,
    new Promise((resolve) => {
      timer = setTimeout(resolve, ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

/**
 * A connection to the local sidecar (made on first use, made again with backoff when
 * lost). `DefaultTaskManager` is the seed's name for it.
 */
export class TaskManager {
  /**
   * @param {object} [options]
   * @param {string} [options.socket] the sidecar's socket (default: `defaultSocket()`)
   * @param {number} [options.connectTimeoutMs] how long a call waits for a connection (30 s)
   * @param {{warn: (message: string) => void}} [options.logger] where errors go when nobody
   *   listens to "error" (default: console)
   * @param {string} [options.client] the client name told in hello
   * @param {number} [options.resyncMs] read a task not heard of for this long (30 s): in
   *   case the sidecar missed its events
   */
  constructor(options = {}) {
    this.socketPath = options.socket ?? options.socketPath ?? defaultSocket();
    this.node = null;
    this.namespace = null;
    this._connectTimeoutMs = options.connectTimeoutMs ?? 30000;
    this._logger = options.logger ?? console;
    this._client = options.client ?? CLIENT;
    this._resyncMs = options.resyncMs ?? RESYNC_MS;
    this._leader = false;
    this._conn = null;
    this._listeners = new Map();
    this._errorListeners = [];
    this._calls = new CallQueue((err) => this._report(err));
    this._tasks = new Map(); // task id -> Task being followed
    this._workers = []; // registered again after a reconnect
    this._workerIds = new Map(); // the current session's worker ids -> Worker
    this._earlyTasks = new Map(); // task pushes that overtook their register answer
    this._deliveries = new Map(); // the current session's deliveries -> WorkerTask
    this._idleWaiters = new Set();
    this._wantAll = false;
    this._all = null; // {session, sid, promise, early}
    this._resync = null;
    this._closed = false;
    this._shutdown = null;
  }

  // -- the seed's API -----------------------------------------------------------------

  /**
   * A new task for `data` (any JSON); set its options, then `await task.commit()`.
   * `uniqueKey` (and `uniqueForMs`): see `Task.withUnique`.
   */
  async create(data, { taskId, uniqueKey, uniqueForMs } = {}) {
    this._ensureStarted();
    const task = new Task(this, data, taskId);
    if (uniqueKey !== undefined) task.withUnique(uniqueKey, { forMs: uniqueForMs });
    return task;
  }

  /** Create and commit in one call; `options` are the protocol's (`timeout_s`, `queue`, ...). */
  async submit(data, options = {}) {
    if (options === null || typeof options !== "object") throw new InvalidRequest("submit() takes an options object");
    const task = await this.create(data);
    Object.assign(task.options, options);
    return task.commit();
  }

  /**
   * A Task for a task committed elsewhere (another process, say): its `result()` and
   * `on()` work as on a task committed here. Rejects with TaskNotFound for an unknown
   * (or expired) task.
   */
  async task(taskId) {
    if (typeof taskId !== "string") throw new InvalidRequest("task() takes a task id");
    this._ensureStarted();
    const known = this._tasks.get(taskId);
    if (known !== undefined && known.committed) return known;
    const task = new Task(this, null, taskId);
    task._followsAll = true; // its subscription pushes every kind
    task.committed = true;
    task._committing = Promise.resolve(task);
    this._tasks.set(taskId, task);
    try {
      for (;;) {
        const session = await this._ready();
        try {
          task._session = session;
          // Subscribed first, read second: nothing between the two can be missed.
          const sub = await session.request("subscribe", { task_id: taskId, until_final: true });
          if (!task._final) task._sid = sub.subscription;
          const info = await session.request("get", { task_id: taskId });
          task.data = info.payload ?? null;
          task.options = info.options ?? {};
          task._heardAt = Date.now();
          task._take(info);
          break;
        } catch (err) {
          if (!(err instanceof ConnectionLost) || this._closed) throw err;
        }
      }
    } catch (err) {
      this._untrack(task, false);
      throw err;
    }
    this._ensureResync();
    return task;
  }

  /**
   * The result of the task `taskId` once it completes, wherever it was committed. Rejects
   * with TaskFailed if it fails, TaskNotFound if there is no such task, WaitTimeout (an
   * Unavailable) after `timeoutMs`.
   */
  async result(taskId, timeoutMs) {
    return this._within(timeoutMs, taskId, async () => (await this.task(taskId)).result());
  }

  /**
   * The task `taskId` (as `get()` shows it) once it completed or failed for good.
   * Rejects with WaitTimeout (an Unavailable) after `timeoutMs`.
   */
  async wait(taskId, timeoutMs) {
    return this._within(timeoutMs, taskId, async () => {
      const task = await this.task(taskId);
      try {
        await task.result();
      } catch (err) {
        if (!(err instanceof TaskFailed)) throw err;
      }
      return this.get(taskId);
    });
  }

  async _within(timeoutMs, taskId, fn) {
    if (timeoutMs === undefined || timeoutMs === null) return fn();
    let timer;
    const expired = new Promise((_, reject) => {
      timer = setTimeout(
        () => reject(new WaitTimeout(`task ${taskId} did not finish within ${timeoutMs} ms (it goes on)`)),
        timeoutMs,
      );
    });
    try {
      return await Promise.race([fn(), expired]);
    } finally {
      clearTimeout(timer);
    }
  }

  /** Cancel a task by id (see `Task.cancel`); false if it had finished. */
  async cancel(taskId, { reason = "cancelled by a client" } = {}) {
    const answer = await this._request("cancel", { task_id: taskId, reason });
    return Boolean(answer.cancelled);
  }

  /**
   * Pause a queue, cluster-wide: the leader assigns nothing more from it (creates still
   * land, running tasks finish). Resolves to the queue's settings.
   */
  async pauseQueue(queue = "default") {
    return this._request("pause", { queue });
  }

  /** Resume a paused queue. Resolves to the queue's settings. */
  async resumeQueue(queue = "default") {
    return this._request("resume", { queue });
  }

  /**
   * Set a queue's cluster-wide limits; null lifts one. `maxRunning` (tasks of the queue
   * running at once), `keyMaxRunning` (per concurrency key), `rate` and `keyRate` (starts:
   * `{limit, periodMs}`). Resolves to the queue's settings.
   */
  async setLimits(queue = "default", limits = {}) {
    const fields = { queue };
    const names = { maxRunning: "max_running", keyMaxRunning: "key_max_running", rate: "rate", keyRate: "key_rate" };
    for (const [name, value] of Object.entries(limits)) {
      const wire = names[name];
      if (wire === undefined) throw new InvalidRequest(`unknown limit ${JSON.stringify(name)}; one of ${Object.keys(names).join(", ")}`);
      if ((name === "rate" || name === "keyRate") && value !== null) {
        if (value === undefined || typeof value !== "object") throw new InvalidRequest(`${name} is {limit, periodMs} or null`);
        fields[wire] = { limit: value.limit, period_s: value.periodMs / 1000 };
      } else {
        fields[wire] = value;
      }
    }
    return this._request("set_limits", fields);
  }

  /** The settings of every queue that has some (paused, limits), by name. */
  async queues() {
    return this._request("queues", {});
  }

  /**
   * Create or replace the schedule `name`: a task with `payload` (and task `options`) at
   * each slot of `cron` (in `timezone`) or every `everyMs`. The leader fires each slot
   * exactly once, across failovers. Slots later than `graceMs` (60 s) are missed:
   * `missed` says what then fires, "skip", "one" (the latest) or "all" (at most
   * `maxCatchUp`). Resolves to the schedule, with its `next_at`.
   */
  async schedule(name, payload = null, { cron, everyMs, timezone = "UTC", options = {}, missed = "one", maxCatchUp, graceMs, paused } = {}) {
    const fields = { name, payload, timezone, missed, options };
    if (cron !== undefined) fields.cron = cron;
    if (everyMs !== undefined) fields.every_s = everyMs / 1000;
    if (maxCatchUp !== undefined) fields.max_catch_up = maxCatchUp;
    if (graceMs !== undefined) fields.grace_s = graceMs / 1000;
    if (paused !== undefined) fields.paused = paused;
    return this._request("schedule", fields);
  }

  /** Every schedule of the namespace. */
  async schedules() {
    return this._request("schedules", {});
  }

  /** Fire nothing more from schedule `name` until resumed. */
  async pauseSchedule(name) {
    return this._request("pause_schedule", { name });
  }

  /** Fire again, from the first slot after now. */
  async resumeSchedule(name) {
    return this._request("resume_schedule", { name });
  }

  /** Delete schedule `name` (its tasks stay); false if there was none. */
  async deleteSchedule(name) {
    return Boolean(await this._request("unschedule", { name }));
  }

  /** "pong" from the local sidecar: it is up and answering. */
  async ping() {
    return this._request("ping", {});
  }

  /**
   * A task for each of `items` (any JSON) in one request, all with `options` (the
   * protocol's task options: `queue`, `priority`, `timeout_s`, `max_attempts`, ...);
   * resolves to their ids in order once every one is durable in etcd. `taskIds` gives
   * the ids (else the SDK makes them, so that a request repeated after a reconnect
   * creates nothing twice); `delayMs` delays them all. The sidecar commits them in
   * order in as few etcd transactions as it takes, each all or nothing; if one fails,
   * the error's `details` has `task_ids` (every item's) and `committed` (how many of the
   * first exist): call again with `taskIds: details.task_ids` to finish.
   */
  async createMany(items, { taskIds, delayMs, ...options } = {}) {
    if (!Array.isArray(items) || items.length === 0) {
      throw new InvalidRequest("createMany takes a non-empty array of items");
    }
    if (items.length > MAX_CREATE_MANY) {
      throw new InvalidRequest(
        `createMany takes at most ${MAX_CREATE_MANY} items at once, not ${items.length}`,
      );
    }
    if ("unique_key" in options) {
      throw new InvalidRequest("createMany takes no unique_key: create unique tasks alone");
    }
    if (taskIds !== undefined && (!Array.isArray(taskIds) || taskIds.length !== items.length)) {
      throw new InvalidRequest("taskIds must be an array of one id per item");
    }
    let runAt;
    if (delayMs !== undefined) {
      if (typeof delayMs !== "number" || !Number.isFinite(delayMs)) {
        throw new InvalidRequest("delayMs must be a number of milliseconds");
      }
      runAt = (Date.now() + Math.max(delayMs, 0)) / 1000;
    }
    const tasks = items.map((payload, i) => {
      const task = { payload, task_id: taskIds ? taskIds[i] : newTaskId() };
      if (runAt !== undefined) task.run_at = runAt;
      return task;
    });
    const answer = await this._request("create_many", { tasks, options });
    return answer.task_ids;
  }

  /**
   * Run `handler(task)` for tasks of `queue`, up to `concurrency` at once. What it returns
   * (any JSON) is the result; what it throws fails the attempt (retried per the task's
   * policy, or not at all for `Permanent`).
   */
  async process(handler, { concurrency = 1, queue = "default" } = {}) {
    if (typeof handler !== "function") throw new InvalidRequest("process() takes a function");
    if (!Number.isInteger(concurrency) || concurrency < 1 || concurrency > 10000) {
      throw new InvalidRequest("concurrency must be a whole number from 1 to 10000");
    }
    this._ensureStarted();
    const worker = new Worker(this, handler, queue, concurrency);
    this._workers.push(worker);
    try {
      for (;;) {
        const session = await this._ready();
        try {
          await this._register(worker, session);
          return worker;
        } catch (err) {
          if (!(err instanceof ConnectionLost) || this._closed) throw err;
        }
      }
    } catch (err) {
      this._workers = this._workers.filter((w) => w !== worker);
      throw err;
    }
  }

  /**
   * Call `callback(event)` on every task event of the namespace; "gap" hears that events
   * were missed and could not be replayed (`callback(gap)`: `from_revision`,
   * `to_revision`, `reason`, `task_ids`, the tasks to read again; the SDK reads the ones
   * it follows itself); "error" hears the SDK's own errors.
   */
  on(event, callback) {
    if (typeof callback !== "function") throw new InvalidRequest("on() takes a function");
    if (event === "error") {
      this._errorListeners.push(callback);
      return this;
    }
    checkEvent(event, MANAGER_EVENTS);
    if (!this._listeners.has(event)) this._listeners.set(event, []);
    this._listeners.get(event).push(callback);
    if (!this._wantAll) {
      this._wantAll = true;
      this._ensureStarted();
      const session = this._conn.session;
      if (session !== null) this._subscribeAll(session).catch((err) => this._report(err));
    }
    return this;
  }

  /** Resolves once manager-level callbacks receive events (after `on()`). */
  async waitSubscribed() {
    this._ensureStarted();
    for (;;) {
      const session = await this._ready();
      try {
        await this._subscribeAll(session);
        return;
      } catch (err) {
        if (!(err instanceof ConnectionLost) || this._closed) throw err;
      }
    }
  }

  /** Whether the local sidecar is the cluster's leader (as last told). */
  isMaster() {
    return this._leader;
  }

  /** The same as `isMaster()`. */
  isLeader() {
    return this._leader;
  }

  /** A task as it stands: state, attempts, result or error, payload, options. */
  async get(taskId) {
    return this._request("get", { task_id: taskId });
  }

  /** The local sidecar's status. */
  async status() {
    return this._request("status", {});
  }

  /**
   * Run this manager's workers until SIGTERM or SIGINT (Ctrl-C), then shut down
   * gracefully (see `shutdown`) and resolve. `runWorker()` is the same in one call.
   */
  async serve({ shutdownTimeoutMs = 30000, signals } = {}) {
    this._ensureStarted();
    let off = () => {};
    const received =
      signals ??
      new Promise((resolve) => {
        process.once("SIGTERM", resolve);
        process.once("SIGINT", resolve);
        off = () => {
          process.off("SIGTERM", resolve);
          process.off("SIGINT", resolve);
        };
      });
    try {
      await received;
    } finally {
      off();
    }
    await this.shutdown(shutdownTimeoutMs);
  }

  /**
   * Stop taking tasks, let running handlers finish within `timeoutMs`, hand back what
   * could not finish (it is retried at once), then disconnect. A handler may call it:
   * its own task is not waited for.
   */
  shutdown(timeoutMs = 30000) {
    if (this._shutdown === null) this._shutdown = this._shutdownNow(timeoutMs, currentDelivery.getStore());
    return this._shutdown;
  }

  // -- the connection -------------------------------------------------------------------

  _ensureStarted() {
    if (this._closed) throw new ConnectionLost("the task manager is shut down");
    if (this._conn === null) {
      this._conn = new Connector({
        path: this.socketPath,
        client: this._client,
        onPush: (frame, session) => this._onPush(frame, session),
        onUp: (session) => this._onUp(session),
        onDown: (session) => this._onDown(session),
        report: (err) => this._report(err),
      }).start();
    }
  }

  _ready() {
    return this._conn.ready(this._connectTimeoutMs);
  }

  /** A request, made again on the next connection if this one is lost (`get`, `status`). */
  async _request(op, fields) {
    this._ensureStarted();
    for (;;) {
      const session = await this._ready();
      try {
        return await session.request(op, fields);
      } catch (err) {
        if (!(err instanceof ConnectionLost) || this._closed) throw err;
      }
    }
  }

  _report(err) {
    if (this._errorListeners.length === 0) {
      this._logger.warn(`tm-sidecar-sdk: ${err?.message ?? err}`);
      return;
    }
    for (const listener of this._errorListeners) {
      try {
        listener(err);
      } catch {
        // An error listener that throws has nowhere left to report to.
      }
    }
  }

  async _onUp(session) {
    const hello = session.hello;
    this._leader = Boolean(hello.leader);
    this.node = hello.node ?? null;
    this.namespace = hello.namespace ?? null;
    const work = this._workers.filter((w) => !w.closed).map((w) => this._register(w, session));
    if (this._wantAll) work.push(this._subscribeAll(session));
    for (const task of this._tasks.values()) {
      if (task.committed && !task._final && task._session !== session) work.push(this._follow(task, session, true));
    }
    for (const result of await Promise.allSettled(work)) {
      if (result.status === "rejected" && !(result.reason instanceof ConnectionLost)) this._report(result.reason);
    }
  }

  _onDown(session) {
    // The sidecar has failed these attempts itself (WorkerDisconnected): stop them here.
    for (const wt of this._deliveries.values()) wt._cancel("the connection to the sidecar was lost");
    this._deliveries.clear();
    this._workerIds.clear();
    this._earlyTasks.clear();
    if (this._all?.session === session) this._all = null;
    this._checkIdle();
  }

  _onPush(frame, session) {
    switch (frame.push) {
      case "event": {
        const event = frame.event;
        check(event !== null && typeof event === "object", "an event push without an event");
        check(typeof event.event === "string" && typeof event.task_id === "string", "an event without a kind or a task id");
        const all = this._all;
        if (all !== null && all.session === session) {
          if (all.sid === null) all.early.push(frame);
          else if (frame.subscription === all.sid) this._emit(event);
        }
        this._tasks.get(event.task_id)?._onEvent(event);
        return;
      }
      case "task": {
        check(Number.isInteger(frame.worker) || typeof frame.worker === "string", "a task push without a worker");
        check(Number.isInteger(frame.delivery) || typeof frame.delivery === "string", "a task push without a delivery");
        const task = frame.task;
        check(task !== null && typeof task === "object" && typeof task.id === "string", "a task push without a task");
        const worker = this._workerIds.get(frame.worker);
        if (worker === undefined) {
          if (!this._earlyTasks.has(frame.worker)) this._earlyTasks.set(frame.worker, []);
          this._earlyTasks.get(frame.worker).push(frame);
        } else {
          this._start(worker, session, frame);
        }
        return;
      }
      case "gap": {
        // Events were missed and could not be replayed (docs/protocol.md, "Events"): read
        // again the tasks named, and tell the manager's "gap" listeners.
        const ids = frame.task_ids;
        check(ids === null || ids === undefined || Array.isArray(ids), "a gap push whose task_ids is not a list");
        const all = this._all;
        if (all !== null && all.session === session) {
          if (all.sid === null) all.early.push(frame);
          else if (frame.subscription === all.sid) this._emitGap(frame);
        }
        this._rereadAfterGap(frame, session);
        return;
      }
      case "tasks": {
        // A batched worker's deliveries (register with `batch`): each as a `task` push.
        check(Array.isArray(frame.tasks), "a tasks push without tasks");
        for (const item of frame.tasks) {
          check(item !== null && typeof item === "object", "a tasks push with an item that is not an object");
          this._onPush({ push: "task", worker: frame.worker, delivery: item.delivery, task: item.task }, session);
        }
        return;
      }
      case "cancel":
        check(frame.delivery !== undefined, "a cancel push without a delivery");
        this._deliveries.get(frame.delivery)?._cancel("the sidecar cancelled the attempt (its timeout, or a withdrawn assignment)");
        this._deliveries.delete(frame.delivery);
        this._checkIdle();
        return;
      case "role":
        check(typeof frame.leader === "boolean", "a role push without leader");
        this._leader = frame.leader;
        return;
      default:
      // A push this SDK does not know (a newer sidecar): nothing to do.
    }
  }

  // -- workers ------------------------------------------------------------------------

  _register(worker, session) {
    if (worker._session !== session) {
      worker._session = session;
      worker._registering = session
        .request("register", {
          queue: worker.queue,
          concurrency: worker.concurrency,
          // Deliveries in `tasks` pushes, many to a frame, where the sidecar serves them.
          ...(session.batched ? { batch: true } : {}),
        })
        .then((answer) => {
          worker.id = answer.worker;
          worker.node = answer.node ?? null;
          this._workerIds.set(answer.worker, worker);
          const early = this._earlyTasks.get(answer.worker) ?? [];
          this._earlyTasks.delete(answer.worker);
          for (const frame of early) this._start(worker, session, frame);
        });
    }
    return worker._registering;
  }

  async _unregister(worker) {
    this._workers = this._workers.filter((w) => w !== worker);
    const session = worker._session;
    if (session !== null && session.open && worker.id !== null) {
      // Tasks pushed before the sidecar takes this still reach the worker and are run.
      await session.request("unregister", { worker: worker.id }).catch(() => {});
    }
  }

  _start(worker, session, frame) {
    const wt = new WorkerTask(session, frame.delivery, frame.task);
    this._deliveries.set(frame.delivery, wt);
    // On the next turn of the event loop, not now: `const worker = await
    // manager.process(handler)` has assigned `worker` by then, so that a handler may use it
    // (the seed's does) even for a task pushed with the register answer.
    setImmediate(() => {
      const run = wt.cancelled ? Promise.resolve() : runDelivery(worker, wt, (err) => this._report(err));
      run
        .catch((err) => this._report(err))
        .finally(() => {
          if (this._deliveries.get(frame.delivery) === wt) this._deliveries.delete(frame.delivery);
          this._checkIdle();
        });
    });
  }

  _checkIdle() {
    for (const waiter of this._idleWaiters) {
      if ([...this._deliveries.values()].every((wt) => wt === waiter.except)) {
        this._idleWaiters.delete(waiter);
        waiter.resolve();
      }
    }
  }

  _whenIdle(except) {
    return new Promise((resolve) => {
      this._idleWaiters.add({ resolve, except });
      this._checkIdle();
    });
  }

  async _shutdownNow(timeoutMs, mine) {
    const session = this._conn?.session ?? null;
    if (session !== null) {
      await Promise.all(this._workers.filter((w) => !w.closed).map((w) => within(w.close(), 5000)));
      await within(this._whenIdle(mine), timeoutMs);
      const left = [...this._deliveries.values()].filter((wt) => wt !== mine);
      for (const wt of left) wt._cancel("the worker shut down");
      // Handed back unfinished: straight to pending, the attempt not spent (protocol: release).
      await within(Promise.all(left.map((wt) => releaseDelivery(wt, (err) => this._report(err)))), 2000);
    }
    this._closed = true;
    clearInterval(this._resync);
    this._resync = null;
    await this._conn?.close();
    const gone = new ConnectionLost("the task manager was shut down before the task finished");
    for (const task of this._tasks.values()) task._end(gone);
    this._tasks.clear();
  }

  // -- tasks ----------------------------------------------------------------------------

  async _commit(task) {
    this._ensureStarted();
    const fields = {
      task_id: task.id,
      payload: task.data === undefined ? null : task.data,
      options: task.options,
      subscribe: true,
      events: task._kinds(),
    };
    if (task.runAt !== null) fields.run_at = task.runAt;
    // Followed before the create is sent: its events may overtake the answer.
    this._tasks.set(task.id, task);
    let repeated = task._ownId;
    let session;
    let answer;
    try {
      // With OpenTelemetry: a producer span, its context carried in the options.
      await withProducerSpan(task, async () => {
        for (;;) {
          session = await this._ready();
          try {
            answer = await session.request("create", fields);
            break;
          } catch (err) {
            if (!(err instanceof ConnectionLost) || this._closed) throw err;
            repeated = true; // the create may have happened: the same task id makes it safe
          }
        }
      });
    } catch (err) {
      if (this._tasks.get(task.id) === task) this._tasks.delete(task.id);
      throw err;
    }
    task.committed = true;
    task._heardAt = Date.now();
    task._session = session;
    task._sid = answer?.subscription ?? null;
    if (answer?.existing && answer.task_id !== task.id) {
      // The unique key is held by a live task: follow that one (its past events are not
      // told again, so read where it stands).
      if (this._tasks.get(task.id) === task) this._tasks.delete(task.id);
      task.id = answer.task_id;
      task.existing = true;
      const followed = this._tasks.get(task.id);
      if (followed !== undefined && followed !== task) followed._followers.push(task);
      else this._tasks.set(task.id, task);
      repeated = true;
    }
    if (task._final) {
      this._untrack(task, true);
    } else if (repeated) {
      // A create repeated (or an id given again) does not repeat past events: the task
      // may be over already. Read where it stands.
      this._settleFromGet(task, session);
    }
    this._ensureResync();
  }

  /** Follow a committed task on `session` (after a reconnect, or for every kind). */
  async _follow(task, session, read) {
    task._session = session;
    const answer = await session.request("subscribe", { task_id: task.id, until_final: true });
    if (task._final) {
      await session.request("unsubscribe", { subscription: answer.subscription }).catch(() => {});
      return;
    }
    task._sid = answer.subscription;
    if (read) await this._settleFromGet(task, session);
  }

  _followAll(task) {
    task._followsAll = true;
    const session = this._conn?.session;
    if (session) this._follow(task, session, false).catch((err) => this._report(err));
  }

  async _settleFromGet(task, session) {
    try {
      task._take(await session.request("get", { task_id: task.id }));
    } catch (err) {
      if (!(err instanceof ConnectionLost)) this._report(err);
    }
  }

  /** Stop following `task`; `ended` when its subscription ended by itself. */
  _untrack(task, ended) {
    if (this._tasks.get(task.id) === task) this._tasks.delete(task.id);
    const session = task._session;
    if (!ended && task._sid !== null && session !== null && session.open) {
      session.request("unsubscribe", { subscription: task._sid }).catch(() => {});
    }
    task._sid = null;
  }

  _ensureResync() {
    if (this._resync !== null || this._closed) return;
    // Should the sidecar miss events (its watch fell behind etcd's compaction), a read
    // settles a task not heard of for a while.
    this._resync = setInterval(() => {
      const session = this._conn?.session;
      if (session === null || session === undefined) return;
      const now = Date.now();
      for (const task of this._tasks.values()) {
        if (task.committed && !task._final && now - task._heardAt >= this._resyncMs) {
          task._heardAt = now;
          this._settleFromGet(task, session);
        }
      }
    }, this._resyncMs / 3);
    this._resync.unref();
  }

  _subscribeAll(session) {
    if (this._all === null || this._all.session !== session) {
      const all = { session, sid: null, early: [], promise: null };
      this._all = all;
      all.promise = session.request("subscribe", {}).then((answer) => {
        all.sid = answer.subscription;
        for (const frame of all.early) {
          if (frame.subscription !== all.sid) continue;
          if (frame.push === "gap") this._emitGap(frame);
          else this._emit(frame.event);
        }
        all.early = [];
      });
      all.promise.catch(() => {
        if (this._all === all) this._all = null;
      });
    }
    return this._all.promise;
  }

  /** A gap of the namespace's subscription: the "gap" listeners hear it (without the push's own keys). */
  _emitGap(frame) {
    const { push: _push, subscription: _sid, ...gap } = frame;
    const listeners = this._listeners.get("gap") ?? [];
    if (listeners.length === 0) {
      this._logger.warn(`tm-sidecar-sdk: events of the namespace were missed (${gap.reason}) after revision ${gap.from_revision}`);
      return;
    }
    this._calls.add(listeners.map((cb) => [cb, [gap], 'a manager "gap" callback']));
  }

  /**
   * After a gap, read again the followed tasks it names (all of them when the sidecar
   * could not list them): their outcome may be among the events missed.
   */
  _rereadAfterGap(frame, session) {
    const ids = Array.isArray(frame.task_ids) && !frame.truncated ? new Set(frame.task_ids) : null;
    for (const task of [...this._tasks.values()]) {
      // A task named is read even before its create's answer (the gap may come first).
      if (!task._final && (ids === null ? task.committed : ids.has(task.id))) {
        task._heardAt = Date.now();
        this._settleFromGet(task, session);
      }
    }
  }

  _emit(event) {
    const kind = event.event;
    const what = (name) => `a manager "${name}" callback`;
    const calls = (this._listeners.get(kind) ?? []).map((cb) => [cb, [event], what(kind)]);
    if (kind === "completed") {
      for (const cb of this._listeners.get("success") ?? []) calls.push([cb, [event.data ?? null, event], what("success")]);
    } else if (kind === "failed" && !event.will_retry) {
      for (const cb of this._listeners.get("failure") ?? []) calls.push([cb, [event.error ?? null, event], what("failure")]);
    }
    if (calls.length && LIFECYCLE.includes(kind)) this._calls.add(calls);
  }
}

/** The seed's name for the task manager. */
export const DefaultTaskManager = TaskManager;
