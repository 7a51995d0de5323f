// A sidecar restart: the SDK reconnects, registers its workers and subscribes again, and
// what was waited for still arrives.

import assert from "node:assert/strict";
import { after, test } from "node:test";
import { ConnectionLost, DefaultTaskManager } from "../index.js";
import { Sidecar, pollUntil } from "../test-support/sidecar.mjs";

/** Every test has a deadline: a hang is a failure, not a stuck run. */
const T = { timeout: 60000 };

const sidecar = new Sidecar();
const managers = [];

after(async () => {
  await Promise.all(managers.map((m) => m.shutdown(1000)));
  await sidecar.destroy();
});

function manager(errors) {
  const m = new DefaultTaskManager({ socket: sidecar.socket, logger: { warn: () => {} } });
  m.on("error", (err) => errors.push(err));
  managers.push(m);
  return m;
}

test("after a sidecar restart: workers registered again, results still arrive", T, async () => {
  await sidecar.start();
  const errors = [];
  const workers = manager(errors);
  await workers.process((task) => task.data.n * 10, { queue: "r", concurrency: 2 });
  // The producer's tasks hear their events by their own subscriptions only; a watcher
  // hears every task's.
  const producer = manager(errors);
  const watcher = manager(errors);
  const completed = [];
  watcher.on("completed", (event) => completed.push(event.data));
  await watcher.waitSubscribed();

  const first = await (await producer.create({ n: 1 })).withQueue("r").commit();
  assert.equal(await first.result(10000), 10);
  // Committed before the restart, run after it: its outcome comes on the new connection.
  const delayed = await (await producer.create({ n: 2 })).withQueue("r").withDelay(1000).commit();

  await sidecar.stop();
  await pollUntil(() => errors.some((e) => e instanceof ConnectionLost), { what: "the lost connection's report" });
  assert.equal(workers.isMaster(), true, "the last role told stays until a new hello");
  // A create while the sidecar is away waits for it (within connectTimeoutMs).
  const during = producer.create({ n: 3 }).then((task) => task.withQueue("r").commit());
  await sidecar.start();

  assert.equal(await (await during).result(10000), 30);
  assert.equal(await delayed.result(10000), 20);
  const status = await producer.status();
  assert.deepEqual(status.capacity, { r: 2 }, "the worker registered itself again");
  // The manager's subscription was made again too: it heard tasks finish after the restart.
  await pollUntil(() => completed.includes(30) && completed.includes(20), { what: "the manager's events after the restart" });
  assert.deepEqual(completed.slice(0, 1), [10]);
});
