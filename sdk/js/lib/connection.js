// One connection to the sidecar at a time, made again with backoff when it goes away
// (docs/protocol.md: "Handshake", "Requests, replies, pushes", "Disconnects").

import net from "node:net";
import { ConnectionLost, PayloadTooLarge, PermissionDenied, ProtocolViolation, errorFromWire } from "./errors.js";
import { FrameReader, MalformedFrame, encodeFrame } from "./framing.js";

export const PROTOCOL_VERSION = 1;
/** The frame limit until the `hello` answer tells the sidecar's. */
export const DEFAULT_MAX_FRAME = 1024 * 1024;

/** The most outcomes one `report` carries (the sidecar takes up to 1,000). */
export const MAX_REPORT_ITEMS = 500;
/** Room kept in a `report` frame for its id, op and brackets. */
const REPORT_OVERHEAD = 64;
/** A report item's kind as the single op and field of a sidecar without `report`. */
const SINGLE = { complete: "result", fail: "error", snooze: "delay_s", progress: "data", release: null };

/** The wait before connect attempt `n` (1, 2, ...): as the Python SDK's, 0.1 s doubling to 2 s. */
export function backoffMs(n) {
  return Math.min(2000, 50 * 2 ** Math.min(n, 16));
}

/** One socket to the sidecar, from connect to close: requests by id, pushes to `onPush`. */
export class Session {
  constructor(socket, { onPush, report }) {
    this.socket = socket;
    this.maxFrame = DEFAULT_MAX_FRAME;
    this.hello = null;
    this.open = true;
    /** Why it ended: null for a close, else the error (a malformed frame, say). */
    this.endReason = null;
    /** The sidecar's refusal of this client (before the handshake), if it refused it. */
    this.refusal = null;
    this._onPush = onPush;
    this._report = report;
    this._reader = new FrameReader(DEFAULT_MAX_FRAME);
    this._pending = new Map();
    this._nextId = 1;
    /** Outcomes waiting for the next `report`: {item, resolve, reject}. */
    this._outcomes = [];
    this._reporting = false;
    this.ended = new Promise((resolve) => {
      this._resolveEnded = resolve;
    });
    socket.on("data", (chunk) => this._onData(chunk));
    // A reset or a broken pipe is a disconnect like any other; 'close' follows it.
    socket.on("error", () => {});
    socket.on("close", () => this._end());
  }

  /** Send a request; its reply's result, or the error the sidecar answered, as an exception. */
  request(op, fields = {}) {
    if (!this.open) return Promise.reject(new ConnectionLost("not connected to the sidecar"));
    const id = this._nextId++;
    let bytes;
    try {
      bytes = encodeFrame({ ...fields, id, op });
    } catch (err) {
      return Promise.reject(err);
    }
    if (bytes.length - 1 > this.maxFrame) {
      return Promise.reject(
        new PayloadTooLarge(
          `a ${op} request of ${bytes.length - 1} bytes is over the sidecar's frame limit ` +
            `of ${this.maxFrame} bytes (max_frame)`,
        ),
      );
    }
    return new Promise((resolve, reject) => {
      this._pending.set(id, { resolve, reject });
      this.socket.write(bytes);
    });
  }

  /** Whether the sidecar takes outcomes in batches (`report`) and pushes tasks in them. */
  get batched() {
    return this.hello !== null && Array.isArray(this.hello.ops) && this.hello.ops.includes("report");
  }

  /**
   * Report `kind` (complete, fail, snooze, release, progress) of `delivery`: its answer,
   * or the error the sidecar answered for it. Where the sidecar serves `report`, many go
   * in one frame: the first on the next turn of the event loop (so that what ends
   * together goes together), those that come while one is in flight in the next, as its
   * answer arrives; a lone outcome is never held back. Else the single op.
   */
  report(kind, delivery, value = true) {
    if (!this.batched) {
      const field = SINGLE[kind];
      return this.request(kind, field === null ? { delivery } : { delivery, [field]: value });
    }
    if (!this.open) return Promise.reject(new ConnectionLost("not connected to the sidecar"));
    let item;
    try {
      item = encodeFrame({ delivery, [kind]: value }).subarray(0, -1); // encoded once
    } catch (err) {
      return Promise.reject(err);
    }
    if (item.length + REPORT_OVERHEAD > this.maxFrame) {
      return Promise.reject(
        new PayloadTooLarge(
          `the ${kind} of delivery ${delivery} is ${item.length} bytes, over the sidecar's ` +
            `frame limit of ${this.maxFrame} bytes (max_frame)`,
        ),
      );
    }
    return new Promise((resolve, reject) => {
      this._outcomes.push({ item, resolve, reject });
      if (!this._reporting) {
        this._reporting = true;
        setImmediate(() => this._flushOutcomes());
      }
    });
  }

  _flushOutcomes() {
    if (this._outcomes.length === 0 || !this.open) {
      this._reporting = false;
      return;
    }
    const room = this.maxFrame - REPORT_OVERHEAD;
    const batch = [];
    let size = 0;
    while (this._outcomes.length > 0 && batch.length < MAX_REPORT_ITEMS) {
      const next = this._outcomes[0].item.length + 1;
      if (batch.length > 0 && size + next > room) break;
      batch.push(this._outcomes.shift());
      size += next;
    }
    const id = this._nextId++;
    const parts = [Buffer.from(`{"id":${id},"op":"report","outcomes":[`)];
    batch.forEach((p, i) => {
      if (i > 0) parts.push(Buffer.from(","));
      parts.push(p.item);
    });
    parts.push(Buffer.from("]}\n"));
    const answered = new Promise((resolve, reject) => this._pending.set(id, { resolve, reject }));
    this.socket.write(Buffer.concat(parts));
    answered
      .then((answer) => {
        const results = answer !== null && typeof answer === "object" ? answer.results : null;
        if (!Array.isArray(results) || results.length !== batch.length) {
          throw new ConnectionLost("the sidecar's report answer does not match the report");
        }
        batch.forEach((p, i) => {
          const r = results[i];
          if (r !== null && typeof r === "object" && r.ok === true) p.resolve(r.result);
          else p.reject(errorFromWire(r !== null && typeof r === "object" ? r.error : null));
        });
      })
      .catch((err) => {
        for (const p of batch) p.reject(err);
      })
      .finally(() => this._flushOutcomes());
  }

  /** Say hello; throws the sidecar's refusal (a version it does not speak, say). */
  async handshake(client) {
    const result = await this.request("hello", { version: PROTOCOL_VERSION, client });
    if (result === null || typeof result !== "object") {
      throw new MalformedFrame("the hello answer is not an object");
    }
    if (Number.isInteger(result.max_frame) && result.max_frame > 0) {
      this.maxFrame = result.max_frame;
      this._reader.limit = result.max_frame;
    }
    this.hello = result;
    return result;
  }

  /** End the session for `reason` (reported by whoever awaits `ended`). */
  fail(reason) {
    if (this.endReason === null) this.endReason = reason;
    this.socket.destroy();
    this._end();
  }

  close() {
    this.socket.destroy();
    this._end();
  }

  _onData(chunk) {
    if (!this.open) return;
    try {
      for (const frame of this._reader.push(chunk)) {
        if (!this.open) return;
        this._dispatch(frame);
      }
    } catch (err) {
      this.fail(
        err instanceof MalformedFrame
          ? err
          : new MalformedFrame(`a frame from the sidecar could not be taken: ${err.message}`),
      );
    }
  }

  _dispatch(frame) {
    if ("push" in frame) {
      if (typeof frame.push !== "string") throw new MalformedFrame("a push without a kind");
      this._onPush(frame, this);
      return;
    }
    if (typeof frame.ok !== "boolean") {
      throw new MalformedFrame("a frame from the sidecar is neither a reply nor a push");
    }
    const waiter = frame.id === null || frame.id === undefined ? undefined : this._pending.get(frame.id);
    if (waiter === undefined) {
      // An error about no request of ours (about a frame the sidecar could not read), or
      // a refusal of this client before it closes the connection.
      if (!frame.ok) {
        const err = errorFromWire(frame.error);
        if (this.hello === null && (err instanceof PermissionDenied || err instanceof ProtocolViolation)) {
          this.refusal = err;
          return;
        }
        err.message = `the sidecar reports: ${err.message}`;
        this._report(err);
      }
      return;
    }
    this._pending.delete(frame.id);
    if (frame.ok) waiter.resolve(frame.result);
    else waiter.reject(errorFromWire(frame.error));
  }

  _end() {
    if (!this.open) return;
    this.open = false;
    const lost = new ConnectionLost("the connection to the sidecar closed");
    for (const waiter of this._pending.values()) waiter.reject(lost);
    this._pending.clear();
    for (const waiting of this._outcomes) waiting.reject(lost);
    this._outcomes = [];
    this._resolveEnded(this.endReason);
  }
}

function connectUnix(path) {
  return new Promise((resolve, reject) => {
    const socket = net.createConnection({ path });
    const onError = (err) => {
      socket.destroy();
      reject(err);
    };
    socket.once("error", onError);
    socket.once("connect", () => {
      socket.off("error", onError);
      resolve(socket);
    });
  });
}

/**
 * Keeps one session to the sidecar until closed. `onUp(session)` runs after each handshake
 * (to register workers and subscribe again), `onDown(session)` after each session ends.
 */
export class Connector {
  constructor({ path, client, onPush, onUp, onDown, report }) {
    this.path = path;
    this.client = client;
    this.session = null;
    this.closed = false;
    /** Why the connector stopped for good (a PermissionDenied), or null. */
    this.failure = null;
    this._onPush = onPush;
    this._onUp = onUp;
    this._onDown = onDown;
    this._report = report;
    this._waiters = new Set();
    this._sleep = null;
    this._loop = null;
  }

  start() {
    if (this._loop === null) this._loop = this._run();
    return this;
  }

  /** The live session, once there is one; rejects after `timeoutMs` or when closed. */
  ready(timeoutMs) {
    if (this.session !== null) return Promise.resolve(this.session);
    if (this.failure !== null) return Promise.reject(this.failure);
    if (this.closed) return Promise.reject(new ConnectionLost("the task manager is shut down"));
    return new Promise((resolve, reject) => {
      const waiter = { resolve, reject, timer: null };
      if (timeoutMs !== undefined && timeoutMs !== null) {
        waiter.timer = setTimeout(() => {
          this._waiters.delete(waiter);
          reject(new ConnectionLost(`cannot reach the sidecar at ${this.path} within ${timeoutMs} ms`));
        }, timeoutMs);
      }
      this._waiters.add(waiter);
    });
  }

  /** Stop: close the session, stop reconnecting, fail whoever waits for a connection. */
  async close() {
    this._stop(new ConnectionLost("the task manager is shut down"));
    await this._loop;
  }

  /** Stop for good: whoever waits for a connection, now or later, is told `err`. */
  _stop(err) {
    this.closed = true;
    this._sleep?.wake();
    this.session?.close();
    const shut = err;
    for (const waiter of this._waiters) {
      clearTimeout(waiter.timer);
      waiter.reject(shut);
    }
    this._waiters.clear();
  }

  /** Refused for good (the socket's permissions, or --allow-uid): trying again is futile. */
  _refused(err) {
    this.failure = err;
    this._report(err);
    this._stop(err);
  }

  async _run() {
    let strikes = 0;
    while (!this.closed) {
      if (strikes > 0) {
        await this._nap(backoffMs(strikes));
        if (this.closed) break;
      }
      let socket;
      try {
        socket = await connectUnix(this.path);
      } catch (err) {
        if (err.code === "EACCES" || err.code === "EPERM") {
          const uid = process.getuid?.() ?? "?";
          this._refused(
            new PermissionDenied(
              `this user (uid ${uid}) may not open the sidecar's socket at ${this.path} (${err.code}): ` +
                "the socket's group (--socket-group) and mode (--socket-mode), and every directory " +
                'above it, must let this user in; see docs/operations.md, "Sockets for other users"',
              { cause: err },
            ),
          );
          break;
        }
        strikes += 1;
        if (strikes === 1 || strikes === 10 || strikes % 50 === 0) {
          this._report(new ConnectionLost(`cannot reach the sidecar at ${this.path} (${err.code ?? err.message}); retrying`));
        }
        continue;
      }
      if (this.closed) {
        socket.destroy();
        break;
      }
      const session = new Session(socket, { onPush: this._onPush, report: this._report });
      try {
        await session.handshake(this.client);
      } catch (err) {
        if (session.open) session.fail(err);
      }
      const upAt = Date.now();
      if (session.open && !this.closed) {
        this.session = session;
        for (const waiter of this._waiters) {
          clearTimeout(waiter.timer);
          waiter.resolve(session);
        }
        this._waiters.clear();
        try {
          await this._onUp(session);
        } catch (err) {
          this._report(err);
        }
      }
      const reason = await session.ended;
      if (this.session === session) this.session = null;
      if (session.hello === null && session.refusal !== null && !this.closed) {
        // Refused before the handshake (a uid not in --allow-uid): refused again if retried.
        this._refused(new session.refusal.constructor(`the sidecar refused this client: ${session.refusal.message}`));
        break;
      }
      try {
        this._onDown(session);
      } catch (err) {
        this._report(err);
      }
      if (this.closed) break;
      if (reason === null && session.hello !== null) {
        this._report(new ConnectionLost("the connection to the sidecar was lost; reconnecting"));
        // One that worked a while: try again at once. One that closes as soon as it is
        // made must not become a busy loop.
        strikes = Date.now() - upAt >= 1000 ? 0 : strikes + 1;
      } else {
        // Garbage from the sidecar, or a refused hello: back off as after a failed connect.
        strikes += 1;
        this._report(
          reason ?? new ConnectionLost("the sidecar closed the connection during the handshake"),
        );
      }
    }
  }

  _nap(ms) {
    return new Promise((resolve) => {
      const timer = setTimeout(done, ms);
      const self = this;
      function done() {
        clearTimeout(timer);
        self._sleep = null;
        resolve();
      }
      this._sleep = { wake: done };
    });
  }
}
