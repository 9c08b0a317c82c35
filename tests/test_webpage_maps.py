"""The web page's per-map values and LLLite batch (issue 16; real browser: Debian's chromium through Playwright): a
second map for a ControlNet Union unit, with its own type, weight and steps, goes out as ldmkit's unit fields (images,
union_control_type, weight, guidance_start, guidance_end as lists) and gives the Python API's image with the same
per-map values; the LLLite batch select goes out as lllite_batch (a plain ControlNet refuses it: the page shows the
server's message)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
from browser import require_browser

require_browser()

from PIL import Image  # noqa: E402
from test_controlnet_union import pipe, saved  # noqa: E402, F401 - a tiny SDXL model and a Union ControlNet
from test_webpage_union import page  # noqa: E402, F401 - the page on a server with the Union (shared fixture)

from ldmkit import checkpoint  # noqa: E402
from ldmkit import controlnet_a1111 as A  # noqa: E402
from ldmkit import pipeline as P  # noqa: E402
from ldmkit.controlnet import make_unit  # noqa: E402


def test_second_map_and_lllite_batch_from_the_page(page, pipe, tmp_path):  # noqa: F811
    page, d = page
    fake = tmp_path / "pose.png"
    fake.write_text("not a picture\n")
    page.set_input_files("#cn-file2", str(fake))  # said, and no second map kept
    page.wait_for_selector("#error", state="visible")
    assert "pose.png is not an image this browser can read" in page.text_content("#error")
    assert page.text_content("#cn-status2") == "none"
    title = A.model_title(d / "union-tiny")
    for sel, value in (("#width", "24"), ("#height", "16"), ("#steps", "4"), ("#seed", "5"), ("#cfg_scale", "5")):
        page.fill(sel, value)
    page.select_option("#sampler_name", "Euler")
    page.set_input_files("#cn-file", str(pipe[0] / "map0.png"))
    page.wait_for_function("document.querySelector('#cn-enabled').checked")
    page.click("#cn-map2-section summary")
    page.set_input_files("#cn-file2", str(pipe[0] / "map1.png"))
    page.wait_for_function("document.querySelector('#cn-status2').textContent === '24×16'")
    page.select_option("#cn-model", title)
    page.select_option("#cn-union-type", "Depth")
    page.select_option("#cn-union-type2", "OpenPose")
    page.select_option("#cn-resize-mode", "Just Resize")
    page.uncheck("#cn-pixel-perfect")
    for sel, value in (("#cn-weight", "0.8"), ("#cn-weight2", "0.5"), ("#cn-start2", "0.25")):
        page.fill(sel, value)
    unit = json.loads(page.evaluate("JSON.stringify(controlnetUnit())"))
    assert "image" not in unit and len(unit["images"]) == 2 and unit["union_control_type"] == ["Depth", "OpenPose"]
    assert unit["weight"] == [0.8, 0.5] and unit["guidance_start"] == [0, 0.25] and unit["guidance_end"] == [1, 1]
    assert "lllite_batch" not in unit
    page.click("#generate")
    page.wait_for_selector("figure.result img")
    src = page.get_attribute("figure.result img", "src")
    got = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    assert "Weight: 0.8+0.5" in page.text_content("figure.result pre")
    model = checkpoint.load(pipe[0] / "model")
    ref_unit = make_unit(model, d / "union-tiny", [Image.open(pipe[0] / f"map{i}.png") for i in (0, 1)], 24, 16,
                         weight=(0.8, 0.5), start=(0.0, 0.25), end=(1.0, 1.0), control_type="depth+openpose")
    ref = P.txt2img(model, P.GenerationParams("", steps=4, sampler="Euler", seed=5, width=24, height=16, cfg_scale=5,
                                              controlnets=(ref_unit,)))[0]
    assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(ref.convert("RGB")))

    page.click("#cn-clear2")  # one map again; the LLLite batch goes out, and this Union is no LLLite: said
    assert page.text_content("#cn-status2") == "none"
    page.select_option("#cn-lllite-batch", "cond-only")
    unit = json.loads(page.evaluate("JSON.stringify(controlnetUnit())"))
    assert unit["lllite_batch"] == "cond-only" and "images" not in unit and unit["weight"] == 0.8
    page.click("#generate")
    page.wait_for_selector("#error", state="visible")
    assert "lllite_batch cond-only is for ControlNet-LLLite models, and union-tiny" in page.text_content("#error")
    page.select_option("#cn-lllite-batch", "both")
    expected = [e for e in page.errors if "status of 422" in e]  # the browser logs the refused request: expected
    assert len(expected) == 1, page.errors
    page.errors.remove(expected[0])


def test_a_damaged_file_in_the_controlnet_dir_is_named_in_the_model_list(page):  # noqa: F811
    page, d = page
    (d / "broken.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"{")
    try:
        page.reload()
        page.wait_for_function("document.querySelectorAll('#cn-model option').length >= 2")
        opts = page.eval_on_selector_all("#cn-model option", "os => os.map(o => [o.textContent, o.disabled])")
        assert ["broken.safetensors (cannot be read: not a readable .safetensors file (its header cannot be read))",
                True] in opts, opts
        assert page.eval_on_selector("#cn-model", "s => s.value") != ""  # a usable model stays selected
    finally:
        (d / "broken.safetensors").unlink()
