// dicomnode status page. Every value from the node is inserted as text, never as HTML:
// series descriptions and AE titles come from peers.
"use strict";

const state = { token: null, role: null };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined) node.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function when(t) {
  return t ? new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19) + "Z" : "";
}

async function api(path, options) {
  const opts = Object.assign({ headers: {} }, options || {});
  opts.headers["Authorization"] = "Bearer " + state.token;
  if (opts.json !== undefined) {
    opts.method = opts.method || "POST";
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(opts.json);
  }
  const rsp = await fetch(path, opts);
  if (rsp.status === 401) { showLogin(); throw new Error("token refused"); }
  const data = rsp.headers.get("Content-Type").includes("json") ? await rsp.json() : await rsp.text();
  if (!rsp.ok) throw new Error((data && data.error) || rsp.statusText);
  return data;
}

function num(x) {
  return typeof x === "number" && !Number.isInteger(x) ? x.toFixed(3) : x;
}

function table(headers, rows) {
  return el("table", {}, el("tr", {}, headers.map(h => el("th", {}, h))),
            rows.map(r => el("tr", {}, r.map(c => el("td", {}, c)))));
}

function view(...children) {
  const main = document.getElementById("view");
  main.replaceChildren(...children.flat());
}

function studyLink(uid) {
  return el("a", { href: "#study=" + encodeURIComponent(uid), class: "study-link" }, el("code", {}, uid));
}

function studiesTable(studies) {
  return table(["Study", "Patient (hashed)", "State", "Modalities", "Instances", "Last received", "Jobs / results"],
    studies.map(s => [studyLink(s.study_uid), el("code", {}, s.patient_key), s.state,
      s.modalities.join(", "), s.instances, when(s.last_received),
      Object.entries(s.outcome).map(([k, v]) => k + ": " + v).join(", ")]));
}

async function showStudies() {
  const result = el("div", { id: "search-result" });
  const field = el("select", { id: "search-field" },
    el("option", { value: "accession" }, "Accession number"),
    el("option", { value: "patient_id" }, "Patient ID"),
    el("option", { value: "patient_key" }, "Hashed patient key"),
    el("option", { value: "study_uid" }, "Study Instance UID"));
  const input = el("input", { id: "search-input", size: 40 });
  const form = el("form", { class: "inline", id: "search-form", onsubmit: async (e) => {
    e.preventDefault();
    try {
      const found = await api("/api/studies/search", { json: { [field.value]: input.value } });
      result.replaceChildren(found.studies.length ? studiesTable(found.studies) : el("p", {}, "No study found."));
    } catch (err) { result.replaceChildren(el("p", { class: "error" }, err.message)); }
  } }, field, input, el("button", { type: "submit" }, "Search"));
  const recent = await api("/api/studies?limit=50");
  view(el("h2", {}, "Studies"), form, result, el("h3", {}, "Recently received"), studiesTable(recent.studies));
}

async function showStudy(uid) {
  const t = await api("/api/studies/" + encodeURIComponent(uid));
  const steps = el("ol", { class: "timeline", id: "timeline", "data-study": uid },
    t.steps.map(s => el("li", { class: s.status, "data-step": s.step, "data-status": s.status },
      el("span", { class: "step" }, s.step), el("span", { class: "state" }, s.status), " ",
      when(s.at), el("div", {}, s.summary))));
  const parts = [el("h2", {}, "Study ", el("code", {}, uid)), steps];
  if (t.patient) {
    parts.push(el("h3", {}, "Patient"), table(["Name", "ID", "Issuer", "Birth date", "Accession"],
      [[t.patient.PatientName, t.patient.PatientID, t.patient.IssuerOfPatientID, t.patient.PatientBirthDate, t.patient.AccessionNumber]]));
  }
  parts.push(el("h3", {}, "Series"), table(["Series", "Modality", "Description", "From", "Instances", "State", "Why complete"],
    t.series.map(s => [el("code", {}, s.series_uid), s.modality, s.description, s.calling_ae,
      s.instances + (s.expected ? " of " + s.expected : ""), s.state, s.close_reason])));
  parts.push(el("h3", {}, "Routing"), table(["Subject", "Route", "Matched", "Why"],
    t.route_decisions.map(d => [el("code", {}, d.subject_uid), d.route || "-",
      el("span", { class: d.matched ? "match" : "nomatch" }, d.matched ? "yes" : "no"), d.reasons.join("; ")])));
  parts.push(el("h3", {}, "Analyses"), table(["Job", "Route", "Pipeline", "Model", "State", "Attempts", "Duration", "Error"],
    t.jobs.map(j => [j.id, j.route, j.pipeline + (j.summary.version ? " v" + j.summary.version : ""),
      j.models.map(m => m.name + " " + m.version).join(", "), j.state, j.attempts,
      j.duration_s !== null ? j.duration_s.toFixed(1) + " s" : "", j.error || ""])));
  parts.push(el("h3", {}, "Results sent"), table(["Outbox", "Destination", "SOP class", "State", "Attempts", "Status", "Sent", "Error"],
    t.sends.map(s => [s.id, s.destination, el("code", {}, s.sop_class_uid), s.state, s.attempts,
      s.last_status !== null ? "0x" + s.last_status.toString(16).toUpperCase().padStart(4, "0") : "",
      when(s.sent_at), s.last_error || ""])));
  view(parts);
}

async function showQueues() {
  const q = await api("/api/queues");
  const canOperate = state.role === "operator" || state.role === "clinical";
  const retry = (path) => el("button", { onclick: async () => { await api(path, { json: {} }); showQueues(); } }, "Retry");
  const jobs = (rows, withRetry) => table(["Job", "Route", "Pipeline", "Study", "Attempts", "Error", ""],
    rows.map(j => [j.id, j.route, j.pipeline, studyLink(j.study_uid), j.attempts, j.error || "",
      withRetry && canOperate ? retry("/api/jobs/" + j.id + "/retry") : ""]));
  const out = (rows, withRetry) => table(["Outbox", "Destination", "Study", "State", "Attempts", "Status", "Error", ""],
    rows.map(o => [o.id, o.destination, studyLink(o.study_uid), o.state, o.attempts,
      o.last_status !== null ? "0x" + o.last_status.toString(16).toUpperCase() : "", o.last_error || "",
      withRetry && canOperate ? retry("/api/outbox/" + o.id + "/retry") : ""]));
  view(el("h2", {}, "Queues"),
    el("p", {}, Object.entries(q.counts).map(([k, v]) => k + ": " + JSON.stringify(v)).join("  ")),
    el("h3", {}, "Running jobs"), jobs(q.running_jobs, false),
    el("h3", {}, "Pending jobs"), jobs(q.pending_jobs, false),
    el("h3", {}, "Failed jobs"), jobs(q.failed_jobs, true),
    el("h3", {}, "Outbox"), out(q.outbox, false),
    el("h3", { id: "dead-letters" }, "Dead letters"), out(q.dead_letters, true));
}

async function showRoutes() {
  const [routes, series] = await Promise.all([api("/api/routes"), api("/api/series?limit=100")]);
  const result = el("div", { id: "tester-result" });
  const pick = el("select", { id: "tester-series" }, el("option", { value: "" }, "(paste tags below instead)"),
    series.series.map(s => el("option", { value: s.series_uid },
      [s.modality, s.description, s.instances + " inst.", s.series_uid].filter(Boolean).join(" | "))));
  const tags = el("textarea", { id: "tester-tags", placeholder: "Modality: CT\nBodyPartExamined: HEAD\nImageType: ORIGINAL\\PRIMARY\\AXIAL" });
  const form = el("form", { id: "tester-form", onsubmit: async (e) => {
    e.preventDefault();
    try {
      const body = pick.value ? { series_uid: pick.value } : { tags: tags.value };
      const r = await api("/api/routes/test", { json: body });
      result.replaceChildren(
        r.warnings.length ? el("p", { class: "error" }, r.warnings.join("; ")) : "",
        table(["Route", "Level", "Verdict", "Why"], r.routes.map(v => [v.route, v.level,
          el("span", { class: v.matched ? "match" : "nomatch", "data-route": v.route }, v.matched ? "match" : "no match"),
          v.reasons.join("; ")])));
    } catch (err) { result.replaceChildren(el("p", { class: "error" }, err.message)); }
  } }, el("p", {}, "Received series: ", pick), tags, el("button", { type: "submit" }, "Test rules"));
  view(el("h2", {}, "Routes"), table(["Name", "Level", "Pipeline", "Send to", "Conditions"],
    routes.routes.map(r => [r.name, r.level, r.pipeline, r.send_to.join(", "), r.conditions.join("; ")])),
    el("h3", {}, "Rule tester"), form, result);
}

async function showModels() {
  const m = await api("/api/models");
  const where = el("p", {}, m.packages.length ? "Packages in " : "No model package in ",
                   el("code", {}, m.models_dir));
  view(el("h2", {}, "Models"), where, m.packages.map(p => {
    const c = p.card;
    return el("section", { class: "model" }, el("h3", {}, p.package + " " + (c.version || "")),
      el("p", {}, (c.task || "") + " — " + (c.intended_use || c.invalid || "")),
      table(["Metric", "Value", "CI", "Data"], (c.metrics || []).map(x => [x.name, num(x.value),
        x.ci ? "[" + x.ci.map(num).join(", ") + "]" : "", x.dataset || ""])),
      table(["Operating point", "Threshold", "Sensitivity", "Specificity"], (c.operating_points || []).map(o =>
        [o.name, num(o.threshold), num(o.sensitivity), num(o.specificity)])),
      el("p", {}, "sha256 ", el("code", {}, c.sha256 || "")));
  }));
}

async function showAudit() {
  const a = await api("/api/audit?limit=200");
  view(el("h2", {}, "Audit trail"), el("p", {}, el("a", { href: "#audit", onclick: async (e) => {
    e.preventDefault();
    const xml = await api("/api/audit?format=atna&limit=1000");
    view(el("h2", {}, "DICOM audit messages"), el("pre", {}, xml));
  } }, "Show as DICOM audit messages (ATNA)")),
    table(["#", "When", "Kind", "Outcome", "Detail"], a.records.slice().reverse().map(r =>
      [r.id, when(r.at), r.kind, r.outcome, el("code", {}, JSON.stringify(r.detail))])));
}

function showLogin() {
  document.getElementById("login").hidden = false;
}

async function route() {
  const hash = new URLSearchParams(location.hash.slice(1));
  const tab = location.hash.slice(1).split("=")[0] || "studies";
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.tab === tab);
  try {
    if (hash.get("study")) await showStudy(hash.get("study"));
    else if (tab === "queues") await showQueues();
    else if (tab === "routes") await showRoutes();
    else if (tab === "models") await showModels();
    else if (tab === "audit") await showAudit();
    else await showStudies();
  } catch (err) { view(el("p", { class: "error" }, err.message)); }
}

async function start() {
  // a token handed over in the fragment (never sent to the server) is kept for the tab only
  const hash = new URLSearchParams(location.hash.slice(1));
  if (hash.get("token")) {
    sessionStorage.setItem("dicomnode-token", hash.get("token"));
    hash.delete("token");
    history.replaceState(null, "", location.pathname + (hash.toString() ? "#" + hash.toString() : ""));
  }
  state.token = sessionStorage.getItem("dicomnode-token");
  document.getElementById("login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem("dicomnode-token", document.getElementById("token-input").value);
    location.reload();
  });
  if (!state.token) { showLogin(); return; }
  try {
    const me = await api("/api/whoami");
    state.role = me.role;
    document.getElementById("who").textContent = me.name + " (" + me.role + ")";
  } catch (err) { return; }
  window.addEventListener("hashchange", route);
  await route();
  document.body.dataset.ready = "1";
}

start();
