// ldmkit web page: a thin client of the A1111-compatible API (/sdapi/v1). No dependencies, works offline.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { mode: "txt2img", running: false, initDataUrl: null, taskId: null, lastPreview: null,
  promptFocused: false };

// ------------------------------------------------------------------ API helpers

async function api(method, path, body) {
  const res = await fetch(path, {
    method,
    headers: body === undefined ? {} : { "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = text; }
  if (!res.ok) throw new Error(errorMessage(res.status, data));
  return data;
}

function errorMessage(status, data) {
  const detail = data && data.detail !== undefined ? data.detail : data;
  if (Array.isArray(detail)) {  // FastAPI validation errors: name the field
    return detail.map((d) => `${(d.loc || []).filter((p) => p !== "body").join(".") || "request"}: ${d.msg}`)
      .join("\n");
  }
  return `HTTP ${status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`;
}

function showError(msg) {
  const el = $("#error");
  el.textContent = msg || "";
  el.hidden = !msg;
}

// ------------------------------------------------------------------ setup: samplers, schedules, models

async function loadChoices() {
  try {
    const [samplers, schedulers] = await Promise.all([api("GET", "/sdapi/v1/samplers"),
      api("GET", "/sdapi/v1/schedulers")]);
    const s = $("#sampler_name");
    for (const item of samplers) s.add(new Option(item.name, item.name, false, item.name === "DPM++ 2M"));
    const sc = $("#scheduler");
    sc.innerHTML = "";
    for (const item of schedulers) sc.add(new Option(item.label, item.name));
  } catch (e) { showError(`could not load samplers: ${e.message}`); }
  await Promise.all([loadModels(), loadVaes(), loadUpscalers(), loadLoras(), loadEmbeddings(),
    typeof loadModelInfo === "function" ? loadModelInfo() : null]);  // static/sdxl.js: native size, refiner
}

// ------------------------------------------------------------------ LoRAs and embeddings (--lora-dir, --embeddings-dir)

// insert text into the prompt at its cursor (the end while the prompt has never been focused), space-separated
function insertIntoPrompt(text) {
  const ta = $("#prompt");
  const value = ta.value;
  const start = state.promptFocused ? ta.selectionStart : value.length;
  const end = state.promptFocused ? ta.selectionEnd : value.length;
  const before = value.slice(0, start), after = value.slice(end);
  const lead = before && !/[\s,(]$/.test(before) ? " " : "";
  const tail = after && !/^[\s,)]/.test(after) ? " " : "";
  ta.value = before + lead + text + tail + after;
  const cursor = (before + lead + text).length;
  ta.focus();
  ta.setSelectionRange(cursor, cursor);
  ta.dispatchEvent(new Event("input", { bubbles: true }));
}
$("#prompt").addEventListener("focus", () => { state.promptFocused = true; });

// one button per name; file names only ever reach the page as text (textContent, title), never as markup
function fillNetworkList(list, items, emptyText) {
  list.replaceChildren();
  if (!items.length) {
    list.append(Object.assign(document.createElement("span"), { className: "empty", textContent: emptyText }));
    return;
  }
  for (const item of items) {
    const b = Object.assign(document.createElement("button"),
      { type: "button", textContent: item.label, title: item.title, disabled: !item.insert });
    b.dataset.name = item.label;
    if (item.insert) b.addEventListener("click", () => insertIntoPrompt(item.insert));
    list.append(b);
  }
  filterNetworks();
}

function filterNetworks() {
  const needle = $("#network-filter").value.trim().toLowerCase();
  for (const b of document.querySelectorAll(".network-list button")) {
    b.hidden = Boolean(needle) && !b.dataset.name.toLowerCase().includes(needle);
  }
}
$("#network-filter").addEventListener("input", filterNetworks);

async function loadLoras() {
  try {
    const loras = await api("GET", "/sdapi/v1/loras");
    loras.sort((a, b) => a.name.localeCompare(b.name));
    fillNetworkList($("#lora-list"), loras.map((l) => ({ label: l.name, insert: `<lora:${l.name}:1>`,
      title: l.alias && l.alias !== l.name ? `${l.alias} (${l.path})` : l.path })),
    "none (ldmkit serve --lora-dir DIR)");
  } catch (e) { showError(`could not load LoRAs: ${e.message}`); }
}

async function loadEmbeddings() {
  try {
    const { loaded, skipped } = await api("GET", "/sdapi/v1/embeddings");
    const vectors = (n) => `${n} vector${n === 1 ? "" : "s"}`;
    const items = [
      ...Object.entries(loaded).map(([name, e]) => ({ label: name, insert: name,
        title: `${vectors(e.vectors)}, width ${e.shape}` })),
      ...Object.entries(skipped).map(([name, e]) => ({ label: name, insert: null,
        title: e.error ? `not loaded: ${e.error}` : `not for this model (width ${e.shape})` })),
    ].sort((a, b) => a.label.localeCompare(b.label));
    fillNetworkList($("#embedding-list"), items, "none (ldmkit serve --embeddings-dir DIR)");
  } catch (e) { showError(`could not load embeddings: ${e.message}`); }
}

for (const [kind, load] of [["loras", loadLoras], ["embeddings", loadEmbeddings]]) {
  $(`#refresh-${kind}`).addEventListener("click", async (ev) => {
    ev.preventDefault();  // a button inside <summary>: refresh without toggling the section
    try { await api("POST", `/sdapi/v1/refresh-${kind}`); } catch (e) { showError(e.message); }
    await load();
  });
}

// hires fix: A1111's latent modes, then the server's upscalers (None, Lanczos, Nearest, its --upscaler-dir files)
const LATENT_MODES = ["Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
  "Latent (nearest)", "Latent (nearest-exact)"];
async function loadUpscalers() {
  const sel = $("#hr_upscaler");
  sel.innerHTML = "";
  for (const name of LATENT_MODES) sel.add(new Option(name, name));
  try {
    for (const u of await api("GET", "/sdapi/v1/upscalers")) sel.add(new Option(u.name, u.name));
  } catch (e) { showError(`could not load upscalers: ${e.message}`); }
}

async function loadModels() {
  try {
    const [models, options] = await Promise.all([api("GET", "/sdapi/v1/sd-models"),
      api("GET", "/sdapi/v1/options")]);
    const sel = $("#model");
    sel.innerHTML = "";
    for (const m of models) sel.add(new Option(m.title, m.title, false, m.title === options.sd_model_checkpoint));
  } catch (e) { showError(`could not load models: ${e.message}`); }
}

async function loadVaes() {
  try {
    const [vaes, options] = await Promise.all([api("GET", "/sdapi/v1/sd-vae"), api("GET", "/sdapi/v1/options")]);
    const sel = $("#sd_vae");
    sel.innerHTML = "";
    for (const name of ["Automatic", ...vaes.map((v) => v.model_name)]) {
      sel.add(new Option(name, name, false, name === options.sd_vae));
    }
    $("#show_progress_type").value = options.show_progress_type;
  } catch (e) { showError(`could not load VAEs: ${e.message}`); }
}

// the VAE and the preview kind are server options, as in A1111: they apply to the following requests
for (const id of ["sd_vae", "show_progress_type"]) {
  $(`#${id}`).addEventListener("change", async (ev) => {
    try { await api("POST", "/sdapi/v1/options", { [id]: ev.target.value }); } catch (e) { showError(e.message); }
    await loadVaes();
  });
}

$("#model").addEventListener("change", async (ev) => {
  const status = $("#model-status");
  status.textContent = "loading…";
  try {
    await api("POST", "/sdapi/v1/options", { sd_model_checkpoint: ev.target.value });
    status.textContent = "";
  } catch (e) { status.textContent = ""; showError(e.message); }
  await Promise.all([loadModels(), loadEmbeddings(),  // which embeddings fit depends on the model
    typeof loadModelInfo === "function" ? loadModelInfo() : null]);  // its native size and refiners
});

// ------------------------------------------------------------------ modes and the init image / mask canvas

function setMode(mode) {
  state.mode = mode;
  for (const b of document.querySelectorAll(".tabs button")) b.classList.toggle("active", b.dataset.mode === mode);
  $("#init-section").hidden = mode === "txt2img";
  $("#hires-section").hidden = mode !== "txt2img";
  $("#mask-tools").hidden = mode !== "inpaint";
  $("#mask-canvas").classList.toggle("off", mode !== "inpaint");
}
for (const b of document.querySelectorAll(".tabs button")) b.addEventListener("click", () => setMode(b.dataset.mode));

$("#denoising_strength").addEventListener("input", (ev) => { $("#strength-value").textContent = ev.target.value; });
$("#random-seed").addEventListener("click", () => { $("#seed").value = -1; });
$("#enable_hr").addEventListener("change", (ev) => { if (ev.target.checked) $("#hires-section").open = true; });

function setInitImage(dataUrl) {
  const img = new Image();
  img.onload = () => {
    const ic = $("#init-canvas"), mc = $("#mask-canvas");
    ic.width = mc.width = img.naturalWidth;
    ic.height = mc.height = img.naturalHeight;
    ic.getContext("2d").drawImage(img, 0, 0);
    mc.getContext("2d").clearRect(0, 0, mc.width, mc.height);
    $("#canvas-wrap").hidden = false;
    state.initDataUrl = dataUrl;
  };
  img.src = dataUrl;
}

$("#init-file").addEventListener("change", (ev) => {
  const file = ev.target.files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => setInitImage(reader.result);
  reader.readAsDataURL(file);
});

(function maskBrush() {
  const mc = $("#mask-canvas");
  const ctx = mc.getContext("2d");
  let last = null;
  const toCanvas = (ev) => {
    const r = mc.getBoundingClientRect();
    return { x: (ev.clientX - r.left) * mc.width / r.width, y: (ev.clientY - r.top) * mc.height / r.height,
      scale: mc.width / r.width };
  };
  const stroke = (from, to) => {
    ctx.globalCompositeOperation = $("#erase").checked ? "destination-out" : "source-over";
    ctx.strokeStyle = "#fff";
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.lineWidth = Number($("#brush").value) * to.scale;
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x, to.y);
    ctx.stroke();
  };
  mc.addEventListener("pointerdown", (ev) => {
    mc.setPointerCapture(ev.pointerId);
    last = toCanvas(ev);
    stroke(last, last);
  });
  mc.addEventListener("pointermove", (ev) => {
    if (!last) return;
    const p = toCanvas(ev);
    stroke(last, p);
    last = p;
  });
  for (const t of ["pointerup", "pointercancel"]) mc.addEventListener(t, () => { last = null; });
  $("#clear-mask").addEventListener("click", () => ctx.clearRect(0, 0, mc.width, mc.height));
})();

function maskDataUrl() {
  // white strokes on black, as A1111's API expects: white is repainted
  const mc = $("#mask-canvas");
  const out = document.createElement("canvas");
  out.width = mc.width;
  out.height = mc.height;
  const ctx = out.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.drawImage(mc, 0, 0);
  return out.toDataURL("image/png");
}

// ------------------------------------------------------------------ generation, progress, gallery

function requestBody() {
  const num = (id) => Number($(id).value);
  const body = {
    prompt: $("#prompt").value, negative_prompt: $("#negative_prompt").value,
    sampler_name: $("#sampler_name").value || "DPM++ 2M", scheduler: $("#scheduler").value || "automatic",
    steps: num("#steps"), cfg_scale: num("#cfg_scale"), width: num("#width"), height: num("#height"),
    seed: num("#seed"), batch_size: num("#batch_size"), n_iter: num("#n_iter"), tiling: $("#tiling").checked,
  };
  const deepcache = num("#deepcache");  // a per-request override; anything but 1 goes to the server to check
  if (deepcache !== 1) body.override_settings = { ...(body.override_settings || {}), deepcache_interval: deepcache };
  if (state.mode === "txt2img" && $("#enable_hr").checked) {
    Object.assign(body, { enable_hr: true, hr_upscaler: $("#hr_upscaler").value, hr_scale: num("#hr_scale"),
      hr_second_pass_steps: num("#hr_second_pass_steps"), denoising_strength: num("#hr_denoising_strength"),
      hr_resize_x: num("#hr_resize_x"), hr_resize_y: num("#hr_resize_y") });
  }
  if (state.mode !== "txt2img") {
    if (!state.initDataUrl) throw new Error("choose an init image first");
    body.init_images = [state.initDataUrl];
    body.denoising_strength = num("#denoising_strength");
    if (state.mode === "inpaint") body.mask = maskDataUrl();
  }
  if (typeof refinerFields === "function") Object.assign(body, refinerFields());  // static/sdxl.js
  const unit = typeof controlnetUnit === "function" ? controlnetUnit() : null;  // static/controlnet.js
  if (unit) body.alwayson_scripts = { controlnet: { args: [unit] } };
  return body;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// live previews come as PNG, JPEG or WebP (the option live_previews_image_format): tell them by their first bytes
function previewMime(b64) {
  if (b64.startsWith("/9j/")) return "image/jpeg";
  if (b64.startsWith("UklGR")) return "image/webp";
  return "image/png";
}

async function pollProgress(taskId) {
  const bar = $("#progress"), text = $("#progress-text"), preview = $("#preview");
  while (state.running && state.taskId === taskId) {
    try {
      const p = await api("GET", "/sdapi/v1/progress");
      const s = p.state;
      if (s.task_id === taskId) {
        bar.value = p.progress;
        const batch = s.job_count > 1 ? `batch ${s.job_no + 1}/${s.job_count}, ` : "";
        text.textContent = `${batch}step ${s.sampling_step}/${s.sampling_steps}` +
          (p.eta_relative > 0 ? `, ${p.eta_relative.toFixed(1)} s left` : "");
        if (p.current_image && p.current_image !== state.lastPreview) {  // the image forming, step by step
          state.lastPreview = p.current_image;
          preview.src = `data:${previewMime(p.current_image)};base64,${p.current_image}`;
          preview.hidden = false;
        }
      } else if (s.task_id) {
        text.textContent = `waiting: another request is running (${s.queued} more queued)`;
      }
    } catch (e) { /* a missed poll is harmless */ }
    await sleep(250);
  }
}

function explainUrl(body, seed, sampler) {
  const q = new URLSearchParams({ prompt: body.prompt, seed, negative_prompt: body.negative_prompt,
    steps: body.steps, sampler, cfg_scale: body.cfg_scale, width: body.width, height: body.height });
  return `/explain?${q}`;
}

// the infotext's "Prompt warnings" (a JSON-quoted string, as A1111 quotes its fields)
function promptWarnings(infotext) {
  const m = /Prompt warnings: ("(?:[^"\\]|\\.)*")/.exec(infotext || "");
  if (!m) return null;
  try { return `warning: ${JSON.parse(m[1])}`; } catch (e) { return `warning: ${m[1]}`; }
}

function addResults(result, body) {
  const info = JSON.parse(result.info);
  const batch = document.createDocumentFragment();  // newest request first, its images in order
  result.images.forEach((b64, i) => {
    const url = `data:image/png;base64,${b64}`;
    const seed = info.all_seeds[i];
    const fig = document.createElement("figure");
    fig.className = "result";
    const img = document.createElement("img");
    img.src = url;
    img.alt = body.prompt;
    const cap = document.createElement("figcaption");
    const pre = document.createElement("pre");
    pre.className = "infotext";
    pre.textContent = info.infotexts[i];
    const links = document.createElement("div");
    links.className = "links";
    const explain = Object.assign(document.createElement("a"),
      { href: explainUrl(body, seed, info.sampler_name), target: "_blank", rel: "noopener",
        textContent: "explain", className: "explain" });
    if (body.alwayson_scripts && typeof explainControlNet === "function") {  // the units go along (controlnet.js)
      explain.addEventListener("click", (ev) => { ev.preventDefault(); explainControlNet(body, seed); });
    }
    const download = Object.assign(document.createElement("a"),
      { href: url, download: `ldmkit-${seed}.png`, textContent: "download" });
    const reuse = Object.assign(document.createElement("button"), { type: "button", textContent: "use as init image" });
    reuse.addEventListener("click", () => { setInitImage(url); if (state.mode === "txt2img") setMode("img2img"); });
    const again = Object.assign(document.createElement("button"), { type: "button", textContent: "reuse seed" });
    again.addEventListener("click", () => { $("#seed").value = seed; });
    links.append(explain, download, reuse, again);
    const warning = promptWarnings(info.infotexts[i]);  // e.g. an unknown <lora:NAME>: generation went on without it
    if (warning) cap.append(Object.assign(document.createElement("div"), { className: "warning", textContent: warning }));
    cap.append(pre, links);
    fig.append(img, cap);
    batch.append(fig);
  });
  $("#gallery").prepend(batch);
}

$("#form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  if (state.running) return;
  showError("");
  let body;
  try { body = requestBody(); } catch (e) { showError(e.message); return; }
  const taskId = `task(${Math.random().toString(36).slice(2)}${Date.now().toString(36)})`;
  body.force_task_id = taskId;
  state.running = true;
  state.taskId = taskId;
  $("#generate").disabled = true;
  $("#interrupt").disabled = false;
  $("#progress").value = 0;
  $("#progress-text").textContent = "queued";
  // a cheap preview is 1/8 of the image's size: show every kind at the image's size (up to the CSS limit)
  $("#preview").style.width = `${body.width}px`;
  state.lastPreview = null;
  const t0 = performance.now();
  const polling = pollProgress(taskId);
  let result = null, error = null;
  try {
    const path = state.mode === "txt2img" ? "/sdapi/v1/txt2img" : "/sdapi/v1/img2img";
    result = await api("POST", path, body);
  } catch (e) { error = e; }
  state.running = false;
  await polling;  // so a late poll cannot overwrite the final status
  if (result) {
    addResults(result, body);
    $("#progress").value = 1;
    $("#progress-text").textContent = `done in ${((performance.now() - t0) / 1000).toFixed(1)} s`;
  } else {
    showError(error.message);
    $("#progress-text").textContent = "failed";
  }
  $("#generate").disabled = false;
  $("#interrupt").disabled = true;
});

$("#interrupt").addEventListener("click", () => api("POST", "/sdapi/v1/interrupt").catch((e) => showError(e.message)));

setMode("txt2img");
loadChoices();
