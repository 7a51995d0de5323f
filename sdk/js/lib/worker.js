// The worker side: handlers registered with `process()`, and the tasks they receive
// (docs/protocol.md, "Running tasks (workers)").

import { AsyncLocalStorage } from "node:async_hooks";
import { ConnectionLost, InvalidRequest, PayloadTooLarge, Snooze, errorToWire } from "./errors.js";
import { withConsumerSpan } from "./otel.js";

/** The delivery a handler is running in (so that shutdown() from a handler knows its own). */
export const currentDelivery = new AsyncLocalStorage();

/** Why a handler's `signal` was aborted. */
export class TaskCancelled extends Error {
  constructor(message) {
    super(message);
    this.name = "TaskCancelled";
  }
}

/** What a handler receives: the task, a way to report progress, and a signal to stop. */
export class WorkerTask {
  constructor(session, delivery, task) {
    this.id = task.id;
    this.data = task.payload ?? null;
    this.attempt = Number.isInteger(task.attempt) ? task.attempt : 1;
    this.options = task.options ?? {};
    this.createdAt = task.created_at ?? null;
    this.delivery = delivery;
    this.cancelled = false;
    this._session = session;
    this._controller = new AbortController();
    /** Aborted when the attempt must stop (its timeout, a withdrawn assignment, shutdown). */
    this.signal = this._controller.signal;
  }

  /** The task's data (the seed's `data`; `payload` in the protocol). */
  get payload() {
    return this.data;
  }

  /** Publish progress (any JSON, at most 64 KiB); false if the attempt is over. */
  async update(progress) {
    if (this.cancelled || !this._session.open) return false;
    return Boolean(await this._session.report("progress", this.delivery, progress));
  }

  _cancel(reason) {
    if (this.cancelled) return;
    this.cancelled = true;
    this._controller.abort(new TaskCancelled(reason));
  }
}

/** Handlers registered with `manager.process()`: `id` is the sidecar's worker id. */
export class Worker {
  constructor(manager, handler, queue, concurrency) {
    this.manager = manager;
    this.handler = handler;
    this.queue = queue;
    this.concurrency = concurrency;
    /** The sidecar's id for this registration (a new one after a reconnect). */
    this.id = null;
    this.node = null;
    this.closed = false;
    this._session = null;
    this._registering = null;
    // Slots: a handler holds one until its promise settles, even after its attempt ended
    // (JavaScript cannot stop it), so that a retry never runs beside it.
    this._busy = 0;
    this._queue = [];
  }

  /** Deliveries waiting for a slot that a handler whose attempt ended still holds. */
  get waiting() {
    return this._queue.length;
  }

  _acquire() {
    if (this._busy < this.concurrency) {
      this._busy += 1;
      return Promise.resolve();
    }
    return new Promise((resolve) => this._queue.push(resolve));
  }

  _release() {
    const next = this._queue.shift();
    if (next !== undefined) next();
    else this._busy -= 1;
  }

  /** Take no new tasks (running ones finish). */
  async close() {
    if (this.closed) return;
    this.closed = true;
    await this.manager._unregister(this);
  }
}

/** Run one delivery on `session` and report its outcome there. */
export async function runDelivery(worker, wt, report) {
  await worker._acquire();
  if (wt.cancelled) {
    worker._release();
    return; // ended while it waited for a slot: nothing ran, nothing to report
  }
  let kind;
  let outcome;
  try {
    // A promise whatever the handler does (returns a value, throws at once): its slot
    // is given back when it settles, however late.
    // With OpenTelemetry: the handler runs in its attempt's span, in the task's trace.
    const handle = () => withConsumerSpan(wt, worker.node, () => worker.handler(wt), (e) => e instanceof Snooze);
    const running = (async () => currentDelivery.run(wt, handle))();
    running.then(
      () => worker._release(),
      () => worker._release(),
    );
    const value = await running;
    kind = "complete";
    outcome = value === undefined ? null : value;
  } catch (err) {
    if (err instanceof Snooze) {
      // Back to delayed for that long, the attempt not counted (protocol: snooze).
      kind = "snooze";
      outcome = err.delayMs / 1000;
    } else {
      kind = "fail";
      outcome = errorToWire(err);
    }
  }
  if (wt.cancelled || !wt._session.open) return; // the sidecar has ended this attempt itself
  try {
    // Many outcomes to a `report` frame where the sidecar serves it (connection.js).
    await wt._session.report(kind, wt.delivery, outcome);
  } catch (err) {
    if (err instanceof TypeError || err instanceof PayloadTooLarge) {
      // Not JSON, or no frame can carry it: the attempt fails for good, with why.
      const type = err instanceof TypeError ? "ResultNotJSON" : "ResultTooLarge";
      await reportFailure(wt, { type, message: err.message, retryable: false }, report);
    } else if (err instanceof ConnectionLost) {
      report(new ConnectionLost(`the outcome of task ${wt.id} was lost with the connection; it will be retried`));
    } else {
      report(new InvalidRequest(`the outcome of task ${wt.id} was not taken: ${err.message}`));
    }
  }
}

/** Tell the sidecar an attempt failed with `error`; a refusal is reported, not thrown. */
export async function releaseDelivery(wt, report) {
  try {
    await wt._session.report("release", wt.delivery);
  } catch (err) {
    report(new ConnectionLost(`could not hand task ${wt.id} back: ${err.message}`));
  }
}

export async function reportFailure(wt, error, report) {
  try {
    await wt._session.report("fail", wt.delivery, error);
  } catch (err) {
    report(new ConnectionLost(`could not report the failure of task ${wt.id}: ${err.message}`));
  }
}
