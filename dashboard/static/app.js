// The dashboard page. Every piece of text from the server is placed with textContent, never
// parsed as HTML: experiment parameters, notes and names are data, not markup.
// The page names no workload's field: what it draws comes from each experiment's declared
// objective in the server's JSON ({field, direction, label, progress}).
"use strict";

const MAX_POINTS = 5000;
let selected = null, experiments = [], view = emptyView(), revision = 0, queueShown = false;
let detailsPending = false, detailsAgain = false;
window.__points = 0;  // points drawn and pushes taken: what a test can wait on
window.__pushes = 0;
window.__detailsSkipped = 0;  // details ticks skipped because the previous request had not answered
window.__detailsInFlight = 0;

function emptyView() {
  // x values are event times (microseconds); t0 is the run's first event (the server says which),
  // shown: events drawn, skipped: events the pushes did not carry (a fast run's pushes are a sample)
  return {series: {}, anomalies: {y: {x: [], y: [], text: []}, y2: {x: [], y: [], text: []}}, phases: {},
          passes: {}, t0: undefined, first: undefined, lastSeq: -1, lastPass: undefined, loading: true,
          shown: 0, skipped: 0, total: undefined};
}

// --- DOM helpers: text only ------------------------------------------------------------------
function el(tag, text, className) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (className) e.className = className;
  return e;
}
function tableRow(cells, tag) {
  const tr = el("tr");
  for (const c of cells) tr.appendChild(el(tag || "td", c));
  return tr;
}
function fillTable(id, header, rows, empty) {
  const body = rows.length ? rows.map(r => tableRow(r)) : [tableRow([empty || "none yet"])];
  document.getElementById(id).replaceChildren(tableRow(header, "th"), ...body);
}
function fmt(v) {
  if (typeof v === "string") return v;
  if (typeof v !== "number") return JSON.stringify(v);
  return Number.isInteger(v) ? String(v) : String(Number(v.toPrecision(6)));
}

// --- events -> chart data --------------------------------------------------------------------
function objective() {
  // the selected experiment's declared objective; null until the server has said
  const cur = experiments.find(e => e.id === selected);
  return (cur && cur.objective) || null;
}
function origin() { return view.t0 ?? view.first; }  // the run's start; until it is known, the first event shown
function seconds(ts) { return Math.max(0, (ts - origin()) / 1e6); }
function trace(name, axis) {
  if (!view.series[name]) view.series[name] = {name: name, axis: axis, x: [], y: []};
  return view.series[name];
}
function push(s, x, y) {
  s.x.push(x); s.y.push(y);
  if (s.x.length > MAX_POINTS) { s.x.splice(0, s.x.length - MAX_POINTS); s.y.splice(0, s.y.length - MAX_POINTS); }
}
function addEvents(events, pushed) {
  for (const e of events) {
    if (e.seq <= view.lastSeq) continue;  // already shown
    if (pushed && view.lastSeq >= 0 && e.seq > view.lastSeq + 1) view.skipped += e.seq - view.lastSeq - 1;
    view.lastSeq = e.seq; view.shown++;
    if (view.first === undefined || e.ts < view.first) view.first = e.ts;
    const t = e.ts, v = e.values || {}, ph = e.phase || "-", obj = objective() || {};
    const main = obj.field ? v[obj.field] : undefined, prog = obj.progress ? v[obj.progress] : undefined;
    if (typeof main === "number") { push(trace(obj.label + " " + ph, "y"), t, main); window.__points++; }
    if (typeof prog === "number") push(trace(obj.progress + " " + ph, "y2"), t, prog);
    if (e.anomaly && e.anomaly.flag) {
      const onProgress = typeof prog === "number";
      const a = view.anomalies[onProgress ? "y2" : "y"];
      a.x.push(t); a.y.push(onProgress ? prog : (typeof main === "number" ? main : 0));
      a.text.push((e.anomaly.methods || []).join(","));
    }
    if (e.name === "phase_start" || (view.lastPass !== undefined && e.pass !== view.lastPass)) {
      mergePass({pass: e.pass, start_ts: e.ts, why: e.name === "phase_start" ? e.notes : undefined});
    }
    if (e.name === "pass_end") mergePass({pass: e.pass, end_ts: e.ts, best: main});
    view.lastPass = e.pass;
    if (e.phase) {
      const p = view.phases[e.phase] || {first: t, gpu: "-"};
      p.last = t; if (e.gpu_mode) p.gpu = e.gpu_mode;
      view.phases[e.phase] = p;
    }
  }
}
function mergePass(p) {
  const cur = view.passes[p.pass] || {pass: p.pass};
  if (p.start_ts != null && (cur.start_ts == null || p.start_ts < cur.start_ts)) {
    cur.start_ts = p.start_ts;
    if (p.why) cur.why = p.why;
  }
  if (p.end_ts != null) { cur.end_ts = p.end_ts; cur.best = p.best; }
  view.passes[p.pass] = cur;
}
function boundaries() {
  // a line where each pass after the first starts, and where the last one ended
  const out = [], list = Object.values(view.passes);
  for (const p of list) {
    if (p.pass > 0 && p.start_ts != null) out.push({ts: p.start_ts, text: `pass ${p.pass}`});
    if (p.end_ts != null && !(view.passes[p.pass + 1] || {}).start_ts) {
      out.push({ts: p.end_ts, text: `pass ${p.pass} ends` + (p.best != null ? ` (${fmt(p.best)})` : "")});
    }
  }
  return view.first === undefined ? [] : out.filter(b => b.ts >= view.first);  // the chart's span only
}

// --- drawing ---------------------------------------------------------------------------------
// A push or an answer only marks the chart stale: Plotly redraws every point of every trace, and
// ten draws a second on a loaded machine would keep the page's one thread busy, a click waiting
// behind them. The chart is drawn on an animation frame (none in a hidden tab), at most once per
// DRAW_GAP_MS, and never more than a third of the time: a draw that took d ms waits 2d for the next.
const DRAW_GAP_MS = 150;
let drawTimer = null, lastDrawEnd = 0, lastDrawMs = 0;
window.__draws = 0;  // draws done: what a test can wait on
function scheduleDraw() {
  if (drawTimer !== null) return;  // one is coming: it draws the view as it is then
  const wait = Math.max(0, lastDrawEnd + Math.max(DRAW_GAP_MS, 2 * lastDrawMs) - performance.now());
  drawTimer = setTimeout(() => requestAnimationFrame(() => {
    drawTimer = null;
    const start = performance.now();
    draw();
    lastDrawEnd = performance.now(); lastDrawMs = lastDrawEnd - start; window.__draws++;
  }), wait);
}
function draw() {
  const series = Object.values(view.series), obj = objective() || {};
  const hasY2 = series.some(s => s.axis === "y2");
  // a whole-number objective (a count) is drawn as steps with whole-number ticks; a measurement as a line
  const whole = series.some(s => s.axis === "y" && s.y.length) &&
                series.every(s => s.axis !== "y" || s.y.every(Number.isInteger));
  // fresh arrays and a new datarevision on every draw: Plotly.react recomputes the ranges
  const data = series.map(s => ({x: s.x.map(seconds), y: s.y.slice(), name: s.name, yaxis: s.axis,
                                 mode: s.axis === "y" ? "lines+markers" : "lines", marker: {size: 4},
                                 line: s.axis === "y" ? {width: 3, shape: whole ? "hv" : "linear"} : {width: 1}}));
  for (const [axis, a] of Object.entries(view.anomalies)) {
    if (a.x.length && (axis === "y" || hasY2)) {
      data.push({x: a.x.map(seconds), y: a.y.slice(), text: a.text.slice(), mode: "markers",
                 name: axis === "y2" ? `anomaly (${obj.progress})` : "anomaly",
                 yaxis: axis, marker: {color: "red", size: 8, symbol: "x"}});
    }
  }
  const lines = boundaries();
  const layout = {
    datarevision: ++revision, uirevision: selected, margin: {t: 24, r: 60, l: 60, b: 50},
    xaxis: {title: {text: view.t0 === undefined ? "seconds since the first event shown" : "seconds since the run started"},
            autorange: true},
    yaxis: {title: {text: obj.label || ""}, autorange: true,
            ...(whole ? {tick0: 0, dtick: wholeStep(series)} : {})},
    legend: {orientation: "h", y: -0.2},
    shapes: lines.map(b => ({type: "line", xref: "x", yref: "paper", x0: seconds(b.ts), x1: seconds(b.ts),
                             y0: 0, y1: 1, line: {dash: "dot", color: "#555", width: 1.5}})),
    annotations: lines.map(b => ({x: seconds(b.ts), xref: "x", y: 1, yref: "paper", yanchor: "bottom",
                                  showarrow: false, font: {size: 11}, text: b.text})),
  };
  if (hasY2) layout.yaxis2 = {title: {text: obj.progress || ""}, overlaying: "y", side: "right", autorange: true,
                              showgrid: false, rangemode: "tozero", tickmode: "auto"};
  Plotly.react("chart", data, layout, {displaylogo: false, responsive: true});
  fillTable("phases", ["phase", "gpu/cpu", "seconds shown"],
            Object.entries(view.phases).map(([p, i]) => [p, i.gpu, ((i.last - i.first) / 1e6).toFixed(1)]));
  const when = ts => ts == null || origin() === undefined ? "-" : `${seconds(ts).toFixed(1)} s`;
  fillTable("passes", ["pass", "started", "ended", "best at end", "why it started"],
            Object.values(view.passes).map(p => {
              const next = (view.passes[p.pass + 1] || {}).start_ts, end = p.end_ts ?? next;
              return [p.pass, when(p.start_ts), end == null ? "running" : when(end),
                      p.best == null ? "-" : `${fmt(p.best)} ${obj.label || ""}`.trim(), p.why || ""];
            }), "no pass yet");
  document.getElementById("chart-note").textContent = chartNote();
}

function chartNote() {
  // what the chart holds: the newest events only, and a sample of them when the run outpaces the pushes
  if (!view.shown) return "";
  const n = view.shown.toLocaleString("en-US"), from = `${seconds(view.first).toFixed(1)} s`;
  const total = view.total != null && view.total > view.shown ? view.total.toLocaleString("en-US") : null;
  let note = total ? `showing the newest ${n} of ${total} events (from ${from})` : `showing ${n} events (from ${from})`;
  if (view.skipped) note += `; a sample: ${view.skipped.toLocaleString("en-US")} events between pushes not drawn`;
  return note;
}

function detailsNote(since) {
  // a long run's passes and hypertune actions come from its newest events only: say from when
  if (typeof since !== "number" || origin() === undefined) return "";
  return `passes and hypertune actions searched from ${seconds(since).toFixed(1)} s on ` +
         "(a long run: its newest events only; crucible export gives the whole run)";
}

function wholeStep(series) {
  // a count's axis: whole-number ticks, about eight of them
  let lo = Infinity, hi = -Infinity;
  for (const s of series) if (s.axis === "y") for (const v of s.y) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  return hi > lo ? Math.max(1, Math.ceil((hi - lo) / 8)) : 1;
}

function renderList() {
  // rows are updated in place, not rebuilt on every push: a click must land on the row it aimed at
  const box = document.getElementById("experiments"), ids = new Set(experiments.map(e => e.id));
  for (const row of Array.from(box.children)) if (!ids.has(row.dataset.id)) row.remove();
  experiments.forEach((e, i) => {
    let row = box.querySelector(`.exp[data-id="${CSS.escape(e.id)}"]`);
    if (!row) {
      row = el("div", null, "exp");
      row.dataset.id = e.id;
      row.append(el("span", e.id), " ", el("span"));
      row.onclick = () => select(e.id);
    }
    if (box.children[i] !== row) box.insertBefore(row, box.children[i] || null);
    row.classList.toggle("sel", e.id === selected);
    const status = row.lastChild;
    if (status.textContent !== e.status) { status.textContent = e.status; status.className = "status-" + e.status; }
  });
  const cur = experiments.find(e => e.id === selected);
  document.getElementById("current").textContent = cur ? cur.id : "-";
  document.getElementById("status").textContent = cur ? cur.status : "-";
  if (cur) fillTable("params", ["parameter", "value"], Object.entries(cur.params || {}).map(([k, v]) => [k, fmt(v)]),
                     "not running");
}

function renderQueue(queued) {
  // a lab daemon's submissions that wait for a slot (or were cancelled, or failed to start)
  const rows = (queued || []).map(q => [q.id, q.position ?? "", q.status]);
  fillTable("queue", ["submission", "position", "status"], rows, queued ? "empty" : "no queue (a Lab, not a daemon)");
}

function renderDetails(d) {
  document.getElementById("details-error").textContent = "";
  if (typeof d.started_ts === "number") view.t0 = d.started_ts;
  if (typeof d.events === "number") view.total = d.events;
  const best = d.best;
  document.getElementById("best").textContent = best ? fmt(best.value) : "-";
  document.getElementById("best-unit").textContent = best ? (best.label || best.field) : "";
  for (const p of d.passes || []) mergePass(p);
  document.getElementById("details-note").textContent = detailsNote(d.details_since);
  const feed = [...(d.hypertune_actions || []).map(a => ({...a, kind: "action"})),
                ...(d.hypertune_outcomes || []).map(a => ({...a, kind: "outcome"}))];
  feed.sort((a, b) => b.ts - a.ts);
  const box = document.getElementById("feed");
  if (!feed.length) { box.replaceChildren(el("div", "none yet", "empty")); return; }
  box.replaceChildren(...feed.slice(0, 30).map(a => {
    const reward = (a.values || {}).reward;
    const tag = el("span", a.kind, "tag tag-" + a.kind + (a.kind === "outcome" && reward < 0 ? " bad" : ""));
    const row = el("div");
    row.append(tag, el("span", a.notes || ""));
    return row;
  }));
}

// --- the token -------------------------------------------------------------------------------
// The dashboard's token is kept in localStorage, which only this page's origin (scheme, host and
// port) can read, and goes out as "Authorization: Bearer" on every request: never in a cookie
// (cookies ignore ports, so every other web server on this host would be sent it) and never in
// a URL (URLs stay in the browser's history). The page gets it with the one-time sign-in code in
// the fragment of the link the Lab printed (…/#code=…: a fragment is never sent to a server),
// or from the token file pasted into the sign-in box.
const TOKEN_KEY = "crucible-dashboard-token";
const stored = {  // storage the browser refuses (a privacy setting) leaves the token in this page only
  get() { try { return localStorage.getItem(TOKEN_KEY); } catch (e) { return null; } },
  set(t) { try { localStorage.setItem(TOKEN_KEY, t); } catch (e) { /* this page only */ } },
  drop() { try { localStorage.removeItem(TOKEN_KEY); } catch (e) { /* nothing kept */ } },
};
let token = stored.get(), signInProblem = null;
const ready = signIn();
async function signIn() {
  const code = new URLSearchParams(location.hash.slice(1)).get("code");
  const oldLink = new URLSearchParams(location.search).has("token");
  if (code === null && !oldLink) return;
  history.replaceState(null, "", location.pathname);  // the code (or an old ?token=) leaves the address bar
  if (oldLink) signInProblem = "Links with ?token= are no longer taken (the token would stay in the browser's history).";
  if (code === null) return;
  try {
    const r = await fetch("/api/login", {method: "POST", headers: {"Content-Type": "application/json"},
                                         body: JSON.stringify({code: code})});
    const body = await r.json().catch(() => ({}));
    if (r.ok && typeof body.token === "string") { useToken(body.token); signInProblem = null; }
    else signInProblem = body.error || `the sign-in link was refused (${r.status})`;
  } catch (e) {
    signInProblem = "the dashboard could not be reached to sign in";
  }
}
function useToken(t) { token = t; stored.set(t); }
async function authFetch(url, options) {
  // every request carries the token; without one the server is not asked
  await ready;
  if (!token) return new Response("{}", {status: 401});
  const headers = new Headers((options && options.headers) || {});
  headers.set("Authorization", `Bearer ${token}`);
  return fetch(url, {...(options || {}), headers: headers});
}
function needToken() {
  // no token, or one this dashboard does not take (a new Lab makes a new one): say how to get one
  if (token) {
    const kept = stored.get();
    if (kept && kept !== token) { location.reload(); return; }  // another tab signed in since: use its token
    stored.drop(); token = null;
    signInProblem = signInProblem ||
      "The token this page kept is not this dashboard's (a Lab that starts again makes a new one).";
  }
  document.getElementById("conn").textContent = "not signed in";
  document.getElementById("signin-why").textContent = signInProblem || "This page needs the dashboard's token.";
  document.getElementById("signin").hidden = false;
}
document.getElementById("signin-save").onclick = () => {
  const t = document.getElementById("signin-token").value.trim();
  if (t) { useToken(t); location.reload(); }
};
window.addEventListener("hashchange", () => { if (location.hash.includes("code=")) location.reload(); });

// --- server ----------------------------------------------------------------------------------
async function getJson(url, options) {
  const r = await authFetch(url, options);
  if (r.status === 401) needToken();
  return {ok: r.ok, status: r.status, body: await r.json().catch(() => ({}))};
}
function clearDetails() {
  // nothing of the previous experiment stays on the page while the new one's details load
  document.getElementById("best").textContent = "-";
  document.getElementById("best-unit").textContent = "";
  document.getElementById("feed").replaceChildren(el("div", "loading", "empty"));
  document.getElementById("details-error").textContent = "";
  document.getElementById("details-note").textContent = "";
}
async function select(id) {
  selected = id; view = emptyView();
  clearDetails(); renderList(); scheduleDraw();
  const r = await getJson(`/api/metrics/live?experiment=${encodeURIComponent(id)}`);
  if (selected !== id) return;
  if (r.ok) {
    if (typeof r.body.started_ts === "number") view.t0 = r.body.started_ts;
    addEvents(r.body.events);
  }
  view.loading = false;
  renderList(); scheduleDraw(); details();
}
async function details() {
  // one request at a time: on a big run an answer can take longer than the 2 s between ticks
  if (!selected) return;
  if (detailsPending) { window.__detailsSkipped++; detailsAgain = true; return; }
  detailsPending = true; window.__detailsInFlight++;
  const id = selected;
  let r;
  try {
    r = await getJson(`/api/experiments/${encodeURIComponent(id)}`);
  } catch (err) {
    r = {ok: false, status: 0, body: {error: String(err)}};
  } finally {
    detailsPending = false; window.__detailsInFlight--;
  }
  if (selected !== id) { if (detailsAgain) { detailsAgain = false; details(); } return; }
  detailsAgain = false;
  if (!r.ok) {
    clearDetails();
    document.getElementById("feed").replaceChildren(el("div", "not loaded", "empty"));
    document.getElementById("details-error").textContent =
      `details not loaded (${r.status || "no answer"}): ${r.body.error || "the server did not say why"}`;
    return;
  }
  renderDetails(r.body); scheduleDraw();
}
for (const b of document.querySelectorAll("button[data-action]")) {
  b.onclick = async () => {
    const fb = document.getElementById("feedback"), action = b.dataset.action;
    if (!selected) { fb.textContent = "select an experiment"; return; }
    fb.textContent = action + "...";
    const r = await getJson(`/api/control/${action}`, {method: "POST", headers: {"Content-Type": "application/json"},
                                                        body: JSON.stringify({experiment: selected})});
    fb.textContent = r.ok ? `${action}: ${r.body.status}` : `${action} refused (${r.status}): ${r.body.error}`;
    if (r.ok) { const cur = experiments.find(e => e.id === selected); if (cur) { cur.status = r.body.status; renderList(); } }
  };
}
async function connect() {
  // a browser cannot send a header with the handshake: a single-use ticket, asked for with the token
  let ticket;
  try {
    ticket = await getJson("/api/ws-ticket", {method: "POST"});
  } catch (e) {  // the server is not there (restarting): try again
    document.getElementById("conn").textContent = "reconnecting";
    setTimeout(connect, 1000);
    return;
  }
  if (!ticket.ok) { if (ticket.status !== 401) setTimeout(connect, 1000); return; }
  const ws = new WebSocket(`ws://${location.host}/ws?ticket=${encodeURIComponent(ticket.body.ticket)}`);
  ws.binaryType = "arraybuffer";
  ws.onopen = () => { document.getElementById("conn").textContent = "live"; };
  ws.onclose = () => {
    document.getElementById("conn").textContent = "reconnecting";
    setTimeout(connect, 1000);
  };
  ws.onmessage = (m) => {
    const d = JSON.parse(new TextDecoder().decode(m.data));
    window.__pushes++;
    // the list comes whole when it changed (an experiment added, removed, moved), else only what changed
    if (d.experiments) experiments = d.experiments;
    for (const u of d.updated || []) {
      const i = experiments.findIndex(e => e.id === u.id);
      if (i >= 0) experiments[i] = u;
    }
    if ("queued" in d || !queueShown) { renderQueue(d.queued); queueShown = true; }  // only when it changed
    if (!selected && experiments.length) { select(experiments[0].id); return; }
    if (selected && !view.loading && d.events[selected]) addEvents(d.events[selected], true);
    renderList(); scheduleDraw();
  };
}
setInterval(details, 2000);
connect();
