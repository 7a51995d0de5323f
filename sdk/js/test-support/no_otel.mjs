// `node --import ./test-support/no_otel.mjs ...`: a process in which @opentelemetry/api
// cannot be imported, as when it is not installed (the SDK must work without it).
import { register } from "node:module";

register(
  "data:text/javascript," +
    encodeURIComponent(`
      export async function resolve(specifier, context, next) {
        if (specifier.startsWith("@opentelemetry/")) {
          const err = new Error("Cannot find package '" + specifier + "'");
          err.code = "ERR_MODULE_NOT_FOUND";
          throw err;
        }
        return next(specifier, context);
      }`),
);
