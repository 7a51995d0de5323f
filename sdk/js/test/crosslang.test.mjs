// One scenario, both SDKs: a producer in Python or Node, a worker in Python or Node, the
// same observed outcomes whichever pair runs it.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { dirname, join } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { after, before, describe, test } from "node:test";
import { Sidecar, pythonBinary } from "../test-support/sidecar.mjs";

/** Every test has a deadline: a hang is a failure, not a stuck run. */
const T = { timeout: 60000 };

const HERE = join(dirname(fileURLToPath(import.meta.url)), "crosslang");
const PROGRAMS = {
  node: (script) => [process.execPath, [join(HERE, `${script}.mjs`)]],
  python: (script) => [pythonBinary(), [join(HERE, `${script}.py`)]],
};

const EXPECTED = {
  add: { result: { sum: 5 }, progress: [{ done: 0.5 }] },
  permanent: { error: { type: "Permanent", message: "cannot do this", retryable: false }, attempts: 1 },
  flaky: { result: { attempt: 2 }, failed: [["Flaky", "the first attempt fails", true]] },
  slow: { error: "Timeout" },
};

let sidecar;

before(async () => {
  sidecar = await new Sidecar().start();
});

after(async () => {
  await sidecar.destroy();
});

function run(language, script, queue) {
  const [command, args] = PROGRAMS[language](script);
  const child = spawn(command, [...args, queue], {
    env: { ...process.env, TM_SOCKET: sidecar.socket },
    stdio: ["pipe", "pipe", "pipe"],
  });
  const lines = [];
  let stderr = "";
  child.stderr.on("data", (d) => {
    stderr += d;
  });
  const exited = new Promise((resolve) => child.once("exit", (code, signal) => resolve({ code, signal })));
  const firstLine = new Promise((resolve, reject) => {
    createInterface({ input: child.stdout }).on("line", (line) => {
      lines.push(line);
      if (lines.length === 1) resolve(line);
    });
    exited.then(({ code }) => reject(new Error(`${language} ${script} exited (${code}) before printing:\n${stderr}`)));
  });
  return { child, firstLine, exited, stderr: () => stderr };
}

function timeout(promise, ms, what) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what} took over ${ms} ms`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

describe("cross-language", () => {
  for (const producer of ["python", "node"]) {
    for (const worker of ["python", "node"]) {
      test(`a ${producer} producer with a ${worker} worker`, T, async () => {
        const queue = `x-${producer}-${worker}`;
        const w = run(worker, "worker", queue);
        try {
          assert.equal(await timeout(w.firstLine, 20000, `the ${worker} worker's start`), "ready");
          const p = run(producer, "producer", queue);
          const line = await timeout(p.firstLine, 30000, `the ${producer} producer`);
          const { code } = await timeout(p.exited, 10000, `the ${producer} producer's exit`);
          assert.equal(code, 0, p.stderr());
          assert.deepEqual(JSON.parse(line), EXPECTED);
        } finally {
          w.child.stdin.end();
          const { code } = await timeout(w.exited, 10000, `the ${worker} worker's exit`);
          assert.equal(code, 0, w.stderr());
        }
      });
    }
  }
});
