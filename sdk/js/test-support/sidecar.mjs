// Real tm-sidecar processes for the Node tests, each with its embedded etcd in a
// temporary data directory and a socket of its own (as tests/procs.py starts them).

import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, openSync, closeSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const HERE = dirname(fileURLToPath(import.meta.url));
export const ROOT = resolve(HERE, "..", "..", "..");

function onPath(name) {
  for (const dir of (process.env.PATH ?? "").split(":")) {
    if (dir && existsSync(join(dir, name))) return join(dir, name);
  }
  return null;
}

/** `tm-sidecar`: $TM_SIDECAR, else the repository's venv, else PATH. */
export function sidecarBinary() {
  const found = process.env.TM_SIDECAR ?? [join(ROOT, ".venv", "bin", "tm-sidecar")].find(existsSync) ?? onPath("tm-sidecar");
  if (!found) throw new Error("tm-sidecar not found: install the project (README) or set TM_SIDECAR");
  return found;
}

/** The Python that has the Python SDK: $TM_PYTHON, else the repository's venv, else python3. */
export function pythonBinary() {
  return process.env.TM_PYTHON ?? [join(ROOT, ".venv", "bin", "python")].find(existsSync) ?? "python3";
}

/** Resolves once `predicate()` is truthy (polled every `everyMs`); rejects after `timeoutMs`. */
export async function pollUntil(predicate, { timeoutMs = 10000, everyMs = 20, what = "a condition" } = {}) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await predicate();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

function canConnect(path) {
  return new Promise((resolve) => {
    const socket = net.createConnection({ path });
    socket.once("connect", () => {
      socket.destroy();
      resolve(true);
    });
    socket.once("error", () => resolve(false));
  });
}

/** A deferred: a promise with its resolve and reject (Promise.withResolvers is Node 22). */
export function deferred() {
  let resolve;
  let reject;
  const promise = new Promise((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

/** One tm-sidecar process; `start()` again after `stop()` keeps its data and socket. */
export class Sidecar {
  constructor({ nodeId = "node-js", args = [] } = {}) {
    this.dir = mkdtempSync(join(tmpdir(), "tm-js-"));
    this.socket = join(this.dir, "tm.sock");
    this.dataDir = join(this.dir, "data");
    this.logPath = join(this.dir, "sidecar.log");
    this.nodeId = nodeId;
    this.args = args;
    this.proc = null;
  }

  /** Start it and resolve once its socket accepts connections. */
  async start() {
    const log = openSync(this.logPath, "a");
    const args = ["--data-dir", this.dataDir, "--socket", this.socket, "--node-id", this.nodeId, "--lease-ttl", "2", ...this.args];
    this.proc = spawn(sidecarBinary(), args, { stdio: ["ignore", log, log], env: { ...process.env, TM_ETCD: "" } });
    closeSync(log);
    const proc = this.proc;
    let exited = false;
    proc.once("exit", () => {
      exited = true;
    });
    await pollUntil(
      async () => {
        if (exited) throw new Error(`tm-sidecar exited during start:\n${this.log().slice(-3000)}`);
        return canConnect(this.socket);
      },
      { timeoutMs: 30000, everyMs: 50, what: "the sidecar's socket" },
    );
    return this;
  }

  /** SIGTERM, and wait for the exit (its drain hands running tasks back). */
  async stop() {
    const proc = this.proc;
    if (proc === null || proc.exitCode !== null || proc.signalCode !== null) return;
    const exited = new Promise((r) => proc.once("exit", r));
    proc.kill("SIGTERM");
    const timer = setTimeout(() => proc.kill("SIGKILL"), 15000);
    await exited;
    clearTimeout(timer);
    this.proc = null;
  }

  log() {
    return existsSync(this.logPath) ? readFileSync(this.logPath, "utf8") : "";
  }

  /** Stop it and remove its directory. */
  async destroy() {
    await this.stop();
    rmSync(this.dir, { recursive: true, force: true });
  }
}
