// /dashboard: polls /dashboard/data (the metrics scope when auth is on) and draws it with Chart.js; "try a user"
// asks /recommend with the same key. Rates and latencies are computed here from the counters' change between two
// polls, as Prometheus's rate() and histogram_quantile() would over that interval.
"use strict";

const POLL_MS = Number(new URLSearchParams(location.search).get("poll")) || 5000;
const POINTS = 60;                       // points kept per time series
const KEY = "cmn-dashboard-key";         // sessionStorage: the key lives as long as the tab
const $ = (id) => document.getElementById(id);
const charts = {};
// one colour per series, in order (Chart.js colours only the datasets a chart starts with)
const PALETTE = ["#3b82c4", "#d9485f", "#2f9e6b", "#d08b1d", "#7b5cc4", "#4aa3a8", "#8c8c8c"];
const colour = (n) => ({ borderColor: PALETTE[n % PALETTE.length], backgroundColor: PALETTE[n % PALETTE.length] + "99" });
let previous = null;

function key() { return sessionStorage.getItem(KEY) || ""; }

function headers(extra) {
  const h = Object.assign({}, extra);
  if (key()) h.Authorization = "Bearer " + key();
  return h;
}

function say(text) {
  $("message").hidden = !text;
  $("message").textContent = text || "";
}

// ------------------------------------------------------------------ metrics

function sum(metrics, name, where) {
  return metrics.filter((s) => s.name === name && (!where || where(s.labels))).reduce((a, s) => a + s.value, 0);
}

function groupBy(metrics, name, label) {
  const out = {};
  for (const s of metrics) if (s.name === name) out[s.labels[label]] = (out[s.labels[label]] || 0) + s.value;
  return out;
}

function buckets(metrics, name, where) {
  const by = {};
  for (const s of metrics) {
    if (s.name === name && (!where || where(s.labels))) by[s.labels.le] = (by[s.labels.le] || 0) + s.value;
  }
  return Object.entries(by).map(([le, n]) => [Number(le), n]).sort((a, b) => a[0] - b[0]);
}

// Prometheus's histogram_quantile: linear interpolation inside the bucket the quantile falls in
function quantile(q, cumulative) {
  if (!cumulative.length) return null;
  const total = cumulative[cumulative.length - 1][1];
  if (total <= 0) return null;
  const rank = q * total;
  let [lower, below] = [0, 0];
  for (const [le, n] of cumulative) {
    if (n >= rank) {
      if (!isFinite(le)) return lower;
      return lower + (le - lower) * ((rank - below) / Math.max(n - below, 1e-12));
    }
    [lower, below] = [le, n];
  }
  return lower;
}

function minus(now, before) {
  const old = new Map(before.map(([le, n]) => [le, n]));
  return now.map(([le, n]) => [le, n - (old.get(le) || 0)]);
}

const isRecommend = (l) => l.route === "/recommend" || l.route === "/recommend/batch";

// ------------------------------------------------------------------ charts

function chart(id, type, options) {
  charts[id] = new Chart($(id), {
    type,
    data: { labels: [], datasets: [] },
    options: Object.assign({ animation: false, responsive: true, maintainAspectRatio: false,
                             plugins: { legend: { position: "bottom" } } }, options),
  });
  return charts[id];
}

// a new point in time on a line chart: every series gets a slot (null until `series` fills it)
function tick(id, time) {
  const c = charts[id];
  c.data.labels.push(time);
  for (const ds of c.data.datasets) ds.data.push(null);
  if (c.data.labels.length > POINTS) {
    c.data.labels.shift();
    for (const ds of c.data.datasets) ds.data.shift();
  }
}

function series(id, label, value) {
  const c = charts[id];
  let ds = c.data.datasets.find((d) => d.label === label);
  if (!ds) {
    ds = Object.assign({ label, data: new Array(c.data.labels.length).fill(null), borderWidth: 2, pointRadius: 2,
                         tension: 0.2 }, colour(c.data.datasets.length));
    c.data.datasets.push(ds);
  }
  ds.data[ds.data.length - 1] = value;
}

function bars(id, pairs, label) {
  const c = charts[id];
  c.data.labels = pairs.map((p) => p[0]);
  c.data.datasets = [Object.assign({ label, data: pairs.map((p) => p[1]), borderWidth: 1 }, colour(0))];
  c.update();
}

function setupCharts() {
  const seconds = { x: { ticks: { maxTicksLimit: 6 } }, y: { beginAtZero: true } };
  chart("chart-rate", "line", { scales: seconds });
  chart("chart-latency", "line", { scales: seconds });
  chart("chart-lag", "line", { scales: seconds });
  chart("chart-strategies", "bar", { scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true } } });
  chart("chart-recommended", "bar", { indexAxis: "y", plugins: { legend: { display: false } } });
  chart("chart-fed-back", "bar", { indexAxis: "y", plugins: { legend: { display: false } } });
}

// ------------------------------------------------------------------ panels

function fill(id, rows) {
  const dl = $(id);
  dl.replaceChildren();
  for (const [name, value] of rows) {
    if (value === undefined || value === null) continue;
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = name;
    dd.textContent = String(value);
    dl.append(dt, dd);
  }
}

function showHealth(h, metrics) {
  $("status").textContent = h.status;
  $("status").className = "pill " + h.status;
  fill("process", [["status", h.status + (h.detail ? " — " + h.detail : "")], ["worker", h.worker],
                   ["uptime", h.uptime_s !== undefined ? (h.uptime_s / 60).toFixed(1) + " min" : null],
                   ["device", h.device], ["queue", sum(metrics, "cmn_queue_depth") + " requests, " +
                   sum(metrics, "cmn_queue_pairs") + " pairs waiting"]]);
  fill("store", [["store", h.store], ["events stored", h.feedback_events], ["applied up to seq", h.applied_seq],
                 ["lag", h.lag_s !== undefined ? h.lag_s.toFixed(2) + " s" : null],
                 ["received", Object.entries(groupBy(metrics, "cmn_feedback_events_total", "outcome"))
                   .map(([k, v]) => k + " " + v).join(", ") || "none"]]);
  const r = h.rollout;
  fill("model", [["version", h.model_version], ["users / items", h.users !== undefined ? h.users + " / " + h.items : null],
                 ["interactions", h.interactions], ["live users / items", h.live_users !== undefined ?
                   h.live_users + " / " + h.live_items : null],
                 ["rollout", r ? "#" + r.id + " " + r.model_version + " " + r.status + (r.detail ? " (" + r.detail + ")" : "")
                   : "none published (serving the configured checkpoint)"],
                 ["reloads", Object.entries(groupBy(metrics, "cmn_reloads_total", "outcome"))
                   .map(([k, v]) => k + " " + v).join(", ") || "none"],
                 ["warnings", (h.warnings || []).join("; ") || null]]);
}

function showStrategies(data, dt) {
  const m = data.metrics;
  const lists = (kinds, s) => sum(m, "cmn_recommendations_total", (l) => l.strategy === s && kinds.includes(l.kind));
  const names = [...new Set([...data.strategies, ...m.filter((s) => s.name === "cmn_recommendations_total")
    .map((s) => s.labels.strategy)])];
  const body = $("strategies").tBodies[0];
  body.replaceChildren();
  for (const s of names) {
    const all = sum(m, "cmn_recommendations_total", (l) => l.strategy === s);
    const before = previous ? sum(previous.metrics, "cmn_recommendations_total", (l) => l.strategy === s) : null;
    const tr = body.insertRow();
    for (const v of [s + (s === data.default_strategy ? " (default)" : ""), lists(["personalised"], s),
                     lists(["fold_in", "live_user"], s), sum(m, "cmn_scored_items_total", (l) => l.strategy === s),
                     before === null ? "–" : ((all - before) / dt).toFixed(2)]) {
      tr.insertCell().textContent = String(v);
    }
  }
  const kinds = [...new Set(m.filter((s) => s.name === "cmn_recommendations_total").map((s) => s.labels.kind))];
  const c = charts["chart-strategies"];
  c.data.labels = names;
  c.data.datasets = kinds.map((kind, n) => Object.assign({ label: kind, data: names.map((s) =>
    sum(m, "cmn_recommendations_total", (l) => l.strategy === s && l.kind === kind)) }, colour(n)));
  c.update();
}

function showSeries(data, dt) {
  const m = data.metrics;
  const time = new Date(data.time * 1000).toLocaleTimeString();
  for (const id of ["chart-rate", "chart-latency", "chart-lag"]) tick(id, time);
  const h = data.health;
  series("chart-lag", "since the store was read to its end", h.lag_s !== undefined ? h.lag_s : null);
  const applied = buckets(m, "cmn_feedback_apply_lag_seconds_bucket");
  if (previous) {
    const groups = { "/recommend": isRecommend, "/feedback": (l) => l.route === "/feedback",
                     "other": (l) => !isRecommend(l) && l.route !== "/feedback" };
    for (const [name, where] of Object.entries(groups)) {
      const d = sum(m, "cmn_request_seconds_count", where) - sum(previous.metrics, "cmn_request_seconds_count", where);
      series("chart-rate", name, d / dt);
    }
    const errors = (l) => l.status.startsWith("5");
    series("chart-rate", "5xx", (sum(m, "cmn_request_seconds_count", errors) -
                                       sum(previous.metrics, "cmn_request_seconds_count", errors)) / dt);
    const now = buckets(m, "cmn_request_seconds_bucket", isRecommend);
    const window = minus(now, buckets(previous.metrics, "cmn_request_seconds_bucket", isRecommend));
    for (const q of [0.5, 0.99]) {
      const v = quantile(q, window);
      series("chart-latency", "p" + Math.round(q * 100), v === null ? null : v * 1000);
    }
    const lagWindow = quantile(0.99, minus(applied, buckets(previous.metrics, "cmn_feedback_apply_lag_seconds_bucket")));
    series("chart-lag", "write → applied, p99", lagWindow);
  } else {
    // the first poll: since the process started
    const all = buckets(m, "cmn_request_seconds_bucket", isRecommend);
    for (const q of [0.5, 0.99]) {
      const v = quantile(q, all);
      series("chart-latency", "p" + Math.round(q * 100), v === null ? null : v * 1000);
    }
    series("chart-rate", "/recommend", null);
    series("chart-lag", "write → applied, p99", quantile(0.99, applied));
  }
  for (const id of ["chart-rate", "chart-latency", "chart-lag"]) charts[id].update();
}

function showItems(data) {
  const rec = data.most_recommended;
  $("recent-lists").textContent = "(last " + rec.lists + " lists of this process)";
  bars("chart-recommended", rec.items, "times in a list");
  const fed = data.most_fed_back;
  $("recent-events").textContent = fed.error ? "(store: " + fed.error + ")" : "(last " + fed.events + " events)";
  bars("chart-fed-back", fed.items, "events");
}

function showStrategyChoices(data) {
  const select = $("try-strategy");
  if (select.options.length === data.strategies.length) return;
  select.replaceChildren();
  for (const s of data.strategies) {
    const o = new Option(s + (s === data.default_strategy ? " (default)" : ""), s, false, s === data.default_strategy);
    select.add(o);
  }
  $("try-explain").disabled = !data.explain_allowed;
  $("try-explain").parentElement.title = data.explain_allowed ? "" : "CMN_ALLOW_EXPLAIN is off on this server";
}

// ------------------------------------------------------------------ polling

async function poll() {
  let data;
  try {
    const r = await fetch("/dashboard/data", { headers: headers(), cache: "no-store" });
    if (r.status === 401 || r.status === 403) {
      $("key-form").hidden = false;
      say(r.status === 401 ? "This server needs an API key with the metrics scope." :
        "This key lacks the metrics scope.");
      return;
    }
    if (!r.ok) { say("/dashboard/data answered " + r.status); return; }
    data = await r.json();
  } catch (e) {
    say("the server does not answer (" + e.message + ")");
    return;
  }
  say("");
  $("key-form").hidden = !data.auth;
  const dt = previous ? Math.max(data.time - previous.time, 1e-3) : 1;
  showHealth(data.health, data.metrics);
  showStrategyChoices(data);
  showStrategies(data, dt);
  showSeries(data, dt);
  showItems(data);
  $("updated").textContent = "updated " + new Date(data.time * 1000).toLocaleTimeString() +
    ", every " + POLL_MS / 1000 + " s";
  previous = data;
}

async function pollForever() {
  await poll();
  setTimeout(pollForever, POLL_MS);
}

// ------------------------------------------------------------------ try a user

async function tryUser(event) {
  event.preventDefault();
  const explain = $("try-explain").checked && !$("try-explain").disabled;
  const body = { user_id: $("try-user").value.trim(), k: Number($("try-k").value) || 10,
                 strategy: $("try-strategy").value || undefined, explain };
  $("try-note").textContent = "asking…";
  let r = await fetch("/recommend", { method: "POST", headers: headers({ "Content-Type": "application/json" }),
                                      body: JSON.stringify(body) });
  let note = "";
  if (r.status === 403 && explain) {   // the key lacks the history scope: the list without its explanations
    note = "explanations not allowed for this key (" + ((await r.json()).detail || "403") + "); ";
    body.explain = false;
    r = await fetch("/recommend", { method: "POST", headers: headers({ "Content-Type": "application/json" }),
                                    body: JSON.stringify(body) });
  }
  const answer = await r.json();
  if (!r.ok) {
    $("try-note").textContent = "/recommend answered " + r.status + ": " + JSON.stringify(answer.detail);
    $("try-result").hidden = true;
    return;
  }
  const how = answer.fallback ? "popularity fallback (" + answer.fallback + ")" :
    (answer.cold_start || "personalised") + ", strategy " + answer.strategy;
  $("try-note").textContent = note + answer.items.length + " items for " + answer.user_id + ": " + how +
    ", model " + answer.model_version + ", " + answer.took_ms + " ms";
  const rows = $("try-result").tBodies[0];
  rows.replaceChildren();
  answer.items.forEach((item, n) => {
    const tr = rows.insertRow();
    const because = (item.explanation || []).map((e) => e.user_id + ": " + e.weight.toFixed(3)).join(", ");
    for (const v of [n + 1, item.item_id, item.score.toFixed(4), because || (body.explain ? "" : "–")]) {
      tr.insertCell().textContent = String(v);
    }
  });
  $("try-result").hidden = false;
}

function start() {
  if (typeof Chart === "undefined") {
    say("Chart.js is missing: build the page's assets (npm ci && npm run build in app/dashboard).");
    return;
  }
  setupCharts();
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY, $("key").value);
    $("key").value = "";
    poll();
  });
  $("try-form").addEventListener("submit", tryUser);
  pollForever();
}

document.addEventListener("DOMContentLoaded", start);
