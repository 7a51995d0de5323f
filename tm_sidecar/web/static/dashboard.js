// tm-sidecar dashboard: the live parts of server-rendered pages. No build step, no library.
//  - [data-refresh=URL][data-every=S]: fetch URL every S seconds (while the tab is visible)
//    and put the server's HTML in place; stops once the HTML holds a [data-final] mark.
//  - table[data-events=URL]: a server-sent event stream of batches of task events; rows
//    are drawn once per animation frame, the table keeps its newest data-rows rows, and
//    data-refresh-target names a [data-refresh] element to refresh on a task's last event.
//    A "gap" message (the sidecar missed events and could not replay them) is drawn as a
//    row of its own, and what the page shows is read again: the refresh target (or the
//    page, when the target stopped refreshing) and the overview's counts.
"use strict";
(function () {
  const refreshers = new Map();

  function startRefresh(el) {
    const url = el.dataset.refresh;
    const every = Math.max(1, Number(el.dataset.every || 2)) * 1000;
    let busy = false;
    let timer = null;
    async function once() {
      if (busy) return;
      busy = true;
      try {
        const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "text/html" } });
        el.classList.toggle("stale", !response.ok);
        if (response.ok) {
          el.innerHTML = await response.text(); // server-rendered and escaped there
          if (el.querySelector("[data-final]") && timer !== null) {
            clearInterval(timer);
            timer = null;
          }
        }
      } catch (err) {
        el.classList.add("stale");
      } finally {
        busy = false;
      }
    }
    timer = setInterval(() => { if (!document.hidden) once(); }, every);
    refreshers.set(el.id, once);
  }

  function when(epochS) {
    const d = new Date(epochS * 1000);
    return d.toISOString().replace("T", " ").replace(/\.(\d{3})Z$/, ".$1Z");
  }

  function td(row, text, cls) {
    const cell = row.insertCell();
    cell.textContent = text; // never HTML: event data is the tasks' own
    if (cls) cell.className = cls;
    return cell;
  }

  function eventRow(e) {
    const row = document.createElement("tr");
    row.className = "ev-" + e.event;
    td(row, when(e.seen_at));
    td(row, e.event + (e.event === "failed" ? (e.will_retry ? " (will retry)" : " (for good)") : ""));
    const cell = row.insertCell();
    const link = document.createElement("a");
    link.href = "/tasks/" + encodeURIComponent(e.task_id);
    link.textContent = e.task_id;
    cell.appendChild(link);
    td(row, String(e.attempt));
    td(row, e.node || "");
    let detail = "";
    if (e.error) detail = e.error.type + ": " + e.error.message;
    else if (e.data !== undefined && e.data !== null) detail = JSON.stringify(e.data).slice(0, 120);
    td(row, detail, "mono");
    return row;
  }

  function startEvents(table) {
    const body = table.tBodies[0];
    const maxRows = Number(table.dataset.rows || 50);
    const status = document.getElementById(table.dataset.status || "");
    const target = table.dataset.refreshTarget;
    let waiting = [];
    let drawing = false;
    let paused = false;
    let seen = 0;
    let dropped = 0;
    let rateFrom = { t: performance.now(), seen: 0 };
    let rate = 0;

    function say(text) { if (status) status.textContent = text; }

    function draw() {
      drawing = false;
      if (paused) return;
      const fragment = document.createDocumentFragment();
      for (const e of waiting.slice(-maxRows).reverse()) fragment.appendChild(eventRow(e));
      waiting = [];
      body.insertBefore(fragment, body.firstChild);
      while (body.rows.length > maxRows) body.deleteRow(-1);
    }

    const source = new EventSource(table.dataset.events, { withCredentials: true });
    source.addEventListener("open", () => say("live"));
    source.addEventListener("error", () => say("reconnecting…"));
    source.addEventListener("batch", (message) => {
      const batch = JSON.parse(message.data);
      seen = batch.seen;
      dropped += batch.dropped;
      const now = performance.now();
      if (now - rateFrom.t >= 1000) {
        rate = ((seen - rateFrom.seen) * 1000) / (now - rateFrom.t);
        rateFrom = { t: now, seen: seen };
      }
      say("live · " + seen + " events" + (rate ? " · " + rate.toFixed(0) + "/s" : "") +
          (dropped ? " · " + dropped + " not drawn (sampled)" : ""));
      waiting.push(...batch.events);
      if (waiting.length > maxRows) waiting = waiting.slice(-maxRows);
      if (!drawing) {
        drawing = true;
        requestAnimationFrame(draw);
      }
      if (target && batch.events.some((e) => e.final) && refreshers.has(target)) {
        refreshers.get(target)();
      }
    });

    source.addEventListener("gap", (message) => {
      const gap = JSON.parse(message.data);
      const row = document.createElement("tr");
      row.className = "ev-gap";
      td(row, when(Date.now() / 1000));
      td(row, "gap");
      const named = gap.task_ids ? gap.task_ids.length + " task(s) changed" : "tasks unknown";
      const cell = td(row, "events missed (" + gap.reason + "): revisions " + (gap.from_revision + 1) +
        " to " + gap.to_revision + " · " + named + (gap.truncated ? ", more not listed" : "") +
        " · read again");
      cell.colSpan = 4;
      body.insertBefore(row, body.firstChild);
      while (body.rows.length > maxRows) body.deleteRow(-1);
      say("live · events missed, reloaded");
      // What the page shows may have changed unseen: read it again.
      if (target) {
        if (refreshers.has(target)) refreshers.get(target)();
        else location.reload(); // drawn final, without a refresher: read the whole page again
      }
      if (refreshers.has("overview")) refreshers.get("overview")();
    });

    const pause = document.querySelector('[data-pause="' + table.id + '"]');
    if (pause) {
      pause.addEventListener("click", () => {
        paused = !paused;
        pause.textContent = paused ? "Resume" : "Pause";
        if (!paused && waiting.length && !drawing) { drawing = true; requestAnimationFrame(draw); }
      });
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    document.querySelectorAll("[data-refresh]").forEach(startRefresh);
    document.querySelectorAll("table[data-events]").forEach(startEvents);
  });
})();
