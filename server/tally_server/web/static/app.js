// Tally's dashboard: reads /api/* with the key kept in this tab, draws with Chart.js. The
// window and filters live in the URL (so a view can be linked and survives a reload) and
// every panel reads them. Caller-chosen names only ever go in as text (textContent).
"use strict";

const state = { charts: {}, log: {}, logNext: "" };
const FILTERS = ["from", "to", "type", "version", "provider", "model", "user", "tag"];

// Money, one rule everywhere (the CLI's tables too): from $1, to the cent with thousands
// separators; below, four significant digits without trailing zeros but with at least
// cents; rounded half to even. The JSON carries exact decimal strings.
function usd(text) {
  if (text === null || text === undefined) return "-";
  const negative = String(text).startsWith("-");
  const [whole, fraction = ""] = String(text).replace("-", "").split(".");
  let nanos = BigInt(whole) * 1000000000n + BigInt((fraction + "000000000").slice(0, 9));
  const sign = negative && nanos > 0n ? "-" : "";
  const halfEven = (value, unit) => {
    let q = value / unit;
    const r = value % unit;
    if (r * 2n > unit || (r * 2n === unit && q % 2n === 1n)) q += 1n;
    return q;
  };
  const cents = (value) => {
    const q = halfEven(value, 10000000n);
    return sign + "$" + (q / 100n).toLocaleString("en-US") + "." + (q % 100n).toString().padStart(2, "0");
  };
  if (nanos === 0n || nanos >= 1000000000n) return cents(nanos);
  const digits = nanos.toString().length;
  if (digits > 4) {
    const unit = 10n ** BigInt(digits - 4);
    nanos = halfEven(nanos, unit) * unit;
    if (nanos >= 1000000000n) return cents(nanos);
  }
  return sign + "$0." + nanos.toString().padStart(9, "0").replace(/0+$/, "").padEnd(2, "0");
}
const number = (value) => (value === null || value === undefined ? "-" : Number(value).toLocaleString("en-US"));
const percent = (value) => (value === null || value === undefined ? "-" : (value * 100).toFixed(1) + "%");
const change = (value) => (value === null || value === undefined ? "-" : (value >= 0 ? "+" : "") + (value * 100).toFixed(1) + "%");
const utc = (us) => (us ? new Date(us / 1000).toISOString().replace("T", " ").slice(0, 19) : "-");
const latency = (ms) => (ms ? Number(ms).toLocaleString("en-US", { maximumFractionDigits: 0 }) + " ms" : "not reported");

function view() {
  const params = new URLSearchParams(location.search);
  const picked = new URLSearchParams();
  for (const name of FILTERS) if (params.get(name)) picked.set(name, params.get(name));
  return picked;
}

function withView(path, extra = {}) {
  const params = view();
  for (const [name, value] of Object.entries(extra)) if (value !== "" && value !== undefined) params.set(name, value);
  const query = params.toString();
  return path + (query ? (path.includes("?") ? "&" : "?") + query : "");
}

async function api(path) {
  const secret = sessionStorage.getItem("tally-key");
  const response = await fetch(path, { headers: secret ? { Authorization: "Bearer " + secret } : {} });
  if (response.status === 401 || response.status === 403) {
    const body = await response.json();
    throw Object.assign(new Error(body.error), { auth: true });
  }
  if (!response.ok) throw new Error(path + ": HTTP " + response.status + " " + (await response.text()));
  return response.json();
}

function rows(table, items, cells, pick) {
  const body = document.querySelector(table + " tbody");
  body.replaceChildren();
  for (const item of items) {
    const tr = document.createElement("tr");
    for (const [text, numeric, className, title] of cells(item)) {
      const td = document.createElement("td");
      td.textContent = text;
      if (numeric) td.className = "n";
      if (className) td.classList.add(className);
      if (title) td.title = title;
      tr.appendChild(td);
    }
    if (pick) {
      tr.classList.add("pick");
      tr.addEventListener("click", () => {
        for (const other of body.querySelectorAll("tr.chosen")) other.classList.remove("chosen");
        tr.classList.add("chosen");
        pick(item);
      });
    }
    body.appendChild(tr);
  }
  return body;
}

function draw(id, config) {
  if (state.charts[id]) state.charts[id].destroy();
  state.charts[id] = new Chart(document.getElementById(id), config);
}

async function loadSummary() {
  const data = await api(withView("/api/summary"));
  const body = document.getElementById("tiles");
  body.replaceChildren();
  const delta = (now, then) => (then ? (now - then) / then : null);
  const tiles = [
    ["Spend", usd(data.current.spend), delta(Number(data.current.spend), Number(data.previous.spend))],
    ["Runs", number(data.current.runs), delta(data.current.runs, data.previous.runs)],
    ["Cost per run", usd(data.current.cost_per_run), delta(Number(data.current.cost_per_run), Number(data.previous.cost_per_run))],
    ["Events", number(data.current.events), delta(data.current.events, data.previous.events)],
    ["Failed events", number(data.current.failed), delta(data.current.failed, data.previous.failed)],
    ["Not priced", number(data.current.unpriced), delta(data.current.unpriced, data.previous.unpriced)],
    ["Tokens in", number(data.current.tokens_in), delta(data.current.tokens_in, data.previous.tokens_in)],
    ["Tokens out", number(data.current.tokens_out), delta(data.current.tokens_out, data.previous.tokens_out)],
  ];
  for (const [label, value, moved] of tiles) {
    const tile = document.createElement("div");
    tile.className = "tile";
    const name = document.createElement("div");
    name.className = "muted";
    name.textContent = label;
    const figure = document.createElement("div");
    figure.className = "figure";
    figure.textContent = value;
    const before = document.createElement("div");
    before.className = "muted";
    before.textContent = moved === null ? "none in the " + data.days + " days before" : change(moved) + " against the " + data.days + " days before";
    tile.append(name, figure, before);
    body.appendChild(tile);
  }
  document.getElementById("runs-meaning").textContent = !data.current.runs_counted
    ? "runs are not counted: " + data.current.runs_not_counted
    : data.current.runs_started
      ? "runs: those whose first event is in the window"
      : "runs: those with one of these events in the window";
}

async function loadSpend() {
  const by = document.getElementById("by").value;
  const data = await api(withView("/api/spend", { by }));
  const days = [];
  for (let i = 0; i < data.days; i++) days.push(new Date(data.start_us / 1000 + i * 86400000).toISOString().slice(0, 10));
  const label = (g) => (by === "experience_version" ? (g.experience_name || "(unattributed)") + " v" + g.experience_version : g[by] || "(unattributed)");
  const series = new Map();
  const add = (name, g) => {
    if (!series.has(name)) series.set(name, new Array(days.length).fill(0));
    const index = Math.round((g.day / 1000 - data.start_us / 1000) / 86400000);
    if (index >= 0 && index < days.length) series.get(name)[index] += Number(g.cost);
  };
  for (const g of data.groups) add(label(g), g);
  // Past the costliest groups, the rest are one series: the answer stays small whatever names callers send.
  for (const g of data.other) add("(all others)", g);
  draw("spend-chart", {
    type: "bar",
    data: { labels: days, datasets: [...series].map(([name, values]) => ({ label: name, data: values })) },
    options: { animation: false, responsive: true, scales: { x: { stacked: true }, y: { stacked: true, ticks: { callback: (v) => usd(String(v)) } } } },
  });
  document.getElementById("spend-total").textContent = "total " + usd(data.total.cost) + " over " + number(data.total.events) + " events";
}

// Spend by user, tag or API key over the view: a user or tag row becomes the view's filter.
async function loadSpendBy() {
  const by = document.getElementById("spend-by").value;
  const data = await api(withView("/api/spend_by", { by }));
  const names = { user: ["User", "(no user)"], tag: ["Tag", "(no tag)"], key: ["API key", "(no key)"] };
  document.getElementById("spend-by-name").textContent = names[by][0];
  const shown = data.groups.map((g) => ({ ...g, label: g.name || names[by][1] }));
  if (data.rest) shown.push({ ...data.rest, label: "(all others)", tokens_in: null, tokens_out: null });
  rows(
    "#spend-by-table",
    shown,
    (g) => [[g.label], [number(g.events), true], [g.tokens_in === null ? "-" : number(g.tokens_in) + " / " + number(g.tokens_out), true], [usd(g.cost), true]],
    by === "key" ? undefined : (g) => g.name && filterBy(by, g.name),
  );
  document.getElementById("spend-by-about").textContent =
    "total " + usd(data.total.cost) + (by === "tag" ? " (an event counts once per tag)" : "") + (by === "key" ? " (events stored before keys were recorded: no key)" : "") +
    (data.note ? "; " + data.note : "");
}

function filterBy(name, value) {
  const params = view();
  params.set(name, value);
  history.pushState(null, "", location.pathname + "?" + params);
  loadAll();
}

async function loadRun(run) {
  const data = await api("/api/runs/" + encodeURIComponent(run.experience_id));
  document.getElementById("run-id").textContent = data.experience_id;
  document.getElementById("run-title").textContent =
    data.type + " v" + data.version + ", " + usd(data.cost) + ", " + number(data.events) + " events, " +
    utc(data.first_us) + " to " + utc(data.last_us) + (data.user_ids.length ? ", users " + data.user_ids.join(", ") : "") +
    ", latency p50 " + latency(data.latency_p50_ms) + ", p95 " + latency(data.latency_p95_ms);
  rows("#run-steps", data.step_costs, (s) => [[s.step], [number(s.events), true], [usd(s.cost), true]]);
  document.getElementById("run-steps").hidden = !data.step_costs.length;
  rows("#steps", data.steps, eventCells);
}

function tokens(units) {
  return Object.entries(units).map(([unit, [input, output]]) => unit + " " + number(input) + " in / " + number(output) + " out").join("; ") || "-";
}

function eventCells(e) {
  return [
    [utc(e.time_us)],
    [e.request_id, false, "id"],
    [e.type ? e.type + " v" + e.version : "(unattributed)"],
    [e.resource, false, "", e.price ? "priced as " + e.price : "no price entry"],
    [tokens(e.units)],
    [latency(e.latency_ms), true],
    [e.state + (e.why_not_priced.length ? ": " + e.why_not_priced.join("; ") : "")],
    [Object.entries(e.properties).map(([k, v]) => k + "=" + v).join(", ")],
    [usd(e.cost), true],
  ];
}

async function loadRuns() {
  const sort = document.getElementById("sort").value;
  const data = await api(withView("/api/runs", { limit: 20, sort }));
  rows(
    "#runs",
    data.runs,
    (r) => [
      [r.experience_id, false, "id", "click to open; select to copy"],
      [r.type + " v" + r.version],
      [r.user || "-"],
      [utc(r.first_us)],
      [utc(r.last_us)],
      [number(r.events), true],
      [number(r.tokens_in) + " / " + number(r.tokens_out), true],
      [usd(r.cost), true],
    ],
    loadRun,
  );
  document.getElementById("runs-found").textContent =
    data.from_events === undefined
      ? ""
      : "(of the filter's newest " + number(data.from_events) + " events)";
  const first = document.querySelector("#runs tbody tr");
  if (first) first.click();
}

async function loadVersions() {
  const data = await api(withView("/api/versions"));
  rows("#versions", data.versions, (v) => [
    [v.type],
    [v.version, true],
    [number(v.runs), true],
    [usd(v.mean), true],
    [usd(v.p50), true],
    [usd(v.p95), true],
    [percent(v.failure_rate), true],
    [v.unpriced_events ? number(v.unpriced_events) + " ($0 each)" : "0", true],
    [v.outcome ? v.outcome + " " + percent(v.success_rate) : "-", true],
    [v.outcome ? usd(v.cost_per_success) : "-", true],
  ]);
  draw("versions-chart", {
    type: "bar",
    data: {
      labels: data.versions.map((v) => v.type + " v" + v.version),
      datasets: ["mean", "p50", "p95"].map((name) => ({ label: name + " cost per run", data: data.versions.map((v) => Number(v[name])) })),
    },
    options: { indexAxis: "y", animation: false, responsive: true, scales: { x: { ticks: { callback: (v) => usd(String(v)) } } } },
  });
}

async function loadCompare() {
  const data = await api("/api/compare");
  rows("#compare", data.comparisons, (c) => [
    [c.type],
    ["v" + c.baseline + " \u2192 v" + c.candidate],
    [c.runs[0] + " / " + c.runs[1], true],
    [usd(c.cost[0]) + " \u2192 " + usd(c.cost[1]), true],
    [c.enough_runs ? change(c.cost_change) : "not enough runs", true],
    [c.outcome || "-"],
    [c.success ? (c.success[0] * 100).toFixed(0) + "% \u2192 " + (c.success[1] * 100).toFixed(0) + "%" : "-", true],
    [c.outcome ? change(c.cost_per_success_change) : "-", true],
  ]);
}

async function loadUnpriced() {
  const data = await api(withView("/api/unpriced"));
  const among = data.among ? ", looked for among the window's newest " + number(data.among) + " not priced of each state" : "";
  const sampled = data.sampled < data.events ? " (reasons of the newest " + number(data.sampled) + among + ")" : "";
  document.getElementById("unpriced-count").textContent = number(data.events) + " events in the window" + sampled;
  const reasons = data.other_reasons ? [...data.reasons, { reason: "(other reasons)", events: data.other_reasons }] : data.reasons;
  // A reason opens the request log kept to its events.
  rows("#unpriced", reasons, (r) => [[r.reason], [number(r.events), true]], (r) => openLog({ state: "unpriced", reason: r.reason === "(other reasons)" ? "" : r.reason }));
}

async function loadLimits() {
  const data = await api("/api/limits");
  // A per-experience limit has no one period: its state reads "per experience", styled as none.
  const known = new Set(["ok", "threshold", "exceeded"]);
  const period = (l) => l.period + ": " + (l.start_us ? utc(l.start_us) : "since created") + " to " + (l.end_us ? utc(l.end_us) : "no end");
  rows(
    "#limits",
    data.limits,
    (l) => [[l.name], [l.kind], [period(l)], [usd(l.spend), true], [usd(l.reserved), true], [usd(l.max), true], [l.state, false, known.has(l.state) ? "state-" + l.state : ""]],
    openLimit,
  );
  document.getElementById("limits-more").textContent = data.more ? "(the first 1,000 limits)" : "";
  const busiest = data.limits.flatMap((l) => (l.busiest || []).map((run) => ({ ...run, limit: l.name })));
  rows(
    "#busiest",
    busiest,
    (r) => [[r.limit], [r.experience_id, false, "id"], [usd(r.spend), true], [number(r.events), true], [r.state, false, "state-" + r.state]],
    (r) => loadRun(r).then(() => document.getElementById("run-id").scrollIntoView()),
  );
}

// A limit's events this period: its scope and period become the page's view, and the log opens.
function openLimit(limit) {
  const params = new URLSearchParams(limit.view);
  history.pushState(null, "", location.pathname + "?" + params);
  state.log = {};
  document.getElementById("search").value = ""; // its events, not an earlier search
  loadAll().then(() => document.getElementById("log-section").scrollIntoView());
}

async function loadLog(page = "") {
  const log = state.log;
  const q = document.getElementById("search").value.trim();
  const data = await api(withView("/api/events", { state: log.state || "", reason: log.reason || "", q, page }));
  state.logNext = data.next;
  document.getElementById("log-next").disabled = !data.next;
  document.getElementById("log-about").textContent =
    (data.searched ? "found by " + data.searched + (data.scanned ? " as a property value, among the newest " + number(data.scanned) + " events of the view" : "") : log.reason ? "not priced: " + log.reason : log.state ? "not priced" : "every event") +
    ", newest first";
  rows("#log", data.events, eventCells);
}

function openLog(filter) {
  state.log = filter;
  document.getElementById("search").value = "";
  loadLog().then(() => document.getElementById("log-section").scrollIntoView());
}

function fillFilters() {
  const params = view();
  for (const name of FILTERS) document.getElementById("f-" + name).value = params.get(name) || "";
  document.getElementById("window").textContent = params.get("from") || params.get("to")
    ? (params.get("from") || "30 days before") + " to " + (params.get("to") || "today") + " (UTC)"
    : "the last 30 days (UTC)";
}

function applyFilters(event) {
  if (event) event.preventDefault();
  const params = new URLSearchParams();
  for (const name of FILTERS) {
    const value = document.getElementById("f-" + name).value.trim();
    if (value) params.set(name, value);
  }
  history.pushState(null, "", location.pathname + (params.toString() ? "?" + params : ""));
  loadAll();
}

function preset(days) {
  const today = new Date(Date.now()).toISOString().slice(0, 10);
  const from = new Date(Date.now() - (days - 1) * 86400000).toISOString().slice(0, 10);
  document.getElementById("f-from").value = from;
  document.getElementById("f-to").value = today;
  applyFilters();
}

async function loadAll() {
  const form = document.getElementById("key-form");
  const who = await api("/api/whoami");
  if (who.keys && !who.authenticated) {
    form.classList.add("shown");
    document.getElementById("key-error").textContent = sessionStorage.getItem("tally-key") ? who.reason : "";
    return;
  }
  form.classList.remove("shown");
  fillFilters();
  document.body.dataset.loaded = "false";
  try {
    await Promise.all([loadSummary(), loadSpend(), loadRuns(), loadVersions(), loadCompare(), loadUnpriced(), loadSpendBy(), loadLimits(), loadLog()]);
    document.getElementById("error").textContent = "";
  } catch (error) {
    document.getElementById("error").textContent = error.message;
  }
  document.body.dataset.loaded = "true";
}

document.getElementById("key").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem("tally-key", document.getElementById("secret").value.trim());
  loadAll();
});
document.getElementById("filters").addEventListener("submit", applyFilters);
for (const days of [1, 7, 30, 90]) document.getElementById("last-" + days).addEventListener("click", () => preset(days));
document.getElementById("by").addEventListener("change", loadSpend);
document.getElementById("sort").addEventListener("change", loadRuns);
document.getElementById("spend-by").addEventListener("change", loadSpendBy);
document.getElementById("log-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.log = {};
  loadLog();
});
document.getElementById("log-all").addEventListener("click", () => openLog({}));
document.getElementById("log-next").addEventListener("click", () => loadLog(state.logNext));
window.addEventListener("popstate", loadAll);
loadAll();
