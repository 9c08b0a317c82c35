"""Hires. fix: ldmkit's two passes equal diffusers' txt2img -> upscale -> img2img composed by hand with A1111's
step rule (``steps`` of a schedule of ``int(steps / denoise)``), on a random tiny pipeline (<= 2/255); A1111's
target-size rules in closed form; the CLI flags, infotext and ``--from-png``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from reference import save_diffusers_pipeline

from ldmkit import checkpoint
from ldmkit.config import TINY
from ldmkit.core import GenerationError, GenerationParams
from ldmkit.hires import HiresParams, txt2img_hires
from ldmkit.infotext import parse_infotext

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    pipe = save_diffusers_pipeline(TINY, folder)
    return folder, pipe


def _reference(pipe, prompt, seed, size, steps, hr_steps, denoise, upscale_latents=None, upscale_image=None):
    """diffusers: txt2img latents -> (latent interpolation | decode, uint8, resize, encode mean) -> img2img."""
    from diffusers import StableDiffusionImg2ImgPipeline

    kw = dict(negative_prompt="blurry", guidance_scale=6.0)
    lat = pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), width=size[0],
               height=size[1], output_type="latent", **kw).images
    sf = pipe.vae.config.scaling_factor
    if upscale_latents is not None:
        init = upscale_latents(lat)
    else:
        with torch.no_grad():
            x = pipe.vae.decode(lat / sf).sample
        arr = ((x[0] / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        big = upscale_image(Image.fromarray(arr))
        t = torch.from_numpy(np.asarray(big, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        with torch.no_grad():
            init = pipe.vae.encode(t).latent_dist.mean * sf
    i2i = StableDiffusionImg2ImgPipeline(**pipe.components)
    total = int(hr_steps / denoise)
    assert int(total * denoise) == hr_steps  # diffusers runs int(total * strength) steps: the same ones
    out = i2i(prompt, image=init, strength=denoise, num_inference_steps=total,
              generator=torch.Generator().manual_seed(seed), output_type="np", **kw).images[0]
    return (out * 255).round().astype(np.int16)


@pytest.mark.parametrize("upscaler", ["Latent", "Latent (bicubic antialiased)", "Lanczos"])
def test_hires_matches_diffusers_composition(saved, upscaler):
    folder, pipe = saved
    model = checkpoint.load(folder)
    size, seed, steps, hr_steps, denoise = (24, 16), 11, 6, 4, 0.5
    params = GenerationParams("a red apple", negative_prompt="blurry", steps=steps, cfg_scale=6.0, sampler="Euler",
                              scheduler="uniform", seed=seed, width=size[0], height=size[1])
    hires = HiresParams(scale=2, upscaler=upscaler, steps=hr_steps, denoise=denoise)
    ours = txt2img_hires(model, params, hires)[0]
    assert ours.size == (48, 32)
    if upscaler.startswith("Latent"):
        mode, aa = {"Latent": ("bilinear", False), "Latent (bicubic antialiased)": ("bicubic", True)}[upscaler]
        ref = _reference(pipe, "a red apple", seed, size, steps, hr_steps, denoise,
                         upscale_latents=lambda z: F.interpolate(z, scale_factor=2, mode=mode, antialias=aa))
    else:
        ref = _reference(pipe, "a red apple", seed, size, steps, hr_steps, denoise,
                         upscale_image=lambda im: im.resize((48, 32), Image.Resampling.LANCZOS))
    diff = np.abs(np.asarray(ours).astype(np.int16) - ref).max()
    assert diff <= 2, f"max pixel difference {diff}/255"
    assert ref.std() > 5
    p = parse_infotext(ours.info["parameters"])
    assert p["Size"] == "24x16" and p["Steps"] == "6"
    assert (p["Denoising strength"], p["Hires upscale"], p["Hires steps"], p["Hires upscaler"]) == (
        "0.5", "2", "4", upscaler)
    assert HiresParams.from_infotext(p) == hires


def test_a1111_target_sizes():
    # (width, height, hires) -> (upscale_to_x, upscale_to_y, truncate_x, truncate_y), modules/processing.py
    assert HiresParams(scale=1.5).target(512, 768) == (768, 1152, 0, 0)
    assert HiresParams(resize_x=1024).target(512, 768) == (1024, 1536, 0, 0)
    assert HiresParams(resize_y=1024).target(512, 768) == (682, 1024, 0, 0)
    # both: cover the box (the aspect ratio kept), then crop the excess
    assert HiresParams(resize_x=1024, resize_y=1024).target(512, 768) == (1024, 1536, 0, 512)
    assert HiresParams(resize_x=1024, resize_y=512).target(512, 512) == (1024, 1024, 0, 512)
    assert HiresParams(resize_x=600, resize_y=600).target(512, 768) == (600, 900, 0, 300)


def test_hires_resize_crops_to_the_box(saved):
    folder, _ = saved
    model = checkpoint.load(folder)
    params = GenerationParams("a castle", steps=2, sampler="Euler", seed=1, width=16, height=24)
    out = txt2img_hires(model, params, HiresParams(resize_x=32, resize_y=32, steps=2, denoise=0.5))[0]
    assert out.size == (32, 32)
    assert "Hires resize: 32x32" in out.info["parameters"]


@pytest.mark.parametrize("hires,needle", [
    (HiresParams(scale=0.5), "hires scale"), (HiresParams(denoise=0), "denoising strength"),
    (HiresParams(steps=-1), "hires steps"), (HiresParams(upscaler="nope.pth"), "hires upscaler 'nope.pth'")])
def test_bad_hires_settings(saved, hires, needle):
    folder, _ = saved
    model = checkpoint.load(folder)
    with pytest.raises(GenerationError, match=needle):
        txt2img_hires(model, GenerationParams("x", steps=1, width=16, height=16), hires)


def test_cli_hires_and_from_png(saved, tmp_path, capsys):
    from ldmkit.cli import main

    folder, _ = saved
    out = tmp_path / "hr.png"
    args = ["generate", "a red apple", "--model", str(folder), "--steps", "3", "--sampler", "Euler", "--seed", "5",
            "--width", "24", "--height", "16", "--hires-scale", "2", "--hires-upscaler", "Latent",
            "--hires-steps", "2", "--hires-denoise", "0.5", "-o", str(out)]
    assert main(args) == 0
    with Image.open(out) as im:
        assert im.size == (48, 32)
        first = np.asarray(im.convert("RGB"))
        text = im.info["parameters"]
    assert "Hires upscale: 2, Hires steps: 2, Hires upscaler: Latent" in text and "Denoising strength: 0.5" in text
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(out), "--model", str(folder), "-o", str(again)]) == 0
    with Image.open(again) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), first)
        assert im.info["parameters"] == text
    capsys.readouterr()
    bad = args[:-2] + ["--hires-denoise", "1.5", "-o", str(tmp_path / "x.png")]
    assert main(bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ldmkit: error:") and "denoising strength" in err[-1]


# ---------------------------------------------------------------- the A1111 API


@pytest.fixture(scope="module")
def hires_server(tmp_path_factory):
    pytest.importorskip("fastapi", reason="server extra not installed: pip install 'ldmkit[server]'")
    from fastapi.testclient import TestClient
    from test_upscale import _save, basicsr_params

    from ldmkit.model import StableDiffusion
    from ldmkit.server.app import create_app

    d = tmp_path_factory.mktemp("hires_server")
    torch.manual_seed(3)
    checkpoint.save_single_file(StableDiffusion(TINY), d / "tiny.safetensors")
    (d / "upscalers").mkdir()
    _save(basicsr_params(nf=8, nb=1, gc=4, scale=2, seed=4), d / "upscalers" / "RealESRGAN_x2plus.pth", "params_ema")
    app = create_app(d / "tiny.safetensors", upscaler_dir=d / "upscalers", device="cpu", preview_interval=None)
    with TestClient(app) as client:
        yield client, d


def _decode(b64: str) -> Image.Image:
    import base64
    import io

    return Image.open(io.BytesIO(base64.b64decode(b64)))


@pytest.mark.parametrize("upscaler", ["Latent", "RealESRGAN_x2plus", "R-ESRGAN 2x+"])
def test_api_hires_and_from_png_reproduces(hires_server, tmp_path, upscaler):
    import json

    from ldmkit.cli import main

    client, d = hires_server
    body = {"prompt": "a castle", "steps": 3, "sampler_name": "Euler", "seed": 9, "width": 24, "height": 16,
            "cfg_scale": 6, "enable_hr": True, "hr_scale": 2, "hr_upscaler": upscaler, "hr_second_pass_steps": 2,
            "denoising_strength": 0.5}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    img = _decode(r.json()["images"][0])
    assert img.size == (48, 32)
    text = img.info["parameters"]
    for field in ("Size: 24x16", "Denoising strength: 0.5", "Hires upscale: 2", "Hires steps: 2",
                  f"Hires upscaler: {upscaler}"):
        assert field in text
    info = json.loads(r.json()["info"])
    assert info["denoising_strength"] == 0.5 and info["extra_generation_params"]["Hires upscaler"] == upscaler
    src = tmp_path / "api.png"
    img.save(src, pnginfo=_pnginfo(text))
    out = tmp_path / "cli.png"
    assert main(["generate", "--from-png", str(src), "--model", str(d / "tiny.safetensors"),
                 "--upscaler-dir", str(d / "upscalers"), "-o", str(out)]) == 0
    with Image.open(out) as again:
        assert np.array_equal(np.asarray(again.convert("RGB")), np.asarray(img.convert("RGB")))


def _pnginfo(text: str):
    from PIL import PngImagePlugin

    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", text)
    return meta


@pytest.mark.parametrize("extra,field", [
    ({"hr_upscaler": "nope"}, "hr_upscaler"), ({"hr_scale": 50}, "hr_scale"),
    ({"denoising_strength": 0}, "denoising_strength"), ({"hr_second_pass_steps": -2}, "hr_second_pass_steps"),
    ({"hr_resize_x": 4096, "hr_resize_y": 4096}, "hr_resize_x")])
def test_api_bad_hires_settings(hires_server, extra, field):
    client, _ = hires_server
    body = {"prompt": "x", "steps": 1, "width": 16, "height": 16, "enable_hr": True, **extra}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 422, r.text
    assert field in json_loc(r)


def json_loc(r) -> str:
    return " ".join(str(x) for e in r.json()["detail"] for x in e["loc"])


def test_python_api_hires(saved):
    from ldmkit import api

    folder, _ = saved
    pipe = api.load(str(folder), device="cpu")
    hires = HiresParams(scale=1.5, upscaler="Nearest", steps=2, denoise=0.6)
    kw = dict(steps=2, sampler="Euler", seed=4, width=16, height=16)
    out = pipe.txt2img("a boat", hires=hires, **kw)[0]
    direct = txt2img_hires(pipe.model, GenerationParams("a boat", **kw), hires)[0]
    assert out.size == (24, 24) and np.array_equal(np.asarray(out), np.asarray(direct))
    assert "Hires upscaler: Nearest" in out.info["parameters"]


def test_sdxl_hires_matches_diffusers(tmp_path):
    """SDXL hires (latent) vs diffusers' SDXL txt2img -> interpolate -> SDXL img2img. (The second pass's size ids
    are the target's, as diffusers takes them from the latent; on this random tiny U-Net their effect is within
    the tolerance, so this does not tell the ids apart.)"""
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from test_sdxl import _diffusers_sdxl_folder

    from ldmkit.config import TINY_SDXL

    pipe = _diffusers_sdxl_folder(TINY_SDXL, tmp_path)
    from diffusers import EulerDiscreteScheduler

    pipe.scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            timestep_spacing="linspace")
    seed, steps, hr_steps, denoise, (w, h) = 5, 4, 3, 0.5, (16, 16)
    kw = dict(negative_prompt="dark", guidance_scale=5.0)
    lat = pipe("a boat", num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), width=w, height=h,
               output_type="latent", **kw).images
    i2i = StableDiffusionXLImg2ImgPipeline(**pipe.components)
    init = F.interpolate(lat, scale_factor=2, mode="bilinear")
    ref = i2i("a boat", image=init, strength=denoise, num_inference_steps=int(hr_steps / denoise),
              generator=torch.Generator().manual_seed(seed), output_type="np", **kw).images[0]
    ref = (ref * 255).round().astype(np.int16)
    model = checkpoint.load(tmp_path / "model")
    params = GenerationParams("a boat", negative_prompt="dark", steps=steps, cfg_scale=5.0, sampler="Euler",
                              scheduler="uniform", seed=seed, width=w, height=h)
    ours = txt2img_hires(model, params, HiresParams(scale=2, steps=hr_steps, denoise=denoise))[0]
    assert ours.size == (32, 32)
    assert np.abs(np.asarray(ours).astype(np.int16) - ref).max() <= 2
