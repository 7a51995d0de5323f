// Batched deliveries and outcomes against a real tm-sidecar (docs/protocol.md, "Batches"):
// a worker registers with `batch`, takes a burst in `tasks` pushes and reports its
// outcomes (and progress) in `report` frames, never one frame per task.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { DefaultTaskManager, InvalidRequest } from "../index.js";
import { Sidecar, deferred } from "../test-support/sidecar.mjs";

const T = { timeout: 30000 };

let sidecar;
const managers = [];

function manager() {
  const m = new DefaultTaskManager({ socket: sidecar.socket, logger: { warn: () => {} } });
  managers.push(m);
  return m;
}

/** What the session sends (op per request frame, items per report) and is pushed. */
function spy(session) {
  const seen = { ops: [], reportItems: [], pushes: [] };
  const write = session.socket.write.bind(session.socket);
  session.socket.write = (bytes, ...rest) => {
    for (const line of bytes.toString("utf8").split("\n")) {
      if (line === "") continue;
      const frame = JSON.parse(line);
      seen.ops.push(frame.op);
      if (frame.op === "report") seen.reportItems.push(frame.outcomes.length);
    }
    return write(bytes, ...rest);
  };
  const onPush = session._onPush;
  session._onPush = (frame, s) => {
    seen.pushes.push(frame.push === "tasks" ? `tasks:${frame.tasks.length}` : frame.push);
    return onPush(frame, s);
  };
  return seen;
}

before(async () => {
  sidecar = await new Sidecar().start();
});

after(async () => {
  await Promise.all(managers.map((m) => m.shutdown(1000)));
  await sidecar.destroy();
});

describe("batches", () => {
  test("a burst comes in few tasks pushes and its outcomes go in few report frames", T, async () => {
    const n = 40;
    const producer = manager();
    const tasks = [];
    for (let i = 0; i < n; i += 1) {
      const task = await producer.create({ i });
      task.withQueue("burst");
      await task.commit();
      tasks.push(task);
    }
    const workers = manager();
    const gate = deferred();
    let started = 0;
    await workers.process(
      async (task) => {
        started += 1;
        if (started === n) gate.resolve();
        await gate.promise; // all end together: their outcomes can share frames
        assert.equal(await task.update({ at: task.data.i }), true);
        if (task.data.i === 0) throw new Error("the first one fails");
        return task.data.i * 2;
      },
      { queue: "burst", concurrency: n },
    );
    const seen = spy(workers._conn.session);
    assert.ok(workers._conn.session.batched, "the sidecar announces report");
    const results = await Promise.allSettled(tasks.map((t) => t.result(20000)));
    assert.equal(results[0].status, "rejected");
    for (let i = 1; i < n; i += 1) assert.deepEqual(results[i], { status: "fulfilled", value: i * 2 });
    // Deliveries: only tasks pushes, fewer than the tasks, at least one with many.
    const taskPushes = seen.pushes.filter((p) => p.startsWith("task"));
    assert.ok(taskPushes.every((p) => p.startsWith("tasks:")), taskPushes.join(" "));
    // Outcomes and progress: only report frames, fewer than the 2n items they carry.
    assert.deepEqual(
      seen.ops.filter((op) => op !== "report" && op !== "unregister" && op !== "register"),
      [],
    );
    const items = seen.reportItems.reduce((a, b) => a + b, 0);
    assert.ok(items >= 2 * n - 1, `${items} items reported`);
    assert.ok(seen.reportItems.length < items, `${seen.reportItems.length} report frames`);
    assert.ok(Math.max(...seen.reportItems) > 1);
  });

  test("an unknown delivery among known ones gets its own error; the known one is taken", T, async () => {
    const producer = manager();
    const task = await producer.create({ n: 1 });
    task.withQueue("mixed");
    await task.commit();
    const workers = manager();
    const answers = deferred();
    await workers.process(
      async (wt) => {
        const session = workers._conn.session;
        // Both in one report frame (one turn of the event loop), in this order.
        const settled = await Promise.allSettled([
          session.report("complete", wt.delivery, "mine"),
          session.report("complete", wt.delivery + 100000, "nobody's"),
          session.report("release", wt.delivery),
        ]);
        answers.resolve(settled);
        return "ignored: the first outcome stands";
      },
      { queue: "mixed" },
    );
    const [mine, unknown, late] = await answers.promise;
    assert.deepEqual(mine, { status: "fulfilled", value: true });
    assert.equal(unknown.status, "rejected");
    assert.ok(unknown.reason instanceof InvalidRequest, String(unknown.reason));
    assert.match(unknown.reason.message, /no such delivery/);
    assert.equal(late.status, "rejected");
    assert.match(late.reason.message, /reported already/);
    assert.equal(await task.result(20000), "mine");
  });

  test("an outcome too large for any frame fails its task, the others are taken", T, async () => {
    const producer = manager();
    const big = await producer.create({ big: true });
    big.withQueue("big").withRetries(1);
    await big.commit();
    const small = await producer.create({ big: false });
    small.withQueue("big");
    await small.commit();
    const workers = manager();
    await workers.process(async (task) => (task.data.big ? "x".repeat(1100 * 1024) : "ok"), {
      queue: "big",
      concurrency: 2,
    });
    assert.equal(await small.result(20000), "ok");
    await assert.rejects(big.result(20000), (err) => {
      assert.equal(err.error?.type, "ResultTooLarge");
      return true;
    });
  });
});
