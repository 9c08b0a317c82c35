"""The web page's hires-fix section in a real browser (Debian's chromium through Playwright): its upscaler list
comes from the server, and a checked section sends A1111's enable_hr fields (the image comes back at the target
size with the hires infotext)."""

from __future__ import annotations

import pytest
import torch
from browser import require_browser

require_browser()

from test_upscale import _save, basicsr_params  # noqa: E402

from ldmkit.config import TINY  # noqa: E402
from ldmkit.model import StableDiffusion  # noqa: E402
from ldmkit.server.app import BackgroundServer, create_app  # noqa: E402


@pytest.fixture(scope="module")
def page(tmp_path_factory, one_thread, open_page):
    d = tmp_path_factory.mktemp("upscalers")
    _save(basicsr_params(nf=8, nb=1, gc=4, scale=2, seed=1), d / "RealESRGAN_x2plus.pth", "params_ema")
    torch.manual_seed(0)
    app = create_app(StableDiffusion(TINY).eval(), upscaler_dir=d, preview_interval=None)
    with BackgroundServer(app) as url:
        page = open_page(url, "document.querySelectorAll('#hr_upscaler option').length > 6")
        yield page
        page.close()


def test_hires_section(page):
    names = page.eval_on_selector_all("#hr_upscaler option", "os => os.map(o => o.value)")
    assert names[:2] == ["Latent", "Latent (antialiased)"]
    assert {"None", "Lanczos", "Nearest", "RealESRGAN_x2plus"} <= set(names)
    page.fill("#prompt", "a castle")
    page.check("#enable_hr")  # opens the section
    for name, value in {"steps": 2, "width": 16, "height": 16, "seed": 5, "hr_second_pass_steps": 2}.items():
        page.fill(f"#{name}", str(value))
    page.select_option("#hr_upscaler", "RealESRGAN_x2plus")
    page.click("#generate")
    fig = page.wait_for_selector("#gallery figure.result")
    assert page.eval_on_selector("#gallery figure img", "img => [img.naturalWidth, img.naturalHeight]") == [32, 32]
    caption = fig.text_content()
    assert "Size: 16x16" in caption and "Hires upscale: 2" in caption and "Hires upscaler: RealESRGAN_x2plus" in caption
    page.click(".tabs button[data-mode=img2img]")
    assert page.is_hidden("#hires-section")
    page.click(".tabs button[data-mode=txt2img]")
    assert page.is_visible("#hires-section")
