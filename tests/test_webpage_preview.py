"""The web page shows the image forming: Chromium sees the live preview change during one generation.

Launched as in ``tests/test_webpage.py`` (Debian's chromium through Playwright, no ``playwright install``).
"""

from __future__ import annotations

import base64
import io
import time

import pytest
import torch
from browser import require_browser
from PIL import Image
from safetensors.torch import save_file

require_browser()
requests = pytest.importorskip("requests")

from ldmkit import pipeline as P  # noqa: E402
from ldmkit.config import TINY  # noqa: E402
from ldmkit.model import StableDiffusion  # noqa: E402
from ldmkit.models.vae import AutoencoderKL  # noqa: E402
from ldmkit.server.app import BackgroundServer, create_app  # noqa: E402

TIMEOUT_MS = 60_000
STEPS = 16

# records every new src of #preview with the number of finished results on the page at that moment
WATCH = """() => {
  window.previewLog = [];
  const img = document.querySelector('#preview');
  new MutationObserver(() => window.previewLog.push({
    src: img.src, results: document.querySelectorAll('#gallery figure.result').length,
    text: document.querySelector('#progress-text').textContent,
  })).observe(img, { attributes: true, attributeFilter: ['src'] });
}"""


@pytest.fixture(scope="module")
def server(tmp_path_factory, one_thread):
    torch.manual_seed(0)
    vaes = tmp_path_factory.mktemp("vaes")
    save_file({k: v.contiguous() for k, v in AutoencoderKL(TINY.vae).state_dict().items()},
              str(vaes / "other-vae.safetensors"))
    app = create_app(StableDiffusion(TINY).eval(), preview_interval=0, vae_dir=vaes)
    with BackgroundServer(app) as url:
        yield url


@pytest.fixture
def slow_steps(monkeypatch):
    """Each step takes 0.3 s more, so the page (polling every 0.25 s) sees the preview of most steps."""
    seen = []
    real = P.txt2img

    def txt2img(model, params, callback=None):
        def cb(d):
            time.sleep(0.3)
            callback(d)
            seen.append(d["i"])

        return real(model, params, callback=cb)

    monkeypatch.setattr(P, "txt2img", txt2img)
    return seen


@pytest.mark.parametrize(("kind", "fmt", "mime", "size"), [
    ("Approx cheap", "jpeg", "image/jpeg", (16, 12)),  # one pixel per latent (this model's f = 2)
    ("Full", "png", "image/png", (32, 24)),
])
def test_preview_changes_during_one_generation(server, open_page, slow_steps, kind, fmt, mime, size):
    r = requests.post(f"{server}/sdapi/v1/options", timeout=30,
                      json={"show_progress_type": kind, "live_previews_image_format": fmt})
    assert r.ok, r.text
    page = open_page(server, "document.querySelectorAll('#sampler_name option').length > 5", TIMEOUT_MS)
    page.evaluate(WATCH)
    page.fill("#prompt", "a red apple")
    for name, value in {"steps": STEPS, "width": 32, "height": 24, "seed": 7}.items():
        page.fill(f"#{name}", str(value))
    page.select_option("#sampler_name", "Euler")
    page.click("#generate")
    page.wait_for_selector("#gallery figure.result")
    log = page.evaluate("window.previewLog")
    shown = page.eval_on_selector("#preview", "img => [img.naturalWidth, img.naturalHeight, img.hidden]")
    page.close()
    assert page.errors == [] and len(slow_steps) == STEPS
    during = [e for e in log if e["results"] == 0 and e["text"].startswith("step ")]
    assert len(during) == len(log) >= 3  # every change came while this one generation ran ...
    assert len({e["src"] for e in during}) >= 3  # ... and the picture changed at least twice
    assert all(e["src"].startswith(f"data:{mime};base64,") for e in during)
    last = Image.open(io.BytesIO(base64.b64decode(during[-1]["src"].split(",", 1)[1])))
    assert last.size == size and shown == [*size, False]


def test_vae_and_preview_choices_set_the_server_options(server, open_page):
    options = lambda: requests.get(f"{server}/sdapi/v1/options", timeout=30).json()  # noqa: E731
    page = open_page(server, "document.querySelectorAll('#sd_vae option').length === 2", TIMEOUT_MS)
    assert page.eval_on_selector_all("#sd_vae option", "os => os.map((o) => o.value)") == [
        "Automatic", "other-vae.safetensors"]
    page.select_option("#sd_vae", "other-vae.safetensors")
    page.wait_for_function("document.querySelector('#sd_vae').value === 'other-vae.safetensors'")
    deadline = time.monotonic() + 30
    while options()["sd_vae"] != "other-vae.safetensors":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    page.select_option("#show_progress_type", "Approx cheap")
    while options()["show_progress_type"] != "Approx cheap":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    page.select_option("#sd_vae", "Automatic")
    while options()["sd_vae"] != "Automatic":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    page.close()
