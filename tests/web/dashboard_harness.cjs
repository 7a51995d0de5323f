// The stand-in for a browser that tests/web/test_dashboard_js.py runs dashboard.js in:
// a page (its refreshers and its live table) from argv, the script run on it, one gap
// pushed on its live stream; prints what the page then holds and what was fetched or
// reloaded, as JSON.
const fs = require("node:fs");
const vm = require("node:vm");
const [script, pageJson] = process.argv.slice(2);
const page = JSON.parse(pageJson);
const fetched = [];
let reloads = 0;
const sources = [];
const byId = new Map();

function element(tag, fields = {}) {
  return { tag, className: "", textContent: "", children: [], dataset: {}, classList: { toggle() {}, add() {} },
           appendChild(c) { this.children.push(c); return c; }, querySelector() { return null; }, ...fields };
}
function row() {
  const r = element("tr");
  r.cells = [];
  r.insertCell = () => { const c = element("td"); r.cells.push(c); return c; };
  return r;
}
const body = { rows: [], get firstChild() { return this.rows[0] ?? null; },
  insertBefore(node) { this.rows.unshift(node); }, deleteRow() { this.rows.pop(); } };
const table = element("table", { id: "live", tBodies: [body], dataset: { events: "/api/events", rows: "20", status: "status", ...page.table } });
const status = element("span", { id: "status" });
byId.set("status", status);
const refreshers = page.refreshers.map((r) => element("div", { id: r.id, dataset: { refresh: r.url, every: "2" } }));
for (const el of [...refreshers, ...page.plain.map((id) => element("div", { id }))]) byId.set(el.id, el);
let ready;
const document = {
  hidden: false,
  addEventListener(type, fn) { if (type === "DOMContentLoaded") ready = fn; },
  querySelectorAll(selector) { return selector === "[data-refresh]" ? refreshers : selector === "table[data-events]" ? [table] : []; },
  querySelector() { return null; },
  getElementById(id) { return byId.get(id) ?? null; },
  createElement(tag) { return tag === "tr" ? row() : element(tag); },
  createDocumentFragment() { return element("#fragment"); },
};
class EventSource {
  constructor(url) { this.url = url; this.listeners = {}; sources.push(this); }
  addEventListener(type, fn) { (this.listeners[type] ??= []).push(fn); }
}
const context = {
  document, EventSource, performance: { now: () => 0 }, requestAnimationFrame() {},
  setInterval() { return 1; }, clearInterval() {}, console, JSON, Date, Math, Number, String, Map, encodeURIComponent,
  location: { reload() { reloads += 1; } },
  fetch: async (url) => { fetched.push(url); return { ok: true, text: async () => "<p>again</p>" }; },
};
vm.runInNewContext(fs.readFileSync(script, "utf8"), context);
ready();
const gap = { from_revision: 310, to_revision: 342, reason: "watch_reset", task_ids: ["t-1"], truncated: false };
for (const fn of sources[0].listeners.gap ?? []) fn({ data: JSON.stringify(gap) });
setImmediate(() => console.log(JSON.stringify({
  rows: body.rows.map((r) => ({ className: r.className, cells: r.cells.map((c) => c.textContent) })),
  status: status.textContent, fetched, reloads,
})));
