"""A1111's refiner_checkpoint / refiner_switch_at through /sdapi/v1/txt2img: the refiner is found as
sd_model_checkpoint is, and the image and infotext are the CLI's (`--refiner --refiner-switch-at`), whose
refiner path tests/test_sdxl_pipeline.py checks against diffusers; `--from-png` reads the refiner back.
An unknown refiner, a refiner for a non-SDXL model or for inpainting, and a bad switch point are 422s."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="server extra not installed: pip install 'ldmkit[server]'")
from fastapi.testclient import TestClient  # noqa: E402
from test_sdxl_server import write_models  # noqa: E402

from ldmkit import checkpoint, cli  # noqa: E402
from ldmkit.infotext import read_parameters  # noqa: E402
from ldmkit.pipeline import GenerationParams, txt2img  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
REQUEST = {"prompt": "an apple", "negative_prompt": "dark", "steps": 4, "width": 32, "height": 24, "seed": 11,
           "sampler_name": "Euler", "cfg_scale": 5}


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def test_refiner_through_the_api_is_the_cli_image(tmp_path):
    from ldmkit.server.app import create_app

    write_models(tmp_path)
    client = TestClient(create_app(tmp_path / "xl.safetensors", models_dir=tmp_path, preview_interval=0))

    r = client.post("/sdapi/v1/txt2img", json={**REQUEST, "refiner_checkpoint": "xl-refiner",
                                               "refiner_switch_at": 0.5})
    assert r.status_code == 200, r.text
    got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    info = json.loads(r.json()["info"])

    cli_png = tmp_path / "cli.png"
    assert cli.main(["generate", "an apple", "--negative-prompt", "dark", "--steps", "4", "--width", "32",
                     "--height", "24", "--seed", "11", "--sampler", "Euler", "--cfg-scale", "5",
                     "--model", str(tmp_path / "xl.safetensors"), "--refiner",
                     str(tmp_path / "xl-refiner.safetensors"), "--refiner-switch-at", "0.5",
                     "-o", str(cli_png)]) == 0
    expected = Image.open(cli_png)
    assert np.array_equal(_pixels(got), _pixels(expected))
    ref_hash = checkpoint.model_hash(tmp_path / "xl-refiner.safetensors")
    assert f"Refiner: xl-refiner [{ref_hash}], Refiner switch at: 0.5" in info["infotexts"][0]
    assert info["infotexts"][0] == read_parameters(cli_png)
    assert info["extra_generation_params"]["Refiner switch at"] == "0.5"
    # the refiner's part shows: without it the image differs
    params = GenerationParams("an apple", negative_prompt="dark", steps=4, width=32, height=24, seed=11,
                              sampler="Euler", cfg_scale=5)
    plain = _pixels(txt2img(checkpoint.load(tmp_path / "xl.safetensors"), params)[0])
    assert not np.array_equal(_pixels(got), plain)

    # --from-png reads the refiner (found beside --model) and the switch point back: the same image
    again = tmp_path / "again.png"
    assert cli.main(["generate", "--from-png", str(cli_png), "--model", str(tmp_path / "xl.safetensors"),
                     "-o", str(again)]) == 0
    assert np.array_equal(_pixels(Image.open(again)), _pixels(expected))

    # a second request reuses the loaded refiner; "None" (A1111's no-refiner value) is the plain image
    r2 = client.post("/sdapi/v1/txt2img", json={**REQUEST, "refiner_checkpoint": "None"})
    assert r2.status_code == 200 and "Refiner" not in json.loads(r2.json()["info"])["infotexts"][0]
    assert np.array_equal(_pixels(Image.open(io.BytesIO(base64.b64decode(r2.json()["images"][0])))), plain)

    def error(body: dict, path: str = "/sdapi/v1/txt2img") -> tuple[int, str]:
        r = client.post(path, json={**REQUEST, **body})
        return r.status_code, json.dumps(r.json()["detail"])

    code, detail = error({"refiner_checkpoint": "nope"})
    assert code == 422 and "no model 'nope'" in detail and "xl-refiner.safetensors" in detail
    code, detail = error({"refiner_checkpoint": "xl-refiner", "refiner_switch_at": 1.5})
    assert code == 422 and "refiner_switch_at 1.5 must be between 0 and 1" in detail
    code, detail = error({"refiner_checkpoint": "sd15"})  # an SD1 model as refiner
    assert code == 422 and "sd15.safetensors" in detail and "is not an SDXL model" in detail
    code, detail = error({"refiner_checkpoint": "xl-refiner", "override_settings": {"sd_model_checkpoint": "sd15"}})
    assert code == 422 and "a refiner needs an SDXL base model; sd15 is sd1" in detail
    buf = io.BytesIO()
    Image.new("RGB", (32, 24)).save(buf, format="PNG")
    png = base64.b64encode(buf.getvalue()).decode()
    code, detail = error({"refiner_checkpoint": "xl-refiner", "init_images": [png], "mask": png}, "/sdapi/v1/img2img")
    assert code == 422 and "a refiner with a mask (inpainting) is not supported" in detail
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sd15"}).status_code == 200
    code, detail = error({"refiner_checkpoint": "xl-refiner"})  # checked before the job: base is SD1
    assert code == 422 and "a refiner needs an SDXL base model; sd15 is sd1" in detail
