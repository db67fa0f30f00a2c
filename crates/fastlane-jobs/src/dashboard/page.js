// The job dashboard: reads the store's JSON every two seconds and draws it;
// actions are POSTs with the page's anti-forgery token. Every text from the
// store (names, payload errors) goes in as text, never as HTML.
"use strict";

const CSRF = document.querySelector('meta[name="fastlane-csrf"]').content;
const STATES = ["waiting", "scheduled", "available", "running", "retrying", "succeeded", "dead", "cancelled"];
const REFRESH_MS = 2000;
const open = new Set(); // job ids whose attempts are shown

/** An element with attributes and children (strings become text). */
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  return node;
}

async function getJson(path) {
  const response = await fetch(path, { headers: { accept: "application/json" }, credentials: "same-origin" });
  if (!response.ok) throw new Error(`${path}: ${response.status} ${await response.text()}`);
  return response.json();
}

async function act(path, done) {
  try {
    const response = await fetch(path, { method: "POST", headers: { "x-fastlane-csrf": CSRF }, credentials: "same-origin" });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(body.error || body.detail || `${response.status}`);
    toast(done(body));
  } catch (err) {
    toast(err.message, true);
  }
  refresh();
}

function toast(text, bad) {
  const box = document.getElementById("toast");
  box.textContent = text;
  box.className = bad ? "show bad" : "show";
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (box.className = ""), 3000);
}

const state = (name) => el("span", { class: `state ${name}` }, name);
const ago = (ms, now) => {
  const s = Math.max(0, Math.round((now - ms) / 1000));
  return s < 90 ? `${s} s ago` : s < 5400 ? `${Math.round(s / 60)} min ago` : `${Math.round(s / 3600)} h ago`;
};
const until = (ms, now) => {
  const s = Math.round((ms - now) / 1000);
  return s <= 0 ? "due" : s < 90 ? `in ${s} s` : s < 5400 ? `in ${Math.round(s / 60)} min` : `in ${Math.round(s / 3600)} h`;
};

function table(id, head, rows, empty) {
  const node = document.getElementById(id);
  node.replaceChildren(
    el("thead", {}, el("tr", {}, head.map(([text, cls]) => el("th", { class: cls || "" }, text)))),
    el("tbody", {}, rows.length ? rows : el("tr", {}, el("td", { class: "empty", colSpan: head.length }, empty))),
  );
}

function drawTotals(totals) {
  document.getElementById("totals").replaceChildren(
    ...STATES.map((s) => el("div", { class: "card", "data-state": s }, el("b", {}, (totals[s] || 0).toLocaleString()), el("span", {}, s))),
  );
}

function drawQueues(queues) {
  const rows = queues.map((q) => {
    const limits = q.limits ? [q.limits.rate && `${q.limits.rate}`, q.limits.concurrency && `${q.limits.concurrency} at once`].filter(Boolean).join(", ") : "";
    return el("tr", { "data-queue": q.queue }, el("td", {}, q.queue), STATES.map((s) => el("td", { class: "num" }, (q.counts[s] || 0).toLocaleString())), el("td", {}, limits || "—"));
  });
  table("queues", [["queue"], ...STATES.map((s) => [s, "num"]), ["limits"]], rows, "no jobs yet");
}

function drawChart(activity, now) {
  const minute = 60000;
  const end = Math.floor(now / minute) * minute;
  const buckets = new Map(activity.map((a) => [a.start_ms, a]));
  const width = 960, height = 140, gap = 2, bar = width / 60 - gap;
  const bars = [];
  let max = 1;
  for (let i = 59; i >= 0; i--) {
    const a = buckets.get(end - i * minute) || { succeeded: 0, dead: 0, cancelled: 0 };
    max = Math.max(max, a.succeeded + a.dead + a.cancelled);
    bars.push([59 - i, a]);
  }
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height + 18}`, role: "img", "aria-label": "jobs that ended per minute, last hour" });
  for (const [i, a] of bars) {
    let y = height;
    for (const [key, color] of [["succeeded", "var(--ok)"], ["dead", "var(--bad)"], ["cancelled", "var(--off)"]]) {
      const h = (a[key] / max) * (height - 4);
      if (h <= 0) continue;
      y -= h;
      const rect = svg("rect", { x: i * (bar + gap), y, width: bar, height: h, fill: color });
      rect.append(svg("title", {}));
      rect.firstChild.textContent = `${a[key]} ${key}`;
      chart.append(rect);
    }
  }
  chart.append(svg("line", { x1: 0, y1: height, x2: width, y2: height, stroke: "#d0d5dd" }));
  for (const [x, text, anchor] of [[0, "60 min ago", "start"], [width / 2, "30 min ago", "middle"], [width, "now", "end"]]) {
    const label = svg("text", { x, y: height + 14, "text-anchor": anchor, "font-size": 11, fill: "#667085" });
    label.textContent = text;
    chart.append(label);
  }
  const peak = svg("text", { x: 2, y: 11, "font-size": 11, fill: "#667085" });
  peak.textContent = `${max.toLocaleString()} / min`;
  chart.append(peak);
  const total = activity.reduce((n, a) => n + a.succeeded + a.dead + a.cancelled, 0);
  const legend = el("div", { class: "legend" },
    el("span", {}, el("i", { style: "background: var(--ok)" }), "succeeded"),
    el("span", {}, el("i", { style: "background: var(--bad)" }), "dead"),
    el("span", {}, el("i", { style: "background: var(--off)" }), "cancelled"),
    el("span", {}, `${total.toLocaleString()} in the last hour`));
  document.getElementById("chart").replaceChildren(chart, legend);
}

function jobRows(jobs, columns, now) {
  const rows = [];
  for (const job of jobs) {
    rows.push(el("tr", { "data-job": job.id }, columns.map((column) => column(job, now))));
    if (open.has(job.id)) rows.push(el("tr", { class: "detail", "data-attempts": job.id }, el("td", { colSpan: columns.length }, "loading attempts…")));
  }
  return rows;
}

const idCell = (job) => el("td", {}, el("button", { class: "link", title: "show its attempts", onclick: () => toggle(job.id) }, `#${job.id}`));
const nameCell = (job) => el("td", {}, job.name, " ", el("small", {}, `(${job.queue})`));
const attemptCell = (job) => el("td", { class: "num" }, job.attempt);
const errorCell = (job) => el("td", { class: "error" }, job.last_error || "");
const retryCell = (job) => el("td", {}, el("button", { class: "retry", onclick: () => act(`api/jobs/${job.id}/retry`, (r) => `job ${r.id}: ${r.state}`) }, "retry"));
const cancelCell = (job) => el("td", {}, el("button", { class: "cancel", onclick: () => act(`api/jobs/${job.id}/cancel`, (r) => `job ${r.id}: ${r.state}`) }, "cancel"));
const progressCell = (job) => {
  const pct = job.progress ?? 0;
  return el("td", {}, el("div", { class: "bar", title: job.progress_message || "" }, el("i", { style: `width: ${pct}%` }), el("em", {}, job.progress == null ? "—" : `${pct} %`)), job.progress_message ? el("small", {}, job.progress_message) : null);
};

function toggle(id) {
  if (open.has(id)) open.delete(id);
  else open.add(id);
  refresh();
}

async function fillAttempts() {
  for (const row of document.querySelectorAll("tr[data-attempts]")) {
    const id = row.getAttribute("data-attempts");
    try {
      const job = await getJson(`api/jobs/${id}`);
      const lines = job.attempts.map((a) =>
        el("tr", {}, el("td", { class: "num" }, a.attempt), el("td", {}, a.consumer), el("td", {}, new Date(a.started_at_ms).toISOString().replace("T", " ").slice(0, 19)),
          el("td", {}, a.outcome || "running"), el("td", { class: "error" }, a.error || "")));
      const parts = [el("table", {}, el("thead", {}, el("tr", {}, ["attempt", "consumer", "started (UTC)", "outcome", "error"].map((h) => el("th", {}, h)))), el("tbody", {}, lines))];
      if (job.depends_on.length) parts.push(el("p", {}, `waited for ${job.depends_on.map((d) => `#${d}`).join(", ")}`));
      row.firstChild.replaceChildren(...parts);
    } catch (err) {
      row.firstChild.textContent = err.message;
    }
  }
}

function drawDeadTypes(types) {
  document.getElementById("dead-types").replaceChildren(
    ...types.map((t) => el("button", { class: "retry", "data-retry-dead": t.name, onclick: () => act(`api/dead/retry?name=${encodeURIComponent(t.name)}`, (r) => `${r.retried} dead ${t.name} job(s) retried`) }, `retry all ${t.count.toLocaleString()} dead ${t.name}`)),
  );
}

function drawSchedules(schedules, now) {
  const rows = schedules.map((s) => el("tr", {}, el("td", {}, s.name), el("td", {}, s.job), el("td", {}, s.spec), el("td", {}, s.missed),
    el("td", {}, s.next_tick ? `${new Date(s.next_tick).toISOString().replace("T", " ").slice(0, 19)} (${until(s.next_tick, now)})` : "—"),
    el("td", {}, s.last_job ? `#${s.last_job}` : "—"), el("td", {}, ago(s.seen_at, now))));
  table("schedules", [["name"], ["job"], ["ticks"], ["missed"], ["next tick (UTC)"], ["last job"], ["last seen"]], rows, "no schedules");
}

let busy = false;
async function refresh() {
  if (busy) return;
  busy = true;
  try {
    const [overview, running, retrying, dead] = await Promise.all([
      getJson("api/overview"), getJson("api/jobs?state=running&limit=50"), getJson("api/jobs?state=retrying&limit=50"), getJson("api/jobs?state=dead&limit=50"),
    ]);
    const now = overview.now_ms;
    drawTotals(overview.totals);
    drawQueues(overview.queues);
    drawChart(overview.activity, now);
    table("running", [["job"], ["type (queue)"], ["attempt", "num"], ["progress"], [""]], jobRows(running, [idCell, nameCell, attemptCell, progressCell, cancelCell], now), "nothing is running");
    table("retrying", [["job"], ["type (queue)"], ["attempt", "num"], ["last error"], [""], [""]], jobRows(retrying, [idCell, nameCell, attemptCell, errorCell, retryCell, cancelCell], now), "nothing is failing");
    table("dead", [["job"], ["type (queue)"], ["attempts", "num"], ["last error"], [""]], jobRows(dead, [idCell, nameCell, attemptCell, errorCell, retryCell], now), "no dead jobs");
    drawDeadTypes(overview.dead_by_name);
    drawSchedules(overview.schedules, now);
    const t = overview.tables;
    document.getElementById("tables").textContent = `store: ${t.jobs.toLocaleString()} jobs, ${t.attempts.toLocaleString()} attempts, ${t.schedules} schedules; ${(t.bytes / 1048576).toFixed(1)} MiB`;
    document.getElementById("status").textContent = `updated ${new Date(now).toLocaleTimeString()}, every ${REFRESH_MS / 1000} s`;
    await fillAttempts();
  } catch (err) {
    document.getElementById("status").textContent = `cannot read the store: ${err.message}`;
  } finally {
    busy = false;
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
