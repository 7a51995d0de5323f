// The seed's usage example (shared/seed/TaskManager-README.md), in Node.js.
//
// Run a sidecar (`tm-sidecar`, or `tm-sidecar --demo`), then `node examples/seed_example.mjs`
// (the socket: $TM_SOCKET, or the sidecar's default). It prints the seed's line for the
// task its worker receives, then the outcome.

import { DefaultTaskManager } from "../sdk/js/index.js";

// A queue of the example's own: `tm-sidecar --demo` runs a handler of its own on the
// default queue, which would otherwise take the example's task.
const queue = "seed-example";

const manager = new DefaultTaskManager();
const worker = await manager.process(
  async (task) => {
    console.log(`Worker with ID ${worker.id} (Master:${manager.isMaster()}) received Task with ID ${task.id}`);
    return true;
  },
  { queue },
);
const task = await manager.create({
  TaskSpecificKey: "TaskSpecificValue",
});
task.withQueue(queue);

// Tell the Worker to wait 10 seconds before failing the Job
task.withTimeout(10000);

// Optionally delay this job until the specific Date
task.withDelayUntil(Date.parse("2020-01-01"));

// Optionally handle a successfully resolved Task ( receives result )
task.on("success", (result) => {
  console.log(`success: ${JSON.stringify(result)}`);
});

// Optionally handle a failed Task ( receives error )
task.on("failure", (error) => {
  console.log(`failure: ${error.type}: ${error.message}`);
});

// Commit this task ( Queues it )
await task.commit();

// Hook to gracefully shutdown TaskManager and associated Workers
process.on("SIGTERM", async () => {
  await manager.shutdown();
  process.exit(0);
});

console.log(`result: ${JSON.stringify(await task.result(30000))}`);
await manager.shutdown();
