// The cross-language scenario's worker, with the Node SDK (worker.py is its twin): runs
// the queue given until its stdin closes.

import { DefaultTaskManager, Permanent } from "../../index.js";

class Flaky extends Error {
  name = "Flaky";
}

const manager = new DefaultTaskManager();
await manager.process(
  async (task) => {
    const { op } = task.data;
    if (op === "add") {
      await task.update({ done: 0.5 });
      return { sum: task.data.a + task.data.b };
    }
    if (op === "permanent") throw new Permanent("cannot do this");
    if (op === "flaky") {
      if (task.attempt === 1) throw new Flaky("the first attempt fails");
      return { attempt: task.attempt };
    }
    if (op === "slow") {
      await new Promise((resolve) => task.signal.addEventListener("abort", resolve));
      return null;
    }
    throw new Permanent(`unknown op ${op}`);
  },
  { queue: process.argv[2], concurrency: 4 },
);
console.log("ready");
process.stdin.resume();
process.stdin.on("end", async () => {
  await manager.shutdown();
});
