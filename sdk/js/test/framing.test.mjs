// Framing on its own (no socket): frames split anywhere, blank lines, the limit.

import assert from "node:assert/strict";
import { test } from "node:test";
import { FrameReader, MalformedFrame, encodeFrame } from "../lib/framing.js";

/** Every test has a deadline: a hang is a failure, not a stuck run. */
const T = { timeout: 5000 };

test("frames split across chunks, several per chunk, blank lines ignored", T, () => {
  const reader = new FrameReader(100);
  const bytes = Buffer.from('{"a":1}\n\n  \n{"b":"é"}\n{"c":');
  const got = [];
  for (let i = 0; i < bytes.length; i += 3) got.push(...reader.push(bytes.subarray(i, i + 3)));
  assert.deepEqual(got, [{ a: 1 }, { b: "é" }]);
  assert.deepEqual(reader.push(Buffer.from("3}\n")), [{ c: 3 }]);
});

test("a frame over the limit is refused before its end arrives; one at the limit is taken", T, () => {
  const exact = `{"p":"${"x".repeat(10 - 8)}"}`;
  assert.equal(exact.length, 10);
  assert.deepEqual(new FrameReader(10).push(Buffer.from(`${exact}\n`)), [{ p: "xx" }]);
  const reader = new FrameReader(10);
  reader.push(Buffer.from("{\"p\":"));
  assert.throws(() => reader.push(Buffer.from('"xxxxxx')), MalformedFrame);
});

test("encodeFrame refuses what JSON would silently change", T, () => {
  assert.equal(encodeFrame({ a: [1, "b"] }).toString(), '{"a":[1,"b"]}\n');
  assert.throws(() => encodeFrame({ n: Number.NaN }), TypeError);
  assert.throws(() => encodeFrame({ n: 1n }), TypeError);
  const cycle = {};
  cycle.self = cycle;
  assert.throws(() => encodeFrame(cycle), TypeError);
});
