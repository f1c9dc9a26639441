// BIDS console front end: plain JavaScript, no build step, no third-party code.
// It only calls the JSON API under /api/ (documented in rmc/openapi.yaml); everything it shows
// an operator can script. State-changing calls carry the session's CSRF token header.
// The host list is searched, sorted and paged by the server, so thousands of hosts cost one
// page per refresh. When a refresh fails, what is shown is marked stale instead of kept as if
// it were current.
"use strict";

const REFRESH_MS = 2000;
const REQUEST_TIMEOUT_MS = 8000;
const IDC_COLORS = ["#2f6fde", "#d9822b", "#1f9d55", "#9b51e0", "#d64545", "#0f9bb0", "#8a6d3b"];
const SERIES = [["wan_in", "#d9822b", "WAN in"], ["wan_out", "#9b51e0", "WAN out"], ["lan", "#2f6fde", "LAN in"]];
let csrf = null;
let timer = null;
let view = "overview";
let data = { hosts: [], total: 0, images: [], stats: null };
let lastOk = null;
let stale = false;
// The host list the operator asked for (sent to GET /api/hosts).
const hostQuery = { q: "", idc: "", role: "", sort: "idc", order: "asc", offset: 0, limit: 50 };
// Bridgehead ticks not applied yet: peer -> { idc, on }.
const dbChanges = new Map();

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
  return (i ? n.toFixed(1) : Math.round(n)) + " " + u[i];
}
function perS(n) { return n === null || n === undefined ? "–" : bytes(n) + "/s"; }
function rate(bps) { return bps ? bytes(bps) + "/s" : "unlimited"; }
function short(peer) { return peer.length > 16 ? peer.slice(0, 6) + "…" + peer.slice(-6) : peer; }
function idcColor(idc, all) { return IDC_COLORS[Math.max(0, all.indexOf(idc)) % IDC_COLORS.length]; }
function duration(sec) {
  if (sec === null || sec === undefined || !isFinite(sec)) return "–";
  sec = Math.max(0, Math.round(sec));
  if (sec < 60) return sec + " s";
  if (sec < 3600) return Math.floor(sec / 60) + " min " + (sec % 60) + " s";
  if (sec < 86400 * 2) return Math.floor(sec / 3600) + " h " + Math.floor((sec % 3600) / 60) + " min";
  return Math.floor(sec / 86400) + " days";
}
function when(ms) { return new Date(ms).toLocaleString(); }

function toast(msg, bad) {
  const t = $("toast");
  t.textContent = msg;
  t.className = "show" + (bad ? " bad" : "");
  clearTimeout(t._h);
  t._h = setTimeout(() => { t.className = ""; }, 5000);
}

// ---------- API ----------
class ApiError extends Error {
  constructor(status, msg) { super(msg); this.status = status; }
}
async function call(method, path, body) {
  const headers = { "Accept": "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && csrf) headers["X-CSRF-Token"] = csrf;
  const ctl = new AbortController();
  const t = setTimeout(() => ctl.abort(), REQUEST_TIMEOUT_MS);
  let r;
  try {
    r = await fetch(path, {
      method, headers, credentials: "same-origin", signal: ctl.signal,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    throw new ApiError(0, e.name === "AbortError" ? `no answer within ${REQUEST_TIMEOUT_MS / 1000} s` : "the console's server cannot be reached");
  } finally {
    clearTimeout(t);
  }
  const text = await r.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch (_) { json = null; }
  if (r.status === 401 && path !== "/api/login") { showLogin(); }
  if (!r.ok) throw new ApiError(r.status, (json && json.error) || text || r.statusText);
  return { json, headers: r.headers };
}
async function api(method, path, body) { return (await call(method, path, body)).json; }

// ---------- login / logout ----------
function showLogin() {
  csrf = null;
  clearInterval(timer);
  timer = null;
  $("nav").hidden = true;
  $("who").hidden = true;
  $("policy").hidden = true;
  setStale(false);
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
  const changed = view !== name;
  view = name;
  for (const v of document.querySelectorAll(".view")) v.hidden = v.id !== "view-" + name;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.view === name);
  render();
  if (changed && csrf) refresh();
}
window.addEventListener("hashchange", () => { if (csrf) show(location.hash.slice(1)); });

function hostsPath() {
  const p = new URLSearchParams();
  for (const [k, v] of Object.entries(hostQuery)) if (v !== "" && v !== null) p.set(k, String(v));
  return "/api/hosts?" + p.toString();
}

let refreshing = false;
async function refresh() {
  if (refreshing || !csrf) return;
  refreshing = true;
  try {
    // Only what the current view shows: the host list is one page, fetched on the hosts view.
    const wantHosts = view === "hosts";
    const wantImages = view === "images";
    const [stats, hosts, images] = await Promise.all([
      api("GET", "/api/stats"),
      wantHosts ? call("GET", hostsPath()) : null,
      wantImages ? api("GET", "/api/images") : null,
    ]);
    data.stats = stats;
    if (hosts) { data.hosts = hosts.json; data.total = Number(hosts.headers.get("X-Total-Count") || hosts.json.length); }
    if (images) data.images = images;
    lastOk = new Date();
    setStale(false);
    $("refreshed").textContent = "updated " + lastOk.toLocaleTimeString();
    render();
  } catch (err) {
    if (err.status !== 401) setStale(true, err.message);
  } finally {
    refreshing = false;
  }
}

// Marks everything on screen as out of date (or current again).
function setStale(on, why) {
  stale = on;
  document.body.classList.toggle("stale", on);
  const b = $("stale-banner");
  b.hidden = !on;
  if (on) {
    const since = lastOk ? `; showing what was known at ${lastOk.toLocaleTimeString()}` : "";
    b.textContent = `Data is stale: the last refresh failed (${why})${since}. Liveness and rates below are not current; retrying every ${REFRESH_MS / 1000} s.`;
    $("refreshed").textContent = "stale since " + (lastOk ? lastOk.toLocaleTimeString() : "start");
  }
}

function render() {
  if (!data.stats) return;
  renderPolicy();
  if (view === "overview") renderOverview();
  if (view === "hosts") renderHosts();
  if (view === "images") renderImages();
  if (view === "transfers") renderTransfers();
}

function renderPolicy() {
  const p = data.stats.policy;
  const el = $("policy");
  el.hidden = false;
  el.className = "policy " + (p || "unknown");
  el.textContent = p === "bids" ? "Policy: BIDS (bridgeheads only across IDCs)"
    : p === "baseline" ? "Policy: Baseline (evaluation only: any host dials any host)"
    : "Policy: unknown (the GIS does not say)";
}

function idcNames() {
  const set = new Set(data.stats.idcs.map((i) => i.idc));
  return [...set].sort();
}

// ---------- overview: IDC cards, alerts and charts ----------
function renderOverview() {
  $("idc-cards").replaceChildren(...data.stats.idcs.map((i) => h("div", { class: "card idc-card", "data-idc": i.idc },
    h("h2", {}, "IDC " + i.idc),
    h("div", { class: "big" }, `${i.alive}/${i.hosts}`), h("div", { class: "hint" }, "hosts alive"),
    h("div", {}, `${i.live_bridgeheads}/${i.bridgeheads} bridgehead(s) alive`),
    h("div", { class: "rates" }, "now: WAN in ", h("b", { class: "r-wan-in" }, perS(i.rates.wan_in_bps)),
      " · out ", h("b", { class: "r-wan-out" }, perS(i.rates.wan_out_bps)),
      " · LAN ", h("b", { class: "r-lan" }, perS(i.rates.lan_bps))),
    h("div", { class: "hint" }, "total: WAN in " + bytes(i.counters.wan_recv_bytes) + " · out " + bytes(i.counters.wan_sent_bytes) + " · LAN in " + bytes(i.counters.lan_recv_bytes)),
  )));
  renderAlerts();
  const names = idcNames();
  const samples = data.stats.history.samples;
  const shared = $("shared-scale").checked;
  const per = names.map((idc) => SERIES.map(([f]) => series(samples, idc, f, data.stats.history.interval_ms)));
  const peak = (ss) => Math.max(1, ...ss.flat().map((p) => p[1]));
  const common = peak(per.flat());
  $("scale-note").textContent = shared
    ? `All IDC charts share one y-scale (top: ${perS(common)}), so their heights compare.`
    : "Each IDC chart has its own y-scale: compare the axis labels, not the heights.";
  $("traffic-charts").replaceChildren(...names.map((idc, k) => trafficChart(idc, per[k], shared ? common : peak(per[k]))));
  $("provision-chart").replaceChildren(provisionChart(data.stats.history.provisions, names));
}
$("shared-scale").addEventListener("change", () => { if (data.stats) renderOverview(); });

function renderAlerts() {
  const certs = data.stats.cert_alerts || [];
  const events = (data.stats.history.events || []).filter((e) => e.change === "demoted");
  const parts = [];
  if (certs.length) {
    parts.push(h("div", { class: "card warn", id: "cert-alerts" },
      h("h2", {}, `Bridgehead certificates needing attention (warning period ${duration(data.stats.cert_warn_s)})`),
      h("ul", {}, certs.map((c) => h("li", { "data-peer": c.peer, class: "cert-" + c.state },
        `${c.state === "expiring" ? "⚠ expires" : c.state === "expired" ? "✖ expired" : "✖ revoked"}: ${short(c.peer)} (IDC ${c.idc}, ${c.db_id} #${c.serial}) `,
        c.state === "expiring" ? `in ${duration(c.expires_in_s)}, at ${when(c.not_after * 1000)}` : `ended ${when(c.not_after * 1000)}`)))));
  }
  if (events.length) {
    parts.push(h("div", { class: "card", id: "demotions" },
      h("h2", {}, "Bridgeheads demoted"),
      h("ul", {}, events.slice(-20).reverse().map((e) => h("li", { "data-peer": e.peer },
        `${when(e.t_ms)}: ${short(e.peer)} (IDC ${e.idc}) became an ordinary host: ${e.reason}${e.serial ? ` (#${e.serial})` : ""}`)))));
  }
  $("alerts").replaceChildren(...parts);
}

// Rates from cumulative samples, each over at least `win` ms (a node reports every few
// seconds, so rates over single samples would jump between zero and bursts). At most ~300
// points per series.
function series(samples, idc, field, interval) {
  const win = Math.max(2000, 2 * (interval || 500));
  const out = [];
  let j = 0;
  for (let k = 1; k < samples.length; k++) {
    const b = samples[k];
    while (j + 1 < k && b.t_ms - samples[j + 1].t_ms >= win) j++;
    const a = samples[j];
    const dt = (b.t_ms - a.t_ms) / 1000;
    if (dt <= 0) continue;
    const va = (a.idcs[idc] || {})[field] || 0, vb = (b.idcs[idc] || {})[field] || 0;
    out.push([b.t_ms, Math.max(0, vb - va) / dt]);
  }
  const step = Math.ceil(out.length / 300);
  return step > 1 ? out.filter((_, i) => i % step === 0 || i === out.length - 1) : out;
}

function trafficChart(idc, lines, vmax) {
  const W = 420, H = 190, L = 64, R = 10, T = 22, B = 24;
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", "data-idc": idc, "data-ymax": vmax, role: "img", "aria-label": `WAN in, WAN out and LAN bytes per second, IDC ${idc}` });
  svg.append(s("text", { x: L, y: 14, class: "title" }, `IDC ${idc}`));
  const all = lines.flat();
  const t0 = all.length ? Math.min(...all.map((p) => p[0])) : 0;
  const t1 = all.length ? Math.max(...all.map((p) => p[0])) : 1;
  const x = (t) => L + (t1 > t0 ? (t - t0) / (t1 - t0) : 0) * (W - L - R);
  const y = (v) => H - B - (Math.min(v, vmax) / vmax) * (H - T - B);
  svg.append(s("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#d9dee7" }));
  svg.append(s("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#d9dee7" }));
  for (const f of [0, 0.5, 1]) {
    svg.append(s("text", { x: L - 4, y: y(vmax * f) + 3, "text-anchor": "end", class: f === 1 ? "ymax" : "" }, perS(vmax * f)));
  }
  if (all.length) {
    svg.append(s("text", { x: L, y: H - 8 }, new Date(t0).toLocaleTimeString()));
    svg.append(s("text", { x: W - R, y: H - 8, "text-anchor": "end" }, new Date(t1).toLocaleTimeString()));
  } else {
    svg.append(s("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "collecting samples…"));
  }
  SERIES.forEach(([f, color], k) => {
    const pts = lines[k];
    if (!pts.length) return;
    const d = pts.map((p, i) => (i ? "L" : "M") + x(p[0]).toFixed(1) + " " + y(p[1]).toFixed(1)).join(" ");
    svg.append(s("path", { d, fill: "none", stroke: color, "stroke-width": 2, class: "series-" + f.replace("_", "-") }));
  });
  const legend = h("div", { class: "legend" }, SERIES.map(([, color, name]) => h("span", {}, h("i", { style: { background: color } }), name)));
  return h("div", { class: "chart-box" }, svg, legend);
}

function provisionChart(provisions, names) {
  const W = 860, H = 200, L = 40, R = 10, T = 12, B = 40;
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart wide", role: "img", "aria-label": "provision times" });
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

// ---------- hosts: one server-side page, searchable and sortable ----------
const HOST_COLUMNS = [
  ["peer", "peer"], ["IDC", "idc"], ["liveness", "alive"], ["role", "role"], ["DB", null],
  ["WAN ↓/s", "wan_in_rate"], ["WAN ↑/s", "wan_out_rate"], ["LAN ↓/s", "lan_in_rate"], ["LAN ↑/s", "lan_out_rate"],
  ["traffic (total)", "wan_in"], ["limits MB/s (up, down)", null], ["sharing", null], ["orders", null],
];

function editingHosts() {
  const a = document.activeElement;
  return a && a.closest && a.closest("#hosts-table") && a.matches("input, select");
}

function renderHosts() {
  const sel = $("host-idc");
  const want = ["", ...idcNames()];
  if ([...sel.options].map((o) => o.value).join() !== want.join()) {
    const cur = sel.value;
    sel.replaceChildren(...want.map((v) => h("option", { value: v }, v || "all")));
    sel.value = want.includes(cur) ? cur : "";
  }
  const first = data.total ? hostQuery.offset + 1 : 0;
  const last = Math.min(hostQuery.offset + data.hosts.length, data.total);
  $("page-info").textContent = `hosts ${first}–${last} of ${data.total}`;
  $("page-prev").disabled = hostQuery.offset === 0;
  $("page-next").disabled = hostQuery.offset + hostQuery.limit >= data.total;
  renderDbPending();
  // Do not rebuild while the operator is typing in the table: refresh live cells only.
  if (editingHosts()) { refreshHostCells(); return; }
  const head = h("tr", {}, HOST_COLUMNS.map(([label, key]) => {
    if (!key) return h("th", {}, label);
    const on = hostQuery.sort === key;
    return h("th", { "aria-sort": on ? (hostQuery.order === "asc" ? "ascending" : "descending") : "none" },
      h("button", { type: "button", class: "sort", "data-sort": key, onclick: () => {
        if (hostQuery.sort === key) hostQuery.order = hostQuery.order === "asc" ? "desc" : "asc";
        else { hostQuery.sort = key; hostQuery.order = key.endsWith("rate") || key === "wan_in" ? "desc" : "asc"; }
        hostQuery.offset = 0;
        refresh();
      } }, label, on ? (hostQuery.order === "asc" ? " ▲" : " ▼") : ""));
  }));
  const body = data.hosts.length ? data.hosts.map(hostRow)
    : [h("tr", {}, h("td", { colspan: HOST_COLUMNS.length, class: "hint" }, "No host matches."))];
  $("hosts-table").replaceChildren(h("table", { class: "hosts" }, h("thead", {}, head), h("tbody", {}, body)));
}

function liveness(x) {
  return [h("span", { class: "dot " + (x.alive ? "up" : "down") }), h("span", { class: "alive-text" }, x.alive ? "alive" : "down")];
}

function refreshHostCells() {
  for (const x of data.hosts) {
    const row = document.querySelector(`tr[data-peer="${CSS.escape(x.peer)}"]`);
    if (!row) continue;
    row.querySelector(".alive").replaceChildren(...liveness(x));
    row.querySelector(".traffic").textContent = trafficText(x);
  }
}

function trafficText(x) {
  const c = x.counters;
  return `WAN ↓${bytes(c.wan_recv_bytes)} ↑${bytes(c.wan_sent_bytes)} · LAN ↓${bytes(c.lan_recv_bytes)} ↑${bytes(c.lan_sent_bytes)}`;
}

function certNote(x) {
  if (x.cert_expiring) return h("div", { class: "warn-text cert-warning" }, `⚠ certificate expires in ${duration(x.cert_expires_in_s)}`);
  if (x.cert && x.cert.status === "expired") return h("div", { class: "bad-text cert-expired" }, "certificate expired: no longer a bridgehead");
  if (x.cert && x.cert.status === "revoked") return h("div", { class: "bad-text" }, "certificate revoked");
  if (x.demoted && x.role === "host") return h("div", { class: "hint demoted" }, `demoted ${new Date(x.demoted.t_ms).toLocaleString()}: ${x.demoted.reason}`);
  return null;
}

// A limit typed in MB/s as bytes/s, or an error message.
function parseLimit(text, what) {
  const t = String(text).trim();
  if (t === "") return { err: `${what}: enter a number of MB/s (0 = unlimited)` };
  const v = Number(t);
  if (!isFinite(v) || v < 0) return { err: `${what} must be 0 (unlimited) or more MB/s, not ${t}` };
  if (v > 1e6) return { err: `${what} must be at most 1,000,000 MB/s` };
  return { v: Math.round(v * 1e6) };
}

function hostRow(x) {
  const lim = x.limits || { upload_bps: 0, download_bps: 0 };
  const up = h("input", { type: "number", min: 0, step: "any", value: lim.upload_bps / 1e6, class: "lim-up", "aria-label": "upload limit MB/s" });
  const down = h("input", { type: "number", min: 0, step: "any", value: lim.download_bps / 1e6, class: "lim-down", "aria-label": "download limit MB/s" });
  const err = h("div", { class: "error lim-error", role: "alert" });
  const apply = h("button", { type: "button", class: "apply-limits", onclick: async () => {
    const u = parseLimit(up.value, "upload limit"), d = parseLimit(down.value, "download limit");
    up.toggleAttribute("aria-invalid", !!u.err);
    down.toggleAttribute("aria-invalid", !!d.err);
    err.textContent = u.err || d.err || "";
    if (u.err || d.err) return;
    const body = { upload_bps: u.v, download_bps: d.v };
    await command(`/api/hosts/${encodeURIComponent(x.peer)}/limits`, body, `limits of ${short(x.peer)} set: up ${rate(body.upload_bps)}, down ${rate(body.download_bps)}`);
    up.blur(); down.blur();
  } }, "Set");
  const sharing = h("input", { type: "checkbox", class: "sharing", checked: x.sharing !== false, "aria-label": "sharing", onchange: (e) =>
    command(`/api/hosts/${encodeURIComponent(x.peer)}/sharing`, { enabled: e.target.checked }, `sharing of ${short(x.peer)} ${e.target.checked ? "on" : "off"}`) });
  const pending = dbChanges.get(x.peer);
  const dbPick = h("input", { type: "checkbox", class: "db-pick", "aria-label": "bridgehead", checked: pending ? pending.on : x.role === "bridgehead", onchange: (e) => {
    const now = e.target.checked;
    if (now === (x.role === "bridgehead")) dbChanges.delete(x.peer); else dbChanges.set(x.peer, { idc: x.idc, on: now });
    renderDbPending();
  } });
  const orders = [
    h("button", { type: "button", class: "secondary order-fetch", onclick: () => fetchDialog(x.peer) }, "Fetch…"),
    h("button", { type: "button", class: "secondary order-remove", onclick: () => removeDialog(x.peer) }, "Remove…"),
    h("button", { type: "button", class: "secondary order-publish", onclick: () => publishDialog(x.peer) }, "Publish…"),
  ];
  const r = x.rates;
  const cells = [
    [h("span", { class: "mono", title: x.peer }, short(x.peer))], [x.idc], liveness(x),
    [x.role, x.cert ? h("div", { class: "hint" }, `${x.cert.db_id} #${x.cert.serial}`) : null, certNote(x)],
    [dbPick],
    [perS(r && r.wan_in_bps)], [perS(r && r.wan_out_bps)], [perS(r && r.lan_in_bps)], [perS(r && r.lan_out_bps)],
    [trafficText(x)], [up, " ", down, " ", apply, err], [sharing], orders,
  ];
  const cls = ["peer", "idc", "alive", "role-" + x.role, "db", "num", "num", "num", "num", "traffic", "limits", "", "orders"];
  return h("tr", { "data-peer": x.peer, "data-idc": x.idc, class: x.cert_expiring ? "expiring" : null },
    cells.map((kids, k) => h("td", { class: cls[k] || null, "data-label": HOST_COLUMNS[k][0] }, ...kids)));
}

function renderDbPending() {
  const el = $("db-pending");
  const per = {};
  for (const [, c] of dbChanges) { const p = (per[c.idc] = per[c.idc] || { add: 0, drop: 0 }); if (c.on) p.add++; else p.drop++; }
  const idcs = Object.keys(per).sort();
  el.hidden = !idcs.length;
  el.replaceChildren(h("span", {}, "Bridgehead changes not applied: "),
    ...idcs.map((i) => h("span", { class: "pending-idc" }, `IDC ${i}: +${per[i].add} −${per[i].drop} `,
      h("button", { type: "button", class: "apply-bridgeheads", "data-idc": i, onclick: () => applyBridgeheads(i) }, `Apply to IDC ${i}…`), " ")),
    h("button", { type: "button", class: "secondary", onclick: () => { dbChanges.clear(); renderHosts(); } }, "Discard"));
}

async function applyBridgeheads(idc) {
  let current;
  try {
    current = (await api("GET", `/api/hosts?idc=${encodeURIComponent(idc)}&role=bridgehead&limit=1000`)).map((x) => x.peer);
  } catch (err) { toast(err.message, true); return; }
  const want = new Set(current);
  for (const [p, c] of dbChanges) if (c.idc === idc) { if (c.on) want.add(p); else want.delete(p); }
  const peers = [...want];
  openForm({
    title: `Make ${peers.length} host(s) the bridgeheads of IDC ${idc}?`,
    text: "New bridgeheads get certificates signed with the admin key; dropped ones have theirs revoked and become ordinary hosts.",
    fields: [],
    ok: "Apply",
    submit: async () => {
      await api("PUT", `/api/idcs/${encodeURIComponent(idc)}/bridgeheads`, { peers });
      for (const [p, c] of [...dbChanges]) if (c.idc === idc) dbChanges.delete(p);
      toast(`bridgeheads of IDC ${idc} changed`);
      refresh();
    },
  });
}

// The filter form: typing searches after a short pause; every change goes back to page 1.
let searchTimer = null;
$("host-search").addEventListener("input", () => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(() => { hostQuery.q = $("host-search").value.trim(); hostQuery.offset = 0; refresh(); }, 250);
});
for (const [id, key] of [["host-idc", "idc"], ["host-role", "role"], ["host-limit", "limit"]]) {
  $(id).addEventListener("change", () => { hostQuery[key] = key === "limit" ? Number($(id).value) : $(id).value; hostQuery.offset = 0; refresh(); });
}
$("host-filter").addEventListener("submit", (e) => { e.preventDefault(); hostQuery.q = $("host-search").value.trim(); hostQuery.offset = 0; refresh(); });
$("page-prev").addEventListener("click", () => { hostQuery.offset = Math.max(0, hostQuery.offset - hostQuery.limit); refresh(); });
$("page-next").addEventListener("click", () => { hostQuery.offset += hostQuery.limit; refresh(); });

async function command(path, body, okMsg, method) {
  try {
    await api(method || "POST", path, body);
    toast(okMsg);
    refresh();
    return true;
  } catch (err) {
    toast(err.message, true);
    return false;
  }
}

// ---------- in-page forms (no window.prompt) ----------
const IMAGE_RE = /^[^\s:]+:[^\s:]+$/;
let dlgSubmit = null;
function openForm({ title, text, fields, ok, submit }) {
  $("dlg-title").textContent = title;
  $("dlg-error").textContent = "";
  $("dlg-ok").textContent = ok || "OK";
  $("dlg-fields").replaceChildren(...(text ? [h("p", { class: "hint" }, text)] : []), ...fields.map((f) =>
    h("label", {}, f.label, h("input", { name: f.name, placeholder: f.placeholder || "", value: f.value || "", required: !!f.required, autocomplete: "off" }))));
  dlgSubmit = async (values) => {
    for (const f of fields) {
      const v = values[f.name];
      const msg = f.required && !v ? `${f.label}: required` : (v && f.check ? f.check(v) : null);
      if (msg) { $("dlg-error").textContent = msg; $("dlg-fields").querySelector(`[name="${f.name}"]`).focus(); return; }
    }
    $("dlg-ok").disabled = true;
    try {
      await submit(values);
      $("dlg").close();
    } catch (err) {
      $("dlg-error").textContent = err.message;
    } finally {
      $("dlg-ok").disabled = false;
    }
  };
  $("dlg").showModal();
  const first = $("dlg-fields").querySelector("input");
  if (first) first.focus();
}
$("dlg-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const values = {};
  for (const i of $("dlg-fields").querySelectorAll("input")) values[i.name] = i.value.trim();
  if (dlgSubmit) dlgSubmit(values);
});
$("dlg-cancel").addEventListener("click", () => $("dlg").close());

const imageCheck = (v) => IMAGE_RE.test(v) ? null : `write the image as name:version, e.g. debian:12.1 (got "${v}")`;
function fetchDialog(peer) {
  openForm({
    title: `Order ${short(peer)} to download an image`, ok: "Fetch",
    fields: [{ name: "image", label: "Image (name:version)", placeholder: "debian:12.1", required: true, check: imageCheck }],
    submit: async (v) => { await api("POST", `/api/hosts/${encodeURIComponent(peer)}/fetch`, { image: v.image }); toast(`${short(peer)} fetches ${v.image}`); refresh(); },
  });
}
function removeDialog(peer) {
  openForm({
    title: `Remove an image from ${short(peer)}`, ok: "Remove",
    fields: [{ name: "image", label: "Image (name:version)", placeholder: "debian:12.1", required: true, check: imageCheck }],
    submit: async (v) => { await api("POST", `/api/hosts/${encodeURIComponent(peer)}/remove`, { image: v.image }); toast(`${short(peer)} removed ${v.image}`); refresh(); },
  });
}
function publishDialog(peer) {
  openForm({
    title: `Order ${short(peer)} to publish a file`, ok: "Publish",
    fields: [
      { name: "file", label: "File on the host (path)", placeholder: "/var/lib/images/debian.raw", required: true },
      { name: "image", label: "As image (name:version)", placeholder: "debian:12.2", required: true, check: imageCheck },
      { name: "from", label: "Previous version to build a delta from (optional)", placeholder: "12.1" },
    ],
    submit: async (v) => {
      const [name, version] = v.image.split(":");
      await api("POST", `/api/hosts/${encodeURIComponent(peer)}/publish`, { file: v.file, name, version, from: v.from || null });
      toast(`${short(peer)} publishes ${v.image}`);
      refresh();
    },
  });
}

// ---------- images ----------
function renderImages() {
  const names = idcNames();
  const rows = data.images.map((im) => h("tr", {},
    h("td", { "data-label": "image" }, `${im.name}:${im.version}`),
    h("td", { "data-label": "kind" }, im.kind),
    h("td", { class: "mono", title: im.id, "data-label": "id" }, im.id.slice(0, 12)),
    h("td", { class: "num", "data-label": "size" }, bytes(im.size)),
    ...names.map((n) => {
      const c = im.idcs[n];
      if (!c) return h("td", { class: "hint", "data-label": "IDC " + n }, "–");
      const holders = im.holders.filter((x) => x.idc === n).map((x) => short(x.peer) + (x.complete ? "" : ` (${x.chunks_held}/${im.chunks})`)).join(", ");
      return h("td", { title: holders, "data-label": "IDC " + n }, `${c.complete} complete, ${c.partial} partial`);
    })));
  $("images-table").replaceChildren(h("div", { class: "card" }, h("h2", {}, "Images, versions and deltas; holders per IDC"),
    h("div", { class: "table-wrap" }, h("table", {}, h("thead", {}, h("tr", {}, ["image", "kind", "id", "size", ...names.map((n) => "IDC " + n)].map((t) => h("th", {}, t)))),
      h("tbody", {}, rows)))));
  const bh = [];
  for (const im of data.images) for (const b of im.bridgeheads || []) bh.push(h("tr", { "data-peer": b.peer },
    h("td", { "data-label": "image" }, `${im.name}:${im.version}`), h("td", { class: "mono", title: b.peer, "data-label": "bridgehead" }, short(b.peer)),
    h("td", { "data-label": "IDC" }, b.idc),
    h("td", { class: "num wan-ratio", "data-label": "WAN in ÷ size" }, b.wan_in_ratio.toFixed(2) + "×"),
    h("td", { class: "num lan-ratio", "data-label": "LAN upload ÷ size" }, b.lan_upload_ratio.toFixed(2) + "×"),
    h("td", { class: "num", "data-label": "LAN upload" }, bytes(b.lan_sent_bytes))));
  $("bh-uploads").replaceChildren(h("div", { class: "card" },
    h("h2", {}, "Bridgehead traffic per image ", h("span", { class: "hint" }, "(LAN upload ÷ image size near 1 means its IDC's hosts shared the image among themselves; near the number of hosts, that they all fetched it from the bridgehead)")),
    bh.length ? h("div", { class: "table-wrap" }, h("table", {}, h("thead", {}, h("tr", {}, ["image", "bridgehead", "IDC", "WAN in ÷ size", "LAN upload ÷ size", "LAN upload"].map((t) => h("th", {}, t)))), h("tbody", {}, bh)))
      : h("p", { class: "hint" }, "No bridgehead has moved an image yet.")));
}

// ---------- transfers ----------
function renderTransfers() {
  const t = data.stats.transfers;
  const rows = t.map((x) => h("tr", { "data-peer": x.peer },
    h("td", { "data-label": "image" }, x.image), h("td", { class: "mono", title: x.peer, "data-label": "host" }, short(x.peer)), h("td", { "data-label": "IDC" }, x.idc),
    h("td", { "data-label": "progress" }, h("span", { class: "bar" }, h("span", { style: { width: `${x.percent.toFixed(1)}%` } })), ` ${x.percent.toFixed(1)}%`),
    h("td", { class: "num", "data-label": "chunks" }, `${x.chunks_held}/${x.chunks}`),
    h("td", { class: "num rate", "data-label": "rate" }, x.bytes_per_s === null ? "measuring…" : perS(x.bytes_per_s)),
    h("td", { class: "num eta", "data-label": "ETA" }, x.eta_s === null ? "–" : duration(x.eta_s))));
  $("transfers-table").replaceChildren(h("div", { class: "card" }, h("h2", {}, "Live transfers ", h("span", { class: "hint" }, "(rate over the last few seconds; ETA = what is left at that rate)")),
    t.length ? h("div", { class: "table-wrap" }, h("table", {}, h("thead", {}, h("tr", {}, ["image", "host", "IDC", "progress", "chunks", "rate", "ETA"].map((x) => h("th", {}, x)))), h("tbody", {}, rows)))
      : h("p", { class: "hint" }, "No host is downloading right now.")));
}

// ---------- image management ----------
function wholeField(id, what, optional) {
  const t = $(id).value.trim();
  if (t === "" && optional) return { v: undefined };
  const v = Number(t);
  if (t === "" || !Number.isInteger(v) || v < 0) return { err: `${what} must be a whole number, 0 or more` };
  return { v };
}
$("gc-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const keep = wholeField("gc-keep", "Keep", true), free = wholeField("gc-free", "Free-space target", true);
  $("gc-error").textContent = keep.err || free.err || "";
  if (keep.err || free.err) return;
  if (keep.v === undefined && free.v === undefined) { $("gc-error").textContent = "Give a keep count, a free-space target or both."; return; }
  const body = { policy: $("gc-policy").value, dry_run: $("gc-dry").checked };
  if (keep.v !== undefined) body.keep = keep.v;
  if (free.v !== undefined) body.free_target = free.v;
  if ($("gc-idc").value.trim()) body.idc = $("gc-idc").value.trim();
  try {
    const r = await api("POST", "/api/gc", body);
    const rows = [];
    for (const x of r.hosts) for (const im of x.removed) rows.push(h("tr", {}, h("td", { class: "mono", title: x.peer }, short(x.peer)), h("td", {}, x.idc), h("td", {}, im.image), h("td", { class: "num" }, bytes(im.bytes))));
    const errs = r.hosts.filter((x) => x.error).map((x) => h("p", { class: "error" }, `${short(x.peer)}: ${x.error}`));
    $("gc-result").replaceChildren(h("div", { class: "card" }, h("h2", {}, r.dry_run ? "Would remove" : "Removed"),
      rows.length ? h("div", { class: "table-wrap" }, h("table", {}, h("thead", {}, h("tr", {}, ["host", "IDC", "image", "size"].map((t) => h("th", {}, t)))), h("tbody", {}, rows))) : h("p", { class: "hint" }, "Nothing."), errs));
    if (!r.dry_run) refresh();
  } catch (err) {
    $("gc-error").textContent = err.message;
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
