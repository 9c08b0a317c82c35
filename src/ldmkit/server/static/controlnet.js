// ldmkit web page: the ControlNet unit (the A1111 extension's API: /controlnet/module_list, model_list, detect).
// Loaded after app.js; app.js's requestBody() adds controlnetUnit() to alwayson_scripts.controlnet.
"use strict";

const cn = { image: null, size: null, image2: null };

async function loadControlNetLists() {
  try {
    const [modules, models] = await Promise.all([api("GET", "/controlnet/module_list"),
      api("GET", "/controlnet/model_list")]);
    const m = $("#cn-module");
    m.innerHTML = "";
    for (const name of modules.module_list) m.add(new Option(name, name));
    const sel = $("#cn-model");
    sel.innerHTML = "";
    if (!models.model_list.length) sel.add(new Option("(none: start the server with --controlnet-dir)", "None"));
    for (const name of models.model_list) sel.add(new Option(name, name));
    for (const [name, why] of Object.entries(models.unreadable || {})) {  // ldmkit's: damaged files, named
      const o = new Option(`${name} (cannot be read: ${why})`, "");
      o.disabled = true;
      sel.add(o);
    }
  } catch (e) { showError(`could not load the ControlNet lists: ${e.message}`); }
}

// a chosen control file read as a data URL: ok(dataUrl, img) once the browser shows it, else bad() and a message
// (a text file named .png, a format the browser cannot show: said, and no image kept)
function readControlFile(ev, ok, bad) {
  const file = ev.target.files[0];
  if (!file) return;
  const reader = new FileReader();
  const unreadable = () => {
    bad();
    showError(`ControlNet: ${file.name} is not an image this browser can read; choose a PNG, JPEG or WebP file`);
  };
  reader.onerror = unreadable;
  reader.onload = () => {
    const img = new Image();
    img.onerror = unreadable;
    img.onload = () => { showError(""); ok(reader.result, img); };
    img.src = reader.result;
  };
  reader.readAsDataURL(file);
}

$("#cn-file").addEventListener("change", (ev) => readControlFile(ev, (data, img) => {
  cn.image = data;
  cn.size = { w: img.naturalWidth, h: img.naturalHeight };
  $("#cn-enabled").checked = true;
  $("#controlnet-section").open = true;
  $("#cn-map").hidden = true;
  $("#cn-status").textContent = `${cn.size.w}×${cn.size.h}`;
}, () => {
  cn.image = null;
  $("#cn-enabled").checked = false;
  $("#cn-map").hidden = true;
  $("#cn-status").textContent = "no control image";
}));

// the second map of a ControlNet Union unit (ldmkit's images)
$("#cn-file2").addEventListener("change", (ev) => readControlFile(ev, (data, img) => {
  cn.image2 = data;
  $("#cn-status2").textContent = `${img.naturalWidth}×${img.naturalHeight}`;
}, () => {
  cn.image2 = null;
  $("#cn-status2").textContent = "none";
}));

$("#cn-clear2").addEventListener("click", () => {
  cn.image2 = null;
  $("#cn-file2").value = "";
  $("#cn-status2").textContent = "none";
});

// the extension's pixel-perfect resolution: the preprocessor runs at the size the output needs
function pixelPerfectRes() {
  const W = Number($("#width").value), H = Number($("#height").value);
  const k0 = H / cn.size.h, k1 = W / cn.size.w;
  const k = $("#cn-resize-mode").value === "Resize and Fill" ? Math.min(k0, k1) : Math.max(k0, k1);
  return Math.round(k * Math.min(cn.size.w, cn.size.h));
}

$("#cn-preview").addEventListener("click", async () => {
  showError("");
  if (!cn.image) { showError("choose a control image first"); return; }
  const res = $("#cn-pixel-perfect").checked ? pixelPerfectRes() : 512;
  $("#cn-status").textContent = "running the preprocessor...";
  try {
    const r = await api("POST", "/controlnet/detect", { controlnet_module: $("#cn-module").value,
      controlnet_input_images: [cn.image], controlnet_processor_res: res });
    const map = $("#cn-map");
    map.src = `data:image/png;base64,${r.images[0]}`;
    map.hidden = false;
    $("#cn-status").textContent = `${$("#cn-module").value} at resolution ${res}`;
  } catch (e) { showError(e.message); $("#cn-status").textContent = "failed"; }
});

// the unit for txt2img/img2img, or null when ControlNet is off
function controlnetUnit() {
  if (!$("#cn-enabled").checked) return null;
  if (!cn.image && state.mode === "txt2img") throw new Error("ControlNet: choose a control image first");
  const num = (id) => Number($(id).value);
  const unit = { enabled: true, module: $("#cn-module").value, model: $("#cn-model").value,
    weight: num("#cn-weight"), guidance_start: num("#cn-start"), guidance_end: num("#cn-end"),
    control_mode: $("#cn-control-mode").value, resize_mode: $("#cn-resize-mode").value,
    pixel_perfect: $("#cn-pixel-perfect").checked, union_control_type: $("#cn-union-type").value };
  if (cn.image) unit.image = cn.image;  // img2img without one: the init image, as the extension does
  if ($("#cn-lllite-batch").value !== "both") unit.lllite_batch = $("#cn-lllite-batch").value;
  if (cn.image2) {  // a Union unit's two maps, each with its own type, weight and steps (ldmkit's fields)
    if (!cn.image) throw new Error("ControlNet: the second map needs a first control image");
    delete unit.image;
    unit.images = [cn.image, cn.image2];
    unit.union_control_type = [unit.union_control_type, $("#cn-union-type2").value];
    unit.weight = [unit.weight, num("#cn-weight2")];
    unit.guidance_start = [unit.guidance_start, num("#cn-start2")];
    unit.guidance_end = [unit.guidance_end, num("#cn-end2")];
  }
  return unit;
}

// the explain page of a result made with a unit: POST /explain with the request (the map is too large for a URL)
async function explainControlNet(body, seed) {
  const win = window.open("about:blank", "_blank");  // opened now, while the click still allows a new window
  try {
    const res = await fetch("/explain", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ ...body, seed, batch_size: 1, n_iter: 1, force_task_id: null }) });
    if (!res.ok) throw new Error(errorMessage(res.status, await res.json().catch(() => null)));
    if (win) win.location = res.url; else window.location = res.url;
  } catch (e) {
    if (win) win.close();
    showError(`explain: ${e.message}`);
  }
}

loadControlNetLists();
