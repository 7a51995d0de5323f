// Newline-delimited JSON with a size limit (docs/protocol.md, "Transport and framing").
// No readline: its lines have no bound, and a frame over the limit must be refused
// before it is held whole in memory.

/** A frame from the sidecar that breaks the framing: the connection is closed and made again. */
export class MalformedFrame extends Error {
  constructor(message) {
    super(message);
    this.name = "MalformedFrame";
  }
}

const utf8 = new TextDecoder("utf-8", { fatal: true });

/** Splits a byte stream into frames of at most `limit` bytes (the newline not counted). */
export class FrameReader {
  constructor(limit) {
    this.limit = limit;
    this._parts = [];
    this._size = 0;
  }

  /**
   * The frames completed by `chunk`, parsed; throws MalformedFrame for a frame over the
   * limit (as soon as it is known to be), one that is not UTF-8 JSON, or not an object.
   */
  push(chunk) {
    const frames = [];
    let start = 0;
    for (;;) {
      const newline = chunk.indexOf(10, start);
      if (newline < 0) break;
      const piece = chunk.subarray(start, newline);
      this._check(this._size + piece.length);
      const line = this._parts.length ? Buffer.concat([...this._parts, piece]) : piece;
      this._parts = [];
      this._size = 0;
      start = newline + 1;
      const frame = parseFrame(line);
      if (frame !== undefined) frames.push(frame);
    }
    if (start < chunk.length) {
      const rest = chunk.subarray(start);
      this._check(this._size + rest.length);
      this._parts.push(rest);
      this._size += rest.length;
    }
    return frames;
  }

  _check(size) {
    if (size > this.limit) {
      throw new MalformedFrame(`a frame from the sidecar is over ${this.limit} bytes`);
    }
  }
}

/** One line to a frame; undefined for a blank line (which the protocol ignores). */
export function parseFrame(line) {
  let text;
  try {
    text = utf8.decode(line);
  } catch {
    throw new MalformedFrame("a frame from the sidecar is not UTF-8");
  }
  if (!text.trim()) return undefined;
  let frame;
  try {
    frame = JSON.parse(text);
  } catch (err) {
    throw new MalformedFrame(`a frame from the sidecar is not JSON (${err.message})`);
  }
  if (frame === null || typeof frame !== "object" || Array.isArray(frame)) {
    throw new MalformedFrame("a frame from the sidecar is not a JSON object");
  }
  return frame;
}

/**
 * One frame as bytes to send. Throws TypeError for what JSON cannot carry (a BigInt, a
 * cycle) and for numbers it would turn into null (NaN, Infinity).
 */
export function encodeFrame(frame) {
  const text = JSON.stringify(frame, (_key, value) => {
    if (typeof value === "number" && !Number.isFinite(value)) {
      throw new TypeError(`${value} is not a JSON number`);
    }
    return value;
  });
  return Buffer.from(`${text}\n`, "utf8");
}
