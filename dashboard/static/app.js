// The dashboard page. Every piece of text from the server is placed with textContent, never
// parsed as HTML: experiment parameters, notes and names are data, not markup.
// The page names no workload's field: what it draws comes from each experiment's declared
// objective in the server's JSON ({field, direction, label, progress}).
"use strict";

const MAX_POINTS = 5000;
let selected = null, experiments = [], view = emptyView(), revision = 0;
window.__points = 0;  // points drawn and pushes taken: what a test can wait on
window.__pushes = 0;

function emptyView() {
  return {series: {}, anomalies: {y: {x: [], y: [], text: []}, y2: {x: [], y: [], text: []}}, phases: {},
          passes: {}, t0: undefined, lastSeq: -1, lastPass: undefined, loading: true};
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
function seconds(ts) { return (ts - view.t0) / 1e6; }
function trace(name, axis) {
  if (!view.series[name]) view.series[name] = {name: name, axis: axis, x: [], y: []};
  return view.series[name];
}
function push(s, x, y) {
  s.x.push(x); s.y.push(y);
  if (s.x.length > MAX_POINTS) { s.x.splice(0, s.x.length - MAX_POINTS); s.y.splice(0, s.y.length - MAX_POINTS); }
}
function addEvents(events) {
  for (const e of events) {
    if (e.seq <= view.lastSeq) continue;  // already shown
    view.lastSeq = e.seq;
    if (view.t0 === undefined) view.t0 = e.ts;
    const t = seconds(e.ts), v = e.values || {}, ph = e.phase || "-", obj = objective() || {};
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
  return view.t0 === undefined ? [] : out.filter(b => b.ts >= view.t0);
}

// --- drawing ---------------------------------------------------------------------------------
function draw() {
  const series = Object.values(view.series), obj = objective() || {};
  const hasY2 = series.some(s => s.axis === "y2");
  // a whole-number objective (a count) is drawn as steps with whole-number ticks; a measurement as a line
  const whole = series.some(s => s.axis === "y" && s.y.length) &&
                series.every(s => s.axis !== "y" || s.y.every(Number.isInteger));
  // fresh arrays and a new datarevision on every draw: Plotly.react recomputes the ranges
  const data = series.map(s => ({x: s.x.slice(), y: s.y.slice(), name: s.name, yaxis: s.axis,
                                 mode: s.axis === "y" ? "lines+markers" : "lines", marker: {size: 4},
                                 line: s.axis === "y" ? {width: 3, shape: whole ? "hv" : "linear"} : {width: 1}}));
  for (const [axis, a] of Object.entries(view.anomalies)) {
    if (a.x.length && (axis === "y" || hasY2)) {
      data.push({x: a.x.slice(), y: a.y.slice(), text: a.text.slice(), mode: "markers",
                 name: axis === "y2" ? `anomaly (${obj.progress})` : "anomaly",
                 yaxis: axis, marker: {color: "red", size: 8, symbol: "x"}});
    }
  }
  const lines = boundaries();
  const layout = {
    datarevision: ++revision, uirevision: selected, margin: {t: 24, r: 60, l: 60, b: 50},
    xaxis: {title: {text: "seconds since the first event shown"}, autorange: true},
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
            Object.entries(view.phases).map(([p, i]) => [p, i.gpu, (i.last - i.first).toFixed(1)]));
  const when = ts => ts == null || view.t0 === undefined ? "-" : `${seconds(ts).toFixed(1)} s`;
  fillTable("passes", ["pass", "started", "ended", "best at end", "why it started"],
            Object.values(view.passes).map(p => {
              const next = (view.passes[p.pass + 1] || {}).start_ts, end = p.end_ts ?? next;
              return [p.pass, when(p.start_ts), end == null ? "running" : when(end),
                      p.best == null ? "-" : `${fmt(p.best)} ${obj.label || ""}`.trim(), p.why || ""];
            }), "no pass yet");
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
  const best = d.best;
  document.getElementById("best").textContent = best ? fmt(best.value) : "-";
  document.getElementById("best-unit").textContent = best ? (best.label || best.field) : "";
  for (const p of d.passes || []) mergePass(p);
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

// --- server ----------------------------------------------------------------------------------
async function getJson(url, options) {
  const r = await fetch(url, options);
  if (r.status === 401) needToken();
  return {ok: r.ok, status: r.status, body: await r.json().catch(() => ({}))};
}
function needToken() {
  document.getElementById("conn").textContent = "token needed: open the URL the Lab printed (…/?token=…)";
}
async function select(id) {
  selected = id; view = emptyView();
  const r = await getJson(`/api/metrics/live?experiment=${encodeURIComponent(id)}`);
  if (selected !== id) return;
  if (r.ok) addEvents(r.body.events);
  view.loading = false;
  renderList(); await details(); draw();
}
async function details() {
  if (!selected) return;
  const id = selected, r = await getJson(`/api/experiments/${encodeURIComponent(id)}`);
  if (!r.ok || selected !== id) return;
  renderDetails(r.body);
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
function connect() {
  const ws = new WebSocket(`ws://${location.host}/ws`);
  ws.binaryType = "arraybuffer";
  ws.onopen = () => { document.getElementById("conn").textContent = "live"; };
  ws.onclose = () => {
    document.getElementById("conn").textContent = "reconnecting";
    fetch("/api/experiments").then(r => { if (r.status === 401) needToken(); else setTimeout(connect, 1000); },
                                   () => setTimeout(connect, 1000));
  };
  ws.onmessage = (m) => {
    const d = JSON.parse(new TextDecoder().decode(m.data));
    window.__pushes++;
    experiments = d.experiments;
    renderQueue(d.queued);
    if (!selected && experiments.length) { select(experiments[0].id); return; }
    if (selected && !view.loading && d.events[selected]) addEvents(d.events[selected]);
    renderList(); draw();
  };
}
setInterval(details, 2000);
connect();
