"""The web page with SDXL models in a real browser (Debian's chromium through Playwright): choosing an SDXL base
model sets the size to its native 1024² and offers the SDXL refiners (GET /ldmkit/model); a chosen refiner goes
out as A1111's refiner_checkpoint / refiner_switch_at and the image's infotext names it; back on an SD1 model the
refiner section hides and a size the user typed stays."""

from __future__ import annotations

from browser import require_browser

require_browser()

from fastapi.testclient import TestClient  # noqa: E402
from test_sdxl_server import write_models  # noqa: E402

from ldmkit import checkpoint  # noqa: E402
from ldmkit.server.app import BackgroundServer, create_app  # noqa: E402


def test_model_info_route(tmp_path):
    write_models(tmp_path)
    client = TestClient(create_app(tmp_path / "sd15.safetensors", models_dir=tmp_path, preview_interval=0))
    info = client.get("/ldmkit/model").json()
    assert (info["family"], info["native_size"], info["refiners"]) == ("sd1", 512, [])
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "xl"}).status_code == 200
    info = client.get("/ldmkit/model").json()
    ref = f"xl-refiner.safetensors [{checkpoint.model_hash(tmp_path / 'xl-refiner.safetensors')}]"
    assert (info["family"], info["native_size"], info["refiners"]) == ("sdxl", 1024, [ref])


def test_sdxl_model_on_the_page(tmp_path, one_thread, open_page):
    write_models(tmp_path)
    app = create_app(tmp_path / "sd15.safetensors", models_dir=tmp_path, preview_interval=None)
    with BackgroundServer(app) as url:
        page = open_page(url, "document.querySelectorAll('#model option').length == 3", 60_000)
        assert page.is_hidden("#refiner-section") and page.input_value("#width") == "512"
        titles = page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")
        xl = next(t for t in titles if t.startswith("xl.safetensors"))
        page.select_option("#model", xl)
        page.wait_for_function("document.querySelector('#width').value === '1024'")
        assert page.input_value("#height") == "1024" and page.is_visible("#refiner-section")
        options = page.eval_on_selector_all("#refiner_checkpoint option", "os => os.map(o => o.value)")
        assert options[0] == "None" and options[1].startswith("xl-refiner.safetensors") and len(options) == 2
        page.click("#refiner-section summary")  # open the section
        page.select_option("#refiner_checkpoint", options[1])
        page.fill("#refiner_switch_at", "0.5")
        for name, value in {"prompt": "an apple", "steps": 4, "width": 32, "height": 24, "seed": 3}.items():
            page.fill(f"#{name}", str(value))
        page.click("#generate")
        caption = page.wait_for_selector("#gallery figure.result").text_content()
        assert "Model: xl" in caption and "Refiner: xl-refiner" in caption and "Refiner switch at: 0.5" in caption
        sd15 = next(t for t in titles if t.startswith("sd15.safetensors"))
        page.select_option("#model", sd15)
        page.wait_for_function("document.querySelector('#refiner-section').hidden")
        assert page.input_value("#width") == "32"  # typed by the user: kept
        page.close()
    assert page.errors == []
