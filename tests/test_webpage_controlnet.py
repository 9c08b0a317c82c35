"""The web page's ControlNet unit in a real browser (Debian's chromium through Playwright), on the tiny model and
ControlNet of test_controlnet_cli: upload a control image, pick a preprocessor and a model, preview the map
(/controlnet/detect at the pixel-perfect resolution), generate with it: the image is the Python API's with the
same unit and carries the extension's infotext line."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from browser import require_browser

require_browser()

from PIL import Image  # noqa: E402
from test_controlnet_cli import files  # noqa: E402, F401 - the tiny SD + ControlNet files

from ldmkit import checkpoint  # noqa: E402
from ldmkit import controlnet_a1111 as A  # noqa: E402
from ldmkit import pipeline as P  # noqa: E402
from ldmkit.controlnet import make_unit  # noqa: E402
from ldmkit.server.app import BackgroundServer, create_app  # noqa: E402


@pytest.fixture(scope="module")
def page(files, one_thread, open_page):  # noqa: F811
    app = create_app(files / "sd", controlnet_dir=files, preview_interval=None, device="cpu")
    with BackgroundServer(app) as url:
        page = open_page(url, "document.querySelectorAll('#cn-model option').length >= 2", 60_000)
        yield page
        page.close()


def _data_url_image(src: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))


def test_upload_preview_and_generate(page, files):  # noqa: F811
    title = A.model_title(files / "cn")
    assert title in page.eval_on_selector_all("#cn-model option", "os => os.map(o => o.value)")
    for sel, value in (("#width", "24"), ("#height", "16"), ("#steps", "3"), ("#seed", "5"), ("#cfg_scale", "5")):
        page.fill(sel, value)
    page.select_option("#sampler_name", "Euler")
    page.set_input_files("#cn-file", str(files / "map.png"))
    page.wait_for_function("document.querySelector('#cn-enabled').checked")  # the file is read asynchronously
    page.select_option("#cn-module", "canny")
    page.select_option("#cn-model", title)
    page.fill("#cn-weight", "0.8")
    page.click("#cn-preview")
    page.wait_for_selector("#cn-map", state="visible")
    preview = _data_url_image(page.get_attribute("#cn-map", "src"))
    img = Image.open(files / "map.png")  # 48x32 for a 24x16 output: pixel perfect runs canny at 16
    want = A.run_preprocessor("canny", img, A.pixel_perfect_resolution(img.size, 24, 16, "Crop and Resize"))
    assert np.array_equal(np.asarray(preview.convert("RGB")), np.asarray(want))
    page.click("#generate")
    page.wait_for_selector("figure.result img")
    got = _data_url_image(page.get_attribute("figure.result img", "src"))
    infotext = page.text_content("figure.result pre")
    assert f'ControlNet 0: "Module: canny, Model: {title}, Weight: 0.8, Resize Mode: Crop and Resize' in infotext
    model = checkpoint.load(files / "sd")
    unit = make_unit(model, files / "cn", img, 24, 16, weight=0.8, preprocessor="canny",
                     resize_mode="Crop and Resize", pixel_perfect=True)
    ref = P.txt2img(model, P.GenerationParams("", steps=3, sampler="Euler", seed=5, width=24, height=16,
                                              cfg_scale=5, controlnets=(unit,)))[0]
    assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(ref.convert("RGB")))
    # the result's explain link sends the unit along (POST /explain): the page shows the map and its residuals
    with page.context.expect_page() as new:
        page.click("figure.result a.explain")
    explained = new.value
    explained.wait_for_url("**/explain/files/**")
    explained.wait_for_selector("#controlnet")
    assert "skip 1" in explained.text_content("#controlnet")
    explained.close()
