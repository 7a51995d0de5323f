// OpenTelemetry traces in the Node.js SDK, checked with the real OpenTelemetry SDK's
// in-memory exporter against a real tm-sidecar: one trace from the producer's span to
// the handler's spans across a retry, and a worker without @opentelemetry/api (it
// cannot be imported there) runs traced tasks.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { after, before, describe, test } from "node:test";
import { SpanKind, SpanStatusCode, trace } from "@opentelemetry/api";
import { BasicTracerProvider, InMemorySpanExporter, SimpleSpanProcessor } from "@opentelemetry/sdk-trace-base";
import { DefaultTaskManager } from "../index.js";
import { Sidecar } from "../test-support/sidecar.mjs";

const T = { timeout: 30000 };
const HERE = dirname(fileURLToPath(import.meta.url));
const exporter = new InMemorySpanExporter();
trace.setGlobalTracerProvider(new BasicTracerProvider({ spanProcessors: [new SimpleSpanProcessor(exporter)] }));

let sidecar;
const managers = [];

function manager() {
  const m = new DefaultTaskManager({ socket: sidecar.socket, logger: { warn: () => {} } });
  managers.push(m);
  return m;
}

before(async () => {
  sidecar = await new Sidecar({ nodeId: "js-1" }).start();
});

after(async () => {
  await Promise.all(managers.map((m) => m.shutdown(1000)));
  await sidecar.destroy();
});

describe("OpenTelemetry", () => {
  test("one trace from the producer's span to the handler's spans across a retry", T, async () => {
    const worker = manager();
    await worker.process(
      async (task) => {
        if (task.attempt === 1) throw new RangeError("gateway timeout");
        return { ok: task.attempt };
      },
      { queue: "orders" },
    );
    const producer = manager();
    const task = await producer.create({ order: 7 });
    task.withQueue("orders").withRetries(2, { baseMs: 50, jitter: 0 });
    await task.commit();
    assert.deepEqual(await task.result(10000), { ok: 2 });

    const spans = exporter.getFinishedSpans();
    const create = spans.find((s) => s.name === "create orders");
    assert.ok(create, "a producer span");
    assert.equal(create.kind, SpanKind.PRODUCER);
    assert.equal(create.attributes["messaging.message.id"], task.id);
    const { traceId, spanId } = create.spanContext();
    // The context went with the task, into its record.
    const record = await producer.get(task.id);
    assert.match(record.options.traceparent, new RegExp(`^00-${traceId}-${spanId}-0[0-9a-f]$`));
    const attempts = spans
      .filter((s) => s.name === "process orders" && s.spanContext().traceId === traceId)
      .sort((a, b) => a.attributes["tm.task.attempt"] - b.attributes["tm.task.attempt"]);
    assert.deepEqual(
      attempts.map((s) => s.attributes["tm.task.attempt"]),
      [1, 2],
    );
    for (const span of attempts) {
      assert.equal(span.kind, SpanKind.CONSUMER);
      assert.equal(span.parentSpanContext?.spanId ?? span.parentSpanId, spanId);
      assert.equal(span.attributes["tm.task.id"], task.id);
      assert.equal(span.attributes["tm.task.queue"], "orders");
      assert.equal(span.attributes["tm.node"], "js-1");
    }
    assert.equal(attempts[0].status.code, SpanStatusCode.ERROR);
    assert.match(attempts[0].status.message, /RangeError: gateway timeout/);
    assert.equal(attempts[1].status.code, SpanStatusCode.OK);
  });

  test("a worker without @opentelemetry/api runs traced tasks", T, async () => {
    const child = spawn(
      process.execPath,
      ["--import", join(HERE, "..", "test-support", "no_otel.mjs"), join(HERE, "crosslang", "worker.mjs"), "plain"],
      { env: { ...process.env, TM_SOCKET: sidecar.socket }, stdio: ["pipe", "pipe", "inherit"] },
    );
    try {
      await new Promise((resolve, reject) => {
        child.stdout.on("data", (chunk) => chunk.toString().includes("ready") && resolve());
        child.once("exit", (code) => reject(new Error(`the worker exited (${code})`)));
      });
      const producer = manager();
      const task = await producer.create({ op: "add", a: 2, b: 3 });
      task.withQueue("plain");
      await task.commit();
      assert.match(task.options.traceparent, /^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$/);
      assert.deepEqual(await task.result(10000), { sum: 5 });
    } finally {
      child.stdin.end();
      await new Promise((resolve) => (child.exitCode !== null ? resolve() : child.once("exit", resolve)));
    }
  });
});
