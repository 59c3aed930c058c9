// meshlib dashboard: one page over /v1/stats and /v1/rules. Plain DOM and SVG; every value from the mesh is set
// as text (textContent / setAttribute), never parsed as markup. Refreshed every 2 s.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const CSRF = document.querySelector('meta[name="mesh-csrf"]').content;
const TOKEN_KEY = "meshlib-admin-token";
const REFRESH_MS = 2000;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const fmt = {
  rps: (v) => (v === null || v === undefined ? "–" : v >= 100 ? v.toFixed(0) : v.toFixed(1)),
  pct: (v) => (v === null || v === undefined ? "–" : (v * 100).toFixed(v >= 0.9995 ? 0 : 2) + "%"),
  ms: (v) => (v === null || v === undefined ? "–" : v >= 100 ? v.toFixed(0) + " ms" : v.toFixed(1) + " ms"),
  ago: (s) => (s === null || s === undefined ? "–" : s.toFixed(0) + " s ago"),
  time: (t) => new Date(t * 1000).toLocaleString(),
};

function successClass(v) {
  if (v === null || v === undefined) return "";
  return v >= 0.99 ? "ok" : v >= 0.95 ? "warn" : "bad";
}

async function api(path, options) {
  const response = await fetch(path, Object.assign({ cache: "no-store" }, options || {}));
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const message = body && body.error ? body.error : response.status + " " + response.statusText;
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return body;
}

function table(columns, rows, emptyText) {
  if (!rows.length) return el("p", { class: "empty" }, emptyText);
  const head = el("tr", {}, columns.map((c) => el("th", {}, c.title)));
  const body = rows.map((row) =>
    el("tr", {}, columns.map((c) => {
      const value = c.value(row);
      return el("td", { class: c.num ? "num " + (c.cls ? c.cls(row) : "") : c.cls ? c.cls(row) : "" }, value);
    })));
  return el("table", {}, el("thead", {}, head), el("tbody", {}, body));
}

const SIGNAL_COLUMNS = [
  { title: "req/s", num: true, value: (r) => fmt.rps(r.rps) },
  { title: "success", num: true, value: (r) => fmt.pct(r.success), cls: (r) => successClass(r.success) },
  { title: "p50", num: true, value: (r) => fmt.ms(r.p50_ms) },
  { title: "p99", num: true, value: (r) => fmt.ms(r.p99_ms) },
];

// -- topology --------------------------------------------------------------------------------------------------

function layout(services, edges) {
  // columns by the longest path from a caller (cycles are cut after as many rounds as there are services)
  const depth = Object.fromEntries(services.map((s) => [s.name, 0]));
  for (let round = 0; round < services.length; round++) {
    let changed = false;
    for (const e of edges) {
      if (e.source === e.destination || !(e.source in depth) || !(e.destination in depth)) continue;
      if (depth[e.destination] < depth[e.source] + 1 && depth[e.source] + 1 < services.length) {
        depth[e.destination] = depth[e.source] + 1;
        changed = true;
      }
    }
    if (!changed) break;
  }
  const columns = [];
  for (const s of services) (columns[depth[s.name]] = columns[depth[s.name]] || []).push(s);
  return columns.filter(Boolean);
}

function renderTopology(main, data) {
  const services = data.services.slice();
  const names = new Set(services.map((s) => s.name));
  for (const e of data.edges) {
    for (const name of [e.source, e.destination]) {
      if (!names.has(name)) { names.add(name); services.push({ name, instances: 0, instances_up: 0, callers_only: true, rps: 0 }); }
    }
  }
  main.append(el("h2", {}, "Topology"));
  if (!services.length) {
    main.append(el("div", { class: "panel" }, el("p", { class: "empty", id: "topology-empty" },
      "No data yet: no instance has registered or reported. Start a service with MESH_CONTROL_PLANE set to " +
      location.origin + " and its figures appear here within a few seconds.")));
    return;
  }
  const columns = layout(services, data.edges);
  const W = 190, H = 66, GAPX = 210, GAPY = 50, PAD = 36;
  const rows = Math.max(...columns.map((c) => c.length));
  const width = PAD * 2 + columns.length * W + (columns.length - 1) * GAPX;
  const height = PAD * 2 + rows * H + (rows - 1) * GAPY;
  const pos = {};
  columns.forEach((col, ci) => col.forEach((s, ri) => {
    const offset = (rows - col.length) * (H + GAPY) / 2;
    pos[s.name] = { x: PAD + ci * (W + GAPX), y: PAD + offset + ri * (H + GAPY), column: ci };
  }));
  // A horizontal lane for an edge that passes other columns: the candidate nearest its ends that crosses no node
  // of those columns (an edge drawn straight across a column ran through the nodes in it).
  const lane = (from, to, y1, y2) => {
    const busy = [];
    for (const name of Object.keys(pos)) {
      const p = pos[name];
      if (p.column > from && p.column < to) busy.push([p.y - 10, p.y + H + 10]);
    }
    const candidates = [y1, y2, (y1 + y2) / 2, PAD / 2, height - PAD / 2];
    for (const [top, bottom] of busy) candidates.push(top - GAPY / 2 + 10, bottom + GAPY / 2 - 10);
    const free = candidates.filter((y) => y > 0 && y < height && busy.every(([top, bottom]) => y < top || y > bottom));
    free.sort((p, q) => Math.abs(p - y1) + Math.abs(p - y2) - Math.abs(q - y1) - Math.abs(q - y2));
    return free.length ? free[0] : height - PAD / 2;
  };
  // An S-bend from (xa, ya) to (xb, yb) within one gap between columns, where no node is.
  const bend = (xa, ya, xb, yb) => `C${(xa + xb) / 2},${ya} ${(xa + xb) / 2},${yb} ${xb},${yb}`;
  // drawn at its natural size (never scaled up), shrunk to fit narrower windows
  const graph = svg("svg", { class: "topology", id: "topology", viewBox: `0 0 ${width} ${height}`, width: width,
    role: "img", "aria-label": "service topology" });
  graph.append(svg("defs", {}, svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: "10", refY: "5",
    markerWidth: "7", markerHeight: "7", orient: "auto-start-reverse" }, svg("path", { d: "M0,0 L10,5 L0,10 z", fill: "#8aa0b8" }))));
  const placed = [];  // label boxes already drawn: a label that would overlap one moves down until it is clear
  const place = (x, y, w, h) => {
    let top = y;
    for (let moved = true, n = 0; moved && n < 20; n++) {
      moved = false;
      for (const b of placed) {
        if (x < b.x + b.w && b.x < x + w && top < b.y + b.h && b.y < top + h) { top = b.y + b.h + 2; moved = true; }
      }
    }
    placed.push({ x, y: top, w, h });
    return top;
  };
  const edges = data.edges.slice().sort((p, q) => (pos[p.source] && pos[q.source] ? pos[p.source].y - pos[q.source].y : 0));
  for (const e of edges) {
    const a = pos[e.source], b = pos[e.destination];
    if (!a || !b) continue;
    const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2;
    const mid = x2 - GAPX / 2;  // the label sits in the gap before the callee
    let d, labelY = (y1 + y2) / 2;
    if (b.column === a.column + 1) {
      d = `M${x1},${y1} ${bend(x1, y1, x2, y2)}`;  // neighbours: one bend in the gap between them
    } else if (b.column > a.column) {
      // past other columns: into a free lane in the first gap, along it, out of it in the last gap
      const y = lane(a.column, b.column, y1, y2);
      d = `M${x1},${y1} ${bend(x1, y1, x1 + GAPX, y)} L${x2 - GAPX},${y} ${bend(x2 - GAPX, y, x2, y2)}`;
      labelY = (y + y2) / 2;
    } else {
      // backwards or within a column: out to the right, round below every node, in from the left
      const y = height - PAD / 2, right = x1 + GAPX / 3, left = x2 - Math.min(GAPX / 3, PAD - 4);
      d = `M${x1},${y1} C${right},${y1} ${right},${y} ${x1},${y} L${x2},${y} C${left},${y} ${left},${y2} ${x2},${y2}`;
      labelY = y - 16;
    }
    const cls = "edge" + (e.mtls ? " mtls" : "") + (e.success !== null && e.success < 0.95 ? " failing" : "");
    const path = svg("path", { class: cls, d, "marker-end": "url(#arrow)", "data-edge": e.source + "->" + e.destination });
    path.append(svg("title", {}, `${e.source} → ${e.destination}` +
      (e.mtls ? `\nmTLS: ${e.source_identity} → ${e.destination_identity || "?"}` : "\nplaintext")));
    graph.append(path);
    const lines = [`${fmt.rps(e.rps)} req/s · ${fmt.pct(e.success)}${e.denied ? ` · ${e.denied} denied` : ""}${e.mtls ? " · mTLS" : ""}`,
      `p50 ${fmt.ms(e.p50_ms)} · p99 ${fmt.ms(e.p99_ms)}`];
    const w = Math.max(...lines.map((l) => l.length)) * 6, h = 28;
    const top = place(mid - w / 2, labelY - h - 2, w, h);
    lines.forEach((line, i) => graph.append(svg("text", { class: "label" + (i === 0 && e.mtls ? " ok" : ""), x: mid,
      y: top + 11 + i * 13, "text-anchor": "middle" }, line)));
  }
  for (const s of services) {
    const p = pos[s.name];
    const node = svg("g", { class: "node" + (s.callers_only ? " callers" : ""), transform: `translate(${p.x},${p.y})`,
      "data-service": s.name, onclick: () => { location.hash = "#/service/" + encodeURIComponent(s.name); } });
    node.append(svg("rect", { width: W, height: H, rx: 8 }));
    node.append(svg("text", { class: "name", x: 10, y: 20 }, s.name));
    node.append(svg("text", { x: 10, y: 38 }, s.callers_only ? "caller only" :
      `${s.instances_up}/${s.instances} instances up${s.tls && s.tls.length ? " · " + s.tls.join("/") : ""}`));
    node.append(svg("text", { x: 10, y: 55 }, s.requests ? `in: ${fmt.rps(s.rps)} req/s · ${fmt.pct(s.success)}` : "in: no traffic"));
    graph.append(node);
  }
  main.append(el("div", { class: "panel" }, graph));
  main.append(el("h3", {}, `Edges (last ${data.window_s} s)`));
  main.append(el("div", { class: "panel" }, table([
    { title: "caller", value: (e) => e.source },
    { title: "callee", value: (e) => el("a", { href: "#/service/" + encodeURIComponent(e.destination) }, e.destination) },
    ...SIGNAL_COLUMNS,
    { title: "mTLS", value: (e) => (e.mtls ? "yes" : "no"), cls: (e) => (e.mtls ? "ok" : "") },
    { title: "identities", value: (e) => (e.mtls ? `${e.source_identity} → ${e.destination_identity || "?"}` : "–") },
    { title: "denied (403)", num: true, value: (e) => String(e.denied || 0), cls: (e) => (e.denied ? "bad" : "") },
  ], data.edges, "No calls between services in the last minute.")));
  main.lastChild.querySelector("table") && main.lastChild.querySelector("table").setAttribute("id", "edges");
}

// -- one service -----------------------------------------------------------------------------------------------

function sparkline(title, points, pick, format) {
  const values = points.map(pick);
  const known = values.filter((v) => v !== null && v !== undefined);
  // the value shown is the last whole 10 s slot's, which is the chart's right edge (the slot in progress is not drawn)
  const box = el("div", { class: "chart" }, el("div", {}, title + ", last 10 s: ", el("b", {}, known.length ? format(known[known.length - 1]) : "no data yet")));
  const W = 300, H = 60;
  const max = Math.max(...known, 1e-9);
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none" });
  let path = "";
  values.forEach((v, i) => {
    if (v === null || v === undefined) return;
    const x = (i / Math.max(values.length - 1, 1)) * W;
    const y = H - 2 - (v / max) * (H - 4);
    path += (path ? " L" : "M") + x.toFixed(1) + "," + y.toFixed(1);
  });
  chart.append(svg("path", { d: path || "M0,0", fill: "none", stroke: "#2b6cb0", "stroke-width": 1.5 }));
  box.append(chart, el("small", { class: "empty" }, "last 15 min, per 10 s"));
  return box;
}

function renderService(main, d) {
  main.append(el("h2", {}, "Service ", el("span", { id: "service-name" }, d.name)));
  main.append(el("div", { class: "figures" },
    el("div", { class: "figure" }, `inbound req/s, last ${d.window_s} s`, el("b", {}, fmt.rps(d.rps))),
    el("div", { class: "figure" }, `success, last ${d.window_s} s`, el("b", { class: successClass(d.success) }, fmt.pct(d.success))),
    el("div", { class: "figure" }, `p50, last ${d.window_s} s`, el("b", {}, fmt.ms(d.p50_ms))),
    el("div", { class: "figure" }, `p99, last ${d.window_s} s`, el("b", {}, fmt.ms(d.p99_ms)))));
  main.append(el("h3", {}, "Instances"));
  const stateClass = (i) => ({ up: "ok", ejected: "bad", silent: "warn", gone: "bad" }[i.state] || "");
  main.append(el("div", { class: "panel" }, table([
    { title: "instance", value: (i) => i.id },
    { title: "address", value: (i) => `${i.address}:${i.port}` },
    { title: "tags", value: (i) => (i.tags.length ? i.tags.join(", ") : "–") },
    { title: "mTLS", value: (i) => i.tls || "?" },
    { title: "state", value: (i) => el("span", { class: "badge " + stateClass(i), "data-state": i.state }, i.state), cls: stateClass },
    { title: "breakers", value: (i) => (i.breakers.length ? i.breakers.map((b) => `${b.state} at ${b.caller}`).join("; ") : "closed") },
    { title: "last report", value: (i) => fmt.ago(i.last_report_s_ago) },
    { title: "inbound req/s, since its previous report", num: true, value: (i) => fmt.rps(i.rps) },
  ], d.instances, "No instances registered or reporting.")));
  main.append(el("h3", {}, "What each caller's balancer sees"));
  main.append(el("div", { class: "panel", id: "estimates" }, table([
    { title: "caller", value: (e) => e.caller },
    { title: "instance", value: (e) => e.endpoint },
    { title: "latency estimate", num: true, value: (e) => fmt.ms(e.latency_ms) },
    { title: "in flight", num: true, value: (e) => String(e.outstanding) },
    { title: "breaker", value: (e) => e.breaker },
    { title: "share", num: true, value: (e) => fmt.pct(e.share) },
  ], d.estimates || [], "No caller has reported its view of this service yet.")));
  const tl = d.timeline.inbound;
  main.append(el("div", { class: "charts" },
    sparkline("inbound req/s", tl, (p) => p.rps, fmt.rps),
    sparkline("inbound success", tl, (p) => p.success, fmt.pct),
    sparkline("inbound p99", tl, (p) => p.p99_ms, fmt.ms),
    sparkline("outbound req/s", d.timeline.outbound, (p) => p.rps, fmt.rps)));
  const routeColumns = (peerTitle) => [
    { title: peerTitle, value: (r) => r.peer }, { title: "route", value: (r) => r.route }, ...SIGNAL_COLUMNS];
  main.append(el("h3", {}, `Inbound, per caller and route (last ${d.window_s} s)`));
  main.append(el("div", { class: "panel" }, table(routeColumns("caller"), d.inbound, "No inbound requests in the last minute.")));
  main.append(el("h3", {}, `Outbound, per callee and route (last ${d.window_s} s)`));
  main.append(el("div", { class: "panel" }, table(routeColumns("callee"), d.outbound, "No outbound calls in the last minute.")));
  if (d.mirrored.length) {
    main.append(el("h3", {}, "Mirrored copies received"));
    main.append(el("div", { class: "panel" }, table(routeColumns("caller"), d.mirrored, "")));
  }
  const names = { authz_denied: "authorization denials", retries: "retries", budget_exhausted: "retries refused by the budget",
    ejections: "ejections", mirror_dropped: "mirror copies dropped", mirror_skipped: "mirror copies skipped" };
  const rows = [];
  for (const [key, label] of Object.entries(names)) {
    for (const [peer, count] of Object.entries(d.counters[key + "_15m"] || {})) {
      rows.push({ label, peer, minute: (d.counters[key] || {})[peer] || 0, quarter: count });
    }
  }
  main.append(el("h3", {}, "Denials, retries, ejections, mirroring"));
  main.append(el("div", { class: "panel" }, table([
    { title: "what", value: (r) => r.label }, { title: "peer", value: (r) => r.peer },
    { title: "last minute", num: true, value: (r) => r.minute.toFixed(0) },
    { title: "last 15 min", num: true, value: (r) => r.quarter.toFixed(0) },
  ], rows, "None in the last 15 minutes.")));
}

// -- rules -----------------------------------------------------------------------------------------------------

const rulesState = { from: null, to: null, message: null, shownDiff: null };

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

async function rollback(version) {
  const headers = { "x-mesh-csrf": CSRF };
  if (token()) headers.authorization = "Bearer " + token();
  try {
    const r = await api("/v1/rules/rollback?to=" + encodeURIComponent(version), { method: "POST", headers });
    rulesState.message = { ok: true, text: `Rolled back to version ${r.rolled_back_to}: now version ${r.version}.` };
    rulesState.from = null; rulesState.to = null;
  } catch (e) {
    rulesState.message = { ok: false, text: `Rollback refused: ${e.message}` };
  }
  refresh();
}

async function renderRules(main, history) {
  const versions = history.versions;
  main.append(el("h2", {}, "Rules ", el("span", { id: "rules-current" }, `version ${history.current}`)));
  if (rulesState.message) {
    main.append(el("p", { id: "rules-message", class: "message " + (rulesState.message.ok ? "ok" : "bad") }, rulesState.message.text));
  }
  if (!versions.length) {
    main.append(el("p", { class: "empty" }, "No rules stored yet: apply some with meshctl rules apply FILE."));
    return;
  }
  const to = rulesState.to ?? history.current;
  const from = rulesState.from ?? Math.max(0, to - 1);
  const options = (selected) => [el("option", { value: "0" }, "0 (empty)"), ...versions.map((v) => {
    const o = el("option", { value: String(v.version) }, `${v.version}`);
    if (v.version === selected) o.selected = true;
    return o;
  })];
  const fromSel = el("select", { id: "diff-from", onchange: (e) => { rulesState.from = Number(e.target.value); refresh(); } }, options(from));
  const toSel = el("select", { id: "diff-to", onchange: (e) => { rulesState.to = Number(e.target.value); refresh(); } }, options(to));
  main.append(el("div", { class: "controls" }, "Diff from ", fromSel, " to ", toSel));
  const pre = el("pre", { class: "diff", id: "diff" });
  try {
    const d = await api(`/v1/rules/diff?from=${from}&to=${to}`);
    if (!d.diff) pre.append(el("span", { class: "empty" }, "no difference"));
    for (const line of d.diff.split("\n")) {
      if (!d.diff) break;
      const cls = line.startsWith("@@") ? "hunk" : line.startsWith("+") ? "add" : line.startsWith("-") ? "del" : "";
      pre.append(el("span", { class: cls }, line), "\n");
    }
  } catch (e) {
    pre.append(`diff unavailable: ${e.message}`);
  }
  main.append(pre);
  main.append(el("h3", {}, "History"));
  main.append(el("div", { class: "panel" }, table([
    { title: "version", value: (v) => String(v.version) + (v.version === history.current ? " (current)" : "") },
    { title: "stored", value: (v) => fmt.time(v.created_at) },
    { title: "author", value: (v) => v.author || "–" },
    { title: "comment", value: (v) => v.comment || "–" },
    { title: "", value: (v) => (v.version === history.current ? "" :
      el("button", { class: "rollback", "data-version": String(v.version), onclick: () => rollback(v.version) }, "Roll back to this")) },
  ], versions, "")));
}

// -- xDS clients -----------------------------------------------------------------------------------------------

const XDS_TYPES = ["Listener", "RouteConfiguration", "Cluster", "ClusterLoadAssignment"];

function xdsState(state) {
  if (!state) return el("span", { class: "empty" }, "–");
  if (state.parked) {
    return el("span", { class: "bad", title: state.error },
      `refused ${state.parked}` + (state.acked ? ` (keeps ${state.acked})` : " (keeps none)") + `: ${state.error}`);
  }
  if (state.acked && state.acked === state.sent) return el("span", { class: "ok" }, state.acked);
  return el("span", { class: "warn" }, state.sent ? `sent ${state.sent}, not accepted yet` : "asked, nothing sent");
}

async function renderXds(main) {
  main.append(el("h2", {}, "xDS clients"));
  let answer;
  try {
    answer = await api("/v1/xds/clients");
  } catch (e) {
    if (e.status !== 404) throw e;
    main.append(el("p", { class: "empty", id: "xds-off" }, e.message));
    return;
  }
  const clients = answer.clients.slice().sort((a, b) => a.cluster.localeCompare(b.cluster) || a.node.localeCompare(b.node));
  const refusing = clients.filter((c) => XDS_TYPES.some((t) => c.types[t] && c.types[t].parked)).length;
  main.append(el("p", { id: "xds-summary" },
    `ADS port ${answer.port}: ${clients.length} client(s) connected, ${refusing} refusing a version. ` +
    "Envoy sidecars and proxyless gRPC clients (meshctl xds bootstrap); the same state is served over CSDS."));
  main.append(el("div", { class: "panel" }, table([
    { title: "node", value: (c) => c.node || "(no node id)" },
    { title: "service", value: (c) => c.cluster || "–" },
    { title: "mTLS", value: (c) => (c.mtls ? "yes" : "no") },
    { title: "connected", num: true, value: (c) => `${c.connected_for.toFixed(0)} s` },
    { title: "refused", num: true, value: (c) => String(c.nacks), cls: (c) => (c.nacks ? "bad" : "") },
    ...XDS_TYPES.map((t) => ({ title: t === "ClusterLoadAssignment" ? "Endpoints" : t, value: (c) => xdsState(c.types[t]) })),
  ], clients, "No xDS client is connected.")));
}

// -- shell -----------------------------------------------------------------------------------------------------

let refreshing = false;

async function refresh() {
  if (refreshing) return;
  refreshing = true;
  const route = location.hash.replace(/^#/, "") || "/";
  document.getElementById("nav-topology").classList.toggle("active", route === "/" || route.startsWith("/service/"));
  document.getElementById("nav-rules").classList.toggle("active", route === "/rules");
  document.getElementById("nav-xds").classList.toggle("active", route === "/xds");
  const next = el("div", {});
  const live = document.getElementById("live");
  try {
    if (route.startsWith("/service/")) {
      const name = decodeURIComponent(route.slice("/service/".length));
      renderService(next, await api("/v1/stats/services/" + encodeURIComponent(name)));
    } else if (route === "/rules") {
      await renderRules(next, await api("/v1/rules/history?limit=200"));
    } else if (route === "/xds") {
      await renderXds(next);
    } else {
      renderTopology(next, await api("/v1/stats/topology"));
    }
    live.textContent = "live · updated " + new Date().toLocaleTimeString();
    live.className = "live ok";
  } catch (e) {
    next.append(el("p", { class: "bad", id: "load-error" }, `Could not load: ${e.message}`));
    live.textContent = "control plane unreachable · retrying";
    live.className = "live bad";
  }
  const main = document.getElementById("main");
  main.replaceChildren(...next.childNodes);
  refreshing = false;
}

function showTokenState() {
  document.getElementById("token-state").textContent = token() ? "token set (this tab only)" : "read-only";
}

document.getElementById("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const input = document.getElementById("token");
  if (input.value) sessionStorage.setItem(TOKEN_KEY, input.value);
  input.value = "";
  showTokenState();
});
document.getElementById("token-forget").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  showTokenState();
});
window.addEventListener("hashchange", () => { rulesState.message = null; refresh(); });
showTokenState();
refresh();
setInterval(refresh, REFRESH_MS);
