// A fake sidecar on a real Unix socket, for what a real one never sends: garbage.
// `script(conn)` is called for each connection; `conn.frames` collects what the client
// sent, `conn.next()` waits for the next one.

import { mkdtempSync, rmSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";

export const HELLO = { version: 1, server: "fake/0", node: "fake", namespace: "default", leader: false, max_frame: 1024 };

class FakeConnection {
  constructor(socket, index) {
    this.socket = socket;
    this.index = index;
    this.at = Date.now();
    this.frames = [];
    this.closed = new Promise((resolve) => socket.once("close", resolve));
    this._waiters = [];
    let buffer = "";
    socket.setEncoding("utf8");
    socket.on("data", (chunk) => {
      buffer += chunk;
      let newline;
      while ((newline = buffer.indexOf("\n")) >= 0) {
        const frame = JSON.parse(buffer.slice(0, newline));
        buffer = buffer.slice(newline + 1);
        this.frames.push(frame);
        this._waiters.shift()?.(frame);
      }
    });
    socket.on("error", () => {});
  }

  /** The next frame the client sends (one already received first). */
  next() {
    if (this._taken === undefined) this._taken = 0;
    const index = this._taken++;
    if (index < this.frames.length) return Promise.resolve(this.frames[index]);
    return new Promise((resolve) => this._waiters.push(resolve));
  }

  /** Read the client's hello and answer it. */
  async hello(overrides = {}) {
    const frame = await this.next();
    if (frame.op !== "hello") throw new Error(`expected hello, got ${JSON.stringify(frame)}`);
    this.reply(frame, { ...HELLO, ...overrides });
    return frame;
  }

  reply(request, result) {
    this.send({ id: request.id, ok: true, result });
  }

  send(frame) {
    this.write(`${JSON.stringify(frame)}\n`);
  }

  write(data) {
    if (!this.socket.destroyed) this.socket.write(data);
  }
}

export class FakeSidecar {
  constructor(script) {
    this.dir = mkdtempSync(join(tmpdir(), "tm-fake-"));
    this.socket = join(this.dir, "fake.sock");
    this.connections = [];
    this._script = script;
    this._arrivals = new Set();
    this.server = net.createServer((socket) => {
      const conn = new FakeConnection(socket, this.connections.length);
      this.connections.push(conn);
      for (const arrival of [...this._arrivals]) arrival(conn);
      Promise.resolve(this._script(conn)).catch((err) => {
        this.scriptError = err;
        socket.destroy();
      });
    });
  }

  async start() {
    await new Promise((resolve) => this.server.listen(this.socket, resolve));
    return this;
  }

  /** The connection with this index, once it is made. */
  connection(index) {
    if (index < this.connections.length) return Promise.resolve(this.connections[index]);
    return new Promise((resolve) => {
      const arrival = (conn) => {
        if (conn.index !== index) return;
        this._arrivals.delete(arrival);
        resolve(conn);
      };
      this._arrivals.add(arrival);
    });
  }

  async close() {
    for (const conn of this.connections) conn.socket.destroy();
    await new Promise((resolve) => this.server.close(resolve));
    rmSync(this.dir, { recursive: true, force: true });
  }
}
