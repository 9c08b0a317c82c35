"""The web page at ``/`` in a real browser (Debian's chromium through Playwright), on a tiny random model.

CI needs: ``apt-get install -y chromium`` and ``pip install playwright`` (no ``playwright install``:
the system chromium is used).
"""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
import torch
from browser import require_browser
from PIL import Image

require_browser()

from ldmkit import pipeline as P  # noqa: E402
from ldmkit.config import TINY  # noqa: E402
from ldmkit.model import StableDiffusion  # noqa: E402
from ldmkit.server.app import BackgroundServer, create_app  # noqa: E402

TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def server(one_thread):
    torch.manual_seed(0)
    app = create_app(StableDiffusion(TINY).eval(), preview_interval=0)
    with BackgroundServer(app) as url:
        yield url


@pytest.fixture(scope="module")
def page(server, open_page):
    return open_page(server, "document.querySelectorAll('#sampler_name option').length > 5", TIMEOUT_MS)


@pytest.fixture
def slow_steps(monkeypatch):
    """Each step takes 0.1 s more, so the page's progress polling has something to show."""
    calls: dict[str, list] = {"txt2img": [], "inpaint": []}

    def slowed(name):
        real = getattr(P, name)

        def run(model, params, *images, callback=None):
            calls[name].append((params, images))

            def cb(d):
                time.sleep(0.1)
                callback(d)

            return real(model, params, *images, callback=cb)

        return run

    for name in calls:
        monkeypatch.setattr(P, name, slowed(name))
    return calls


def fill(page, **fields):
    for name, value in fields.items():
        page.fill(f"#{name}", str(value))


def test_generate_shows_progress_preview_and_result(page, slow_steps):
    page.fill("#prompt", "a red apple")
    fill(page, steps=12, width=32, height=24, seed=7)
    page.select_option("#sampler_name", "Euler")
    page.click("#generate")
    # live progress: a fraction of the steps done, and a preview decoded from the running step
    page.wait_for_function("(() => { const v = document.querySelector('#progress').value; return v > 0 && v < 1; })()")
    assert page.text_content("#progress-text").startswith("step ")
    page.wait_for_function("document.querySelector('#preview').src.startsWith('data:image/png;base64,')")
    fig = page.wait_for_selector("#gallery figure.result")
    assert page.eval_on_selector("#gallery figure img", "img => [img.naturalWidth, img.naturalHeight]") == [32, 24]
    caption = fig.text_content()
    assert "a red apple" in caption and "Steps: 12, Sampler: Euler," in caption and "Seed: 7," in caption
    href = fig.query_selector("a.explain").get_attribute("href")
    assert href.startswith("/explain?prompt=a+red+apple&seed=7")
    assert page.text_content("#progress-text").startswith("done") and page.is_disabled("#interrupt")
    params = slow_steps["txt2img"][0][0]
    assert (params.prompt, params.seed, params.steps, params.width, params.height) == ("a red apple", 7, 12, 32, 24)


def test_inpaint_with_mask_brush(page, slow_steps, tmp_path):
    init = Image.fromarray((np.random.default_rng(1).random((32, 32, 3)) * 255).astype(np.uint8))
    init.save(tmp_path / "init.png")
    page.click(".tabs button[data-mode=inpaint]")
    page.set_input_files("#init-file", str(tmp_path / "init.png"))
    page.wait_for_selector("#canvas-wrap:not([hidden])")
    fill(page, steps=3, width=32, height=32, seed=3)
    page.fill("#brush", "40")  # screen pixels: about 3 image pixels here
    box = page.locator("#mask-canvas").bounding_box()
    # paint a stroke along the left quarter of the image
    x = box["x"] + box["width"] * 0.2
    page.mouse.move(x, box["y"] + box["height"] * 0.1)
    page.mouse.down()
    page.mouse.move(x, box["y"] + box["height"] * 0.9, steps=8)
    page.mouse.up()
    page.click("#generate")
    page.wait_for_selector("#gallery figure.result >> text=Denoising strength: 0.75")
    params, (sent_init, mask) = slow_steps["inpaint"][0]
    assert params.strength == 0.75 and np.array_equal(np.asarray(sent_init.convert("RGB")), np.asarray(init))
    m = np.asarray(mask.convert("L")) > 127
    cols = np.flatnonzero(m.any(axis=0))
    assert m.sum() > 0 and cols.min() >= 2 and cols.max() <= 12  # the stroke, nothing else
    img_src = page.get_attribute("#gallery figure img", "src")
    out = Image.open(io.BytesIO(base64.b64decode(img_src.split(",", 1)[1])))
    assert out.size == (32, 32) and "Denoising strength: 0.75" in out.info["parameters"]
