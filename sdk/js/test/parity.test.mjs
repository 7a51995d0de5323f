// Every operation the Python SDK has, in the Node.js SDK, against a real tm-sidecar
// (issue 20 item 11): unique keys, concurrency keys and limits, cancel, pause and resume,
// schedules, snooze, result/wait/task by id, submit, ping. That each protocol op is
// sent by both SDKs is tests/sdk/test_sdk_ops.py's to check.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { DefaultTaskManager, InvalidRequest, Snooze, TaskFailed, TaskNotFound, Unavailable, WaitTimeout } from "../index.js";
import { Sidecar, deferred, pollUntil } from "../test-support/sidecar.mjs";

/** Every test has a deadline: a hang is a failure, not a stuck run. */
const T = { timeout: 30000 };

let sidecar;
const managers = [];
let queues = 0;

function manager() {
  const m = new DefaultTaskManager({ socket: sidecar.socket, logger: { warn: () => {} } });
  managers.push(m);
  return m;
}

function queue() {
  queues += 1;
  return `parity${queues}`;
}

before(async () => {
  sidecar = await new Sidecar({ nodeId: "node-parity" }).start();
});

after(async () => {
  await Promise.all(managers.map((m) => m.shutdown(1000)));
  await sidecar.destroy();
});

describe("parity with the Python SDK", () => {
  test("a unique key: a second create while the first lives answers that task", T, async () => {
    const m = manager();
    const q = queue();
    const first = await (await m.create({ n: 1 }, { uniqueKey: `key-${q}` })).withQueue(q).commit();
    const second = await (await m.create({ n: 2 })).withUnique(`key-${q}`).withQueue(q).commit();
    assert.equal(first.existing, false);
    assert.equal(second.existing, true);
    assert.equal(second.id, first.id, "the live task's id");
    // Both handles hear the one task's outcome.
    await m.process(async (task) => task.data.n * 10, { queue: q });
    assert.equal(await first.result(20000), 10);
    assert.equal(await second.result(20000), 10);
    assert.equal((await m.get(first.id)).options.unique_key, `key-${q}`);
  });

  test("a concurrency key with key_max_running 1 runs one task of a key at a time", T, async () => {
    const m = manager();
    const q = queue();
    const settings = await m.setLimits(q, { keyMaxRunning: 1, maxRunning: 10, rate: { limit: 100, periodMs: 1000 } });
    assert.equal(settings.key_max_running, 1);
    assert.equal(settings.max_running, 10);
    assert.deepEqual(settings.rate, { limit: 100, period_s: 1 });
    assert.equal((await m.queues())[q].key_max_running, 1);
    let running = 0;
    let most = 0;
    await m.process(
      async () => {
        running += 1;
        most = Math.max(most, running);
        await new Promise((r) => setImmediate(r));
        await new Promise((r) => setTimeout(r, 30));
        running -= 1;
        return null;
      },
      { queue: q, concurrency: 4 },
    );
    const tasks = [];
    for (let i = 0; i < 4; i++) tasks.push(await (await m.create({ i })).withQueue(q).withConcurrencyKey("customer-1").commit());
    await Promise.all(tasks.map((t) => t.result(20000)));
    assert.equal(most, 1, "tasks of one key overlapped");
    assert.equal((await m.get(tasks[0].id)).options.concurrency_key, "customer-1");
    const lifted = await m.setLimits(q, { keyMaxRunning: null, rate: null });
    assert.equal(lifted.key_max_running, undefined);
    assert.equal(lifted.rate, undefined);
  });

  test("cancel: a pending task fails at once, for good, with Cancelled", T, async () => {
    const m = manager();
    const q = queue();
    const task = await (await m.create({ n: 1 })).withQueue(q).commit();
    assert.equal(await task.cancel("not needed"), true);
    await assert.rejects(task.result(20000), (err) => err instanceof TaskFailed && err.error.type === "Cancelled");
    assert.equal(await m.cancel(task.id), false, "already over");
    await assert.rejects(m.cancel("no-such-task"), TaskNotFound);
  });

  test("pause and resume: a paused queue starts nothing until resumed", T, async () => {
    const m = manager();
    const q = queue();
    const other = queue();
    assert.equal((await m.pauseQueue(q)).paused, true);
    assert.equal((await m.queues())[q].paused, true);
    await m.process(async (task) => task.data, { queue: q });
    await m.process(async (task) => task.data, { queue: other });
    const held = await (await m.create("held")).withQueue(q).commit();
    const later = await (await m.create("later")).withQueue(other).commit();
    assert.equal(await later.result(20000), "later");
    assert.equal((await m.get(held.id)).state, "pending", "a task committed before ran after, paused");
    assert.equal((await m.resumeQueue(q)).paused, false);
    assert.equal(await held.result(20000), "held");
  });

  test("schedules: made, listed, fired, paused, resumed, deleted", T, async () => {
    const m = manager();
    const q = queue();
    const name = `every-${q}`;
    const fired = deferred();
    await m.process(
      async (task) => {
        fired.resolve(task.id);
        return task.data;
      },
      { queue: q },
    );
    const made = await m.schedule(name, { from: "schedule" }, { everyMs: 1000, options: { queue: q }, missed: "skip", graceMs: 5000 });
    assert.equal(made.every_s, 1);
    assert.equal(made.missed, "skip");
    assert.equal(made.grace_s, 5);
    assert.ok((await m.schedules()).some((s) => s.name === name));
    const taskId = await fired.promise;
    assert.ok(taskId.startsWith(`${name}.`), taskId);
    assert.deepEqual(await m.result(taskId, 20000), { from: "schedule" });
    assert.equal((await m.pauseSchedule(name)).paused, true);
    assert.equal((await m.resumeSchedule(name)).paused, false);
    assert.equal(await m.deleteSchedule(name), true);
    assert.equal(await m.deleteSchedule(name), false);
    assert.ok(!(await m.schedules()).some((s) => s.name === name));
  });

  test("snooze: the task runs again later, the attempt not counted", T, async () => {
    const m = manager();
    const q = queue();
    const runs = [];
    await m.process(
      async (task) => {
        runs.push(task.attempt);
        if (runs.length === 1) throw new Snooze(0);
        return "woke";
      },
      { queue: q },
    );
    const task = await (await m.create(null)).withQueue(q).withMaxSnoozes(2).commit();
    assert.equal(await task.result(20000), "woke");
    assert.deepEqual(runs, [1, 1], "the snoozed attempt did not count");
    const info = await m.get(task.id);
    assert.equal(info.attempts, 1);
    assert.equal(info.options.max_snoozes, 2);
    assert.throws(() => new Snooze(-1), InvalidRequest);
  });

  test("by id, from another manager: task(), result(), wait(); WaitTimeout; submit; ping", T, async () => {
    const producer = manager();
    const q = queue();
    const gate = deferred();
    const task = await producer.submit({ n: 7 }, { queue: q, max_attempts: 1 });
    const elsewhere = manager();
    const waiting = await elsewhere.wait(task.id, 50).catch((err) => err);
    assert.ok(waiting instanceof WaitTimeout, String(waiting));
    assert.ok(waiting instanceof Unavailable, "a timed-out wait is unavailable, as the protocol's");
    await assert.rejects(elsewhere.result(task.id, 50), WaitTimeout);
    await assert.rejects(elsewhere.task("no-such-task"), TaskNotFound);
    const followed = await elsewhere.task(task.id);
    assert.deepEqual(followed.data, { n: 7 });
    await producer.process(
      async (t) => {
        await gate.promise;
        return t.data.n * 2;
      },
      { queue: q },
    );
    gate.resolve();
    assert.equal(await elsewhere.result(task.id, 20000), 14);
    assert.equal(await followed.result(20000), 14);
    const info = await elsewhere.wait(task.id, 20000);
    assert.equal(info.state, "completed");
    assert.equal(info.result, 14);
    assert.equal(await elsewhere.ping(), "pong");
    assert.equal(elsewhere.isLeader(), elsewhere.isMaster());
    await pollUntil(() => elsewhere.isLeader(), { what: "the only sidecar to lead" });
  });
});

describe("a handler past its timeout", () => {
  test("keeps its slot until it settles: its retry waits for it", T, async () => {
    const m = manager();
    const q = queue();
    const events = [];
    const release = deferred();
    const worker = await m.process(
      async (task) => {
        events.push(["start", task.attempt]);
        if (task.attempt === 1) await release.promise; // ignores task.signal
        events.push(["end", task.attempt]);
        return task.attempt;
      },
      { queue: q, concurrency: 1 },
    );
    const task = await (await m.create(null)).withQueue(q).withTimeout(1000).withRetries(6, { baseMs: 0 }).commit();
    const startedTwo = () => events.some(([what, attempt]) => what === "start" && attempt === 2);
    await pollUntil(() => startedTwo() || worker.waiting === 1, { timeoutMs: 20000, what: "the retry" });
    assert.ok(!startedTwo(), `a retry ran beside its timed-out handler: ${JSON.stringify(events)}`);
    release.resolve();
    const last = await task.result(20000);
    assert.ok(last >= 2);
    assert.deepEqual(events.slice(0, 2), [["start", 1], ["end", 1]]);
    assert.deepEqual(events.slice(-2), [["start", last], ["end", last]]);
    assert.equal(worker.waiting, 0);
  });
});

describe("runWorker", () => {
  test("runs a queue until SIGTERM, then exits 0 after a graceful shutdown", T, async () => {
    const { spawn } = await import("node:child_process");
    const { fileURLToPath } = await import("node:url");
    const index = fileURLToPath(new URL("../index.js", import.meta.url));
    const q = queue();
    const script = `
      import { runWorker } from ${JSON.stringify(index)};
      await runWorker(async (task) => task.data * 2, { queue: process.argv[1], socket: process.argv[2], shutdownTimeoutMs: 5000 });
      console.log("stopped");
    `;
    const child = spawn(process.execPath, ["--input-type=module", "-e", script, q, sidecar.socket], { stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    child.stdout.on("data", (chunk) => {
      out += chunk;
    });
    child.stderr.on("data", (chunk) => {
      out += chunk;
    });
    const exited = new Promise((resolve) => child.once("exit", (code, signal) => resolve({ code, signal })));
    try {
      const m = manager();
      const task = await (await m.create(21)).withQueue(q).commit();
      assert.equal(await task.result(20000), 42);
      child.kill("SIGTERM");
      assert.deepEqual(await exited, { code: 0, signal: null }, out);
      assert.match(out, /stopped/);
    } finally {
      child.kill("SIGKILL");
    }
  });
});
