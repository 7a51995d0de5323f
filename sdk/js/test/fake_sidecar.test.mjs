// What a real sidecar never sends (garbage: the client reports it, reconnects, and the
// application carries on), and what it rarely does (a lost answer, missed events), from
// a fake sidecar on a real Unix socket.

import assert from "node:assert/strict";
import { afterEach, describe, test } from "node:test";
import { ConnectionLost, DefaultTaskManager, MalformedFrame, PermissionDenied } from "../index.js";
import { backoffMs } from "../lib/connection.js";
import { FakeSidecar } from "../test-support/fake_sidecar.mjs";
import { deferred, pollUntil } from "../test-support/sidecar.mjs";

/** Every test has a deadline: a hang is a failure, not a stuck run. */
const T = { timeout: 15000 };

let fake;
let manager;

afterEach(async () => {
  await manager?.shutdown(100);
  await fake?.close();
  manager = undefined;
  fake = undefined;
});

function managerOn(socket) {
  const errors = [];
  const m = new DefaultTaskManager({ socket, logger: { warn: () => {} } });
  m.on("error", (err) => errors.push(err));
  return { m, errors };
}

const GARBAGE = [
  ["a line that is not JSON", "this is not json\n", /not JSON/],
  ["JSON that is not an object", "[1, 2, 3]\n", /not a JSON object/],
  ["a bare number", "42\n", /not a JSON object/],
  ["bytes that are not UTF-8", Buffer.from([0xff, 0xfe, 0x7b, 0x7d, 0x0a]), /not UTF-8/],
  ["a frame over max_frame, before its newline", `{"push":"role","leader":true,"pad":"${"x".repeat(2000)}`, /over 1024 bytes/],
  ["a complete frame over max_frame", `{"push":"role","leader":true,"pad":"${"x".repeat(2000)}"}\n`, /over 1024 bytes/],
  ["a reply without ok", '{"id": 2}\n', /neither a reply nor a push/],
  ["a push without a kind", '{"push": 5}\n', /push without a kind/],
  ["an event push without an event", '{"push": "event", "subscription": 1}\n', /without an event/],
  ["a task push without a task", '{"push": "task", "worker": 1, "delivery": 2}\n', /without a task/],
  ["a role push without leader", '{"push": "role"}\n', /without leader/],
];

describe("against a fake sidecar: garbage, lost answers, missed events", () => {
  for (const [what, garbage, message] of GARBAGE) {
    test(`${what}: reported, reconnected, the request answered on the next connection`, T, async () => {
      fake = await new FakeSidecar(async (conn) => {
        await conn.hello({ leader: conn.index > 0 });
        const request = await conn.next();
        if (conn.index === 0) {
          conn.write(garbage); // instead of the answer
        } else {
          conn.reply(request, { task_id: request.task_id, state: "completed", result: 42 });
        }
      }).start();
      const { m, errors } = managerOn(fake.socket);
      manager = m;
      const info = await m.get("t1");
      assert.deepEqual(info, { task_id: "t1", state: "completed", result: 42 });
      const bad = errors.filter((e) => e instanceof MalformedFrame);
      assert.equal(bad.length, 1, errors.map(String).join("; "));
      assert.match(bad[0].message, message);
      assert.equal(fake.connections.length, 2);
      assert.deepEqual(
        fake.connections.map((c) => c.frames[0].op),
        ["hello", "hello"],
      );
      await fake.connections[0].closed; // the client closed the garbled connection
      assert.equal(m.isMaster(), true, "the second connection's hello is what counts");
    });
  }

  test("an error reply about no request is reported, and the connection stays", T, async () => {
    fake = await new FakeSidecar(async (conn) => {
      await conn.hello();
      const request = await conn.next();
      conn.send({ id: null, ok: false, error: { code: "invalid_request", message: "say hello first", retryable: false } });
      conn.reply(request, "pong");
    }).start();
    const { m, errors } = managerOn(fake.socket);
    manager = m;
    assert.equal(await m._request("ping", {}), "pong");
    assert.equal(fake.connections.length, 1);
    assert.match(errors[0].message, /the sidecar reports: say hello first/);
  });

  test("a running handler is stopped when its connection is garbled, and the worker registers again", T, async () => {
    const registered = [];
    fake = await new FakeSidecar(async (conn) => {
      await conn.hello();
      const register = await conn.next();
      assert.equal(register.op, "register");
      registered.push(conn.index);
      conn.reply(register, { worker: 10 + conn.index, node: "fake" });
      if (conn.index === 0) {
        conn.send({ push: "task", worker: 10, delivery: 5, task: { id: "t1", payload: { n: 1 }, attempt: 1, options: {} } });
      }
      for (;;) conn.reply(await conn.next(), true); // unregister, at shutdown
    }).start();
    const { m, errors } = managerOn(fake.socket);
    manager = m;
    const aborted = deferred();
    const worker = await m.process(async (task) => {
      task.signal.addEventListener("abort", () => aborted.resolve(task.signal.reason.message));
      fake.connections[0].write("}{\n");
      return new Promise(() => {});
    });
    assert.match(await aborted.promise, /connection to the sidecar was lost/);
    await pollUntil(() => worker.id === 11, { what: "the worker's registration on the new connection" });
    assert.deepEqual(registered, [0, 1]);
    assert.ok(errors.some((e) => e instanceof MalformedFrame));
    // No outcome was sent for the stopped attempt (the sidecar has failed it itself).
    assert.deepEqual(
      fake.connections[0].frames.map((f) => f.op),
      ["hello", "register"],
    );
  });

  test("a create whose answer is lost is sent again with the same task id, then read", T, async () => {
    const creates = [];
    fake = await new FakeSidecar(async (conn) => {
      await conn.hello();
      const create = await conn.next();
      creates.push(create);
      if (conn.index === 0) {
        conn.socket.destroy(); // the answer is lost with the connection
        return;
      }
      conn.reply(create, { task_id: create.task_id, subscription: 7 });
      // The task finished while the client was away: no event will come; `get` tells.
      const get = await conn.next();
      assert.deepEqual([get.op, get.task_id], ["get", create.task_id]);
      conn.reply(get, { task_id: create.task_id, state: "completed", result: "done", attempts: 1 });
    }).start();
    const { m } = managerOn(fake.socket);
    manager = m;
    const task = await (await m.create({ n: 1 })).commit();
    assert.equal(await task.result(5000), "done");
    assert.equal(creates.length, 2);
    assert.equal(creates[0].task_id, task.id);
    assert.deepEqual({ ...creates[1], id: 0 }, { ...creates[0], id: 0 }, "the same create, repeated");
  });

  test("a task whose events never come is settled by reading it now and then", T, async () => {
    const gets = [];
    fake = await new FakeSidecar(async (conn) => {
      await conn.hello();
      const create = await conn.next();
      conn.reply(create, { task_id: create.task_id, subscription: 3 }); // and no event, ever
      for (;;) {
        const get = await conn.next();
        gets.push(Date.now());
        const state = gets.length < 2 ? { state: "pending" } : { state: "failed", error: { type: "Boom", message: "m", retryable: true } };
        conn.reply(get, { task_id: create.task_id, attempts: 1, ...state });
      }
    }).start();
    manager = new DefaultTaskManager({ socket: fake.socket, resyncMs: 150, logger: { warn: () => {} } });
    const started = Date.now();
    const task = await (await manager.create({})).commit();
    const err = await task.result(5000).catch((e) => e);
    assert.equal(err.error?.type, "Boom", String(err));
    assert.equal(gets.length, 2);
    assert.ok(gets[0] - started >= 150, "not read before it went unheard for resyncMs");
  });

  test("a sidecar that keeps sending garbage is reconnected to with growing waits", T, async () => {
    fake = await new FakeSidecar(async (conn) => {
      await conn.hello();
      conn.write("garbage\n");
    }).start();
    const { m, errors } = managerOn(fake.socket);
    manager = m;
    m.on("queued", () => {}); // something to connect for
    await fake.connection(3);
    const at = fake.connections.map((c) => c.at);
    for (let i = 1; i <= 3; i++) {
      // Lower bounds only: a loaded machine may be slower, never faster.
      const gap = at[i] - at[i - 1];
      assert.ok(gap >= backoffMs(i) - 15, `wait before connection ${i}: ${gap} ms < ${backoffMs(i)} ms`);
    }
    assert.ok(errors.filter((e) => e instanceof MalformedFrame).length >= 3);
  });

  test("a refused hello is reported and retried; calls wait for a connection, then time out", T, async () => {
    fake = await new FakeSidecar(async (conn) => {
      const hello = await conn.next();
      conn.send({ id: hello.id, ok: false, error: { code: "invalid_request", message: "protocol version 1 is not spoken here; use 2", retryable: false } });
    }).start();
    const errors = [];
    manager = new DefaultTaskManager({ socket: fake.socket, connectTimeoutMs: 400, logger: { warn: () => {} } });
    manager.on("error", (e) => errors.push(e));
    await assert.rejects(manager.get("t"), ConnectionLost);
    assert.ok(fake.connections.length >= 2, "it tried again");
    assert.match(errors[0].message, /use 2/);
  });
  test("a gap: the tasks it names are read again at once, and on('gap') hears it", T, async () => {
    const gets = [];
    const gapped = deferred();
    fake = await new FakeSidecar(async (conn) => {
      await conn.hello();
      let taskId = null;
      for (;;) {
        const request = await conn.next();
        if (request.op === "subscribe") {
          conn.reply(request, { subscription: 5, revision: 10 });
        } else if (request.op === "create") {
          taskId = request.task_id;
          conn.reply(request, { task_id: taskId, subscription: 6 });
          // Its events are lost (the sidecar's watch started again): one gap to each
          // subscription that may have missed them, the task's own and the namespace's.
          const gap = { push: "gap", from_revision: 10, to_revision: 42, reason: "watch_reset", task_ids: [taskId], truncated: false };
          conn.send({ ...gap, subscription: 6 });
          conn.send({ ...gap, subscription: 5 });
        } else if (request.op === "get") {
          gets.push(request.task_id);
          conn.reply(request, { task_id: request.task_id, state: "completed", attempts: 1, result: "read again" });
        }
      }
    }).start();
    // resyncMs far away: the read must come from the gap, not from the periodic one.
    manager = new DefaultTaskManager({ socket: fake.socket, resyncMs: 600000, logger: { warn: () => {} } });
    manager.on("gap", (gap) => gapped.resolve(gap));
    await manager.waitSubscribed();
    const task = await (await manager.create({})).commit();
    assert.equal(await task.result(5000), "read again");
    assert.deepEqual(gets, [task.id, task.id], "read once per gap that named it");
    const gap = await gapped.promise;
    assert.deepEqual(gap, { from_revision: 10, to_revision: 42, reason: "watch_reset", task_ids: [task.id], truncated: false });
  });

  test("a refusal (--allow-uid) is a PermissionDenied at once, never retried", T, async () => {
    fake = await new FakeSidecar(async (conn) => {
      conn.send({ id: null, ok: false, error: { code: "permission_denied", message: "uid 0 is not allowed to use this sidecar", retryable: false } });
      conn.socket.end();
    }).start();
    manager = new DefaultTaskManager({ socket: fake.socket, connectTimeoutMs: 600000, logger: { warn: () => {} } });
    const err = await manager.get("t").catch((e) => e);
    assert.ok(err instanceof PermissionDenied, String(err));
    assert.match(err.message, /refused this client: uid 0 is not allowed/);
    await assert.rejects(manager.status(), PermissionDenied);
    assert.equal(fake.connections.length, 1, "not tried again");
  });
});
