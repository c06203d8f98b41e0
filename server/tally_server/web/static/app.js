// Tally's dashboard: reads /api/* with the key kept in this tab, draws with Chart.js.
"use strict";

const state = { charts: {} };
const usd = (value) =>
  value === null || value === undefined
    ? "-"
    : "$" + (value < 0.01 && value > 0 ? value.toPrecision(3) : value.toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 4 }));

async function api(path) {
  const secret = sessionStorage.getItem("tally-key");
  const response = await fetch(path, { headers: secret ? { Authorization: "Bearer " + secret } : {} });
  if (response.status === 401 || response.status === 403) {
    const body = await response.json();
    throw Object.assign(new Error(body.error), { auth: true });
  }
  if (!response.ok) throw new Error(path + ": HTTP " + response.status);
  return response.json();
}

function rows(table, items, cells, pick) {
  const body = document.querySelector(table + " tbody");
  body.replaceChildren();
  for (const item of items) {
    const tr = document.createElement("tr");
    for (const [text, numeric, className] of cells(item)) {
      const td = document.createElement("td");
      td.textContent = text;
      if (numeric) td.className = "n";
      if (className) td.classList.add(className);
      tr.appendChild(td);
    }
    if (pick) {
      tr.className = "pick";
      tr.addEventListener("click", () => pick(item));
    }
    body.appendChild(tr);
  }
}

function draw(id, config) {
  if (state.charts[id]) state.charts[id].destroy();
  state.charts[id] = new Chart(document.getElementById(id), config);
}

async function loadSpend() {
  const by = document.getElementById("by").value;
  const data = await api("/api/spend?days=30&by=" + by);
  const days = [];
  for (let i = 0; i < data.days; i++) days.push(new Date(data.start_us / 1000 + i * 86400000).toISOString().slice(0, 10));
  const label = (g) => (by === "experience_version" ? (g.experience_name || "(unattributed)") + " v" + g.experience_version : g[by] || "(unattributed)");
  const series = new Map();
  const add = (name, g) => {
    if (!series.has(name)) series.set(name, new Array(days.length).fill(0));
    const index = Math.round((g.day / 1000 - data.start_us / 1000) / 86400000);
    if (index >= 0 && index < days.length) series.get(name)[index] += g.cost;
  };
  for (const g of data.groups) add(label(g), g);
  // Past the costliest groups, the rest are one series: the answer stays small whatever names callers send.
  for (const g of data.other) add("(all others)", g);
  draw("spend-chart", {
    type: "bar",
    data: { labels: days, datasets: [...series].map(([name, values]) => ({ label: name, data: values })) },
    options: { animation: false, responsive: true, scales: { x: { stacked: true }, y: { stacked: true, ticks: { callback: (v) => "$" + v } } } },
  });
  document.getElementById("spend-total").textContent = "total " + usd(data.total.cost) + " over " + data.total.events.toLocaleString() + " events";
}

async function loadRun(run) {
  const data = await api("/api/runs/" + run.experience_id);
  document.getElementById("run-title").textContent = data.type + " v" + data.version + ", " + usd(data.cost) + ", " + data.events + " events";
  rows("#steps", data.steps, (s) => [
    [new Date(s.time_us / 1000).toISOString().replace("T", " ").slice(0, 19)],
    [s.model],
    [s.latency_ms ? s.latency_ms + " ms" : "not reported", true],
    [s.state + (s.why_not_priced.length ? ": " + s.why_not_priced.join("; ") : "")],
    [usd(s.cost), true],
  ]);
}

async function loadRuns() {
  const data = await api("/api/runs?limit=20");
  rows("#runs", data.runs, (r) => [[r.type], [r.version, true], [r.events, true], [usd(r.cost), true]], loadRun);
  if (data.runs.length) await loadRun(data.runs[0]);
}

async function loadVersions() {
  const data = await api("/api/versions");
  rows("#versions", data.versions, (v) => [[v.type], [v.version, true], [v.runs, true], [usd(v.mean), true], [usd(v.p95), true], [usd(v.total), true]]);
  draw("versions-chart", {
    type: "bar",
    data: { labels: data.versions.map((v) => v.type + " v" + v.version), datasets: [{ label: "mean cost per run", data: data.versions.map((v) => v.mean) }] },
    options: { animation: false, responsive: true, plugins: { legend: { display: false } } },
  });
}

const percent = (value) => (value === null || value === undefined ? "-" : (value >= 0 ? "+" : "") + (value * 100).toFixed(1) + "%");

async function loadCompare() {
  const data = await api("/api/compare");
  rows("#compare", data.comparisons, (c) => [
    [c.type],
    ["v" + c.baseline + " \u2192 v" + c.candidate],
    [c.runs[0] + " / " + c.runs[1], true],
    [usd(c.cost[0]) + " \u2192 " + usd(c.cost[1]), true],
    [c.enough_runs ? percent(c.cost_change) : "not enough runs", true],
    [c.outcome || "-"],
    [c.success ? (c.success[0] * 100).toFixed(0) + "% \u2192 " + (c.success[1] * 100).toFixed(0) + "%" : "-", true],
    [c.outcome ? percent(c.cost_per_success_change) : "-", true],
  ]);
}

async function loadUnpriced() {
  const data = await api("/api/unpriced?days=30");
  const sampled = data.sampled < data.events ? " (reasons of the newest " + data.sampled + ")" : "";
  document.getElementById("unpriced-count").textContent = data.events + " events in 30 days" + sampled;
  const reasons = data.other_reasons ? [...data.reasons, { reason: "(other reasons)", events: data.other_reasons }] : data.reasons;
  rows("#unpriced", reasons, (r) => [[r.reason], [r.events, true]]);
}

async function loadLimits() {
  const data = await api("/api/limits");
  // A per-experience limit has no one period: its state reads "per experience", styled as none.
  const known = new Set(["ok", "threshold", "exceeded"]);
  rows("#limits", data.limits, (l) => [[l.name], [l.kind], [l.period], [usd(l.spend), true], [usd(l.max), true], [l.state, false, known.has(l.state) ? "state-" + l.state : ""]]);
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
  await Promise.all([loadSpend(), loadRuns(), loadVersions(), loadCompare(), loadUnpriced(), loadLimits()]);
  document.body.dataset.loaded = "true";
}

document.getElementById("key").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem("tally-key", document.getElementById("secret").value.trim());
  loadAll();
});
document.getElementById("by").addEventListener("change", loadSpend);
loadAll();
