// OpenTelemetry traces, when the application has @opentelemetry/api installed (an
// optional peer dependency); without it nothing is imported and nothing changes.
//
// A create records a producer span and carries its W3C trace context in the task's
// options (`traceparent`, `tracestate`: stored in the task's record, shown by
// `tmctl show`). A worker runs each attempt's handler in a consumer span whose parent is
// that context (the active context while the handler runs), so the producer's request,
// every attempt (retries included) and what the handler traces are one trace; the span
// has the task's id, queue, attempt and node as attributes and the outcome as status.

const SCOPE = "tm-sidecar-sdk";
const SYSTEM = "tm-sidecar";
const TRACEPARENT = /^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$/;

let loading = null;

/** The OpenTelemetry API module, or null when it is not installed (imported once). */
export function otelApi() {
  if (loading === null) {
    loading = import("@opentelemetry/api").then(
      (api) => api,
      () => null,
    );
  }
  return loading;
}

/**
 * Run `create()` (the create request) in a producer span for `task`, after putting the
 * span's context in the task's options (unless they carry one already).
 */
export async function withProducerSpan(task, create) {
  const api = await otelApi();
  if (api === null) return create();
  const queue = task.options.queue ?? "default";
  const span = api.trace.getTracer(SCOPE).startSpan(
    `create ${queue}`,
    {
      kind: api.SpanKind.PRODUCER,
      attributes: {
        "messaging.system": SYSTEM,
        "messaging.operation.type": "create",
        "messaging.destination.name": queue,
        "messaging.message.id": task.id,
      },
    },
    api.context.active(),
  );
  const sc = span.spanContext();
  if (task.options.traceparent === undefined && api.trace.isSpanContextValid(sc)) {
    const flags = (sc.traceFlags & 0xff).toString(16).padStart(2, "0");
    task.options.traceparent = `00-${sc.traceId}-${sc.spanId}-${flags}`;
    const state = sc.traceState?.serialize();
    if (state) task.options.tracestate = state.slice(0, 512);
  }
  try {
    return await create();
  } catch (err) {
    span.setStatus({ code: api.SpanStatusCode.ERROR, message: String(err?.message ?? err) });
    throw err;
  } finally {
    span.end();
  }
}

/** The parent context a task's options carry, or `base` when they carry none. */
function parentOf(api, options, base) {
  const match = typeof options.traceparent === "string" ? TRACEPARENT.exec(options.traceparent) : null;
  if (match === null) return base;
  const spanContext = {
    traceId: match[2],
    spanId: match[3],
    traceFlags: parseInt(match[4], 16),
    isRemote: true,
  };
  if (typeof options.tracestate === "string" && api.createTraceState) {
    spanContext.traceState = api.createTraceState(options.tracestate);
  }
  if (!api.trace.isSpanContextValid(spanContext)) return base;
  return api.trace.setSpanContext(base, spanContext);
}

/**
 * Run `handle()` (one attempt's handler) in a consumer span of the task's trace.
 * `handle` settles as the handler did; the span's status follows: OK for a value, an
 * error for a throw (a Snooze, `isSnooze(err)`, leaves it unset).
 */
export async function withConsumerSpan(wt, node, handle, isSnooze) {
  const api = await otelApi();
  if (api === null) return handle();
  const queue = wt.options.queue ?? "default";
  const attributes = {
    "messaging.system": SYSTEM,
    "messaging.operation.type": "process",
    "messaging.destination.name": queue,
    "messaging.message.id": wt.id,
    "tm.task.id": wt.id,
    "tm.task.queue": queue,
    "tm.task.attempt": wt.attempt,
  };
  if (node) attributes["tm.node"] = node;
  const parent = parentOf(api, wt.options, api.context.active());
  const span = api.trace
    .getTracer(SCOPE)
    .startSpan(`process ${queue}`, { kind: api.SpanKind.CONSUMER, attributes }, parent);
  try {
    const value = await api.context.with(api.trace.setSpan(parent, span), handle);
    span.setAttribute("tm.outcome", "complete");
    span.setStatus({ code: api.SpanStatusCode.OK });
    return value;
  } catch (err) {
    if (isSnooze(err)) {
      span.setAttribute("tm.outcome", "snooze");
    } else {
      const type = err?.constructor?.name ?? "Error";
      span.setAttribute("tm.outcome", "fail");
      span.setAttribute("error.type", type);
      span.setStatus({ code: api.SpanStatusCode.ERROR, message: `${type}: ${err?.message ?? err}` });
    }
    throw err;
  } finally {
    span.end();
  }
}
