"""The SDXL refiner in img2img and with hires fix, as A1111 applies it (``sd_samplers_common.apply_refiner``):
the refiner takes over at the first step whose noise level has progress (999 - t) / 1000 >= refiner_switch_at
(t: the nearest training timestep), which is diffusers' denoising_end / denoising_start cut; with hires fix
only in the second pass (A1111's default ``hires_fix_refiner_pass: second pass``).

img2img + refiner against diffusers' StableDiffusionXLImg2ImgPipeline (base with denoising_end, refiner with
denoising_start, <= 2/255); a strength below 1 - switch_at leaves everything to the refiner (= diffusers'
refiner img2img). Through /sdapi/v1/img2img and txt2img with enable_hr, and `ldmkit img2img --refiner` /
`ldmkit generate --hires-scale 2 --refiner`: the library's image and A1111's infotext.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from reference import encode_to_posterior_mean, img2img_noise_as_diffusers
from test_sdxl import _diffusers_sdxl_folder
from test_sdxl_pipeline import PROMPT, H, W, _init_image, _pixels, _ref_pixels, _scheduler

from ldmkit import checkpoint, cli
from ldmkit.config import TINY_SDXL, TINY_SDXL_REFINER
from ldmkit.pipeline import GenerationParams, img2img
from ldmkit.sdxl import img2img_refined, switch_step

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base, ref = tmp_path_factory.mktemp("xl"), tmp_path_factory.mktemp("xl-refiner")
    return (base / "model", _diffusers_sdxl_folder(TINY_SDXL, base)), (ref / "model",
                                                                       _diffusers_sdxl_folder(TINY_SDXL_REFINER, ref))


def _params(strength: float) -> GenerationParams:
    return GenerationParams(PROMPT, negative_prompt="dark", steps=10, cfg_scale=5.0, sampler="Euler",
                            scheduler="uniform", seed=7, width=W, height=H, strength=strength)


def test_switch_step_is_a1111s_timestep_rule():
    from ldmkit.core import model_schedule
    from ldmkit.sdxl import StableDiffusionXL

    with torch.device("meta"):  # only its config (the SD noise schedule) is read
        model = StableDiffusionXL(TINY_SDXL)
    table = model_schedule(model).sigmas.float()
    sigmas = torch.cat([table[[999, 888, 777, 666, 555, 444, 333, 222, 111, 0]], torch.zeros(1)])
    assert switch_step(model, sigmas, 0.5) == 5  # t 444 is the first with (999 - t) / 1000 >= 0.5
    assert switch_step(model, sigmas, 0.8) == 8  # t 111 (222 gives 0.777)
    assert switch_step(model, sigmas[4:], 0.3) == 0  # img2img from t 555: the refiner does it all
    assert switch_step(model, sigmas, 0.9995) == 10  # never reached: the base alone


def test_img2img_with_refiner_matches_diffusers(models, monkeypatch):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    (folder, pipe), (rfolder, rpipe) = models
    i2i = StableDiffusionXLImg2ImgPipeline(**pipe.components)
    encode_to_posterior_mean(i2i, monkeypatch)
    img2img_noise_as_diffusers(monkeypatch)
    i2i.scheduler, rpipe.scheduler = _scheduler("euler"), _scheduler("euler")
    init = _init_image()
    kw = dict(negative_prompt="dark", num_inference_steps=10, guidance_scale=5.0)
    latents = i2i(PROMPT, image=init, strength=0.8, denoising_end=0.5, generator=torch.Generator().manual_seed(7),
                  output_type="latent", **kw).images
    ref = _ref_pixels(rpipe(PROMPT, image=latents, denoising_start=0.5, output_type="np", **kw))

    base, refiner = checkpoint.load(folder), checkpoint.load(rfolder)
    seen = []
    ours = img2img_refined(base, refiner, _params(0.8), init, switch_at=0.5, callback=lambda d: seen.append(d["i"]))[0]
    diff = np.abs(_pixels(ours) - ref).max()
    assert diff <= 2, f"max pixel difference {diff}/255"
    assert np.abs(_pixels(img2img(base, _params(0.8), init)[0]) - ref).max() > 4  # the refiner's part shows
    assert seen == list(range(8))  # 3 base steps (t 777..555) then 5 refiner steps, counted on
    text = ours.info["parameters"]
    assert "Denoising strength: 0.8" in text and "Refiner: model, Refiner switch at: 0.5" in text


def test_img2img_below_the_switch_is_the_refiners_alone(models, monkeypatch):
    """strength 0.3 starts at t 222 (progress 0.78 >= 0.5): diffusers' refiner img2img at that strength."""
    (folder, _), (rfolder, rpipe) = models
    encode_to_posterior_mean(rpipe, monkeypatch)
    img2img_noise_as_diffusers(monkeypatch)
    rpipe.scheduler = _scheduler("euler")
    init = _init_image()
    ref = _ref_pixels(rpipe(PROMPT, image=init, strength=0.3, negative_prompt="dark", num_inference_steps=10,
                            guidance_scale=5.0, generator=torch.Generator().manual_seed(7), output_type="np"))
    ours = img2img_refined(checkpoint.load(folder), checkpoint.load(rfolder), _params(0.3), init, switch_at=0.5)[0]
    assert np.abs(_pixels(ours) - ref).max() <= 2
    assert "Refiner: model" in ours.info["parameters"]


# ---------------------------------------------------------------- the A1111 API

pytest.importorskip("fastapi", reason="server extra not installed: pip install 'ldmkit[server]'")
REQUEST = {"prompt": "an apple", "negative_prompt": "dark", "steps": 4, "width": 32, "height": 24, "seed": 11,
           "sampler_name": "Euler", "cfg_scale": 5}


def _decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_img2img_and_hires_with_refiner_through_the_api(tmp_path):
    from fastapi.testclient import TestClient
    from test_sdxl_server import write_models

    from ldmkit.hires import HiresParams, txt2img_hires
    from ldmkit.server.app import create_app

    write_models(tmp_path)
    client = TestClient(create_app(tmp_path / "xl.safetensors", models_dir=tmp_path, preview_interval=0))
    base, refiner = checkpoint.load(tmp_path / "xl.safetensors"), checkpoint.load(tmp_path / "xl-refiner.safetensors")
    ref_hash = checkpoint.model_hash(tmp_path / "xl-refiner.safetensors")
    init = _init_image()
    buf = io.BytesIO()
    init.save(buf, format="PNG")
    body = {**REQUEST, "init_images": [base64.b64encode(buf.getvalue()).decode()], "denoising_strength": 0.8,
            "refiner_checkpoint": "xl-refiner", "refiner_switch_at": 0.5}
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    got = _decode(r.json()["images"][0])
    params = GenerationParams("an apple", negative_prompt="dark", steps=4, cfg_scale=5.0, sampler="Euler", seed=11,
                              width=32, height=24, strength=0.8)
    want = img2img_refined(base, refiner, params, init, switch_at=0.5)[0]
    assert np.array_equal(_pixels(got), _pixels(want))
    common = ["--negative-prompt", "dark", "--steps", "4", "--width", "32", "--height", "24", "--seed", "11",
              "--sampler", "Euler", "--cfg-scale", "5", "--model", str(tmp_path / "xl.safetensors"),
              "--refiner", str(tmp_path / "xl-refiner.safetensors"), "--refiner-switch-at", "0.5"]
    init.save(tmp_path / "init.png")
    assert cli.main(["img2img", "an apple", *common, "--init-image", str(tmp_path / "init.png"), "--strength", "0.8",
                     "-o", str(tmp_path / "cli-i2i.png")]) == 0
    assert np.array_equal(_pixels(Image.open(tmp_path / "cli-i2i.png")), _pixels(got))
    info = json.loads(r.json()["info"])
    assert f"Refiner: xl-refiner [{ref_hash}], Refiner switch at: 0.5" in info["infotexts"][0]
    assert info["extra_generation_params"]["Refiner switch at"] == "0.5"

    # hires fix + refiner: the first pass is the base's, the refiner finishes the second (A1111's default)
    hr = {**REQUEST, "enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 4,
          "denoising_strength": 0.7}
    r = client.post("/sdapi/v1/txt2img", json={**hr, "refiner_checkpoint": "xl-refiner", "refiner_switch_at": 0.5})
    assert r.status_code == 200, r.text
    got = _decode(r.json()["images"][0])
    assert got.size == (64, 48)
    text = got.info["parameters"]
    assert "Hires upscale: 2" in text and f"Refiner: xl-refiner [{ref_hash}], Refiner switch at: 0.5" in text
    hires = HiresParams(scale=2.0, upscaler="Latent", steps=4, denoise=0.7)
    params = params.replace(strength=0.75)
    want = txt2img_hires(base, params, hires, refiner=refiner, switch_at=0.5)[0]
    assert np.array_equal(_pixels(got), _pixels(want))
    assert cli.main(["generate", "an apple", *common, "--hires-scale", "2", "--hires-steps", "4", "--hires-denoise",
                     "0.7", "-o", str(tmp_path / "cli-hr.png")]) == 0
    assert np.array_equal(_pixels(Image.open(tmp_path / "cli-hr.png")), _pixels(got))
    plain = _decode(client.post("/sdapi/v1/txt2img", json=hr).json()["images"][0])
    assert np.abs(_pixels(plain) - _pixels(got)).max() > 4 and "Refiner" not in plain.info["parameters"]
