// The SDK against a real tm-sidecar (with its embedded etcd): the seed's lifecycle,
// events in order, delays, timeouts, retries, permanent failure, shutdown.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import {
  DefaultTaskManager,
  InvalidRequest,
  PayloadTooLarge,
  Permanent,
  TaskFailed,
  TaskCancelled,
  WaitTimeout,
} from "../index.js";
import { Sidecar, deferred, pollUntil } from "../test-support/sidecar.mjs";

/** Every test has a deadline: a hang is a failure, not a stuck run. */
const T = { timeout: 20000 };

let sidecar;
const managers = [];
let queues = 0;

/** A manager on the test sidecar, shut down after the file. */
function manager() {
  const m = new DefaultTaskManager({ socket: sidecar.socket, logger: { warn: () => {} } });
  managers.push(m);
  return m;
}

/** A queue of the test's own: the tests share one sidecar. */
function queue() {
  queues += 1;
  return `q${queues}`;
}

before(async () => {
  sidecar = await new Sidecar().start();
});

after(async () => {
  await Promise.all(managers.map((m) => m.shutdown(1000)));
  await sidecar.destroy();
});

describe("lifecycle", () => {
  test("the seed's flow: process, create, configure, commit, result", T, async () => {
    const q = queue();
    const workers = manager();
    const seen = [];
    const worker = await workers.process(
      async (task) => {
        seen.push({ worker: worker.id, master: workers.isMaster(), id: task.id, data: task.data, attempt: task.attempt });
        return true;
      },
      { queue: q },
    );
    assert.ok(worker.id !== null, "register answered a worker id");
    const producer = manager();
    const task = await producer.create({ TaskSpecificKey: "TaskSpecificValue" });
    assert.equal(task.committed, false, "create() builds the task; commit() queues it");
    const success = deferred();
    task.withQueue(q).withTimeout(10000).withDelayUntil(Date.parse("2020-01-01"));
    task.on("success", success.resolve);
    task.on("failure", success.reject);
    await task.commit();
    assert.equal(task.committed, true);
    assert.equal(await task.result(10000), true);
    assert.equal(await success.promise, true);
    assert.deepEqual(seen, [{ worker: worker.id, master: true, id: task.id, data: { TaskSpecificKey: "TaskSpecificValue" }, attempt: 1 }]);
    const info = await producer.get(task.id);
    assert.equal(info.state, "completed");
    assert.equal(info.result, true);
    assert.equal(info.options.timeout_s, 10);
    assert.equal(producer.isMaster(), true, "a single sidecar leads");
  });

  test("a handler may use the worker `process()` answers, even for a task already waiting", T, async () => {
    const q = queue();
    const producer = manager();
    const task = await (await producer.create({})).withQueue(q).withRetries(1).commit();
    const workers = manager();
    // The task is pushed with the register answer; the handler runs once `worker` is set.
    const worker = await workers.process(() => ({ id: worker.id }), { queue: q });
    assert.deepEqual(await task.result(10000), { id: worker.id });
  });

  test("events of a task, and of the manager, in order", T, async () => {
    const q = queue();
    const workers = manager();
    await workers.process(
      async (task) => {
        assert.equal(await task.update({ progress: 0.5 }), true);
        return { done: task.data.n };
      },
      { queue: q },
    );
    const producer = manager();
    const all = [];
    producer.on("queued", (e) => all.push(["queued", e.task_id]));
    producer.on("assigned", (e) => all.push(["assigned", e.task_id]));
    producer.on("started", (e) => all.push(["started", e.task_id]));
    producer.on("updated", (e) => all.push(["updated", e.task_id, e.data]));
    producer.on("completed", (e) => all.push(["completed", e.task_id, e.data]));
    producer.on("success", (result, e) => all.push(["success", e.task_id, result]));
    await producer.waitSubscribed();
    const mine = [];
    const task = (await producer.create({ n: 7 })).withQueue(q);
    for (const kind of ["queued", "assigned", "started"]) task.on(kind, (e) => mine.push([kind, e.attempt]));
    task.on("updated", (progress, e) => mine.push(["updated", progress, e.node]));
    task.on("completed", (result) => mine.push(["completed", result]));
    task.on("success", (result) => mine.push(["success", result]));
    await task.commit();
    assert.deepEqual(await task.result(10000), { done: 7 });
    assert.deepEqual(mine, [
      ["queued", 0],
      ["assigned", 1],
      ["started", 1],
      ["updated", { progress: 0.5 }, "node-js"],
      ["completed", { done: 7 }],
      ["success", { done: 7 }],
    ]);
    await pollUntil(() => all.some((e) => e[0] === "success"), { what: "the manager's success" });
    const ofTask = all.filter((e) => e[1] === task.id);
    assert.deepEqual(ofTask, [
      ["queued", task.id],
      ["assigned", task.id],
      ["started", task.id],
      ["updated", task.id, { progress: 0.5 }],
      ["completed", task.id, { done: 7 }],
      ["success", task.id, { done: 7 }],
    ]);
  });

  test("a delayed task waits for its time", T, async () => {
    const q = queue();
    const workers = manager();
    const startedAt = deferred();
    await workers.process(
      () => {
        startedAt.resolve(Date.now());
        return "late";
      },
      { queue: q },
    );
    const producer = manager();
    const due = Date.now() + 1200;
    const task = (await producer.create({})).withQueue(q).withDelayUntil(new Date(due));
    await task.commit();
    const info = await producer.get(task.id);
    assert.equal(info.state, "delayed");
    assert.ok(Math.abs(info.due_at * 1000 - due) < 5, `due_at ${info.due_at} is the date asked for`);
    assert.equal(await task.result(10000), "late");
    const started = await startedAt.promise;
    // The sidecar's clock is this machine's: the handler never starts before the due time.
    assert.ok(started >= due - 5, `started ${due - started} ms early`);
  });

  test("a timeout fails the attempt and aborts the handler's signal", T, async () => {
    const q = queue();
    const workers = manager();
    const aborted = deferred();
    await workers.process(
      (task) =>
        new Promise((resolve) => {
          task.signal.addEventListener("abort", () => {
            aborted.resolve({ reason: task.signal.reason, cancelled: task.cancelled });
            resolve("too late"); // dropped: the attempt is over
          });
        }),
      { queue: q },
    );
    const producer = manager();
    const failed = [];
    const task = (await producer.create({})).withQueue(q).withTimeout(300).withRetries(1);
    task.on("failed", (error, willRetry) => failed.push([error.type, willRetry]));
    await task.commit();
    const err = await task.result(10000).then(
      () => assert.fail("a timed-out task must not complete"),
      (e) => e,
    );
    assert.ok(err instanceof TaskFailed);
    assert.equal(err.error.type, "Timeout");
    assert.deepEqual(failed, [["Timeout", false]]);
    const { reason, cancelled } = await aborted.promise;
    assert.ok(reason instanceof TaskCancelled);
    assert.equal(cancelled, true);
    const info = await producer.get(task.id);
    assert.equal(info.state, "failed");
    assert.equal(info.attempts, 1);
  });

  test("retries: failed attempts are retried with backoff until one succeeds", T, async () => {
    const q = queue();
    const workers = manager();
    const attempts = [];
    await workers.process(
      (task) => {
        attempts.push(task.attempt);
        if (task.attempt < 3) throw new Error(`flaky ${task.attempt}`);
        return { attempt: task.attempt };
      },
      { queue: q },
    );
    const producer = manager();
    const failed = [];
    const task = (await producer.create({})).withQueue(q).withRetries(3, { baseMs: 50, jitter: 0 });
    task.on("failed", (error, willRetry, event) => failed.push([error.message, error.type, willRetry, event.attempt]));
    await task.commit();
    assert.deepEqual(await task.result(15000), { attempt: 3 });
    assert.deepEqual(attempts, [1, 2, 3]);
    assert.deepEqual(failed, [
      ["flaky 1", "Error", true, 1],
      ["flaky 2", "Error", true, 2],
    ]);
    const info = await producer.get(task.id);
    assert.equal(info.attempts, 3);
    assert.deepEqual(info.options.backoff, { base_s: 0.05, factor: 2, max_s: 300, jitter: 0 });
  });

  test("Permanent fails the task at once, without the remaining retries", T, async () => {
    const q = queue();
    const workers = manager();
    let runs = 0;
    class NotAllowed extends Error {}
    await workers.process(
      (task) => {
        runs += 1;
        if (task.data.wrapped) throw new NotAllowed("wrapped", { cause: new Permanent("inner") });
        throw new Permanent("this task cannot succeed");
      },
      { queue: q },
    );
    const producer = manager();
    const failure = deferred();
    const task = (await producer.create({})).withQueue(q).withRetries(5);
    task.on("failure", failure.resolve);
    await task.commit();
    const err = await task.result(10000).catch((e) => e);
    assert.ok(err instanceof TaskFailed, String(err));
    assert.equal(err.taskId, task.id);
    assert.equal(err.error.type, "Permanent");
    assert.equal(err.error.message, "this task cannot succeed");
    assert.equal(err.error.retryable, false);
    assert.match(err.error.traceback, /lifecycle\.test\.mjs/);
    assert.deepEqual(await failure.promise, err.error);
    const wrapped = (await producer.create({ wrapped: true })).withQueue(q).withRetries(5);
    await wrapped.commit();
    const err2 = await wrapped.result(10000).catch((e) => e);
    assert.equal(err2.error.type, "NotAllowed", "an error caused by Permanent is permanent too");
    assert.equal(runs, 2, "one attempt each, not five");
    assert.equal((await producer.get(task.id)).attempts, 1);
  });

  test("results that cannot travel fail the attempt with why; bad input is refused", T, async () => {
    const q = queue();
    const workers = manager();
    await workers.process((task) => (task.data.big ? "x".repeat(300 * 1024) : { n: 10n }), { queue: q });
    const producer = manager();
    const bigint = await (await producer.create({})).withQueue(q).commit();
    const e1 = await bigint.result(10000).catch((e) => e);
    assert.equal(e1.error.type, "ResultNotJSON");
    const big = await (await producer.create({ big: true })).withQueue(q).commit();
    const e2 = await big.result(10000).catch((e) => e);
    assert.equal(e2.error.type, "ResultTooLarge");
    const huge = (await producer.create("y".repeat(300 * 1024))).withQueue(q);
    await assert.rejects(huge.commit(), PayloadTooLarge);
    const oversized = (await producer.create("z".repeat(2 * 1024 * 1024))).withQueue(q);
    await assert.rejects(oversized.commit(), PayloadTooLarge, "over the frame limit: refused before it is sent");
    const task = await producer.create({});
    assert.throws(() => task.withTimeout(-1), InvalidRequest);
    assert.throws(() => task.on("finished", () => {}), InvalidRequest);
    await assert.rejects(task.result(), InvalidRequest, "result() before commit()");
    const unknownQueue = (await producer.create({})).withQueue("bad queue!");
    await assert.rejects(unknownQueue.commit(), InvalidRequest);
    const waiting = await (await producer.create({})).withQueue(`${q}-nobody`).commit();
    await assert.rejects(waiting.result(200), WaitTimeout);
    // The connection survived all of it.
    assert.equal((await producer.status()).leader, true);
  });

  test("shutdown lets a running handler finish and report, then disconnects", T, async () => {
    const q = queue();
    const workers = manager();
    const running = deferred();
    const release = deferred();
    await workers.process(
      async (task) => {
        running.resolve();
        await release.promise;
        return { finished: task.data.n };
      },
      { queue: q },
    );
    const producer = manager();
    const task = await (await producer.create({ n: 1 })).withQueue(q).commit();
    await running.promise;
    let shutDown = false;
    const shutdown = workers.shutdown(10000).then(() => {
      shutDown = true;
    });
    // Shutdown has stopped new tasks (unregistered) but waits for the running one.
    const second = await (await producer.create({ n: 2 })).withQueue(q).commit();
    await pollUntil(async () => (await producer.status()).capacity?.[q] === undefined, { what: "the worker's capacity to go" });
    assert.equal(shutDown, false, "shutdown waits for the running handler");
    release.resolve();
    await shutdown;
    assert.deepEqual(await task.result(10000), { finished: 1 }, "its outcome was reported before the disconnect");
    assert.equal((await producer.get(second.id)).state, "pending", "no task was taken after shutdown began");
    await assert.rejects(workers.create({}), /shut down/);
  });

  test("shutdown hands back a handler that does not finish in time, and it runs again elsewhere", T, async () => {
    const q = queue();
    const stuck = manager();
    const running = deferred();
    await stuck.process(
      (task) => {
        running.resolve();
        return new Promise(() => {}); // never settles
      },
      { queue: q },
    );
    const producer = manager();
    const failed = [];
    const task = (await producer.create({})).withQueue(q).withRetries(3, { baseMs: 10 });
    task.on("failed", (error, willRetry) => failed.push([error.type, willRetry]));
    await task.commit();
    await running.promise;
    await stuck.shutdown(200);
    const other = manager();
    await other.process((t) => ({ attempt: t.attempt }), { queue: q });
    // A hand-back spends no attempt and is no failure: the task runs again as attempt 1.
    assert.deepEqual(await task.result(10000), { attempt: 1 });
    assert.deepEqual(failed, []);
  });
});
