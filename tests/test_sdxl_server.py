"""SDXL through the A1111 API: /sdapi/v1/sd-models lists SDXL files beside SD1 ones, switching between them
with ``sd_model_checkpoint`` works both ways, txt2img gives the image the Python API gives, and a refiner
asked for txt2img is a 400 naming it."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="server extra not installed: pip install 'ldmkit[server]'")
from fastapi.testclient import TestClient  # noqa: E402

from ldmkit import checkpoint, checkpoint_sdxl  # noqa: E402
from ldmkit.config import TINY, TINY_SDXL, TINY_SDXL_REFINER  # noqa: E402
from ldmkit.model import StableDiffusion  # noqa: E402
from ldmkit.pipeline import GenerationParams, txt2img  # noqa: E402
from ldmkit.sdxl import StableDiffusionXL  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
REQUEST = {"prompt": "an apple", "negative_prompt": "dark", "steps": 3, "width": 32, "height": 24, "seed": 11,
           "sampler_name": "Euler", "cfg_scale": 5}


def write_models(folder) -> None:
    """Tiny random single files (seed 0) in ``folder``: sd15 (SD1), xl (SDXL base), xl-refiner."""
    torch.manual_seed(0)
    checkpoint.save_single_file(StableDiffusion(TINY).eval(), folder / "sd15.safetensors")
    checkpoint_sdxl.save_sdxl_single_file(StableDiffusionXL(TINY_SDXL).eval(), folder / "xl.safetensors")
    checkpoint_sdxl.save_sdxl_single_file(StableDiffusionXL(TINY_SDXL_REFINER).eval(),
                                          folder / "xl-refiner.safetensors")


def test_sdxl_and_sd15_in_one_server(tmp_path):
    from ldmkit.server.app import create_app

    write_models(tmp_path)
    client = TestClient(create_app(tmp_path / "sd15.safetensors", models_dir=tmp_path, preview_interval=0))
    titles = [m["title"] for m in client.get("/sdapi/v1/sd-models").json()]
    assert {t.split(" ")[0] for t in titles} == {"sd15.safetensors", "xl.safetensors", "xl-refiner.safetensors"}

    def generate() -> tuple[np.ndarray, str]:
        r = client.post("/sdapi/v1/txt2img", json=REQUEST)
        assert r.status_code == 200, r.text
        img = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
        return np.asarray(img.convert("RGB")), json.loads(r.json()["info"])["infotexts"][0]

    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "xl"}).status_code == 200
    got, info = generate()
    assert f"Model hash: {checkpoint.model_hash(tmp_path / 'xl.safetensors')}, Model: xl" in info
    params = GenerationParams("an apple", negative_prompt="dark", steps=3, width=32, height=24, seed=11,
                              sampler="Euler", cfg_scale=5)
    expected = np.asarray(txt2img(checkpoint.load(tmp_path / "xl.safetensors"), params)[0])
    assert np.array_equal(got, expected)

    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sd15"}).status_code == 200
    assert "Model: sd15" in generate()[1]

    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "xl-refiner"}).status_code == 200
    r = client.post("/sdapi/v1/txt2img", json=REQUEST)
    assert r.status_code == 400 and "xl-refiner is an SDXL refiner" in r.json()["detail"]
