// createMany against a real tm-sidecar (with its embedded etcd): ids in order, options
// for all, a repeat that creates nothing twice, the partial answer when an id is taken,
// and bad input refused whole.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import {
  DefaultTaskManager,
  InvalidRequest,
  MAX_CREATE_MANY,
  PayloadTooLarge,
  TaskNotFound,
} from "../index.js";
import { Sidecar } from "../test-support/sidecar.mjs";

const T = { timeout: 30000 };
/** Tasks in one etcd transaction of a bulk create today (128 operations, two per task):
 * a call of more takes several. */
const PER_TXN = 64;

let sidecar;
let manager;

async function exists(taskId) {
  try {
    await manager.get(taskId);
    return true;
  } catch (err) {
    if (err instanceof TaskNotFound) return false;
    throw err;
  }
}

before(async () => {
  sidecar = await new Sidecar({ nodeId: "node-bulk" }).start();
  manager = new DefaultTaskManager({ socket: sidecar.socket, logger: { warn: () => {} } });
});

after(async () => {
  await manager?.shutdown(1000);
  await sidecar?.destroy();
});

describe("createMany", () => {
  test("many tasks in one call run, with their options, ids in order", T, async () => {
    const count = 2 * PER_TXN + 3;
    const items = Array.from({ length: count }, (_, n) => ({ n }));
    const ids = await manager.createMany(items, { queue: "bulk-js", priority: 2 });
    assert.equal(ids.length, count);
    assert.equal(new Set(ids).size, count);
    const last = await manager.get(ids[count - 1]);
    assert.deepEqual(last.payload, { n: count - 1 });
    assert.equal(last.options.queue, "bulk-js");
    assert.equal(last.options.priority, 2);
    await manager.process(async (task) => task.data.n * 2, { queue: "bulk-js", concurrency: 8 });
    const results = await Promise.all(
      ids.map((id) => manager._request("wait", { task_id: id, timeout_s: 25 }).then((info) => info.result)),
    );
    assert.deepEqual(results, items.map(({ n }) => n * 2));
  });

  test("a repeat with the same ids creates nothing twice; delayMs delays them", T, async () => {
    const ids = await manager.createMany(["a", "b"], { delayMs: 3600000, queue: "idle-js" });
    assert.deepEqual(await manager.createMany(["a", "b"], { taskIds: ids, delayMs: 3600000 }), ids);
    assert.equal((await manager.get(ids[0])).state, "delayed");
  });

  test("an id taken by another task: the transactions before land, its own not at all", T, async () => {
    const other = await (await manager.create("someone else's", { taskId: "js-taken-1" })).withQueue("idle-js").commit();
    const count = 1500; // several transactions, whatever etcd's --max-txn-ops (up to 1,000 tasks)
    const takenAt = count - 10; // not in the first transaction
    const ids = Array.from({ length: count }, (_, i) => `js-bulk-${i}`);
    ids[takenAt] = other.id;
    const items = Array.from({ length: count }, (_, i) => i);
    let committed;
    await assert.rejects(manager.createMany(items, { taskIds: ids, queue: "idle-js" }), (err) => {
      assert.ok(err instanceof InvalidRequest);
      assert.match(err.message, new RegExp(`tasks\\[${takenAt}\\].*taken`));
      assert.deepEqual(err.details.task_ids, ids);
      committed = err.details.committed;
      return true;
    });
    // A transaction boundary before the taken id: those before landed whole, the taken
    // id's transaction (and any after it) not at all.
    assert.ok(committed > 0 && committed <= takenAt, `committed ${committed}`);
    assert.ok(await exists(ids[0]));
    assert.ok(await exists(ids[committed - 1]));
    for (const i of [committed, takenAt - 1, takenAt + 1, count - 1]) {
      if (i >= committed && i !== takenAt) assert.ok(!(await exists(ids[i])), `item ${i}`);
    }
    assert.equal((await manager.get(other.id)).payload, "someone else's");
  });

  test("bad input is refused whole: one malformed item, too many, too large", T, async () => {
    const tasks = Array.from({ length: 5 }, (_, i) => ({ payload: i, task_id: `js-ok-${i}` }));
    tasks[2] = { payload: 2, options: { priority: "high" } };
    await assert.rejects(manager._request("create_many", { tasks }), (err) => {
      assert.ok(err instanceof InvalidRequest);
      assert.match(err.message, /tasks\[2\]/);
      return true;
    });
    assert.ok(!(await exists("js-ok-0")));
    await assert.rejects(manager.createMany([1, Number.NaN]), /NaN|finite|JSON/i);
    await assert.rejects(manager.createMany(new Array(MAX_CREATE_MANY + 1).fill(0)), InvalidRequest);
    const tooMany = Array.from({ length: MAX_CREATE_MANY + 1 }, (_, i) => ({ payload: 0, task_id: `js-m${i}` }));
    await assert.rejects(manager._request("create_many", { tasks: tooMany }), /at most 10000/);
    assert.ok(!(await exists("js-m0")));
    const big = Array.from({ length: 2000 }, () => "x".repeat(1000));
    await assert.rejects(manager.createMany(big, { taskIds: big.map((_, i) => `js-l${i}`) }), PayloadTooLarge);
    assert.ok(!(await exists("js-l0")));
    await assert.rejects(manager.createMany([]), InvalidRequest);
    await assert.rejects(manager.createMany([1], { unique_key: "k" }), /unique_key/);
    assert.equal((await manager.createMany([1])).length, 1);
  });
});
