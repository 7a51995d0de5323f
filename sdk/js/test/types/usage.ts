// Type-checked (never run) by `npm test`: the seed's usage and the rest of the API must
// compile against index.d.ts, and misuse must not.
import {
  DefaultTaskManager,
  Permanent,
  PermissionDenied,
  Snooze,
  TaskFailed,
  WaitTimeout,
  runWorker,
  type TaskEvent,
  type WorkerTask,
} from "tm-sidecar-sdk";

export async function seed(): Promise<void> {
  const manager = new DefaultTaskManager();
  const worker = await manager.process(async (task) => {
    console.log(`Worker with ID ${worker.id} (Master:${manager.isMaster()}) received Task with ID ${task.id}`);
    return true;
  });
  const task = await manager.create({
    TaskSpecificKey: "TaskSpecificValue",
  });
  task.withTimeout(10000);
  task.withDelayUntil(Date.parse("2020-01-01"));
  task.on("success", (result) => {
    console.log(result);
  });
  task.on("failure", (error) => {
    console.log(error?.type, error?.message);
  });
  await task.commit();
  process.on("SIGTERM", async () => {
    await manager.shutdown();
    process.exit(0);
  });
}

export async function more(): Promise<void> {
  const manager = new DefaultTaskManager({ socket: "/tmp/x.sock", connectTimeoutMs: 1000 });
  await manager.process(
    async (task: WorkerTask<{ n: number }>) => {
      await task.update({ progress: 0.5 });
      if (task.signal.aborted) return null;
      if (task.data.n < 0) throw new Permanent("negative");
      return { doubled: task.data.n * 2 };
    },
    { concurrency: 4, queue: "math" },
  );
  const task = (await manager.create({ n: 2 }, { taskId: "job-1" }))
    .withQueue("math")
    .withRetries(3, { baseMs: 100 })
    .withPriority(5)
    .withDelay(10)
    .on("updated", (progress, event: TaskEvent) => console.log(progress, event.revision))
    .on("failed", (error, willRetry) => console.log(error?.message, willRetry));
  await task.commit();
  manager.on("completed", (event) => console.log(event.task_id, event.data));
  manager.on("error", (err) => console.error(err.message));
  await manager.waitSubscribed();
  try {
    console.log(await task.result(5000));
  } catch (err) {
    if (err instanceof TaskFailed) console.log(err.error.type, err.taskId);
  }
  const info = await manager.get(task.id);
  console.log(info.state, info.attempts);
  try {
    const ids: string[] = await manager.createMany([{ n: 1 }, { n: 2 }], {
      queue: "math",
      priority: 1,
      delayMs: 500,
    });
    console.log(ids.length);
  } catch (err) {
    if (err instanceof TaskFailed && err.details?.committed !== undefined) {
      console.log(err.details.task_ids);
    }
  }
  // @ts-expect-error: createMany takes an array of items
  await manager.createMany({ n: 1 });
  // @ts-expect-error: an event name that does not exist
  task.on("finished", () => {});
  // @ts-expect-error: timeouts are numbers of milliseconds
  task.withTimeout("10s");
  await manager.shutdown(1000);
}

export async function parity(): Promise<void> {
  const manager = new DefaultTaskManager();
  await manager.process(async (task) => {
    if (task.attempt === 1) throw new Snooze(1000);
    return null;
  });
  const unique = (await manager.create({ n: 1 }, { uniqueKey: "k", uniqueForMs: 1000 }))
    .withConcurrencyKey("customer-1")
    .withMaxSnoozes(3);
  await unique.commit();
  console.log(unique.existing, await unique.cancel("no longer needed"));
  await manager.submit({ n: 2 }, { queue: "q", timeout_s: 5, unique_key: "u" });
  const elsewhere = await manager.task("some-id");
  console.log(await elsewhere.result(1000), await manager.result("some-id", 1000));
  const info = await manager.wait("some-id", 1000);
  console.log(info.state, await manager.cancel("some-id", { reason: "why" }));
  const settings = await manager.pauseQueue("q");
  console.log(settings.paused, (await manager.resumeQueue()).paused);
  await manager.setLimits("q", { maxRunning: 2, keyMaxRunning: 1, rate: { limit: 5, periodMs: 2000 }, keyRate: null });
  console.log(Object.keys(await manager.queues()));
  const schedule = await manager.schedule("nightly", { n: 3 }, { cron: "0 3 * * *", timezone: "Europe/Paris", missed: "skip" });
  console.log(schedule.next_at, (await manager.schedules()).length);
  await manager.pauseSchedule("nightly");
  await manager.resumeSchedule("nightly");
  console.log(await manager.deleteSchedule("nightly"), await manager.ping(), manager.isLeader());
  manager.on("gap", (gap) => console.log(gap.reason, gap.task_ids?.length, gap.to_revision));
  try {
    await manager.status();
  } catch (err) {
    if (err instanceof PermissionDenied || err instanceof WaitTimeout) console.log(err.code);
  }
  // @ts-expect-error: limits are named in camelCase
  await manager.setLimits("q", { max_running: 2 });
}

export async function worker(): Promise<void> {
  await runWorker(async (task) => ({ seen: task.id }), { concurrency: 2, queue: "q", shutdownTimeoutMs: 1000 });
  await new DefaultTaskManager().serve({ shutdownTimeoutMs: 1000 });
}
