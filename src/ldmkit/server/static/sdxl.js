// SDXL on the web page (uses app.js's $, api, state, showError): the width and height follow the loaded model's
// native size (SDXL 1024, SD1 and SDXL-Turbo 512, SD2-v 768) unless typed over, and with an SDXL base model a
// refiner can be chosen (A1111's refiner_checkpoint / refiner_switch_at; txt2img, hires fix and img2img).
// GET /ldmkit/model says which.
let modelNativeSize = null;  // the loaded model's native size, once known

async function loadModelInfo() {
  try {
    const info = await api("GET", "/ldmkit/model");
    for (const id of ["#width", "#height"]) {
      const el = $(id);
      const untouched = Number(el.value) === (modelNativeSize ?? Number(el.defaultValue));
      if (untouched) el.value = info.native_size;  // a size the user typed stays
    }
    modelNativeSize = info.native_size;
    const sel = $("#refiner_checkpoint");
    const keep = sel.value;
    sel.innerHTML = "";
    sel.add(new Option("None", "None"));
    for (const title of info.refiners) sel.add(new Option(title, title, false, title === keep));
    $("#refiner-section").hidden = info.refiners.length === 0;
  } catch (e) { showError(`could not read the model: ${e.message}`); }
}

// the request's refiner fields: none without a choice, for another model, or for inpainting (not supported)
function refinerFields() {
  const name = $("#refiner_checkpoint").value;
  if ($("#refiner-section").hidden || !name || name === "None" || state.mode === "inpaint") return {};
  return { refiner_checkpoint: name, refiner_switch_at: Number($("#refiner_switch_at").value) };
}
