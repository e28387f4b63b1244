// The dashboard: a few views over the public API, routed by the URL's hash (#/jobs, #/jobs/<id>, #/new).
// Every call sends the key the user entered once (kept in localStorage) as Authorization: Bearer.
import { lineChart } from "./chart.js";

const KEY_STORAGE = "masktune.apiKey";
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
// A job that finishes in seconds on a CPU with a small dataset: edit it in the form.
const FAST_CONFIG = { erm: { epochs: 3, batch_size: 64 }, masking: { batch_size: 64 }, preview_count: 2 };
const POLL_MS = 1000;
const METHOD_NAMES = { erm: "ERM", masktune: "MaskTune", erm_last: "ERM (last epoch)", jtt: "JTT", dfr: "DFR" };
const COLORS = { train_loss: "#2563eb", train_accuracy: "#2563eb", val_accuracy: "#dc2626" };

const main = document.getElementById("main");

// ------------------------------------------------------------------------------------- helpers

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== undefined && child !== null && child !== false) node.append(child);  // strings become text nodes
  }
  return node;
}

const fmt = (value, digits = 3) => (typeof value === "number" ? value.toFixed(digits) : "–");
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "–");
const methodName = (key) => METHOD_NAMES[key] ?? key.toUpperCase();

function bytes(n) {
  const units = ["B", "kB", "MB", "GB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

function progressBar(fraction) {
  const pct = Math.round((fraction ?? 0) * 100);
  return h("div", { class: "progress", role: "progressbar", "aria-valuenow": pct, "aria-valuemin": 0, "aria-valuemax": 100 },
           h("div", { class: "progress-fill", style: `width: ${pct}%` }), h("span", {}, `${pct}%`));
}

const statusBadge = (status) => h("span", { class: `badge status-${status}`, "data-status": status }, status);

function newIdempotencyKey() {
  return crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random().toString(16).slice(2)}`;
}

function banner(message) {
  const node = document.getElementById("banner");
  node.textContent = message ?? "";
  node.hidden = !message;
}

// ------------------------------------------------------------------------------------- the key and the API

const storedKey = () => localStorage.getItem(KEY_STORAGE);

function showKeyStatus() {
  const key = storedKey();
  document.getElementById("key-status").hidden = !key;
  document.getElementById("key-hint").textContent = key ? `key …${key.slice(-4)}` : "";
}

function forgetKey() {
  localStorage.removeItem(KEY_STORAGE);
  showKeyStatus();
}

class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail ?? `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

// fetch() with the key; JSON (or a Blob with as: "blob") back, else an ApiError with the problem+json details.
async function api(path, { method = "GET", body, headers = {}, as = "json" } = {}) {
  const key = storedKey();
  const response = await fetch(path, { method, body, headers: { Authorization: `Bearer ${key}`, ...headers } });
  if (!response.ok) {
    const problem = await response.json().catch(() => ({ detail: `${response.status} ${response.statusText}` }));
    if (response.status === 401 && storedKey() === key) {  // (a late answer to a key already replaced changes nothing)
      forgetKey();
      route(problem.detail);
    }
    throw new ApiError(response.status, problem);
  }
  if (response.status === 204) return null;
  return as === "blob" ? response.blob() : response.json();
}

function describe(error) {
  const fields = error.problem?.errors?.map((e) => `${e.loc.join(".")}: ${e.msg}`) ?? [];
  return [error.message, ...fields].join("\n");
}

// ------------------------------------------------------------------------------------- routing

let leaveView = () => {};  // stops the current view's polling and frees its object URLs

function route(keyError) {
  leaveView();
  leaveView = () => {};
  banner(null);
  main.replaceChildren();
  showKeyStatus();
  if (!storedKey()) return keyView(keyError);
  const [, page, id] = location.hash.split("/");
  document.querySelectorAll("[data-nav]").forEach((a) => a.classList.toggle("active", a.dataset.nav === page));
  if (page === "jobs" && id) return jobView(decodeURIComponent(id));
  if (page === "new") return newJobView();
  return jobsView();
}

// A view's poller: calls step() every POLL_MS until step returns false or the view is left.
function poll(step) {
  let timer = null, stopped = false;
  const run = async () => {
    let again = true;
    try {
      again = await step();
    } catch (error) {
      if (!(error instanceof ApiError && error.status === 401)) banner(describe(error));
      if (error instanceof ApiError && error.status === 404) again = false;  // it is not there: asking again won't help
    }
    if (again !== false && !stopped) timer = setTimeout(run, POLL_MS);
  };
  run();
  return () => { stopped = true; clearTimeout(timer); };
}

// ------------------------------------------------------------------------------------- views

function keyView(error) {
  const input = h("input", { type: "password", id: "key-input", autocomplete: "off", placeholder: "mt_…", required: true });
  const message = h("p", { class: "error", id: "key-error" }, error ? `The key was refused: ${error}` : "");
  const form = h("form", { id: "key-form", class: "card narrow" },
    h("h1", {}, "API key"),
    h("p", {}, "Enter your API key once; this browser keeps it (localStorage) until you press Forget key."),
    h("label", { for: "key-input" }, "Key"), input, message,
    h("button", { type: "submit" }, "Use this key"));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    localStorage.setItem(KEY_STORAGE, input.value.trim());
    if (location.hash.startsWith("#/") && location.hash !== "#/") route();
    else location.hash = "#/jobs";  // routes on hashchange
  });
  main.append(form);
  input.focus();
}

function verdictHeadline(verdict) {
  if (!verdict) return "";
  const method = verdict.method ?? "masktune";  // the top-level verdict is MaskTune's, else the first method's
  return h("span", { class: "headline" }, h("span", { class: `badge call-${verdict.call}` }, verdict.call),
           ` ${verdict.split} ${verdict.metric.replaceAll("_", " ")} ${fmt(verdict.erm)} → ${fmt(verdict[method])}`);
}

function jobsView() {
  const body = h("tbody");
  const table = h("table", { id: "jobs", class: "list" },
    h("thead", {}, h("tr", {}, ["Job", "Status", "Stage", "Progress", "Created", "Verdict"].map((c) => h("th", {}, c)))),
    body);
  const empty = h("p", { class: "muted", hidden: true }, "No jobs yet. ", h("a", { href: "#/new" }, "Start one."));
  main.append(h("section", { class: "card" }, h("h1", {}, "Jobs"), table, empty));
  leaveView = poll(async () => {
    const { data } = await api("/v1/jobs?limit=100");
    body.replaceChildren(...data.map((job) => h("tr", { "data-job": job.id },
      h("td", {}, h("a", { href: `#/jobs/${job.id}` }, job.id)),
      h("td", {}, statusBadge(job.status)),
      h("td", {}, job.stage ?? "–"),
      h("td", {}, progressBar(job.progress)),
      h("td", {}, when(job.created_at)),
      h("td", {}, verdictHeadline(job.metrics?.verdict)))));
    empty.hidden = data.length > 0;
    return data.some((job) => !TERMINAL.has(job.status));  // nothing will change once all are finished
  });
}

// The stages a job runs follow its methods (the pipeline's order).
function stagesOf(job) {
  const methods = job.config?.methods ?? ["masktune"];
  return ["prepare", "erm",
    ...(methods.includes("masktune") ? ["saliency", "finetune"] : []),
    ...(methods.includes("jtt") ? ["jtt_identify", "jtt"] : []),
    ...(methods.includes("dfr") ? ["dfr"] : []),
    "evaluate", "export"];
}

function stageSteps(job) {
  const stages = stagesOf(job);
  const current = stages.indexOf(job.stage);
  return h("ol", { class: "stages" }, stages.map((stage, i) => {
    let state = "pending";
    if (job.status === "succeeded" || i < current) state = "done";
    else if (i === current) state = job.status === "running" ? "current" : job.status === "queued" ? "pending" : "stopped";
    return h("li", { class: `stage-${state}`, "data-stage": stage, "data-state": state }, stage);
  }));
}

function epochCharts(events) {
  const epochs = events.filter((e) => e.kind === "epoch").map((e) => e.data);
  const short = { erm: "ERM", finetune: "FT", jtt_identify: "JTT-id", jtt: "JTT" };
  const labels = epochs.map((e) => `${short[e.phase] ?? e.phase} ${e.epoch}`);
  // A dashed line where each phase after ERM starts (finetune, JTT's retraining...).
  const dividers = epochs.flatMap((e, i) => i > 0 && e.phase !== epochs[i - 1].phase ? [{ index: i, caption: e.phase }] : []);
  const series = (key, name) => ({ name, color: COLORS[key], values: epochs.map((e) => e[key] ?? null) });
  // The accuracy axis ends at 1 and starts just below the lowest accuracy, so that close curves stay apart.
  const lowest = Math.min(1, ...epochs.flatMap((e) => [e.train_accuracy, e.val_accuracy]).filter((v) => typeof v === "number"));
  return h("div", { class: "charts" },
    lineChart({ name: "loss", title: "Training loss per epoch", labels, dividers,
                series: [series("train_loss", "train loss")] }),
    lineChart({ name: "accuracy", title: "Accuracy per epoch", labels, dividers, range: [lowest, 1],
                series: [series("train_accuracy", "train"), series("val_accuracy", "val")] }));
}

function eventLog(events) {
  const shown = events.filter((e) => e.kind !== "epoch").slice(-10).reverse();
  return h("ul", { class: "events" }, shown.map((e) => h("li", { class: `event-${e.kind}` },
    h("time", {}, new Date(e.created_at).toLocaleTimeString()), " ", e.stage ? h("b", {}, e.stage) : "", " ", e.message)));
}

// The methods metrics.json holds: top-level keys whose value maps each split to its metrics.
function methodKeys(metrics) {
  const keys = Object.keys(metrics).filter((key) => {
    const splits = Object.values(metrics[key] ?? {});
    return typeof metrics[key] === "object" && splits.length > 0
      && splits.every((m) => m && typeof m === "object" && "overall_accuracy" in m);
  });
  const first = ["erm", "masktune"].filter((k) => keys.includes(k));
  return [...first, ...keys.filter((k) => !first.includes(k))];
}

// Rows of the comparison: [label, path into one split's metrics, count].
function comparisonRows(reference) {
  const byGroup = "per_group" in reference;
  const table = byGroup ? "per_group" : "per_class";
  const subset = byGroup ? "group" : "class";
  return [
    ["Overall accuracy", ["overall_accuracy"], reference.count],
    ...Object.entries(reference[table]).map(([name, row]) => [`${subset} ${name}`, [table, name, "accuracy"], row.count]),
    [`Worst ${subset}`, [`worst_${subset}_accuracy`], null],
    ...(byGroup ? [["Group mean", ["group_mean_accuracy"], null]] : []),
  ];
}

function comparisonTable(metrics, split) {
  const methods = methodKeys(metrics);
  const rows = comparisonRows(metrics.erm[split]);
  return h("table", { class: "comparison", id: "comparison", "data-split": split },
    h("thead", {}, h("tr", {}, h("th", {}, split), h("th", {}, "images"), methods.map((m) => h("th", { "data-method": m }, methodName(m))))),
    h("tbody", {}, rows.map(([label, path, count]) => {
      const values = methods.map((m) => path.reduce((node, key) => node?.[key], metrics[m]?.[split]));
      const numbers = values.filter((v) => typeof v === "number");
      const best = Math.min(...numbers) < Math.max(...numbers) ? Math.max(...numbers) : null;  // bold only a real lead
      return h("tr", { "data-row": path.join("/") }, h("th", {}, label), h("td", { class: "count" }, count ?? ""),
        methods.map((m, i) => h("td", {
          class: `num${values[i] === best ? " best" : ""}`, "data-method": m,
          "data-path": path.join("/"), title: path[0].startsWith("worst_") ? metrics[m]?.[split]?.[path[0].replace("_accuracy", "")] : null,
        }, fmt(values[i]))));
    })));
}

function verdictBox(verdict, masking) {
  const method = verdict.method ?? "masktune";
  const name = METHOD_NAMES[method] ?? method;
  const recommended = verdict.recommended;
  const subset = verdict.metric.replace("worst_", "").replace("_accuracy", "");
  const interval = ([low, high], digits = 2) => `[${fmt(low, digits)}, ${fmt(high, digits)}]`;
  return h("section", { class: `verdict call-${verdict.call}`, id: "verdict", "data-call": verdict.call },
    h("h2", {}, "Verdict ", h("span", { class: `badge call-${verdict.call}`, id: "verdict-call" }, verdict.call)),
    h("p", { id: "verdict-message" }, verdict.message),
    h("dl", {},
      h("dt", {}, `ERM, worst ${subset} on ${verdict.split}`),
      h("dd", {}, `${fmt(verdict.erm)} ${interval(verdict.erm_interval)} (${verdict.erm_worst})`),
      h("dt", {}, `${name}, worst ${subset} on ${verdict.split}`),
      h("dd", {}, `${fmt(verdict[method])} ${interval(verdict[`${method}_interval`])} (${verdict[`${method}_worst`]})`),
      h("dt", {}, "Change"),
      h("dd", {}, `${verdict.change >= 0 ? "+" : ""}${fmt(verdict.change)} ${interval(verdict.change_interval)}`),
      masking ? [h("dt", {}, "Masked training pixels"), h("dd", {}, `${(masking.masked_pixel_fraction * 100).toFixed(1)}%`)] : null,
      recommended ? [h("dt", {}, "Recommended model"),
                     h("dd", { id: "verdict-recommended", "data-method": recommended.method },
                       `${METHOD_NAMES[recommended.method] ?? recommended.method} (${recommended.artifact}): ${recommended.why}`)] : null),
    h("p", { class: "muted small" }, verdict.interval_method));
}

async function saveArtifact(jobId, name) {
  const url = URL.createObjectURL(await api(`/v1/jobs/${jobId}/artifacts/${encodeURIComponent(name)}`, { as: "blob" }));
  const link = h("a", { href: url, download: name });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);  // the download has its bytes by then
}

async function resultsSection(job, objectUrls) {
  // metrics.json has every number; the job's summary has the verdict even if the artifact is gone.
  const metrics = await api(`/v1/jobs/${job.id}/artifacts/metrics.json`);
  const { data: artifacts } = await api(`/v1/jobs/${job.id}/artifacts`);
  const splits = Object.keys(metrics.erm);
  const holder = h("div", {});
  const tabs = h("div", { class: "tabs", role: "tablist" });
  const show = (split) => {
    holder.replaceChildren(comparisonTable(metrics, split));
    tabs.querySelectorAll("button").forEach((b) => b.setAttribute("aria-selected", b.dataset.split === split));
  };
  tabs.append(...splits.map((split) => h("button", { type: "button", role: "tab", "data-split": split, onclick: () => show(split) }, split)));
  show(splits.includes("val") ? "val" : splits[0]);

  const downloads = h("section", { class: "card" }, h("h2", {}, "Downloads"), h("ul", { class: "downloads" }, artifacts.map((a) =>
    h("li", {}, h("button", { type: "button", class: "link", "data-artifact": a.name,
                              onclick: () => saveArtifact(job.id, a.name).catch((e) => banner(describe(e))) }, a.name),
      ` ${bytes(a.size_bytes)}`))));
  const section = h("section", { id: "results" }, h("div", { class: "columns" },
    h("div", {}, verdictBox(metrics.verdict ?? job.metrics.verdict, metrics.masking), downloads),
    h("section", { class: "card" }, h("h2", {}, "ERM vs MaskTune"), tabs, holder)));
  if (artifacts.some((a) => a.name === "previews.png")) {
    const url = URL.createObjectURL(await api(`/v1/jobs/${job.id}/artifacts/previews.png`, { as: "blob" }));
    objectUrls.push(url);
    section.append(h("section", { class: "card" }, h("h2", {}, "What was masked"),
      h("img", { id: "previews", src: url, alt: "Training images with the pixels MaskTune masked" })));
  }
  return section;
}

function jobView(id) {
  const header = h("div", {});
  const charts = h("section", { class: "card" });
  const log = h("section", { class: "card" });
  const results = h("div", {});
  main.append(h("h1", {}, "Job ", h("code", {}, id)), header, charts, results, log);
  const events = [];
  let cursor = null, epochCount = -1, resultsShown = false;
  const objectUrls = [];

  const stopPolling = poll(async () => {
    // The job first, then its events: a terminal status is stored with its last event, so once the
    // status read is terminal the events read after it are complete.
    // Polling rather than the event stream: the progress bar needs the job row anyway (progress is
    // not an event), and fetch() with ?after= resumes where it left off without reconnect logic.
    const job = await api(`/v1/jobs/${encodeURIComponent(id)}`);
    for (;;) {
      const page = await api(`/v1/jobs/${encodeURIComponent(id)}/events?limit=1000${cursor === null ? "" : `&after=${cursor}`}`);
      events.push(...page.data);
      if (page.next_cursor === null || page.data.length < 1000) { cursor = page.next_cursor ?? cursor; break; }
      cursor = page.next_cursor;
    }
    const active = !TERMINAL.has(job.status);
    header.replaceChildren(h("section", { class: "card job-summary" },
      h("p", {}, statusBadge(job.status), " ", job.stage ? `stage ${job.stage}` : "", active && job.status !== "cancelling"
        ? h("button", { type: "button", class: "secondary", id: "cancel", onclick: () => api(`/v1/jobs/${id}/cancel`, { method: "POST" }).catch((e) => banner(describe(e))) }, "Cancel")
        : ""),
      stageSteps(job), progressBar(job.progress),
      job.error ? h("p", { class: "error" }, `${job.error.code}: ${job.error.message}`) : "",
      h("p", { class: "muted small" }, `dataset ${job.dataset_id} · created ${when(job.created_at)} · started ${when(job.started_at)}`
        + ` · finished ${when(job.finished_at)} · attempts ${job.attempts}`)));
    const epochs = events.filter((e) => e.kind === "epoch").length;
    if (epochs !== epochCount) {
      epochCount = epochs;
      charts.replaceChildren(h("h2", {}, "Training"), epochCharts(events));
    }
    log.replaceChildren(h("h2", {}, "Events"), eventLog(events));
    if (job.status === "succeeded" && !resultsShown) {
      resultsShown = true;
      results.replaceChildren(await resultsSection(job, objectUrls));
    }
    return active;
  });
  leaveView = () => { stopPolling(); objectUrls.forEach((url) => URL.revokeObjectURL(url)); };
}

function datasetSummary(dataset) {
  if (dataset.status === "invalid") return h("span", { class: "error" }, dataset.error);
  if (dataset.status !== "ready" || !dataset.summary) return "";
  const { classes = [], splits = {}, groups } = dataset.summary;
  const images = Object.entries(splits).map(([name, s]) => `${name} ${s.images ?? s}`).join(", ");
  return `${classes.length} classes, ${groups ? `${groups.length} groups, ` : ""}images: ${images}`;
}

function newJobView() {
  const file = h("input", { type: "file", id: "dataset-file", accept: ".zip,.tar,.tar.gz,.tgz", required: true });
  const uploadState = h("p", { id: "upload-state", class: "muted" });
  const uploadForm = h("form", { id: "upload-form", class: "card" },
    h("h2", {}, "1. Upload a dataset"),
    h("p", { class: "muted small" }, "A .zip or .tar(.gz): ImageFolder (train/<class>/…, optional val/, test/) or a CSV "
      + "manifest filename,label[,split][,group] at the root. A worker validates it before jobs may use it."),
    file, h("button", { type: "submit", id: "upload" }, "Upload"), uploadState);

  const select = h("select", { id: "dataset-select", required: true });
  const config = h("textarea", { id: "job-config", rows: 8, spellcheck: "false" }, JSON.stringify(FAST_CONFIG, null, 2));
  const start = h("button", { type: "submit", id: "start-job", disabled: true }, "Start job");
  const jobError = h("pre", { class: "error", id: "job-error" });
  const jobForm = h("form", { id: "job-form", class: "card" },
    h("h2", {}, "2. Start a job"),
    h("label", { for: "dataset-select" }, "Dataset (ready ones)"), select,
    h("label", { for: "job-config" }, "Config (JSON; every field has a default, see /docs)"), config,
    start, jobError);
  main.append(h("h1", {}, "New job"), uploadForm, jobForm);

  let idempotencyKey = newIdempotencyKey();  // one per job meant: a resent form makes the same job
  let stopValidation = () => {};
  leaveView = () => stopValidation();

  async function loadDatasets(selected) {
    const { data } = await api("/v1/datasets?limit=100");
    const ready = data.filter((d) => d.status === "ready");
    select.replaceChildren(...ready.map((d) => h("option", { value: d.id, selected: d.id === selected },
      `${d.filename} (${d.id}, ${when(d.created_at)})`)));
    start.disabled = ready.length === 0;
  }
  loadDatasets().catch((e) => banner(describe(e)));

  uploadForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const chosen = file.files[0];
    if (!chosen) return;
    const form = new FormData();
    form.append("file", chosen, chosen.name);
    uploadState.textContent = `uploading ${chosen.name} (${bytes(chosen.size)})…`;
    let dataset;
    try {
      dataset = await api("/v1/datasets", { method: "POST", body: form });
    } catch (error) {
      uploadState.textContent = "";
      banner(describe(error));
      return;
    }
    stopValidation();
    stopValidation = poll(async () => {
      dataset = await api(`/v1/datasets/${dataset.id}`);
      uploadState.replaceChildren(h("code", {}, dataset.id), " ", statusBadge(dataset.status), " ", datasetSummary(dataset));
      if (dataset.status === "validating") return true;
      if (dataset.status === "ready") await loadDatasets(dataset.id);
      return false;
    });
  });

  jobForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    jobError.textContent = "";
    let body;
    try {
      body = JSON.parse(config.value || "{}");
    } catch (error) {
      jobError.textContent = `The config is not valid JSON: ${error.message}`;
      return;
    }
    start.disabled = true;
    try {
      const job = await api("/v1/jobs", { method: "POST", body: JSON.stringify({ ...body, dataset_id: select.value }),
                                          headers: { "Content-Type": "application/json", "Idempotency-Key": idempotencyKey } });
      idempotencyKey = newIdempotencyKey();
      location.hash = `#/jobs/${job.id}`;
    } catch (error) {
      jobError.textContent = describe(error);
      if (error instanceof ApiError) idempotencyKey = newIdempotencyKey();  // refused: no job was made with this key
      start.disabled = false;
    }
  });
}

// ------------------------------------------------------------------------------------- start

document.getElementById("forget-key").addEventListener("click", () => { forgetKey(); route(); });
window.addEventListener("hashchange", () => route());
route();
