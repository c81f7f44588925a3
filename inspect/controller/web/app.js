// pouchline line controller: the browser side. No framework, no build step, no CDN.
"use strict";

const state = { me: null, csrf: "", stream: null, review: null, zoom: 1, overlay: true };
const view = () => document.getElementById("view");

// -- helpers --------------------------------------------------------------------------------
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) el.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children.flat()) el.append(child instanceof Node ? child : document.createTextNode(child ?? ""));
  return el;
}
const svgEl = (tag, attrs = {}) => {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  return el;
};
const fmt = (x, digits = 2) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "–");

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  if (options.method && options.method !== "GET") headers["X-CSRF-Token"] = state.csrf;
  const reply = await fetch(path, { ...options, headers, body: options.body === undefined ? undefined : JSON.stringify(options.body) });
  if (reply.status === 401) { showLogin(); throw new Error("not logged in"); }
  if (!reply.ok) {
    let detail = reply.statusText;
    try { detail = (await reply.json()).detail; } catch (_) { /* not JSON */ }
    throw new Error(typeof detail === "string" ? detail : JSON.stringify(detail));
  }
  return reply.status === 204 ? null : reply.json();
}

function render(...nodes) { view().replaceChildren(...nodes.flat()); }

// -- login ----------------------------------------------------------------------------------
function showLogin(message = "") {
  document.getElementById("nav").hidden = true;
  document.getElementById("who").textContent = "";
  const error = h("p", { class: "error", id: "login-error" }, message);
  const form = h("form", { class: "login", onsubmit: async (event) => {
    event.preventDefault();
    const body = { name: form.elements.name.value, password: form.elements.password.value };
    const reply = await fetch("/api/v1/session", { method: "POST", headers: { "Content-Type": "application/json" },
                                                    body: JSON.stringify(body) });
    if (!reply.ok) { error.textContent = (await reply.json()).detail; return; }
    await signedIn(await reply.json());
  } },
    h("h2", {}, "Sign in"),
    h("label", {}, "User", h("input", { name: "name", autocomplete: "username", required: true })),
    h("label", {}, "Password", h("input", { name: "password", type: "password", autocomplete: "current-password", required: true })),
    h("button", { type: "submit" }, "Sign in"), error);
  render(form);
}

async function signedIn(me) {
  state.me = me;
  state.csrf = me.csrf;
  document.getElementById("nav").hidden = false;
  document.getElementById("who").replaceChildren(`${me.name} (${me.role}) `,
    h("button", { onclick: async () => { await api("/api/v1/session", { method: "DELETE" }); showLogin(); } }, "Sign out"));
  route();
}

// -- dashboard ----------------------------------------------------------------------------------
function dashboard() {
  const cards = h("div", { class: "cards", id: "cards" });
  const feed = h("tbody", { id: "feed" });
  const alarms = h("ul", { id: "alarms" });
  render(h("h2", {}, "Line"), cards, h("h3", {}, "Stations"), h("div", { id: "stations" }),
         h("h3", {}, "Latest cells"), h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "cell"), h("th", {}, "lot"),
           h("th", {}, "decision"), h("th", {}, "reasons"))), feed), h("h3", {}, "Alarms"), alarms);
  const stream = new EventSource("/api/v1/stream");
  state.stream = stream;
  stream.addEventListener("summary", (event) => {
    const s = JSON.parse(event.data);
    cards.replaceChildren(
      card("cells / min", s.cells_per_min, "cells-per-min"), card("defect rate, last hour", s.defect_rate_pct === null ? "–" : `${s.defect_rate_pct} %`, "defect-rate"),
      card("cells, last hour", s.cells_last_hour, "cells-hour"), card("open lots", s.open_lots, "open-lots"),
      card("lots on hold", s.held_lots, "held-lots"), card("open alarms", s.open_alarms, "open-alarms"),
      card("review queue", s.review_queue, "review-queue"));
    document.getElementById("stations").replaceChildren(h("table", {}, h("tbody", {}, s.stations.map((st) =>
      h("tr", {}, h("td", {}, st.station), h("td", {}, `${st.cells} cells`),
        h("td", { class: st.age_s !== null && st.age_s < 30 ? "pass" : "reject" },
          st.age_s === null ? "no verdicts" : `last verdict ${st.age_s} s ago`))))),
      h("p", {}, `cameras seen: ${s.cameras.join(", ") || "none"}`),
      h("table", { id: "services" }, h("tbody", {}, s.services.map((v) => h("tr", {}, h("td", {}, `inspection ${v.address}`),
        v.reachable ? h("td", { class: v.workers_alive === v.workers ? "pass" : "reject" },
                        `${v.workers_alive}/${v.workers} workers up, ${v.restarts} restarts, ${v.cells_per_s ?? 0} cells/s`)
                    : h("td", { class: "reject" }, `unreachable: ${v.detail}`))))));
  });
  stream.addEventListener("cell", (event) => {
    const c = JSON.parse(event.data);
    feed.prepend(h("tr", {}, h("td", {}, c.key), h("td", {}, c.lot), h("td", { class: c.decision }, c.decision),
                   h("td", {}, c.reasons.join(", "))));
    while (feed.children.length > 30) feed.lastChild.remove();
  });
  stream.addEventListener("alarm", (event) => {
    const a = JSON.parse(event.data);
    alarms.prepend(h("li", { class: "reject" }, `${a.kind} — ${a.message}`));
  });
}
const card = (label, value, id) => h("div", { class: "card" }, label, h("b", { id }, String(value)));

// -- review queue -------------------------------------------------------------------------------
async function review(params) {
  const filters = h("form", { class: "filters", onsubmit: (e) => { e.preventDefault(); location.hash = "#/review?" +
    new URLSearchParams([...new FormData(filters)].filter(([, v]) => v)).toString(); } },
    h("input", { name: "lot", placeholder: "lot", value: params.get("lot") || "" }),
    h("input", { name: "station", placeholder: "station", value: params.get("station") || "" }),
    h("select", { name: "flag" }, ["", "swollen", "deformed", "anomaly"].map((k) =>
      h("option", { value: k, selected: params.get("flag") === k }, k || "any defect"))),
    h("input", { name: "since", type: "date", value: params.get("since") || "" }),
    h("button", {}, "Filter"));
  const query = new URLSearchParams(params);
  query.set("limit", "1");
  const page = await api(`/api/v1/reviews/queue?${query}`);
  const help = h("p", {}, h("kbd", {}, "c"), " confirm defect ", h("kbd", {}, "f"), " false alarm ", h("kbd", {}, "s"),
                 " skip ", h("kbd", {}, "+"), h("kbd", {}, "-"), " zoom ", h("kbd", {}, "o"), " overlay");
  if (!page.items.length) {
    state.review = null;
    render(h("h2", {}, "Review queue"), filters, h("p", { id: "queue-empty" }, "Nothing waits for review."));
    return;
  }
  const cell = page.items[0];
  state.review = cell;
  const reference = await api(`/api/v1/reviews/reference?station=${encodeURIComponent(cell.station)}`);
  const shot = cell.inspections.find((i) => i.image) || cell.inspections[0];
  render(h("h2", {}, `Review queue — ${page.total} waiting`), filters, help,
    h("div", { class: "review" },
      h("div", {}, h("h3", {}, `Flagged: ${cell.key}`), stage(shot, true)),
      h("div", {}, h("h3", {}, "Reference good cell"), reference ? stage(reference.inspections.find((i) => i.image), false)
        : h("p", {}, "No passed cell with an image yet (audit samples provide them).")),
      h("div", { class: "card", id: "facts" },
        h("p", {}, "Decision: ", h("b", { class: cell.decision }, cell.decision)),
        h("p", {}, "Flags: ", cell.flags.map((f) => h("span", { class: "tag" }, f))),
        h("p", {}, `Swelling: ${fmt(cell.swelling_mm)} mm`),
        h("table", {}, h("tbody", {}, Object.entries(shot.probs).map(([k, v]) =>
          h("tr", {}, h("td", {}, k), h("td", {}, fmt(v, 3)))),
          h("tr", {}, h("td", {}, "anomaly score"), h("td", {}, fmt(shot.anomaly, 1))))),
        h("p", {}, `Model ${shot.model_version || "–"}`),
        h("p", {}, `Lot ${cell.lot}, station ${cell.station}, ${when(cell.t_capture)}`))));
}

function stage(inspection, withOverlay) {
  if (!inspection || !inspection.image) return h("p", {}, "No image stored for this cell.");
  const box = h("div", { class: "stage", id: withOverlay ? "stage" : null, style: `transform: scale(${withOverlay ? state.zoom : 1})` });
  const image = h("img", { src: `/api/v1/images/${inspection.image}`, alt: "cell" });
  box.append(image);
  if (withOverlay) {
    if (inspection.overlay) box.append(h("img", { class: "layer", id: "overlay", src: `/api/v1/images/${inspection.overlay}`,
                                                 alt: "heat map", hidden: !state.overlay }));
    image.addEventListener("load", () => {
      const svg = svgEl("svg", { viewBox: `0 0 ${image.naturalWidth} ${image.naturalHeight}`, id: "regions" });
      if (inspection.cell_corners) svg.append(svgEl("polygon", { class: "cell", points: inspection.cell_corners.map((p) => p.join(",")).join(" ") }));
      for (const region of inspection.regions) svg.append(svgEl("polygon", { class: "region", points: region.map((p) => p.join(",")).join(" ") }));
      box.append(svg);
    });
  }
  return h("div", { class: "viewport" }, box);
}

async function decide(outcome) {
  const cell = state.review;
  if (!cell) return;
  const body = { outcome, kinds: outcome === "confirmed" ? cell.flags.filter((f) => f !== "anomaly") : [] };
  await api(`/api/v1/cells/${cell.key}/review`, { method: "POST", body });
  route();
}

document.addEventListener("keydown", (event) => {
  if (!location.hash.startsWith("#/review") || event.target.closest("input, select, textarea, dialog")) return;
  const actions = { c: () => decide("confirmed"), f: () => decide("false_alarm"), s: () => decide("skipped"),
    "+": () => zoomBy(1.25), "=": () => zoomBy(1.25), "-": () => zoomBy(0.8),
    o: () => { state.overlay = !state.overlay; const layer = document.getElementById("overlay"); if (layer) layer.hidden = !state.overlay; } };
  const action = actions[event.key];
  if (action) { event.preventDefault(); action(); }
});
function zoomBy(factor) {
  state.zoom = Math.min(6, Math.max(0.5, state.zoom * factor));
  const box = document.getElementById("stage");
  if (box) box.style.transform = `scale(${state.zoom})`;
}

// -- lots -------------------------------------------------------------------------------------------
async function lots() {
  const page = await api("/api/v1/lots?limit=100");
  render(h("h2", {}, "Lots"), h("table", { id: "lots" }, h("thead", {}, h("tr", {}, ["lot", "product", "batch", "state",
    "cells", "rejected", "disposition", "reason"].map((t) => h("th", {}, t)))),
    h("tbody", {}, page.items.map((lot) => h("tr", {},
      h("td", {}, h("a", { href: `#/lots/${encodeURIComponent(lot.code)}` }, lot.code)), h("td", {}, lot.product),
      h("td", {}, lot.supplier_batch || "–"), h("td", {}, lot.state), h("td", {}, `${lot.cells} / ${lot.expected_quantity}`),
      h("td", {}, lot.rejected), h("td", { class: lot.disposition }, lot.disposition), h("td", {}, lot.disposition_reason))))));
}

async function lotDetail(code) {
  const lot = await api(`/api/v1/lots/${encodeURIComponent(code)}`);
  const cells = await api(`/api/v1/cells?lot=${encodeURIComponent(code)}&decision=reject&limit=100`);
  const canOverride = state.me && state.me.role !== "operator";
  render(h("h2", {}, `Lot ${lot.code}`),
    h("div", { class: "cards" }, card("disposition", lot.disposition, "lot-disposition"), card("state", lot.state, "lot-state"),
      card("cells", `${lot.cells} / ${lot.expected_quantity}`, "lot-cells"), card("rejected", lot.rejected, "lot-rejected")),
    h("p", { id: "lot-reason" }, lot.disposition_reason),
    canOverride ? h("button", { id: "override", onclick: () => overrideDialog(lot) }, "Override disposition…") : "",
    h("a", { href: `/api/v1/lots/${encodeURIComponent(code)}/cells.csv` }, " Export cells (CSV)"),
    h("h3", {}, "Rejected cells"), h("table", {}, h("tbody", {}, cells.items.map((c) => h("tr", {},
      h("td", {}, c.key), h("td", {}, c.reasons.join(", ")), h("td", {}, fmt(c.swelling_mm)), h("td", {}, c.review_state))))));
}

function overrideDialog(lot) {
  const dialog = document.getElementById("dialog");
  const error = h("p", { class: "error" });
  const form = h("form", { method: "dialog", onsubmit: async (event) => {
    event.preventDefault();
    try {
      await api(`/api/v1/lots/${encodeURIComponent(lot.code)}/override`, { method: "POST",
        body: { disposition: form.elements.disposition.value, reason: form.elements.reason.value } });
      dialog.close();
      route();
    } catch (e) { error.textContent = e.message; }
  } },
    h("h3", {}, `Override lot ${lot.code}`), h("p", {}, `Now: ${lot.disposition} — ${lot.disposition_reason}`),
    h("label", {}, "New disposition ", h("select", { name: "disposition" }, ["accept", "reject", "hold"].map((d) => h("option", { value: d }, d)))),
    h("p", {}, h("label", {}, "Reason (mandatory, recorded in the audit log)", h("br"),
      h("textarea", { name: "reason", rows: 3, cols: 44, required: true, minlength: 5 }))),
    error, h("button", { type: "submit", id: "override-submit" }, "Override"), " ",
    h("button", { type: "button", onclick: () => dialog.close() }, "Cancel"));
  dialog.replaceChildren(form);
  dialog.showModal();
}

// -- SPC ----------------------------------------------------------------------------------------------
async function spcView(params) {
  const products = await api("/api/v1/products");
  const batches = await api("/api/v1/supplier-batches");
  const product = params.get("product") || (products[0] && products[0].name);
  const batch = params.get("batch") || "";
  const pick = h("form", { class: "filters", onchange: () => { location.hash = "#/spc?" + new URLSearchParams([...new FormData(pick)].filter(([, v]) => v)); } },
    h("select", { name: "product" }, products.map((p) => h("option", { value: p.name, selected: p.name === product }, p.name))),
    h("select", { name: "batch" }, h("option", { value: "" }, "all batches"),
      batches.filter((b) => b.product === product).map((b) => h("option", { value: b.code, selected: b.code === batch }, `${b.code} (${b.supplier})`))));
  if (!product) { render(h("h2", {}, "SPC"), h("p", {}, "No products yet.")); return; }
  const data = await api(`/api/v1/spc?product=${encodeURIComponent(product)}${batch ? `&batch=${encodeURIComponent(batch)}` : ""}`);
  const titles = { xbar: `X-bar: mean swelling (mm) per ${data.subgroup} cells`, r: "R: range of swelling (mm)",
                   p: `p: reject rate per ${data.rate_subgroup} cells` };
  render(h("h2", {}, `SPC — ${product}${batch ? ` / ${batch}` : ""}`), pick,
    h("p", {}, `Limits from the product's first ${data.baseline_subgroups} subgroups; red dots break a Western Electric rule.`),
    Object.keys(titles).map((name) => data.charts[name]
      ? h("section", {}, h("h3", {}, titles[name]), chart(data.charts[name]), violations(data.charts[name].violations))
      : h("p", {}, `${titles[name]}: not enough cells yet.`)));
}

function violations(found, shown = 8) {
  const recent = found.slice(-shown).reverse();
  return h("div", {}, h("p", {}, found.length ? `${found.length} rule violations${found.length > shown ? `, the latest ${shown}` : ""}:` : "No rule violations."),
           h("ul", {}, recent.map((v) => h("li", { class: "reject" }, v.message))));
}

function chart(data) {
  const width = 900, height = 240, pad = 30;
  const points = data.points;
  const values = points.flatMap((p) => [p.value, p.ucl, p.lcl]);
  const lo = Math.min(...values), hi = Math.max(...values), span = hi - lo || 1;
  const x = (i) => pad + (i * (width - 2 * pad)) / Math.max(1, points.length - 1);
  const y = (v) => height - pad - ((v - lo) / span) * (height - 2 * pad);
  const line = (key, cls) => svgEl("polyline", { class: cls, points: points.map((p, i) => `${x(i)},${y(key(p))}`).join(" ") });
  const svg = svgEl("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none" });
  svg.append(line((p) => p.ucl, "limit"), line((p) => p.lcl, "limit"), line((p) => p.centre, "centre"),
             line((p) => p.zone2[1], "zone"), line((p) => p.zone2[0], "zone"), line((p) => p.value, "series"));
  const bad = new Set(data.violations.map((v) => v.index));
  points.forEach((p, i) => svg.append(svgEl("circle", { cx: x(i), cy: y(p.value), r: bad.has(i) ? 4 : 2,
                                                         class: bad.has(i) ? "violation" : "" })));
  return svg;
}

// -- cameras and audit ----------------------------------------------------------------------------------
async function live() {
  const stations = await api("/api/v1/cameras");
  const images = [];
  render(h("h2", {}, "Cameras"),
    stations.length ? "" : h("p", {}, "No stations configured (controller setting `stations`)."),
    h("div", { class: "cards" }, stations.flatMap((s) => s.reachable
      ? s.cameras.map((c) => {
          const image = h("img", { class: "live", alt: `${s.station}/${c.name}`, style: "max-width:100%",
                                   "data-src": `/api/v1/cameras/${encodeURIComponent(s.station)}/${encodeURIComponent(c.name)}.jpg` });
          images.push(image);
          return h("div", { class: "card" }, h("h3", {}, `${s.station} / ${c.name}`), image,
                   h("p", { class: c.state === "running" ? "pass" : "reject" }, `${c.state}, ${c.fps} frames/s`));
        })
      : [h("div", { class: "card reject" }, h("h3", {}, s.address), "station unreachable")])));
  const refresh = () => images.forEach((image) => { image.src = `${image.dataset.src}?t=${Date.now()}`; });
  refresh();
  const timer = setInterval(() => (location.hash.startsWith("#/live") ? refresh() : clearInterval(timer)), 1000);
}

async function audit() {
  const page = await api("/api/v1/audit?limit=200");
  render(h("h2", {}, "Audit log"), h("table", { id: "audit" }, h("thead", {}, h("tr", {}, ["when", "who", "what", "subject", "why"].map((t) => h("th", {}, t)))),
    h("tbody", {}, page.items.map((e) => h("tr", {}, h("td", {}, when(e.at)), h("td", {}, e.actor), h("td", {}, e.action),
      h("td", {}, e.subject), h("td", {}, e.reason))))));
}

// -- routing --------------------------------------------------------------------------------------------
async function route() {
  if (state.stream) { state.stream.close(); state.stream = null; }
  if (!state.me) return;
  const [path, query] = location.hash.replace(/^#/, "").split("?");
  const params = new URLSearchParams(query || "");
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.getAttribute("href") === `#${path || "/"}`);
  try {
    if (!path || path === "/") dashboard();
    else if (path === "/review") await review(params);
    else if (path === "/lots") await lots();
    else if (path.startsWith("/lots/")) await lotDetail(decodeURIComponent(path.slice(6)));
    else if (path === "/spc") await spcView(params);
    else if (path === "/live") await live();
    else if (path === "/audit") await audit();
    else render(h("p", {}, "No such page."));
  } catch (error) {
    if (state.me) render(h("p", { class: "error" }, error.message));
  }
}

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", async () => {
  const reply = await fetch("/api/v1/session");
  if (reply.ok) await signedIn(await reply.json());
  else showLogin();
});
