// MAX300 dashboard. One page for three views, routed on location.pathname:
//   /                  the fleet
//   /devices/{id}      one device's day (?date=YYYY-MM-DD; default: the fleet's today)
//   /commands/{id}     one command
// Every view polls its JSON every 2 s and rebuilds its HTML as one string per refresh: no
// framework, no CDN, nothing fetched but our own API.
"use strict";

const POLL_MS = 2000;
const TOKEN_KEY = "max300-token";

// ---- token: ?token= once, then sessionStorage, sent as a bearer token ----------------------

(function takeToken() {
  const params = new URLSearchParams(location.search);
  const token = params.get("token");
  if (token) {
    sessionStorage.setItem(TOKEN_KEY, token);
    params.delete("token");
    const q = params.toString();
    history.replaceState(null, "", location.pathname + (q ? "?" + q : "") + location.hash);
  }
})();

async function api(path) {
  const headers = { Accept: "application/json" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = "Bearer " + token;
  const res = await fetch(path, { headers, cache: "no-store" });
  if (!res.ok) {
    let msg = res.status + " " + res.statusText;
    try {
      const body = await res.json();
      if (body && body.error) msg = res.status + ": " + body.error;
    } catch (_) { /* not JSON */ }
    const err = new Error(path + ": " + msg);
    err.status = res.status;
    throw err;
  }
  return res.json();
}

// ---- small helpers -------------------------------------------------------------------------

const $ = (sel) => document.querySelector(sel);

function esc(v) {
  if (v === null || v === undefined) return "";
  return String(v).replace(/[&<>"']/g, (c) =>
    ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function num(v, digits) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  return Number(v).toFixed(digits === undefined ? 1 : digits);
}

// Instants arrive as RFC 3339 UTC; they are shown in the fleet's zone, with UTC on hover, and
// with the offset when asked (a clock-change night has the same local hour twice).
function fmtTime(ts, tz, withDate, withOffset) {
  if (!ts) return "–";
  const d = new Date(ts);
  if (Number.isNaN(d.getTime())) return esc(ts);
  const opts = { hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23" };
  if (withDate) Object.assign(opts, { year: "numeric", month: "2-digit", day: "2-digit" });
  if (withOffset && tz && tz !== "UTC") opts.timeZoneName = "shortOffset";
  try {
    if (tz) opts.timeZone = tz;
    return '<span title="' + esc(ts) + '">' + esc(new Intl.DateTimeFormat("en-CA", opts).format(d)) + "</span>";
  } catch (_) {
    return esc(ts);
  }
}

function fmtAge(s) {
  if (s === null || s === undefined) return "never";
  if (s < 120) return Math.round(s) + " s";
  if (s < 5400) return Math.round(s / 60) + " min";
  if (s < 172800) return (s / 3600).toFixed(1) + " h";
  return Math.round(s / 86400) + " d";
}

// Date arithmetic on YYYY-MM-DD, in UTC so no local clock change can shift it.
function addDays(date, n) {
  const [y, m, d] = date.split("-").map(Number);
  const t = new Date(Date.UTC(y, m - 1, d + n));
  return t.toISOString().slice(0, 10);
}

const STATE_CLASS = {
  created: "b-info", sent: "b-info", acknowledged: "b-ok", completed: "b-ok",
  rejected: "b-bad", expired: "b-bad", incomplete: "b-warn", cancelled: "b-off", superseded: "b-off",
};

function stateBadge(state) {
  if (!state) return "";
  return '<span class="badge ' + (STATE_CLASS[state] || "b-off") + '">' + esc(state) + "</span>";
}

const ALERT_TEXT = {
  offline: "offline", plan_missing: "plan missing", late: "late", expired: "expired", fallback: "fallback",
};

function alertBadge(a) {
  const cls = a === "late" || a === "fallback" ? "b-warn" : "b-bad";
  return '<span class="badge ' + cls + '" data-alert="' + esc(a) + '">' + esc(ALERT_TEXT[a] || a) + "</span>";
}

function commandCell(c) {
  if (!c) return '<span class="muted">none</span>';
  let html = '<a href="/commands/' + encodeURIComponent(c.message_id) + '">' + stateBadge(c.state) + "</a>";
  html += ' <span class="muted">v' + esc(c.version) + "</span>";
  if (c.late) html += ' <span class="badge b-warn">late</span>';
  return html;
}

// ---- polling -------------------------------------------------------------------------------

let polls = 0;

// One refresh at a time: the next starts 2 s after the previous one ended, so a slow server
// never gets a pile of overlapping requests.
async function poll(refresh) {
  try {
    await refresh();
    polls += 1;
    $("#error").hidden = true;
    const t = new Date();
    $("#last-updated").textContent =
      "updated " + t.toLocaleTimeString("en-GB", { hourCycle: "h23" }) + " · refresh #" + polls;
  } catch (e) {
    $("#error").hidden = false;
    $("#error").textContent = String(e.message || e) +
      (e.status === 401 ? " — open the page once with ?token=… to give it the API token" : "");
  }
  setTimeout(() => poll(refresh), POLL_MS);
}

// ---- fleet view ----------------------------------------------------------------------------

function fleetView() {
  document.title = "Fleet · MAX300";
  $("#view").innerHTML =
    '<h1>Fleet</h1><div id="summary"></div>' +
    '<div class="toolbar"><input id="filter" type="search" placeholder="filter: device id, mode, alert…" autocomplete="off">' +
    '<span id="shown" class="muted"></span></div>' +
    '<div class="scroll"><table id="fleet">' +
    // Fixed widths: with table-layout fixed the browser lays out 1,000 rows without
    // measuring each one's content on every refresh.
    "<colgroup><col style=width:11%><col style=width:11%><col style=width:7%><col style=width:7%>" +
    "<col style=width:6%><col style=width:9%><col style=width:13%><col style=width:13%><col style=width:9%>" +
    "<col style=width:14%></colgroup><thead><tr>" +
    "<th>Device</th><th>Heartbeat</th><th>Mode</th><th class=num>Rate kW</th><th class=num>SoC %</th>" +
    "<th>Fallback</th><th>Today</th><th>Tomorrow</th><th class=num>Conformance</th><th>Alerts</th>" +
    '</tr></thead><tbody id="fleet-body"></tbody></table></div>';
  let last = null;
  const render = () => {
    if (!last) return;
    const filter = $("#filter").value.trim().toLowerCase();
    renderFleet(last, filter);
  };
  $("#filter").addEventListener("input", render);
  poll(async () => {
    last = await api("/api/fleet");
    render();
  });
}

function renderFleet(f, filter) {
  const s = f.summary || {};
  const a = s.alerts || {};
  const card = (n, label, alert, title) =>
    '<div class="card' + (alert && n > 0 ? " alert" : "") + '"' + (title ? ' title="' + esc(title) + '"' : "") +
    '><div class="n">' + esc(n === undefined ? "–" : n) + '</div><div class="l">' + esc(label) + "</div></div>";
  $("#clock").innerHTML = "fleet time " + fmtTime(f.now, f.timezone, true) + " " + esc(f.timezone) +
    " · today " + esc(f.today) + " · tomorrow " + esc(f.tomorrow);
  $("#summary").innerHTML = '<div class="cards">' +
    card(s.devices, "devices") +
    card(s.online, "online") +
    card(s.problems, "with problems", true) +
    card(a.offline, "offline > " + fmtAge(f.offline_after_s), true,
      "no heartbeat for more than " + f.offline_after_s + " s") +
    card(a.plan_missing, "plan for " + (f.tomorrow || "tomorrow") + " missing", true,
      "no plan for tomorrow after " + f.plan_due_local + " local") +
    card(a.late, "late commands", true) +
    card(a.expired, "expired commands", true) +
    card(a.fallback, "in fallback", true) +
    "</div>";

  const rows = [];
  let shown = 0;
  for (const d of f.devices || []) {
    const alerts = d.alerts || [];
    if (filter) {
      const hay = [d.device_id, d.mode, d.fallback, d.online ? "online" : "offline",
        d.today && d.today.state, d.tomorrow && d.tomorrow.state].concat(alerts).join(" ").toLowerCase();
      if (!hay.includes(filter)) continue;
    }
    shown += 1;
    const c = d.conformance || {};
    const ratio = c.ratio === null || c.ratio === undefined ? "" : " (" + Math.round(c.ratio * 100) + " %)";
    rows.push(
      '<tr data-device-id="' + esc(d.device_id) + '"' + (alerts.length ? ' class="problem"' : "") + ">" +
      '<td><a href="/devices/' + encodeURIComponent(d.device_id) + '">' + esc(d.device_id) + "</a></td>" +
      '<td><span class="dot ' + (d.online ? "on" : "off") + '"></span>' + (d.online ? "online" : "offline") +
      ' <span class="muted" title="last seen ' + esc(d.last_seen || "never") + '">' + fmtAge(d.heartbeat_age_s) + "</span></td>" +
      "<td>" + esc(d.mode || "–") + "</td>" +
      '<td class="num">' + num(d.rate_kw) + "</td>" +
      '<td class="num">' + num(d.soc_pct) + "</td>" +
      "<td>" + (d.fallback ? '<span class="badge b-warn">' + esc(d.fallback) + "</span>" : "") + "</td>" +
      "<td>" + commandCell(d.today) + "</td>" +
      "<td>" + commandCell(d.tomorrow) + "</td>" +
      '<td class="num">' + esc(c.as_planned === undefined ? "–" : c.as_planned + "/" + c.due) + ratio + "</td>" +
      "<td>" + alerts.map(alertBadge).join("") + "</td></tr>");
  }
  $("#fleet-body").innerHTML = rows.join("");
  $("#shown").textContent = shown + " of " + (f.devices || []).length + " shown";
}

// ---- device view ---------------------------------------------------------------------------

function deviceView(id) {
  document.title = id + " · MAX300";
  const params = new URLSearchParams(location.search);
  const date = params.get("date");
  $("#view").innerHTML =
    '<div class="nav"><a href="/">← fleet</a><h1 id="title">' + esc(id) + "</h1>" +
    '<span id="daynav"></span></div><div id="facts" class="facts"></div>' +
    '<h2 id="chart-title">The day</h2><div id="chart"></div><div id="legend" class="legend"></div>' +
    '<div class="cols"><div><h2>Command</h2><div id="command"></div></div>' +
    '<div><h2>Recent reports</h2><div id="reports" class="scroll"></div></div></div>' +
    '<h2>Energy per period</h2><div id="energy" class="scroll"></div>';
  $("#legend").innerHTML = legendHtml();
  const dayPath = "/api/devices/" + encodeURIComponent(id) + "/day" + (date ? "?date=" + encodeURIComponent(date) : "");
  poll(async () => {
    const [day, dev] = await Promise.all([
      api(dayPath),
      api("/api/devices/" + encodeURIComponent(id)).catch(() => null),
    ]);
    renderDevice(id, day, dev);
  });
}

function renderDevice(id, day, dev) {
  const link = (d, label) => '<a href="/devices/' + encodeURIComponent(id) + "?date=" + d + '">' + label + "</a>";
  $("#daynav").innerHTML = link(addDays(day.date, -1), "← " + addDays(day.date, -1)) +
    ' <strong id="day-date">' + esc(day.date) + "</strong> " +
    link(addDays(day.date, 1), addDays(day.date, 1) + " →") +
    ' <a class="muted" href="/devices/' + encodeURIComponent(id) + '">today</a>';
  const facts = [["date", day.date], ["zone", day.timezone], ["periods", day.period_count]];
  if (dev) {
    facts.push(["status", dev.online ? "online" : "offline"], ["last seen", null, fmtTime(dev.last_seen, day.timezone, true)],
      ["mode", dev.mode || "–"], ["rate", num(dev.rate_kw) + " kW"], ["SoC", num(dev.soc_pct) + " %"],
      ["fallback", dev.fallback || "none"]);
  }
  $("#facts").innerHTML = facts.map(([k, v, html]) =>
    "<div><span>" + esc(k) + "</span>" + (html !== undefined ? html : esc(v)) + "</div>").join("");
  $("#chart-title").textContent = "The day: " + day.date + " (" + day.period_count + " periods, " + day.timezone + ")";
  $("#chart").innerHTML = chartSvg(day.periods || []);
  $("#chart").setAttribute("data-period-count", String(day.period_count));
  $("#command").innerHTML = day.command ? commandSummary(day.command, day.timezone) :
    '<p class="muted">No command governs this date.</p>';
  $("#reports").innerHTML = reportsTable(day.reports || [], day.timezone);
  $("#energy").innerHTML = energyTable(day.periods || []);
}

// Status → fill. Pending is hollow-dashed and skipped hatched, so the four states that matter
// most differ by more than hue.
const STATUS = {
  executed: { fill: "#2da44e", label: "executed" },
  failed: { fill: "#cf222e", label: "failed" },
  skipped: { fill: "url(#hatch)", label: "skipped" },
  pending: { fill: "#ddf4ff", stroke: "#0969da", dash: "3 2", label: "pending" },
  unreported: { fill: "#fb8f44", label: "unreported (due, no report)" },
  none: { fill: "#eaeef2", label: "no command" },
};

function svgDefs() {
  return '<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" patternTransform="rotate(45)">' +
    '<rect width="6" height="6" fill="#eaeef2"/><line x1="0" y1="0" x2="0" y2="6" stroke="#6e7781" stroke-width="2.5"/></pattern></defs>';
}

function statusAttrs(status) {
  const s = STATUS[status] || STATUS.none;
  return 'fill="' + s.fill + '"' + (s.stroke ? ' stroke="' + s.stroke + '" stroke-dasharray="' + s.dash + '"' : "");
}

function legendHtml() {
  const items = Object.keys(STATUS).map((k) =>
    '<span><svg width="14" height="14">' + (k === "skipped" ? svgDefs() : "") +
    '<rect x="1" y="1" width="12" height="12" ' + statusAttrs(k) + "/></svg>" + esc(STATUS[k].label) + "</span>");
  items.push('<span><svg width="18" height="14"><line x1="1" y1="7" x2="17" y2="7" stroke="#8250df" stroke-width="2"/></svg>SoC % (right axis)</span>');
  items.push('<span><svg width="18" height="14"><line x1="3" y1="7" x2="15" y2="7" stroke="#1b1f24" stroke-width="2"/></svg>applied kW</span>');
  items.push('<span class="muted">bars: planned kW, charge up, discharge down</span>');
  return items.join("");
}

function niceMax(v) {
  const steps = [10, 20, 25, 50, 75, 100, 150, 200, 250, 300, 500, 1000];
  for (const s of steps) if (v <= s) return s;
  return Math.ceil(v / 500) * 500;
}

// The day's chart, hand-written SVG. Planned kW per period as bars about a zero line (charge
// above, discharge below), a status strip under the plot so idle periods show their state too,
// the applied kW as a tick, and the SoC line on a second axis (0–100 %).
function chartSvg(periods) {
  const n = periods.length;
  const W = 1100, H = 340, L = 52, R = 48, T = 16, B = 70;
  const pw = W - L - R, ph = H - T - B;
  const strip = 10;
  const plotH = ph - strip - 6;
  let maxKw = 0;
  for (const p of periods) {
    maxKw = Math.max(maxKw, Math.abs(p.signed_kw || 0), Math.abs(p.applied_kw || 0));
  }
  const top = niceMax(Math.max(maxKw, 10));
  const yKw = (kw) => T + plotH / 2 - (kw / top) * (plotH / 2);
  const ySoc = (pct) => T + plotH - (pct / 100) * plotH;
  const bw = n ? pw / n : pw;
  const x = (i) => L + i * bw;
  const multiOffset = new Set(periods.map((p) => p.utc_offset)).size > 1;
  const out = ['<svg viewBox="0 0 ' + W + " " + H + '" role="img" aria-label="planned rate per period, status and SoC">', svgDefs()];

  // Grid and axes: kW on the left, SoC on the right.
  for (const f of [-1, -0.5, 0, 0.5, 1]) {
    const y = yKw(f * top);
    out.push('<line class="' + (f === 0 ? "zero" : "grid") + '" x1="' + L + '" x2="' + (W - R) + '" y1="' + y + '" y2="' + y + '"/>');
    out.push('<text x="' + (L - 6) + '" y="' + (y + 4) + '" text-anchor="end">' + Math.round(f * top) + "</text>");
  }
  for (const pct of [0, 50, 100]) {
    out.push('<text x="' + (W - R + 6) + '" y="' + (ySoc(pct) + 4) + '">' + pct + " %</text>");
  }
  out.push('<text x="12" y="' + (T + plotH / 2) + '" transform="rotate(-90 12 ' + (T + plotH / 2) + ')" text-anchor="middle">kW (charge +, discharge −)</text>');
  out.push('<text x="' + (W - 8) + '" y="' + (T + plotH / 2) + '" transform="rotate(90 ' + (W - 8) + " " + (T + plotH / 2) + ')" text-anchor="middle">SoC %</text>');
  out.push('<line class="axis" x1="' + L + '" x2="' + L + '" y1="' + T + '" y2="' + (T + plotH) + '"/>');
  out.push('<line class="axis" x1="' + (W - R) + '" x2="' + (W - R) + '" y1="' + T + '" y2="' + (T + plotH) + '"/>');

  // Periods.
  const stripY = T + plotH + 4;
  periods.forEach((p, i) => {
    const kw = p.signed_kw || 0;
    const y0 = yKw(0), y1 = yKw(kw);
    const gap = Math.min(1.5, bw * 0.15);
    const title = "period " + p.period + " · " + p.local_start + "–" + p.local_end + " (UTC" + p.utc_offset + ")\n" +
      p.mode + " " + num(p.rate_kw) + " kW planned · " + p.status +
      (p.applied_kw !== null && p.applied_kw !== undefined ? " · applied " + num(p.applied_kw) + " kW" : "") +
      (p.soc_pct !== null && p.soc_pct !== undefined ? " · SoC " + num(p.soc_pct) + " %" : "") +
      (p.limited_by ? " · limited by " + p.limited_by : "") + (p.reason ? " · " + p.reason : "") +
      (p.error ? " · error: " + p.error : "");
    out.push('<g data-period="' + p.period + '" data-status="' + esc(p.status) + '"><title>' + esc(title) + "</title>");
    out.push('<rect class="bar" x="' + (x(i) + gap) + '" y="' + Math.min(y0, y1) + '" width="' + Math.max(bw - 2 * gap, 1) +
      '" height="' + Math.max(Math.abs(y1 - y0), kw === 0 ? 0 : 1) + '" ' + statusAttrs(p.status) + "/>");
    out.push('<rect x="' + (x(i) + gap) + '" y="' + stripY + '" width="' + Math.max(bw - 2 * gap, 1) + '" height="' + strip + '" ' +
      statusAttrs(p.status) + "/>");
    if (p.applied_kw !== null && p.applied_kw !== undefined && p.status === "executed") {
      const sign = p.mode === "discharge" ? -1 : 1;
      const ya = yKw(sign * Math.abs(p.applied_kw));
      out.push('<line class="applied" x1="' + (x(i) + bw * 0.2) + '" x2="' + (x(i) + bw * 0.8) + '" y1="' + ya + '" y2="' + ya + '"/>');
    }
    out.push("</g>");
  });

  // Time axis: every 2 h, plus wherever the UTC offset changes and both copies of a repeated
  // hour. On a clock-change day each label carries its offset, so the repeated 01:00 and
  // 01:30 can be told apart (the tooltips say it for every period).
  const labelY = stripY + strip + 14;
  const seen = new Map();
  for (const p of periods) seen.set(p.local_start, (seen.get(p.local_start) || 0) + 1);
  periods.forEach((p, i) => {
    const changed = i > 0 && periods[i - 1].utc_offset !== p.utc_offset;
    // Both copies of a repeated hour get a label, each with its offset.
    const repeated = seen.get(p.local_start) > 1 && p.local_start.endsWith(":00");
    if (i % 4 !== 0 && !changed && !repeated) return;
    const cx = x(i);
    out.push('<line class="axis" x1="' + cx + '" x2="' + cx + '" y1="' + (stripY + strip) + '" y2="' + (stripY + strip + 4) + '"/>');
    out.push('<text x="' + cx + '" y="' + labelY + '" text-anchor="middle">' + esc(p.local_start) + "</text>");
    if (multiOffset) {
      out.push('<text class="offset" x="' + cx + '" y="' + (labelY + 12) + '" text-anchor="middle">' + esc(p.utc_offset) + "</text>");
    }
    if (changed) {
      out.push('<line x1="' + cx + '" x2="' + cx + '" y1="' + T + '" y2="' + (T + plotH) + '" stroke="#bc4c00" stroke-dasharray="4 3"/>');
      out.push('<text x="' + (cx + 4) + '" y="' + (T + 10) + '" fill="#bc4c00">clock change</text>');
    }
  });
  out.push('<text x="' + (L + pw / 2) + '" y="' + (H - 6) + '" text-anchor="middle">local time' +
    (multiOffset ? " (with UTC offset)" : "") + "</text>");

  // SoC line through the periods that have a reading, at each period's middle.
  const pts = [];
  periods.forEach((p, i) => {
    if (p.soc_pct !== null && p.soc_pct !== undefined) pts.push([x(i) + bw / 2, ySoc(p.soc_pct)]);
  });
  if (pts.length > 1) out.push('<polyline class="soc" points="' + pts.map((q) => q[0].toFixed(1) + "," + q[1].toFixed(1)).join(" ") + '"/>');
  for (const q of pts) out.push('<circle class="soc-dot" cx="' + q[0].toFixed(1) + '" cy="' + q[1].toFixed(1) + '" r="2"/>');
  out.push("</svg>");
  return out.join("");
}

// Created, sent, acknowledged and the rest, merged with every publish, in time order.
function timelineHtml(c, tz) {
  const events = (c.history || []).map((h) => ({ at: h.at, html: stateBadge(h.state), cls: "" }));
  (c.sends || []).forEach((at, i) => events.push({
    at, cls: "send", html: i === 0 ? "published" : '<span class="badge b-warn">resend ' + i + "</span>",
  }));
  events.sort((a, b) => String(a.at).localeCompare(String(b.at)));
  return '<ul class="timeline">' + events.map((e) =>
    '<li class="' + e.cls + '">' + fmtTime(e.at, tz, true, true) + " " + e.html + "</li>").join("") + "</ul>";
}

function shaHtml(c) {
  let html = '<code title="sha256 of the plan">' + esc(c.sha256 || "–") + "</code>";
  if (c.acked_sha256) {
    const same = c.acked_sha256 === c.sha256;
    html += '<br>acked: <code>' + esc(c.acked_sha256) + "</code> " +
      (same ? '<span class="badge b-ok">matches</span>' : '<span class="badge b-bad">differs</span>');
  } else {
    html += '<br><span class="muted">not acked yet</span>';
  }
  return html;
}

function commandSummary(c, tz) {
  const sends = c.sends || [];
  return '<div class="facts">' +
    '<div><span>id</span><a href="/commands/' + encodeURIComponent(c.message_id) + '"><code>' + esc(c.message_id) + "</code></a></div>" +
    "<div><span>version</span>" + esc(c.version) + "</div>" +
    "<div><span>state</span>" + stateBadge(c.state) + (c.late ? ' <span class="badge b-warn">late</span>' : "") + "</div>" +
    "<div><span>effective from period</span>" + esc(c.effective_period === null || c.effective_period === undefined ? "–" : c.effective_period) + "</div>" +
    "<div><span>publishes</span>" + esc(c.publishes === undefined ? sends.length : c.publishes) +
    (sends.length > 1 ? " (" + (sends.length - 1) + (sends.length === 2 ? " resend)" : " resends)") : "") + "</div></div>" +
    '<p class="mono">' + shaHtml(c) + "</p>" + timelineHtml(c, tz);
}

function reportsTable(reports, tz) {
  if (!reports.length) return '<p class="muted">No reports for this date yet.</p>';
  return "<table><thead><tr><th>At</th><th class=num>Period</th><th>Status</th><th>Mode</th>" +
    "<th class=num>Planned kW</th><th class=num>Applied kW</th><th class=num>kWh</th><th class=num>SoC %</th><th>Why</th></tr></thead><tbody>" +
    reports.map((r) => "<tr><td>" + fmtTime(r.at, tz, false, true) + '</td><td class="num">' + esc(r.period) + "</td><td>" +
      esc(r.status) + "</td><td>" + esc(r.mode) + '</td><td class="num">' + num(r.rate_kw) + '</td><td class="num">' +
      num(r.applied_kw) + '</td><td class="num">' + num(r.energy_kwh, 2) + '</td><td class="num">' + num(r.soc_pct) +
      "</td><td>" + esc([r.limited_by, r.reason, r.error].filter(Boolean).join(" · ")) + "</td></tr>").join("") +
    "</tbody></table>";
}

function energyTable(periods) {
  let planned = 0, delivered = 0;
  const rows = periods.map((p) => {
    planned += p.planned_kwh || 0;
    delivered += p.delivered_kwh || 0;
    return '<tr data-energy-period="' + p.period + '"><td class="num">' + p.period + "</td><td>" + esc(p.local_start) + "–" +
      esc(p.local_end) + ' <span class="muted">' + esc(p.utc_offset) + "</span></td><td>" + esc(p.mode) +
      '</td><td class="num">' + num(p.signed_kw) + '</td><td class="num">' + num(p.planned_kwh, 2) + '</td><td class="num">' +
      num(p.delivered_kwh, 2) + "</td><td>" + esc(p.status) + '</td><td class="num">' + num(p.applied_kw) +
      '</td><td class="num">' + num(p.soc_pct) + "</td><td>" + esc([p.limited_by, p.reason, p.error].filter(Boolean).join(" · ")) +
      "</td></tr>";
  });
  return "<table><thead><tr><th class=num>Period</th><th>Local time</th><th>Mode</th><th class=num>Planned kW</th>" +
    "<th class=num>Planned kWh</th><th class=num>Delivered kWh</th><th>Status</th><th class=num>Applied kW</th>" +
    "<th class=num>SoC %</th><th>Why</th></tr></thead><tbody>" + rows.join("") + "</tbody>" +
    '<tfoot><tr><td colspan="4">total</td><td class="num">' + num(planned, 2) + '</td><td class="num">' + num(delivered, 2) +
    '</td><td colspan="4"></td></tr></tfoot></table>';
}

// ---- command view --------------------------------------------------------------------------

function commandView(id) {
  document.title = "Command " + id + " · MAX300";
  $("#view").innerHTML = '<div class="nav"><a href="/">← fleet</a><h1>Command <code>' + esc(id) + "</code></h1></div>" +
    '<div id="cmd-head"></div><div class="cols"><div><h2>Timeline (UTC)</h2><div id="cmd-timeline"></div></div>' +
    '<div><h2>Periods (UTC)</h2><div id="cmd-periods" class="scroll"></div></div></div>';
  poll(async () => {
    const c = await api("/api/commands/" + encodeURIComponent(id));
    renderCommand(c);
  });
}

function renderCommand(c) {
  const dayHref = "/devices/" + encodeURIComponent(c.device_id) + "?date=" + encodeURIComponent(c.schedule_date);
  $("#cmd-head").innerHTML = '<div class="facts">' +
    '<div><span>device</span><a href="/devices/' + encodeURIComponent(c.device_id) + '">' + esc(c.device_id) + "</a></div>" +
    '<div><span>date</span><a href="' + dayHref + '">' + esc(c.schedule_date) + "</a> (chart)</div>" +
    "<div><span>version</span>" + esc(c.version) + "</div>" +
    "<div><span>state</span>" + stateBadge(c.state) + (c.late ? ' <span class="badge b-warn">late</span>' : "") + "</div>" +
    "<div><span>effective from period</span>" + esc(c.effective_period === null || c.effective_period === undefined ? "–" : c.effective_period) + "</div>" +
    "<div><span>publishes</span>" + esc(c.publishes === undefined ? "–" : c.publishes) + "</div></div>" +
    '<p class="mono">' + shaHtml(c) + "</p>" +
    (c.warning ? '<div class="warning">' + esc(c.warning) + "</div>" : "");
  $("#cmd-timeline").innerHTML = timelineHtml(c, "UTC");
  const periods = c.periods || [];
  $("#cmd-periods").innerHTML = "<table><thead><tr><th class=num>Period</th><th>Start (UTC)</th><th>Mode</th>" +
    "<th class=num>Planned kW</th><th>Status</th><th class=num>Applied kW</th><th class=num>SoC %</th><th>Reported</th><th>Why</th></tr></thead><tbody>" +
    periods.map((p) => '<tr data-command-period="' + p.period + '" data-status="' + esc(p.status) + '"><td class="num">' + p.period +
      "</td><td>" + esc(p.start) + "</td><td>" + esc(p.mode) + '</td><td class="num">' + num(p.rate_kw) + "</td><td>" +
      esc(p.status) + '</td><td class="num">' + num(p.applied_kw) + '</td><td class="num">' + num(p.soc_pct) + "</td><td>" +
      (p.at ? fmtTime(p.at, "UTC") : "") + "</td><td>" + esc([p.limited_by, p.reason, p.error].filter(Boolean).join(" · ")) +
      "</td></tr>").join("") + "</tbody></table>";
}

// ---- routing -------------------------------------------------------------------------------

(function route() {
  const parts = location.pathname.split("/").filter(Boolean).map(decodeURIComponent);
  if (parts.length === 0) return fleetView();
  if (parts.length === 2 && parts[0] === "devices") return deviceView(parts[1]);
  if (parts.length === 2 && parts[0] === "commands") return commandView(parts[1]);
  $("#view").innerHTML = '<h1>Not found</h1><p><a href="/">The fleet</a></p>';
})();
