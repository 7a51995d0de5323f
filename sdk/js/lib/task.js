// A task as its producer holds it: built, committed, then waited for.

import { randomBytes } from "node:crypto";
import { InvalidRequest, TaskFailed, WaitTimeout } from "./errors.js";

/** Event kinds the sidecar pushes (docs/protocol.md, "Events"). */
export const LIFECYCLE = Object.freeze(["queued", "assigned", "started", "updated", "failed", "completed"]);
/** What `on()` takes: the pushed kinds, and the outcome as `success` or `failure`. */
export const EVENTS = Object.freeze([...LIFECYCLE, "success", "failure"]);
/** What a manager's `on()` takes besides `EVENTS` (and "error"): "gap", events missed. */
export const MANAGER_EVENTS = Object.freeze([...EVENTS, "gap"]);

// The order of the events one change can tell (a start, then progress or an outcome):
// with it, the same event through two subscriptions is taken once.
const RANK = { queued: 0, assigned: 1, started: 2, updated: 3, failed: 4, completed: 4 };

/** A fresh task id, sorting by creation time as the sidecar's do (docs/keys.md). */
export function newTaskId() {
  return `${Date.now().toString(16).padStart(12, "0")}-${randomBytes(6).toString("hex")}`;
}

export function checkEvent(event, allowed) {
  if (!allowed.includes(event)) {
    throw new InvalidRequest(`unknown event ${JSON.stringify(event)}; one of ${allowed.join(", ")}`);
  }
}

/** Runs callbacks one after the other in the order given; one that throws is reported. */
export class CallQueue {
  constructor(report) {
    this._report = report;
    this._tail = Promise.resolve();
  }

  /** Queue `calls` ([fn, args, what]) and then `after`; answers when all have run. */
  add(calls, after) {
    this._tail = this._tail.then(async () => {
      for (const [fn, args, what] of calls) {
        try {
          await fn(...args);
        } catch (err) {
          this._report(new Error(`${what} failed: ${err?.message ?? err}`, { cause: err }));
        }
      }
      after?.();
    });
    return this._tail;
  }
}

/** A task being built, then committed, then waited for. Methods chain. */
export class Task {
  constructor(manager, data, taskId) {
    this.manager = manager;
    this.id = taskId ?? newTaskId();
    this.data = data;
    /** The protocol's `options` (timeout_s, max_attempts, backoff, priority, queue). */
    this.options = {};
    /** UTC epoch seconds before which the task does not start, or null. */
    this.runAt = null;
    this.committed = false;
    /** True when a unique key's live task answered the commit: this follows that task. */
    this.existing = false;
    /** The last state told: queued, assigned, started, updated, completed, failed. */
    this.state = null;
    this.resultValue = undefined;
    this.error = null;
    this._ownId = taskId !== undefined;
    this._callbacks = new Map();
    this._seen = [-1, -1];
    this._final = false;
    this._settled = false;
    this._waiters = new Set();
    this._calls = new CallQueue((err) => manager._report(err));
    this._committing = null;
    this._session = null;
    this._sid = null;
    this._followsAll = false;
    this._heardAt = 0;
    this._endError = null;
    this._followers = [];
  }

  _editable() {
    if (this.committed || this._committing) {
      throw new InvalidRequest("the task is committed: set its options before commit()");
    }
  }

  /** Fail an attempt that runs longer than `ms` milliseconds (its handler is told to stop). */
  withTimeout(ms) {
    this._editable();
    if (typeof ms !== "number" || !Number.isFinite(ms) || ms <= 0) {
      throw new InvalidRequest("withTimeout takes a positive number of milliseconds");
    }
    this.options.timeout_s = ms / 1000;
    return this;
  }

  /** Do not start before `when`: a Date, or epoch milliseconds (what Date.parse answers). */
  withDelayUntil(when) {
    this._editable();
    const ms = when instanceof Date ? when.getTime() : when;
    if (typeof ms !== "number" || !Number.isFinite(ms)) {
      throw new InvalidRequest("withDelayUntil takes a Date or epoch milliseconds");
    }
    this.runAt = ms / 1000;
    return this;
  }

  /** Do not start before `ms` milliseconds from now. */
  withDelay(ms) {
    return this.withDelayUntil(Date.now() + ms);
  }

  /**
   * Try at most `maxAttempts` times (as the Python SDK's with_retries: attempts, not
   * retries), optionally with a backoff `{baseMs, factor, maxMs, jitter}`.
   */
  withRetries(maxAttempts, backoff) {
    this._editable();
    if (!Number.isInteger(maxAttempts) || maxAttempts < 1) {
      throw new InvalidRequest("withRetries takes a whole number of attempts, at least 1");
    }
    this.options.max_attempts = maxAttempts;
    if (backoff !== undefined) {
      const { baseMs = 1000, factor = 2, maxMs = 300000, jitter = 0.5 } = backoff;
      this.options.backoff = { base_s: baseMs / 1000, factor, max_s: maxMs / 1000, jitter };
    }
    return this;
  }

  /** Higher runs first; equal priorities run in commit order. */
  withPriority(priority) {
    this._editable();
    if (!Number.isInteger(priority)) throw new InvalidRequest("withPriority takes a whole number");
    this.options.priority = priority;
    return this;
  }

  /**
   * At most one live task per `key` (namespace-wide): if one is pending, delayed or
   * running when this commits, no new task is made and this Task follows that one (its
   * `id` becomes that task's and `existing` is true). With `forMs`, the key stays taken
   * that long after its task finished too.
   */
  withUnique(key, { forMs } = {}) {
    this._editable();
    if (typeof key !== "string" || key === "") throw new InvalidRequest("withUnique takes a non-empty string key");
    this.options.unique_key = key;
    if (forMs !== undefined) {
      if (typeof forMs !== "number" || !Number.isFinite(forMs) || forMs < 0) {
        throw new InvalidRequest("withUnique's forMs is a number of milliseconds, at least 0");
      }
      this.options.unique_for_s = forMs / 1000;
    }
    return this;
  }

  /**
   * Count this task against its queue's per-key limits (`keyMaxRunning`, `keyRate`)
   * under `key`: one task at a time per customer, say.
   */
  withConcurrencyKey(key) {
    this._editable();
    if (typeof key !== "string" || key === "") throw new InvalidRequest("withConcurrencyKey takes a non-empty string key");
    this.options.concurrency_key = key;
    return this;
  }

  /** At most `count` snoozes (default 100); one more fails the task (`SnoozeLimit`). */
  withMaxSnoozes(count) {
    this._editable();
    if (!Number.isInteger(count) || count < 0) throw new InvalidRequest("withMaxSnoozes takes a whole number, at least 0");
    this.options.max_snoozes = count;
    return this;
  }

  /**
   * Cancel the task: pending or delayed, it fails at once with `Cancelled`; running, its
   * handler is told to stop (on whichever node runs it) and it fails the same way, never
   * retried. `result()` then rejects with TaskFailed. False if it had finished already.
   */
  async cancel(reason = "cancelled by its creator") {
    if (!this.committed) throw new InvalidRequest("commit() the task first");
    return this.manager.cancel(this.id, { reason });
  }

  /** Send the task to the workers of `queue` (default: "default"). */
  withQueue(queue) {
    this._editable();
    if (typeof queue !== "string") throw new InvalidRequest("withQueue takes a string");
    this.options.queue = queue;
    return this;
  }

  /**
   * Call `callback` on an event of this task: queued, assigned, started (each with the
   * event), updated (progress, event), failed (error, willRetry, event), completed
   * (result, event); success (result) and failure (error) for the outcome.
   */
  on(event, callback) {
    checkEvent(event, EVENTS);
    if (typeof callback !== "function") throw new InvalidRequest("on() takes a function");
    const later = this.committed && !this._final && LIFECYCLE.includes(event) && !this._kinds().includes(event);
    if (!this._callbacks.has(event)) this._callbacks.set(event, []);
    this._callbacks.get(event).push(callback);
    if (later) this.manager._followAll(this); // committed with fewer kinds: follow all now
    return this;
  }

  /** The event kinds this task needs pushed: its outcome, and what has callbacks. */
  _kinds() {
    if (this._followsAll) return [...LIFECYCLE];
    const kinds = new Set(["completed", "failed"]);
    for (const kind of this._callbacks.keys()) if (LIFECYCLE.includes(kind)) kinds.add(kind);
    return [...kinds].sort();
  }

  /** Queue the task; once this resolves it is durable in etcd. */
  commit() {
    if (this._committing === null) {
      this._committing = this.manager._commit(this).then(
        () => this,
        (err) => {
          this._committing = null;
          throw err;
        },
      );
    }
    return this._committing;
  }

  /**
   * The task's result once it completes (after its callbacks for the outcome have run);
   * rejects with TaskFailed if it fails for good, WaitTimeout after `timeoutMs`.
   */
  async result(timeoutMs) {
    if (!this.committed) {
      if (this._committing === null) throw new InvalidRequest("commit() the task first");
      await this._committing;
    }
    if (!this._settled) {
      if (this._endError !== null) throw this._endError;
      await new Promise((resolve, reject) => {
        const waiter = { resolve, reject, timer: null };
        if (timeoutMs !== undefined && timeoutMs !== null) {
          waiter.timer = setTimeout(() => {
            this._waiters.delete(waiter);
            reject(new WaitTimeout(`task ${this.id} did not finish within ${timeoutMs} ms (it goes on)`));
          }, timeoutMs);
        }
        this._waiters.add(waiter);
      });
    }
    if (this.state === "failed") throw new TaskFailed(this.id, this.error);
    return this.resultValue;
  }

  /** An event pushed by the sidecar (`streamed`), or an outcome read with `get`. */
  _onEvent(event, streamed = true) {
    // Tasks of this manager that a unique key sent to this one hear what it hears.
    for (const follower of this._followers) follower._onEvent(event, streamed);
    if (this._final) return;
    this._heardAt = Date.now();
    const kind = event.event;
    if (streamed) {
      const seen = [Number(event.revision) || 0, RANK[kind] ?? 0];
      if (seen[0] < this._seen[0] || (seen[0] === this._seen[0] && seen[1] <= this._seen[1])) {
        return; // the same event through a second subscription
      }
      this._seen = seen;
    }
    let args = [event];
    let final = null;
    if (kind === "queued" || kind === "assigned" || kind === "started") {
      this.state = kind;
    } else if (kind === "updated") {
      this.state = kind;
      args = [event.data, event];
    } else if (kind === "completed") {
      this.state = "completed";
      this.resultValue = event.data ?? null;
      final = "success";
      args = [this.resultValue, event];
    } else if (kind === "failed") {
      args = [event.error ?? null, Boolean(event.will_retry), event];
      if (!event.will_retry) {
        this.state = "failed";
        this.error = event.error ?? null;
        final = "failure";
      }
    } else {
      return; // a kind this SDK does not know (a newer sidecar): nothing to call
    }
    const what = (name) => `the "${name}" callback of task ${this.id}`;
    const calls = (this._callbacks.get(kind) ?? []).map((cb) => [cb, args, what(kind)]);
    if (final === "success") {
      for (const cb of this._callbacks.get("success") ?? []) calls.push([cb, [this.resultValue], what("success")]);
    } else if (final === "failure") {
      for (const cb of this._callbacks.get("failure") ?? []) calls.push([cb, [this.error], what("failure")]);
    }
    if (final !== null) {
      this._final = true;
      this.manager._untrack(this, streamed);
    }
    if (calls.length || final !== null) {
      this._calls.add(calls, final === null ? undefined : () => this._settle());
    }
  }

  /** A task as `get` answers it: if it is over, take its outcome. */
  _take(info) {
    if (this._final || info === null || typeof info !== "object") return;
    if (info.state === "completed") {
      this._onEvent({ event: "completed", task_id: this.id, attempt: info.attempts, data: info.result }, false);
    } else if (info.state === "failed") {
      this._onEvent(
        { event: "failed", task_id: this.id, attempt: info.attempts, error: info.error, will_retry: false },
        false,
      );
    }
  }

  _settle() {
    this._settled = true;
    for (const waiter of this._waiters) {
      clearTimeout(waiter.timer);
      waiter.resolve();
    }
    this._waiters.clear();
  }

  /** The manager shut down before the outcome came: whoever waits is told. */
  _end(err) {
    for (const follower of this._followers) follower._end(err);
    if (this._settled) return;
    this._endError = err;
    for (const waiter of this._waiters) {
      clearTimeout(waiter.timer);
      waiter.reject(err);
    }
    this._waiters.clear();
  }
}
