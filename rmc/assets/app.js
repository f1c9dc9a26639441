// BIDS console front end: plain JavaScript, no build step, no third-party code.
// It only calls the JSON API under /api/ (documented in rmc/openapi.yaml); everything it shows
// an operator can script. State-changing calls carry the session's CSRF token header.
"use strict";

const REFRESH_MS = 2000;
const IDC_COLORS = ["#2f6fde", "#d9822b", "#1f9d55", "#9b51e0", "#d64545", "#0f9bb0", "#8a6d3b"];
let csrf = null;
let timer = null;
let view = "overview";
let data = { hosts: [], images: [], stats: null };
// Host rows being edited keep their inputs across refreshes.
const editing = new Set();

// ---------- DOM helpers (text only: nothing from the network becomes HTML) ----------
function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    // Through the CSSOM: the page's CSP forbids inline style attributes.
    else if (k === "style") Object.assign(el.style, v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const k of kids.flat()) {
    if (k === null || k === undefined) continue;
    el.append(k instanceof Node ? k : document.createTextNode(String(k)));
  }
  return el;
}
const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
function s(tag, attrs, text) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const u = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < u.length - 1) { n /= 1000; i++; }
  return (i ? n.toFixed(1) : n) + " " + u[i];
}
function rate(bps) { return bps ? bytes(bps) + "/s" : "unlimited"; }
function short(peer) { return peer.length > 16 ? peer.slice(0, 6) + "…" + peer.slice(-6) : peer; }
function idcColor(idc, all) { return IDC_COLORS[Math.max(0, all.indexOf(idc)) % IDC_COLORS.length]; }

function toast(msg, bad) {
  const t = $("toast");
  t.textContent = msg;
  t.className = "show" + (bad ? " bad" : "");
  clearTimeout(t._h);
  t._h = setTimeout(() => { t.className = ""; }, 4000);
}

// ---------- API ----------
class ApiError extends Error {
  constructor(status, msg) { super(msg); this.status = status; }
}
async function api(method, path, body) {
  const headers = { "Accept": "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && csrf) headers["X-CSRF-Token"] = csrf;
  const r = await fetch(path, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch (_) { json = null; }
  if (r.status === 401 && path !== "/api/login") { showLogin(); }
  if (!r.ok) throw new ApiError(r.status, (json && json.error) || text || r.statusText);
  return json;
}

// ---------- login / logout ----------
function showLogin() {
  csrf = null;
  clearInterval(timer);
  timer = null;
  $("nav").hidden = true;
  $("who").hidden = true;
  for (const v of document.querySelectorAll(".view")) v.hidden = v.id !== "view-login";
}

function showApp() {
  $("nav").hidden = false;
  $("who").hidden = false;
  show(location.hash.slice(1) || "overview");
  refresh();
  if (!timer) timer = setInterval(refresh, REFRESH_MS);
}

$("login-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  $("login-error").textContent = "";
  try {
    const r = await api("POST", "/api/login", { user: $("login-user").value, password: $("login-password").value });
    csrf = r.csrf_token;
    $("login-password").value = "";
    showApp();
  } catch (err) {
    $("login-error").textContent = err.status === 401 ? "Wrong user or password." : err.message;
  }
});

$("logout").addEventListener("click", async () => {
  try { await api("POST", "/api/logout"); } catch (_) { /* the session is gone either way */ }
  showLogin();
});

// ---------- views ----------
function show(name) {
  if (!["overview", "hosts", "images", "transfers", "manage"].includes(name)) name = "overview";
  view = name;
  for (const v of document.querySelectorAll(".view")) v.hidden = v.id !== "view-" + name;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.view === name);
  render();
}
window.addEventListener("hashchange", () => { if (csrf) show(location.hash.slice(1)); });

async function refresh() {
  try {
    const [hosts, images, stats] = await Promise.all([api("GET", "/api/hosts"), api("GET", "/api/images"), api("GET", "/api/stats")]);
    data = { hosts, images, stats };
    $("refreshed").textContent = "updated " + new Date().toLocaleTimeString();
    render();
  } catch (err) {
    if (err.status !== 401) $("refreshed").textContent = "refresh failed: " + err.message;
  }
}

function render() {
  if (!data.stats) return;
  if (view === "overview") renderOverview();
  if (view === "hosts") renderHosts();
  if (view === "images") renderImages();
  if (view === "transfers") renderTransfers();
}

function idcNames() {
  const set = new Set(data.hosts.map((x) => x.idc));
  for (const i of data.stats.idcs) set.add(i.idc);
  return [...set].sort();
}

// ---------- overview: IDC cards and charts ----------
function renderOverview() {
  const cards = $("idc-cards");
  cards.replaceChildren(...data.stats.idcs.map((i) => h("div", { class: "card" },
    h("h2", {}, "IDC " + i.idc),
    h("div", { class: "big" }, `${i.alive}/${i.hosts}`), h("div", { class: "hint" }, "hosts alive"),
    h("div", {}, `${i.bridgeheads} bridgehead(s)`),
    h("div", {}, "WAN in " + bytes(i.counters.wan_recv_bytes) + " · LAN in " + bytes(i.counters.lan_recv_bytes)),
  )));
  const names = idcNames();
  const samples = data.stats.history.samples;
  const charts = $("traffic-charts");
  charts.replaceChildren(...names.map((idc) => trafficChart(idc, samples)));
  $("provision-chart").replaceChildren(provisionChart(data.stats.history.provisions, names));
}

// Rates between consecutive cumulative samples.
function series(samples, idc, field) {
  const out = [];
  for (let k = 1; k < samples.length; k++) {
    const a = samples[k - 1], b = samples[k];
    const dt = (b.t_ms - a.t_ms) / 1000;
    if (dt <= 0) continue;
    const va = (a.idcs[idc] || {})[field] || 0, vb = (b.idcs[idc] || {})[field] || 0;
    out.push([b.t_ms, Math.max(0, vb - va) / dt]);
  }
  return out;
}

function trafficChart(idc, samples) {
  const W = 420, H = 190, L = 56, R = 10, T = 22, B = 24;
  const wan = series(samples, idc, "wan_in"), lan = series(samples, idc, "lan");
  const svg = s("svg", { width: W, height: H, class: "chart", "data-idc": idc, role: "img", "aria-label": `WAN and LAN bytes per second, IDC ${idc}` });
  svg.append(s("text", { x: L, y: 14, class: "title" }, `IDC ${idc}`));
  const all = wan.concat(lan);
  const t0 = all.length ? Math.min(...all.map((p) => p[0])) : 0;
  const t1 = all.length ? Math.max(...all.map((p) => p[0])) : 1;
  const vmax = Math.max(1, ...all.map((p) => p[1]));
  const x = (t) => L + (t1 > t0 ? (t - t0) / (t1 - t0) : 0) * (W - L - R);
  const y = (v) => H - B - (v / vmax) * (H - T - B);
  svg.append(s("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#d9dee7" }));
  svg.append(s("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#d9dee7" }));
  for (const f of [0, 0.5, 1]) {
    svg.append(s("text", { x: L - 4, y: y(vmax * f) + 3, "text-anchor": "end" }, bytes(vmax * f) + "/s"));
  }
  if (all.length) {
    svg.append(s("text", { x: L, y: H - 8 }, new Date(t0).toLocaleTimeString()));
    svg.append(s("text", { x: W - R, y: H - 8, "text-anchor": "end" }, new Date(t1).toLocaleTimeString()));
  } else {
    svg.append(s("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "collecting samples…"));
  }
  for (const [pts, color, name] of [[wan, "#d9822b", "wan"], [lan, "#2f6fde", "lan"]]) {
    if (!pts.length) continue;
    const d = pts.map((p, k) => (k ? "L" : "M") + x(p[0]).toFixed(1) + " " + y(p[1]).toFixed(1)).join(" ");
    svg.append(s("path", { d, fill: "none", stroke: color, "stroke-width": 2, class: "series-" + name }));
  }
  const legend = h("div", { class: "legend" },
    h("span", {}, h("i", { style: { background: "#d9822b" } }), "WAN in"),
    h("span", {}, h("i", { style: { background: "#2f6fde" } }), "LAN in"));
  return h("div", {}, svg, legend);
}

function provisionChart(provisions, names) {
  const W = 860, H = 200, L = 40, R = 10, T = 12, B = 40;
  const svg = s("svg", { width: W, height: H, class: "chart", role: "img", "aria-label": "provision times" });
  if (!provisions.length) {
    svg.append(s("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no completed downloads seen yet"));
    return svg;
  }
  const shown = provisions.slice(-60);
  const vmax = Math.max(0.001, ...shown.map((p) => p.seconds));
  const bw = (W - L - R) / shown.length;
  const y = (v) => H - B - (v / vmax) * (H - T - B);
  svg.append(s("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#d9dee7" }));
  for (const f of [0, 0.5, 1]) svg.append(s("text", { x: L - 4, y: y(vmax * f) + 3, "text-anchor": "end" }, (vmax * f).toFixed(1) + "s"));
  shown.forEach((p, k) => {
    const r = s("rect", { x: L + k * bw + 1, y: y(p.seconds), width: Math.max(1, bw - 2), height: H - B - y(p.seconds), fill: idcColor(p.idc, names) });
    r.append(s("title", {}, `${p.image} on ${p.peer} (IDC ${p.idc}): ${p.seconds.toFixed(2)} s, completed ${new Date(p.completed_ms).toLocaleTimeString()}`));
    svg.append(r);
  });
  names.forEach((n, k) => {
    svg.append(s("rect", { x: L + k * 70, y: H - 16, width: 10, height: 10, fill: idcColor(n, names) }));
    svg.append(s("text", { x: L + k * 70 + 14, y: H - 7 }, "IDC " + n));
  });
  return svg;
}

// ---------- hosts ----------
function renderHosts() {
  const root = $("hosts-by-idc");
  // Do not rebuild while the operator is typing in this view.
  if (editing.size && root.childElementCount) { refreshHostCells(); return; }
  const byIdc = {};
  for (const x of data.hosts) (byIdc[x.idc] = byIdc[x.idc] || []).push(x);
  root.replaceChildren(...Object.keys(byIdc).sort().map((idc) => hostTable(idc, byIdc[idc])));
}

function refreshHostCells() {
  for (const x of data.hosts) {
    const row = document.querySelector(`tr[data-peer="${CSS.escape(x.peer)}"]`);
    if (!row) continue;
    row.querySelector(".alive").replaceChildren(h("span", { class: "dot " + (x.alive ? "up" : "down") }), x.alive ? "alive" : "down");
    row.querySelector(".traffic").textContent = trafficText(x);
  }
}

function trafficText(x) {
  const c = x.counters;
  return `WAN ↓${bytes(c.wan_recv_bytes)} ↑${bytes(c.wan_sent_bytes)} · LAN ↓${bytes(c.lan_recv_bytes)} ↑${bytes(c.lan_sent_bytes)}`;
}

function hostTable(idc, hosts) {
  const rows = hosts.map((x) => {
    const up = h("input", { type: "number", min: 0, step: "any", value: x.limits.upload_bps / 1e6, class: "lim-up", "aria-label": "upload limit MB/s", onfocus: () => editing.add(x.peer), onblur: () => editing.delete(x.peer) });
    const down = h("input", { type: "number", min: 0, step: "any", value: x.limits.download_bps / 1e6, class: "lim-down", "aria-label": "download limit MB/s", onfocus: () => editing.add(x.peer), onblur: () => editing.delete(x.peer) });
    const apply = h("button", { type: "button", class: "apply-limits", onclick: async () => {
      const body = { upload_bps: Math.round(Number(up.value) * 1e6), download_bps: Math.round(Number(down.value) * 1e6) };
      await command(`/api/hosts/${encodeURIComponent(x.peer)}/limits`, body, `limits of ${short(x.peer)} set: up ${rate(body.upload_bps)}, down ${rate(body.download_bps)}`);
      editing.delete(x.peer);
    } }, "Set");
    const sharing = h("input", { type: "checkbox", class: "sharing", checked: x.sharing, onchange: (e) =>
      command(`/api/hosts/${encodeURIComponent(x.peer)}/sharing`, { enabled: e.target.checked }, `sharing of ${short(x.peer)} ${e.target.checked ? "on" : "off"}`) });
    const fetchBtn = h("button", { type: "button", class: "secondary", onclick: () => {
      const image = prompt("Image to download (name:version)");
      if (image) command(`/api/hosts/${encodeURIComponent(x.peer)}/fetch`, { image }, `${short(x.peer)} fetches ${image}`);
    } }, "Fetch…");
    const publishBtn = h("button", { type: "button", class: "secondary", onclick: () => {
      const file = prompt("File on the host to publish (path)");
      if (!file) return;
      const ref = prompt("As image (name:version)");
      if (!ref || !ref.includes(":")) return;
      const [name, version] = ref.split(":");
      const from = prompt("Previous version to build a delta from (optional)") || null;
      command(`/api/hosts/${encodeURIComponent(x.peer)}/publish`, { file, name, version, from }, `${short(x.peer)} publishes ${ref}`);
    } }, "Publish…");
    return h("tr", { "data-peer": x.peer },
      h("td", { class: "mono", title: x.peer }, short(x.peer)),
      h("td", { class: "alive" }, h("span", { class: "dot " + (x.alive ? "up" : "down") }), x.alive ? "alive" : "down"),
      h("td", { class: "role-" + x.role }, x.role, x.cert ? h("div", { class: "hint" }, `${x.cert.db_id} #${x.cert.serial}`) : null),
      h("td", {}, h("input", { type: "checkbox", class: "db-pick", checked: x.role === "bridgehead", "aria-label": "bridgehead" })),
      h("td", {}, up), h("td", {}, down), h("td", {}, apply),
      h("td", {}, sharing),
      h("td", { class: "traffic" }, trafficText(x)),
      h("td", {}, fetchBtn, " ", publishBtn));
  });
  const applyDbs = h("button", { type: "button", class: "apply-bridgeheads", onclick: (e) => {
    const table = e.target.closest(".card");
    const peers = [...table.querySelectorAll("tr[data-peer]")].filter((r) => r.querySelector(".db-pick").checked).map((r) => r.dataset.peer);
    if (!confirm(`Make ${peers.length} host(s) the bridgeheads of IDC ${idc}? Dropped bridgeheads lose their certificates.`)) return;
    command(`/api/idcs/${encodeURIComponent(idc)}/bridgeheads`, { peers }, `bridgeheads of IDC ${idc} changed`, "PUT");
  } }, "Apply bridgeheads");
  return h("div", { class: "card", "data-idc": idc },
    h("h2", {}, "IDC " + idc, " ", applyDbs),
    h("table", {}, h("thead", {}, h("tr", {}, ["peer", "liveness", "role", "DB", "upload MB/s", "download MB/s", "", "sharing", "traffic", "orders"].map((t) => h("th", {}, t)))),
      h("tbody", {}, rows)));
}

async function command(path, body, okMsg, method) {
  try {
    await api(method || "POST", path, body);
    toast(okMsg);
    refresh();
  } catch (err) {
    toast(err.message, true);
  }
}

// ---------- images ----------
function renderImages() {
  const names = idcNames();
  const rows = data.images.map((im) => h("tr", {},
    h("td", {}, `${im.name}:${im.version}`),
    h("td", {}, im.kind),
    h("td", { class: "mono", title: im.id }, im.id.slice(0, 12)),
    h("td", { class: "num" }, bytes(im.size)),
    ...names.map((n) => {
      const c = im.idcs[n];
      if (!c) return h("td", { class: "hint" }, "–");
      const holders = im.holders.filter((x) => x.idc === n).map((x) => short(x.peer) + (x.complete ? "" : ` (${x.chunks_held}/${im.chunks})`)).join(", ");
      return h("td", { title: holders }, `${c.complete} complete, ${c.partial} partial`);
    })));
  $("images-table").replaceChildren(h("div", { class: "card" }, h("h2", {}, "Images, versions and deltas; holders per IDC"),
    h("table", {}, h("thead", {}, h("tr", {}, ["image", "kind", "id", "size", ...names.map((n) => "IDC " + n)].map((t) => h("th", {}, t)))),
      h("tbody", {}, rows))));
}

// ---------- transfers ----------
function renderTransfers() {
  const t = data.stats.transfers;
  const rows = t.map((x) => h("tr", {},
    h("td", {}, x.image), h("td", { class: "mono", title: x.peer }, short(x.peer)), h("td", {}, x.idc),
    h("td", {}, h("span", { class: "bar" }, h("span", { style: { width: `${x.percent.toFixed(1)}%` } })), ` ${x.percent.toFixed(1)}%`),
    h("td", { class: "num" }, `${x.chunks_held}/${x.chunks}`)));
  $("transfers-table").replaceChildren(h("div", { class: "card" }, h("h2", {}, "Live transfers"),
    t.length ? h("table", {}, h("thead", {}, h("tr", {}, ["image", "host", "IDC", "progress", "chunks"].map((x) => h("th", {}, x)))), h("tbody", {}, rows))
      : h("p", { class: "hint" }, "No host is downloading right now.")));
}

// ---------- image management ----------
$("gc-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const body = { policy: $("gc-policy").value, keep: Number($("gc-keep").value), dry_run: $("gc-dry").checked };
  if ($("gc-free").value) body.free_target = Number($("gc-free").value);
  if ($("gc-idc").value) body.idc = $("gc-idc").value;
  try {
    const r = await api("POST", "/api/gc", body);
    const rows = [];
    for (const x of r.hosts) for (const im of x.removed) rows.push(h("tr", {}, h("td", { class: "mono", title: x.peer }, short(x.peer)), h("td", {}, x.idc), h("td", {}, im.image), h("td", { class: "num" }, bytes(im.bytes))));
    const errs = r.hosts.filter((x) => x.error).map((x) => h("p", { class: "error" }, `${short(x.peer)}: ${x.error}`));
    $("gc-result").replaceChildren(h("div", { class: "card" }, h("h2", {}, r.dry_run ? "Would remove" : "Removed"),
      rows.length ? h("table", {}, h("thead", {}, h("tr", {}, ["host", "IDC", "image", "size"].map((t) => h("th", {}, t)))), h("tbody", {}, rows)) : h("p", { class: "hint" }, "Nothing."), errs));
    if (!r.dry_run) refresh();
  } catch (err) {
    toast(err.message, true);
  }
});

// ---------- start: resume a live session if the cookie still holds one ----------
(async () => {
  try {
    const r = await api("GET", "/api/session");
    csrf = r.csrf_token;
    showApp();
  } catch (_) {
    showLogin();
  }
})();
