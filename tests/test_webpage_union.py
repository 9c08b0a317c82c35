"""The web page's ControlNet unit with a ControlNet Union (real browser: Debian's chromium through Playwright): the
"Union type" select goes out as the extension's union_control_type, and the image is the Python API's with the
same unit and control type."""

from __future__ import annotations

import base64
import io
import shutil

import numpy as np
import pytest
from browser import require_browser

require_browser()

from PIL import Image  # noqa: E402
from test_controlnet_union import pipe, saved  # noqa: E402, F401 - a tiny SDXL model and a Union ControlNet

from ldmkit import checkpoint  # noqa: E402
from ldmkit import controlnet_a1111 as A  # noqa: E402
from ldmkit import pipeline as P  # noqa: E402
from ldmkit.controlnet import make_unit  # noqa: E402
from ldmkit.server.app import BackgroundServer, create_app  # noqa: E402


@pytest.fixture(scope="module")
def page(pipe, saved, one_thread, open_page, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("web-union")
    shutil.copytree(saved[0] / "union", d / "union-tiny")
    app = create_app(pipe[0] / "model", controlnet_dir=d, preview_interval=None, device="cpu")
    with BackgroundServer(app) as url:
        page = open_page(url, "document.querySelectorAll('#cn-model option').length >= 1", 60_000)
        yield page, d
        page.close()


def test_union_type_from_the_page(page, pipe):  # noqa: F811
    page, d = page
    title = A.model_title(d / "union-tiny")
    for sel, value in (("#width", "24"), ("#height", "16"), ("#steps", "3"), ("#seed", "5"), ("#cfg_scale", "5")):
        page.fill(sel, value)
    page.select_option("#sampler_name", "Euler")
    page.set_input_files("#cn-file", str(pipe[0] / "map0.png"))
    page.wait_for_function("document.querySelector('#cn-enabled').checked")
    page.select_option("#cn-model", title)
    page.select_option("#cn-union-type", "Depth")
    page.click("#generate")
    page.wait_for_selector("figure.result img")
    got = Image.open(io.BytesIO(base64.b64decode(page.get_attribute("figure.result img", "src").split(",", 1)[1])))
    model = checkpoint.load(pipe[0] / "model")
    unit = make_unit(model, d / "union-tiny", Image.open(pipe[0] / "map0.png"), 24, 16, resize_mode="Crop and Resize",
                     pixel_perfect=True, control_type="depth")
    ref = P.txt2img(model, P.GenerationParams("", steps=3, sampler="Euler", seed=5, width=24, height=16,
                                              cfg_scale=5, controlnets=(unit,)))[0]
    assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(ref.convert("RGB")))
