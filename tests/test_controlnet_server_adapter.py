"""T2I-Adapters through the A1111 ControlNet extension's API (issue 16, parts 2 and 5): ``--controlnet-dir``
lists adapter files and folders beside the ControlNets (``stem [hash]``), and an ``alwayson_scripts`` unit whose
model is an adapter gives the image of ``ldmkit generate --adapter`` with the same settings (server test client).
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="server extra not installed: pip install 'ldmkit[server]'")

from reference import save_diffusers_pipeline  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from test_controlnet import diffusers_controlnet  # noqa: E402
from test_t2i_adapter import TINY3, _to_original, diffusers_adapter  # noqa: E402

from ldmkit import checkpoint  # noqa: E402
from ldmkit import controlnet_a1111 as A  # noqa: E402
from ldmkit.cli import main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
SKETCH, COLOR, CANNY, XL = "t2iadapter_sketch_sd15v2", "t2iadapter_color_sd14v1", "control_tiny_canny", "adapter_xl"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cn-server-adapter")
    save_diffusers_pipeline(TINY3, d / "sd")
    checkpoint.save_single_file(checkpoint.load(d / "sd"), d / "sd.safetensors")
    (d / "cn").mkdir()
    diffusers_adapter("full", seed=7).save_pretrained(d / "cn" / SKETCH)  # a diffusers T2IAdapter folder
    light = diffusers_adapter("light", seed=8)
    save_file(_to_original(light.state_dict(), light=True), d / "cn" / f"{COLOR}.safetensors")  # TencentARC's
    diffusers_adapter("xl", seed=9).save_pretrained(d / "cn" / XL)  # for SDXL
    diffusers_controlnet(TINY3.unet, hint=(8, 16), seed=3).save_pretrained(d / "cn" / CANNY)
    (d / "cn" / "adapter_notes.pth").write_bytes(b"not a model")  # named as an adapter, not one: unlisted
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(d / "map.png")  # 48x32: resized
    return d


@pytest.fixture(scope="module")
def client(files):
    from fastapi.testclient import TestClient

    from ldmkit.server.app import create_app

    app = create_app(files / "sd.safetensors", controlnet_dir=files / "cn", preview_interval=None, device="cpu")
    yield TestClient(app, raise_server_exceptions=False)
    app.state.worker.stop()


def _b64(path) -> str:
    buf = io.BytesIO()
    Image.open(path).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


BODY = {"prompt": "a stone house", "steps": 4, "seed": 5, "width": 24, "height": 16, "cfg_scale": 5,
        "sampler_name": "Euler"}


def test_model_list_has_the_adapters(client, files):
    models = client.get("/controlnet/model_list").json()["model_list"]
    want = [A.model_title(files / "cn" / n) for n in (SKETCH, f"{COLOR}.safetensors", XL, CANNY)]
    assert sorted(models) == sorted(want)
    assert any(m.startswith(f"{SKETCH} [") for m in models)


@pytest.mark.parametrize("name", [SKETCH, COLOR])
def test_adapter_unit_gives_the_cli_adapter_image(client, files, name, tmp_path):
    path = files / "cn" / (name if name == SKETCH else f"{name}.safetensors")
    unit = {"module": "none", "model": A.model_title(path), "image": _b64(files / "map.png"), "weight": 0.8,
            "guidance_start": 0.0, "guidance_end": 0.5, "resize_mode": "Just Resize"}
    r = client.post("/sdapi/v1/txt2img", json={**BODY, "alwayson_scripts": {"controlnet": {"args": [unit]}}})
    assert r.status_code == 200, r.text
    got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    out = tmp_path / "cli.png"
    rc = main(["generate", "a stone house", "--model", str(files / "sd.safetensors"), "--steps", "4", "--sampler",
               "Euler", "--seed", "5", "--width", "24", "--height", "16", "--cfg-scale", "5", "--adapter", str(path),
               "--control-image", str(files / "map.png"), "--control-weight", "0.8", "--control-end", "0.5",
               "-o", str(out)])
    assert rc == 0
    assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(Image.open(out).convert("RGB")))
    plain = client.post("/sdapi/v1/txt2img", json=BODY).json()["images"][0]
    assert plain != r.json()["images"][0]  # the adapter acted
    info = json.loads(r.json()["info"])["infotexts"][0]
    assert f'ControlNet 0: "Module: none, Model: {A.model_title(path)}, Weight: 0.8, Resize Mode: Just Resize' in info


def test_adapter_with_a_controlnet_in_one_request(client, files):
    units = [{"module": "none", "model": SKETCH, "image": _b64(files / "map.png")},
             {"module": "invert", "model": CANNY, "image": _b64(files / "map.png"), "weight": 0.5}]
    r = client.post("/sdapi/v1/txt2img", json={**BODY, "alwayson_scripts": {"controlnet": {"args": units}}})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])["infotexts"][0]
    assert "ControlNet 0:" in info and "ControlNet 1:" in info


@pytest.mark.parametrize("change,field,words", [
    ({"model": XL}, "model", "another model family"),
    ({"control_mode": "ControlNet is more important"}, "control_mode", "Balanced control mode only"),
    ({"model": "adapter_notes"}, "model", "no ControlNet 'adapter_notes'"),
])
def test_bad_adapter_units_are_422(client, files, change, field, words):
    unit = {"module": "none", "model": SKETCH, "image": _b64(files / "map.png"), **change}
    r = client.post("/sdapi/v1/txt2img", json={**BODY, "alwayson_scripts": {"controlnet": {"args": [unit]}}})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"][0]
    assert field in detail["loc"] and words in detail["msg"], detail

