// `runWorker`: the one call a worker process needs, as the Python SDK's run_worker.

import { PermissionDenied, Unavailable } from "./errors.js";
import { TaskManager } from "./manager.js";

/** Resolves with the first of SIGTERM and SIGINT; `off()` stops listening. */
function signals() {
  let off;
  const received = new Promise((resolve) => {
    const on = (signal) => {
      off();
      resolve(signal);
    };
    process.on("SIGTERM", on);
    process.on("SIGINT", on);
    off = () => {
      process.off("SIGTERM", on);
      process.off("SIGINT", on);
    };
  });
  return { received, off: () => off() };
}

/**
 * Run `handler` for the tasks of `queue` until SIGTERM or SIGINT (Ctrl-C), then shut
 * down gracefully: no new task is taken, running ones get `shutdownTimeoutMs` to finish,
 * and what cannot finish is handed back to be retried. Waits for a sidecar that is not
 * up yet; rejects at once if it refuses this worker for good (PermissionDenied).
 */
export async function runWorker(handler, options = {}) {
  const { concurrency = 1, queue = "default", socket, shutdownTimeoutMs = 30000, connectTimeoutMs = 5000, logger = console } = options;
  const manager = new TaskManager({ socket, connectTimeoutMs, logger });
  const stop = signals();
  try {
    for (;;) {
      const registering = manager.process(handler, { concurrency, queue });
      registering.catch(() => {}); // a signal may win the race: its end is shutdown's
      const first = await Promise.race([registering.then(() => "registered"), stop.received]).catch((err) => err);
      if (first === "registered") break;
      if (typeof first === "string") return await manager.shutdown(0); // a signal while connecting
      if (first instanceof Unavailable && !(first instanceof PermissionDenied)) {
        logger.warn(`tm-sidecar-sdk: ${first.message}; still trying`);
        continue;
      }
      await manager.shutdown(0);
      throw first;
    }
    await manager.serve({ shutdownTimeoutMs, signals: stop.received });
  } finally {
    stop.off();
  }
}
