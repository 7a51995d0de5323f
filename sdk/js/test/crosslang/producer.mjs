// The cross-language scenario's producer, with the Node SDK (producer.py is its twin):
// creates one task per kind of outcome on the queue given, prints what it saw as JSON.

import { DefaultTaskManager, TaskFailed } from "../../index.js";

const queue = process.argv[2];
const manager = new DefaultTaskManager();

async function outcome(task) {
  try {
    return { result: await task.result(30000) };
  } catch (err) {
    if (!(err instanceof TaskFailed)) throw err;
    return { error: { type: err.error.type, message: err.error.message, retryable: err.error.retryable } };
  }
}

const add = (await manager.create({ op: "add", a: 2, b: 3 })).withQueue(queue);
const progress = [];
add.on("updated", (data) => progress.push(data));
const permanent = (await manager.create({ op: "permanent" })).withQueue(queue).withRetries(3);
const flaky = (await manager.create({ op: "flaky" })).withQueue(queue).withRetries(3, { baseMs: 50, jitter: 0 });
const failed = [];
flaky.on("failed", (error, willRetry) => failed.push([error.type, error.message, willRetry]));
const slow = (await manager.create({ op: "slow" })).withQueue(queue).withTimeout(300).withRetries(1);
for (const task of [add, permanent, flaky, slow]) await task.commit();

const out = {
  add: { ...(await outcome(add)), progress },
  permanent: { ...(await outcome(permanent)), attempts: (await manager.get(permanent.id)).attempts },
  flaky: { ...(await outcome(flaky)), failed },
  slow: { error: (await outcome(slow)).error.type },
};
console.log(JSON.stringify(out));
await manager.shutdown();
