// Admin page: polls /admin/jobs every second and renders a table with progress bars.
// The API key comes from the form, or once from the URL fragment (#key=…, which is
// never sent to the server), and lives in sessionStorage for this tab only.
// All text goes through textContent: job fields are user input.
"use strict";

const KEY_SLOT = "realign-admin-key";
const POLL_MS = 1000;

function takeKeyFromFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  const key = params.get("key");
  if (key) {
    sessionStorage.setItem(KEY_SLOT, key);
    history.replaceState(null, "", location.pathname + location.search);
  }
}

function headers() {
  const key = sessionStorage.getItem(KEY_SLOT);
  return key ? { Authorization: "Bearer " + key } : {};
}

async function getJson(path) {
  const response = await fetch(path, { headers: headers(), cache: "no-store" });
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const message = body && body.error ? body.error.message : response.statusText;
    throw new Error(response.status + ": " + message);
  }
  return body;
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text == null ? "" : String(text);
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function progressCell(row, job) {
  const td = cell(row, "");
  const bar = document.createElement("progress");
  const pct = job.status === "succeeded" ? 100 : Math.max(0, Math.min(100, job.progress.percent));
  bar.max = 100;
  bar.value = pct;
  bar.className = "job-progress";
  bar.setAttribute("aria-label", "progress of " + job.id);
  const label = document.createElement("span");
  label.className = "pct";
  label.textContent = pct.toFixed(0) + "%";
  td.append(bar, label);
}

function outcome(job) {
  // a failed sweep keeps its scores (a result without a model): its error comes first
  if (job.error) return job.error.code + ": " + job.error.message;
  if (job.result) return job.result.model_id || job.result.output;
  return job.cancel_requested ? "cancel requested" : "";
}

// The report needs the API key too: fetched here, shown from a blob in a new tab.
function reportLink(jobId) {
  const link = document.createElement("a");
  link.href = "/v1/evals/" + encodeURIComponent(jobId) + "/report";
  link.className = "report-link";
  link.textContent = "report";
  link.addEventListener("click", async (event) => {
    event.preventDefault();
    const tab = window.open("", "_blank");
    const response = await fetch(link.href, { headers: headers(), cache: "no-store" });
    const html = await response.text();
    if (tab) tab.location = URL.createObjectURL(new Blob([html], { type: "text/html" }));
  });
  return link;
}

function renderJobs(list) {
  const body = document.querySelector("#jobs tbody");
  const rows = list.data.map((job) => {
    const row = document.createElement("tr");
    row.className = "job";
    row.dataset.jobId = job.id;
    row.dataset.status = job.status;
    cell(row, job.id).title = job.id;
    cell(row, job.owner);
    cell(row, job.status, "status-" + job.status);
    cell(row, job.stage || "");
    progressCell(row, job);
    cell(row, new Date(job.created_at).toLocaleString());
    const last = cell(row, outcome(job));
    if (job.result && job.result.evaluation) last.append(" ", reportLink(job.id));
    return row;
  });
  body.replaceChildren(...rows);
}

function renderSummary(queue, workers) {
  const depths = Object.entries(queue.queues).map(([q, n]) => q + ": " + n).join(", ");
  const busy = workers.filter((w) => w.current_job).length;
  document.getElementById("summary").textContent =
    "Queues — " + (depths || "none") + " · Workers — " + workers.length + " (" + busy + " busy)";
}

async function refresh() {
  const status = document.getElementById("status");
  try {
    const [jobs, queue, workers] = await Promise.all([
      getJson("/admin/jobs?limit=100"),
      getJson("/admin/queue"),
      getJson("/admin/workers"),
    ]);
    renderJobs(jobs);
    renderSummary(queue, workers);
    status.className = "";
    status.textContent = jobs.total + " jobs · updated " + new Date().toLocaleTimeString();
  } catch (err) {
    status.className = "error";
    status.textContent = "Cannot load jobs (" + err.message + "). Enter an admin API key.";
  }
}

function setUp() {
  takeKeyFromFragment();
  document.getElementById("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = document.getElementById("key");
    if (input.value) sessionStorage.setItem(KEY_SLOT, input.value);
    input.value = "";
    refresh();
  });
  document.getElementById("forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_SLOT);
    refresh();
  });
  refresh();
  setInterval(refresh, POLL_MS);
}

document.addEventListener("DOMContentLoaded", setUp);
