// The lab page: each panel asks the server for numbers and draws them. Nothing is computed
// here but formatting; `window.lab` keeps the last responses (the browser tests read them).
"use strict";

const lab = {info: null, rank: null, memory: null, train: {events: []}, library: null,
             answer: null, family: null};
window.lab = lab;

const $ = id => document.getElementById(id);
const int = n => Math.round(n).toLocaleString("en-US");
const GiB = 1024 ** 3;

function bytes(n) {
  if (n >= GiB) return (n / GiB).toFixed(2) + " GiB";
  if (n >= 1024 ** 2) return (n / 1024 ** 2).toFixed(2) + " MiB";
  if (n >= 1024) return (n / 1024).toFixed(1) + " KiB";
  return n + " B";
}

function setNumber(el, value, shown) {
  el.dataset.value = value;
  el.textContent = shown;
}

async function api(path, body) {
  const init = body === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json"},
                                          body: JSON.stringify(body)};
  const response = await fetch(path, init);
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || data.detail || response.statusText);
  return data;
}

function debounce(fn, ms) {
  let timer = null;
  return (...args) => { clearTimeout(timer); timer = setTimeout(() => fn(...args), ms); };
}

// -- tabs ------------------------------------------------------------------------------------
function show(panel) {
  document.querySelectorAll(".panel").forEach(p => p.classList.toggle("active", p.id === "panel-" + panel));
  document.querySelectorAll(".tab").forEach(t => t.classList.toggle("active", t.dataset.panel === panel));
  location.hash = panel;
}

// -- Rank --------------------------------------------------------------------------------------
let rankRequest = 0;

function chosenTargets() {
  if ($("targets-all").checked) return "all-linear";
  return [...document.querySelectorAll("input[name=target]:checked")].map(c => c.value).join(",");
}

async function updateRank() {
  const rank = +$("rank-slider").value, targets = chosenTargets();
  $("rank-value").textContent = rank;
  if (!targets) return;
  const ticket = ++rankRequest;
  const data = await api(`/api/rank?rank=${rank}&targets=${encodeURIComponent(targets)}`);
  if (ticket !== rankRequest) return;  // a newer slider position is on its way
  lab.rank = data;
  setNumber($("rank-adapter-params"), data.adapter_params, int(data.adapter_params));
  setNumber($("rank-model-params"), data.model_params, int(data.model_params));
  setNumber($("rank-percent"), data.percent, data.percent.toFixed(3) + "%");
  setNumber($("rank-size"), data.adapter_bytes, bytes(data.adapter_bytes));
  charts.hbars($("rank-bars"), [{label: "full model", value: data.model_params},
                                {label: `LoRA r=${data.rank}`, value: data.adapter_params}], int);
  const body = $("rank-rows").querySelector("tbody");
  body.innerHTML = "";
  for (const row of data.rows) {
    const tr = body.insertRow();
    [row.module_type, row.modules, int(row.adapter_params), int(row.base_params),
     (100 * row.adapter_params / row.base_params).toFixed(2) + "%"].forEach(v => tr.insertCell().textContent = v);
  }
  const ex = data.example;
  $("rank-example-shape").textContent = `${ex.out_features}×${ex.in_features}`;
  $("rank-example-rank").textContent = ex.rank;
  setNumber($("rank-example-lora"), ex.lora_params, int(ex.lora_params));
  setNumber($("rank-example-full"), ex.full_params, int(ex.full_params));
  setNumber($("rank-example-ratio"), ex.ratio, int(ex.ratio));
  document.body.dataset.rankReady = `${rank}:${targets}`;
}

function setupRank(info) {
  const box = $("rank-targets");
  for (const name of info.targets) {
    const label = document.createElement("label");
    label.innerHTML = `<input type="checkbox" name="target" value="${name}"> ${name}`;
    box.appendChild(label);
  }
  for (const name of ["q_proj", "v_proj"]) {
    const c = box.querySelector(`input[value=${name}]`);
    if (c) c.checked = true;
  }
  if (!box.querySelector("input[name=target]:checked")) $("targets-all").checked = true;
  const later = debounce(updateRank, 80);
  $("rank-slider").addEventListener("input", () => { $("rank-value").textContent = $("rank-slider").value; later(); });
  const allLinear = () => box.querySelectorAll("input[name=target]").forEach(c => c.disabled = $("targets-all").checked);
  box.addEventListener("change", () => { allLinear(); updateRank(); });
  allLinear();
  updateRank();
}

// -- Memory ------------------------------------------------------------------------------------
let memoryRequest = 0;
const MEMORY_INPUTS = ["mem-model", "mem-rank", "mem-batch", "mem-seq", "mem-targets", "mem-dtype",
                       "mem-optimizer", "mem-ckpt"];

async function updateMemory() {
  const q = new URLSearchParams({model: $("mem-model").value, rank: $("mem-rank").value,
                                 batch: $("mem-batch").value, seq: $("mem-seq").value,
                                 targets: $("mem-targets").value, dtype: $("mem-dtype").value,
                                 optimizer: $("mem-optimizer").value,
                                 grad_checkpointing: $("mem-ckpt").checked});
  const ticket = ++memoryRequest;
  try {
    const data = await api("/api/memory?" + q);
    if (ticket !== memoryRequest) return;
    lab.memory = data;
    $("mem-error").textContent = "";
    const groups = data.methods.map(m => ({label: m.method, parts: m.parts, peak: m.total}));
    charts.stackedBars($("mem-chart"), groups, data.parts, bytes);
    const table = $("mem-table");
    table.tHead.innerHTML = "<tr><th>method</th><th>trains</th>" +
      data.parts.map(p => `<th>${p}</th>`).join("") + "<th>sum</th><th>peak</th></tr>";
    const body = table.tBodies[0];
    body.innerHTML = "";
    for (const m of data.methods) {
      const tr = body.insertRow();
      tr.dataset.method = m.method;
      tr.insertCell().textContent = m.method;
      setNumber(tr.insertCell(), m.trainable_params, int(m.trainable_params));
      for (const p of data.parts) {
        const td = tr.insertCell();
        td.dataset.part = p;
        setNumber(td, m.parts[p], bytes(m.parts[p]));
      }
      setNumber(tr.insertCell(), m.sum, bytes(m.sum));
      const peak = tr.insertCell();
      peak.className = "peak";
      setNumber(peak, m.total, bytes(m.total));
    }
    document.body.dataset.memoryReady = q.toString();
  } catch (err) {
    $("mem-error").textContent = err.message;
  }
}

function fill(select, choices) {
  for (const choice of choices) {
    const o = document.createElement("option");
    if (typeof choice === "string") { o.value = o.textContent = choice; }
    else { o.value = choice.value; o.textContent = choice.label; }
    select.appendChild(o);
  }
}

function setupMemory(info) {
  const m = info.memory;
  fill($("mem-model"), m.models);
  fill($("mem-targets"), m.targets);
  fill($("mem-dtype"), m.dtypes);
  fill($("mem-optimizer"), m.optimizers);
  const later = debounce(updateMemory, 120);
  for (const id of MEMORY_INPUTS) $(id).addEventListener("input", later);
  updateMemory();
}

// -- Train -------------------------------------------------------------------------------------
let stream = null;

// "model.layers.3.self_attn.q_proj" -> "3 q"
function shortPath(path) {
  const index = path.match(/\.(\d+)\./);
  const leaf = path.split(".").pop().replace(/_proj$/, "");
  return index ? `${index[1]} ${leaf}` : leaf;
}

function drawTrain() {
  const events = lab.train.events;
  const steps = events.length ? events[0].steps : (lab.info ? lab.info.train.steps : 1);
  charts.lineChart($("loss-chart"), events.map(e => [e.step, e.loss]), steps, v => v.toFixed(2));
  if (!events.length) return;
  const last = events[events.length - 1];
  const rows = Object.entries(last.norms).map(([path, value]) => ({label: path, value, short: shortPath(path)}));
  lab.train.normMax = Math.max(lab.train.normMax || 0, ...rows.map(r => r.value));
  charts.columns($("norm-chart"), rows, lab.train.normMax || 1e-3, v => v.toPrecision(2));
  $("train-step").textContent = `${last.step} / ${last.steps}`;
  setNumber($("train-loss"), last.loss, last.loss.toFixed(4));
  setNumber($("train-loss-first"), events[0].loss, events[0].loss.toFixed(4));
  const max = Math.max(...rows.map(r => r.value));
  setNumber($("train-norm-max"), max, max.toPrecision(3));
}

function setTrainState(status) {
  $("train-state").textContent = status.state;
  document.body.dataset.trainState = status.state;
  $("train-error").textContent = status.error || "";
}

function listen() {
  if (stream) stream.close();
  lab.train = {events: [], normMax: 0};
  stream = new EventSource("/api/train/events");
  stream.addEventListener("step", e => { lab.train.events.push(JSON.parse(e.data)); drawTrain(); });
  stream.addEventListener("end", e => { stream.close(); stream = null; setTrainState(JSON.parse(e.data)); });
}

function setupTrain(info) {
  const t = info.train;
  $("train-about").textContent = `LoRA rank ${t.rank} on ${t.targets.join(", ")}, ${t.examples} examples of ` +
    `the toy task (person records to one key=value line), AdamW lr ${t.lr}, ${t.steps} steps, ` +
    `trained on a copy of ${info.model}.`;
  $("train-play").addEventListener("click", async () => {
    // A new run: drop the last run's events now, not when the new stream opens, so nothing
    // reads the old run's steps as the new run's.
    if (!stream) { lab.train = {events: [], normMax: 0}; drawTrain(); }
    const status = await api("/api/train/play", {});
    setTrainState(status);
    if (!stream) listen();
  });
  $("train-pause").addEventListener("click", async () => setTrainState(await api("/api/train/pause", {})));
  $("train-stop").addEventListener("click", async () => setTrainState(await api("/api/train/stop", {})));
  drawTrain();
}

// -- Library -----------------------------------------------------------------------------------
async function busy(label, work) {
  $("lib-busy").textContent = label;
  document.body.dataset.libraryBusy = "1";
  $("lib-error").textContent = "";
  try {
    await work();
  } catch (err) {
    $("lib-error").textContent = err.message;
  } finally {
    $("lib-busy").textContent = "";
    delete document.body.dataset.libraryBusy;
  }
}

function appliedText(applied) {
  if (applied.kind === "merge") return applied.names[0];
  if (applied.kind === "blend") return "blend " + applied.names.map((n, i) => `${applied.weights[i]}·${n}`).join(" + ");
  return "nothing";
}

function drawLibrary(state) {
  lab.library = state;
  $("lib-folder").textContent = state.folder ? `library: ${state.folder}` : "no library (start with --library DIR)";
  const body = $("lib-list").tBodies[0];
  body.innerHTML = "";
  for (const e of state.entries) {
    const tr = body.insertRow();
    const targets = Array.isArray(e.targets) ? e.targets.join(", ") : (e.targets || "");
    [e.name, e.method, e.rank ?? "", targets, bytes(e.size_bytes)].forEach(v => tr.insertCell().textContent = v);
    const button = document.createElement("button");
    button.className = "merge";
    button.dataset.name = e.name;
    button.textContent = "merge";
    button.disabled = !!e.error;
    button.title = e.error;
    button.addEventListener("click", () => busy(`merging ${e.name}…`, async () => {
      drawLibrary(await api("/api/library/merge", {name: e.name}));
      await ask();
    }));
    tr.insertCell().appendChild(button);
    tr.classList.toggle("applied", state.applied.names.includes(e.name));
  }
  $("lib-applied").textContent = appliedText(state.applied);
  for (const id of ["blend-a", "blend-b"]) {
    const select = $(id), keep = select.value;
    select.innerHTML = "";
    for (const e of state.entries.filter(e => e.method === "lora" && !e.error)) {
      const o = document.createElement("option");
      o.value = o.textContent = e.name;
      select.appendChild(o);
    }
    if (keep) select.value = keep;
  }
  if (!$("blend-b").value || $("blend-b").value === $("blend-a").value) {
    if ($("blend-b").options.length > 1) $("blend-b").selectedIndex = 1;
  }
}

async function ask() {
  const data = await api("/api/library/answer", {prompt: $("lib-prompt").value});
  lab.answer = data;
  $("lib-answer-base").textContent = data.base;
  $("lib-answer-current").textContent = data.current;
  $("lib-answer-label").textContent = appliedText(data.applied);
  document.body.dataset.answerFor = appliedText(data.applied);
}

function setupLibrary(info) {
  $("lib-prompt").value = info.prompt;
  $("lib-ask").addEventListener("click", () => busy("answering…", ask));
  $("lib-unmerge").addEventListener("click", () => busy("unmerging…", async () => {
    drawLibrary(await api("/api/library/unmerge", {}));
    await ask();
  }));
  for (const id of ["blend-wa", "blend-wb"]) {
    $(id).addEventListener("input", () => $(id + "-value").textContent = $(id).value);
  }
  $("blend-apply").addEventListener("click", () => busy("blending…", async () => {
    drawLibrary(await api("/api/library/blend", {names: [$("blend-a").value, $("blend-b").value],
                                                 weights: [+$("blend-wa").value, +$("blend-wb").value]}));
    await ask();
  }));
  busy("loading…", async () => drawLibrary(await api("/api/library")));
}

// -- Family ------------------------------------------------------------------------------------
async function setupFamily() {
  const rows = await api("/api/family");
  lab.family = rows;
  const body = $("family-table").tBodies[0];
  for (const row of rows) {
    const tr = body.insertRow();
    for (const key of ["method", "trains", "mergeable", "file format"]) tr.insertCell().textContent = row[key];
  }
}

// -- start -------------------------------------------------------------------------------------
async function start() {
  document.querySelectorAll(".tab").forEach(t => t.addEventListener("click", () => show(t.dataset.panel)));
  show((location.hash || "#rank").slice(1));
  const info = await api("/api/info");
  lab.info = info;
  $("model-name").textContent = info.model;
  setupRank(info);
  setupMemory(info);
  setupTrain(info);
  setupLibrary(info);
  await setupFamily();
  const status = await api("/api/train/status");
  setTrainState(status);
  if (status.run) listen();
  document.body.dataset.ready = "1";
}

start();
