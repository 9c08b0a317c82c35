"""Bad input around SDXL through the A1111 API (tests/test_sdxl_errors.py has the CLI's): an SDXL LoRA on an
SD1.5 model and the reverse as <lora:NAME:W> prompt tags (as A1111: the image without it, the infotext's Prompt
warnings naming the family), a refiner used as the base model and a truncated SDXL file chosen as
sd_model_checkpoint (a 4xx whose detail names it, never a 500); and on the CLI, a U-Net-only kohya SDXL LoRA
(sgm block names, as `ldmkit train lora --no-text-encoder-lora` writes on SDXL) on SD1.5."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import save_file
from test_sdxl_errors import SD15_KOHYA, SDXL_KOHYA, _generate, _one_line_error, _pair

pytest.importorskip("fastapi", reason="server extra not installed: pip install 'ldmkit[server]'")
from fastapi.testclient import TestClient  # noqa: E402
from test_sdxl_server import write_models  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
REQUEST = {"prompt": "an apple", "steps": 1, "width": 32, "height": 32, "seed": 1}
# what `train lora --no-text-encoder-lora` writes on an SDXL base: U-Net only, sgm block names
SDXL_UNET_ONLY = {**_pair("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", (4, 2048), (640, 4)),
                  **_pair("lora_unet_output_blocks_2_1_transformer_blocks_1_attn1_to_q", (4, 640), (640, 4))}


def test_sdxl_unet_only_lora_on_sd15_cli(tmp_path, capsys):
    write_models(tmp_path)
    save_file(SDXL_UNET_ONLY, tmp_path / "xl-unet.safetensors")
    err = _one_line_error(capsys, _generate(tmp_path / "sd15.safetensors", tmp_path, "--lora",
                                            str(tmp_path / "xl-unet.safetensors")))
    assert "a kohya LoRA for SDXL (cross-attention width 2048) and this model is sd1" in err


def test_bad_sdxl_input_is_4xx(tmp_path):
    from ldmkit.server.app import create_app

    write_models(tmp_path / "models")
    loras = tmp_path / "loras"
    loras.mkdir()
    save_file(SDXL_KOHYA, loras / "xl-style.safetensors")
    save_file(SD15_KOHYA, loras / "sd15-style.safetensors")
    data = (tmp_path / "models" / "xl.safetensors").read_bytes()
    (tmp_path / "models" / "xl-cut.safetensors").write_bytes(data[: len(data) // 2])
    client = TestClient(create_app(tmp_path / "models" / "sd15.safetensors", models_dir=tmp_path / "models",
                                   lora_dir=loras, preview_interval=0), raise_server_exceptions=False)

    def detail(r) -> str:
        assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
        body = r.json()
        text = str(body.get("detail", body))
        assert "Traceback" not in text
        return text

    def warning(r) -> str:  # a <lora:> tag that does not fit: A1111 generates without it and says so
        assert r.status_code == 200, r.text[:500]
        return json.loads(r.json()["info"])["infotexts"][0].split("Prompt warnings: ", 1)[1]

    r = client.post("/sdapi/v1/txt2img", json={**REQUEST, "prompt": "an apple <lora:xl-style:1>"})
    assert "a LoRA for SDXL (lora_te2_... keys), and this model is sd1" in warning(r)
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "xl"}).status_code == 200
    r = client.post("/sdapi/v1/txt2img", json={**REQUEST, "prompt": "an apple <lora:sd15-style:1>"})
    assert "SD1.x (cross-attention width 768)" in warning(r)
    r = client.post("/sdapi/v1/txt2img", json={**REQUEST, "override_settings": {"sd_model_checkpoint": "xl-refiner"}})
    assert "is an SDXL refiner" in detail(r)
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "xl-cut"})
    assert "xl-cut" in detail(r)
    assert client.post("/sdapi/v1/txt2img", json=REQUEST).status_code == 200  # the server is still fine
