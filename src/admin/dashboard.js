// cport dashboard: polls /api/live once a second and draws the server's
// last minutes on canvases. No libraries, no external requests.
"use strict";

const POLL_MS = 1000;
const RETRY_MS = 2000;
const MAX_SAMPLES = 600;
const MAX_EVENTS = 500;

// Each chart: the sample fields it draws, with a label and a colour.
const CHARTS = [
  { id: "connections", title: "Connections", unit: "", series: [
    ["connections", "open", "#4fc3f7"]] },
  { id: "accepts", title: "Accepts / s", unit: "/s", series: [
    ["accepts_per_s", "accepts", "#81c784"], ["closes_per_s", "closes", "#e57373"]] },
  { id: "messages", title: "Messages / s", unit: "/s", series: [
    ["msgs_in_per_s", "in", "#4fc3f7"], ["msgs_out_per_s", "out", "#ffb74d"]] },
  { id: "bytes", title: "Bytes / s", unit: "B/s", series: [
    ["bytes_in_per_s", "in", "#4fc3f7"], ["bytes_out_per_s", "out", "#ffb74d"]] },
  { id: "cpu", title: "CPU", unit: "%", series: [
    ["cpu_pct", "process", "#ba68c8"]] },
  { id: "rss", title: "Memory (RSS)", unit: "B", series: [
    ["rss_bytes", "rss", "#4db6ac"]] },
  { id: "latency", title: "Request handling", unit: "µs", series: [
    ["handling_p50_us", "p50", "#81c784"], ["handling_p99_us", "p99", "#e57373"]] },
];

const state = {
  samples: [],
  lastSample: 0,
  lastEvent: 0,
  events: 0,
  uptime: -1,
  windowS: 300,
  charts: [],
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) e.append(c);
  return e;
}

// 1234 -> "1.23k"; with unit "B", binary prefixes.
function fmt(v, unit) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  const bytes = unit === "B" || unit === "B/s";
  const base = bytes ? 1024 : 1000;
  const prefixes = bytes ? ["", "Ki", "Mi", "Gi", "Ti"] : ["", "k", "M", "G", "T"];
  let i = 0;
  let x = Math.abs(v);
  while (x >= base && i < prefixes.length - 1) { x /= base; i++; }
  const digits = x >= 100 || (i === 0 && Number.isInteger(v)) ? 0 : x >= 10 ? 1 : 2;
  const num = (v < 0 ? "-" : "") + x.toFixed(digits);
  if (bytes) return `${num} ${prefixes[i]}${unit}`;
  if (unit === "%") return `${num}%`;
  if (unit === "µs") return `${num} µs`;
  return num + prefixes[i] + unit;
}

// The y axis: a round step (1, 2 or 5 times a power of ten; of 1024 for
// bytes) giving at most five gridlines, and the top gridline at or above max.
function axis(max, unit) {
  if (!(max > 0)) return { top: 1, step: 0.25 };
  const bytes = unit === "B" || unit === "B/s";
  let scale = 1;
  if (bytes) while (max / scale >= 1024) scale *= 1024;
  const raw = max / scale / 4;
  const p = Math.pow(10, Math.floor(Math.log10(raw)));
  const m = [1, 2, 5, 10].find((k) => k * p >= raw);
  const step = m * p * scale;
  return { top: Math.ceil(max / step - 1e-9) * step, step };
}

function buildCharts() {
  const root = $("charts");
  for (const c of CHARTS) {
    const legend = el("span", { class: "legend" });
    for (const [, label, colour] of c.series) {
      const swatch = el("i");
      swatch.style.background = colour;
      legend.append(swatch, label);
    }
    const now = el("span", { class: "now" }, "–");
    const canvas = el("canvas", { "data-role": "plot" });
    const fig = el("figure", { class: "chart", "data-chart": c.id, "data-points": "0", "data-max": "0", "data-last": "" },
      el("figcaption", {}, el("span", { class: "title" }, c.title), legend, now), canvas);
    root.append(fig);
    state.charts.push({ def: c, fig, canvas, now });
  }
}

function draw(chart) {
  const { def, fig, canvas, now } = chart;
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 340;
  const h = canvas.clientHeight || 150;
  canvas.width = Math.round(w * dpr);
  canvas.height = Math.round(h * dpr);
  const g = canvas.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);

  const samples = state.samples;
  const end = samples.length ? samples[samples.length - 1].t_ms : Date.now();
  const start = end - state.windowS * 1000;
  const pts = samples.filter((s) => s.t_ms >= start);
  let max = 0;
  for (const s of pts) for (const [key] of def.series) {
    const v = s[key];
    if (v !== null && v !== undefined && v > max) max = v;
  }
  const { top, step: ystep } = axis(max, def.unit);
  const L = 62, R = 8, T = 6, B = 18;
  const pw = w - L - R, ph = h - T - B;
  const x = (t) => L + ((t - start) / (end - start || 1)) * pw;
  const y = (v) => T + ph - (v / top) * ph;

  g.font = "11px system-ui, sans-serif";
  g.lineWidth = 1;
  g.strokeStyle = "#2a313b";
  g.fillStyle = "#8592a3";
  g.textAlign = "right";
  g.textBaseline = "middle";
  for (let i = 0; i * ystep <= top * (1 + 1e-9) && i <= 10; i++) {
    const v = i * ystep;
    const yy = Math.round(y(v)) + 0.5;
    g.beginPath(); g.moveTo(L, yy); g.lineTo(L + pw, yy); g.stroke();
    g.fillText(fmt(v, def.unit), L - 4, yy);
  }
  g.textAlign = "center";
  g.textBaseline = "top";
  const step = state.windowS <= 60 ? 15 : 60;
  for (let s = 0; s <= state.windowS; s += step) {
    const xx = Math.round(x(end - s * 1000)) + 0.5;
    g.beginPath(); g.moveTo(xx, T); g.lineTo(xx, T + ph); g.stroke();
    const label = s === 0 ? "now" : s < 60 || s % 60 ? `-${s}s` : `-${s / 60}m`;
    g.fillText(label, Math.min(Math.max(xx, L + 12), L + pw - 12), T + ph + 3);
  }

  g.lineWidth = 1.6;
  g.lineJoin = "round";
  for (const [key, , colour] of def.series) {
    g.strokeStyle = colour;
    g.beginPath();
    let pen = false;
    let prevT = 0;
    for (const s of pts) {
      const v = s[key];
      // A gap (no value, or more than 2.5 s without a sample) lifts the pen.
      if (v === null || v === undefined) { pen = false; continue; }
      if (pen && s.t_ms - prevT > 2500) pen = false;
      if (pen) g.lineTo(x(s.t_ms), y(v)); else g.moveTo(x(s.t_ms), y(v));
      pen = true;
      prevT = s.t_ms;
    }
    g.stroke();
  }

  const last = pts.length ? pts[pts.length - 1] : null;
  const lastValue = last ? last[def.series[0][0]] : null;
  now.textContent = def.series
    .map(([key, label]) => (def.series.length > 1 ? label + " " : "") + fmt(last ? last[key] : null, def.unit))
    .join("  ");
  fig.dataset.points = String(pts.length);
  fig.dataset.max = String(max);
  fig.dataset.last = lastValue === null || lastValue === undefined ? "" : String(lastValue);
}

function drawAll() {
  for (const c of state.charts) draw(c);
}

function duration(s) {
  s = Math.floor(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  return h ? `${h}h ${m}m` : m ? `${m}m ${r}s` : `${r}s`;
}

function tiles(st) {
  const errors = Object.values(st.errors || {}).reduce((a, b) => a + b, 0);
  const closed = Object.values(st.closed || {}).reduce((a, b) => a + b, 0);
  const lat = st.latency || {};
  const items = [
    ["backend", `${st.backend} · ${st.protocol}`],
    ["ports / workers", `${st.ports} / ${st.workers}`],
    ["uptime", duration(st.uptime_s)],
    ["connections open", fmt(st.connections_open, "")],
    ["accepted", fmt(st.connections_accepted, "")],
    ["closed", fmt(closed, "")],
    ["frames in / out", `${fmt(st.frames_in, "")} / ${fmt(st.frames_out, "")}`],
    ["bytes in / out", `${fmt(st.bytes_in, "B")} / ${fmt(st.bytes_out, "B")}`],
    ["errors", fmt(errors, "")],
    ["send queue", fmt(st.send_queue_bytes, "B")],
    ["requests timed", fmt(lat.count || 0, "")],
    ["RSS", fmt(st.rss_bytes, "B")],
  ];
  const root = $("tiles");
  if (root.children.length !== items.length) {
    root.replaceChildren(...items.map(([k]) => el("div", { class: "tile", "data-tile": k },
      el("div", { class: "k" }, k), el("div", { class: "v" }, "–"))));
  }
  items.forEach(([, v], i) => { root.children[i].lastChild.textContent = v; });
}

function cluster(c) {
  const root = $("cluster");
  if (!c) { root.hidden = true; return; }
  root.hidden = false;
  const st = $("cluster-state");
  st.dataset.state = c.state === "up" ? "live" : "down";
  st.textContent = c.state === "up" ? "cluster: up" : `cluster: degraded (${c.reason || "unknown"})`;
  const dropped = Object.entries(c.dropped || {}).filter(([, v]) => v > 0)
    .map(([k, v]) => `${k} ${fmt(v, "")}`).join(", ") || "none";
  $("cluster-figures").textContent =
    `this node: ${c.node_name} (#${c.node}) · published ${fmt(c.published, "")} · sent ${fmt(c.sent, "")} · ` +
    `received ${fmt(c.received, "")} · delivered ${fmt(c.delivered, "")} · dropped: ${dropped} · ` +
    `queues out/in ${fmt(c.queue_out, "")} / ${fmt(c.queue_in, "")} of ${fmt(c.queue_limit, "")} · ` +
    `NATS round trip ${c.rtt_us == null ? "–" : (c.rtt_us / 1000).toFixed(2) + " ms"}`;
  const body = $("cluster-nodes").tBodies[0];
  body.replaceChildren(...(c.nodes || []).map((n) => el("tr", { "data-node": n.name },
    el("td", {}, n.name), el("td", {}, String(n.node)), el("td", {}, `${n.last_heard_s.toFixed(1)} s ago`))));
  if (!body.children.length) body.append(el("tr", {}, el("td", { colSpan: 3, class: "muted" }, "no other node heard from")));
}

function clock(ms) {
  const d = new Date(ms);
  const p = (n, w = 2) => String(n).padStart(w, "0");
  return `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}.${p(d.getMilliseconds(), 3)}`;
}

function addEvents(events) {
  const list = $("events");
  const frag = document.createDocumentFragment();
  for (const e of events) {
    const words = [];
    if (e.conn) words.push(e.conn);
    if (e.peer) words.push(e.peer);
    if (e.reason) words.push(e.reason);
    if (e.detail) words.push(e.detail);
    const li = el("li", { "data-kind": e.kind, "data-seq": String(e.seq), "data-peer": e.peer || "", "data-reason": e.reason || "" },
      el("span", { class: "t" }, clock(e.t_ms)), el("span", { class: "kind" }, e.kind), words.join("  "));
    li.title = words.join("  ");
    frag.prepend(li);
    state.lastEvent = Math.max(state.lastEvent, e.seq);
    state.events++;
  }
  list.prepend(frag);
  while (list.children.length > MAX_EVENTS) list.lastChild.remove();
  $("event-count").textContent = `${state.events} seen, newest first`;
}

function setStatus(kind, text) {
  const s = $("status");
  s.dataset.state = kind;
  s.textContent = text;
}

async function poll() {
  let delay = POLL_MS;
  try {
    const r = await fetch(`/api/live?samples=${state.lastSample}&events=${state.lastEvent}`, { cache: "no-store" });
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    const live = await r.json();
    if (live.stats.uptime_s < state.uptime) {
      // The server restarted: its sequence numbers start again.
      state.samples = []; state.lastSample = 0; state.lastEvent = 0;
      $("events").replaceChildren();
    }
    state.uptime = live.stats.uptime_s;
    for (const s of live.samples) {
      state.samples.push(s);
      state.lastSample = Math.max(state.lastSample, s.seq);
    }
    if (state.samples.length > MAX_SAMPLES) state.samples.splice(0, state.samples.length - MAX_SAMPLES);
    addEvents(live.events);
    tiles(live.stats);
    cluster(live.stats.cluster);
    drawAll();
    document.body.dataset.polls = String(Number(document.body.dataset.polls) + 1);
    document.body.dataset.lastSample = String(state.lastSample);
    setStatus("live", `live · ${new Date().toLocaleTimeString()}`);
  } catch (e) {
    setStatus("down", `no answer from the server (${e.message}); retrying`);
    delay = RETRY_MS;
  }
  setTimeout(poll, delay);
}

function init() {
  buildCharts();
  const sel = $("window");
  state.windowS = Number(sel.value);
  sel.addEventListener("change", () => { state.windowS = Number(sel.value); drawAll(); });
  for (const box of document.querySelectorAll(".log-head input[data-kind]")) {
    box.addEventListener("change", () => {
      $("events").classList.toggle(`hide-${box.dataset.kind}`, !box.checked);
    });
  }
  window.addEventListener("resize", drawAll);
  poll();
}

init();
