"""SDXL generation end to end against diffusers: a random tiny SDXL pipeline saved by diffusers loads in ldmkit
and txt2img (Euler, DPM++ 2M Karras), img2img and the refiner give the same image as StableDiffusionXLPipeline /
StableDiffusionXLImg2ImgPipeline (max pixel difference <= 2/255); ldmkit's single file loads in diffusers'
from_single_file and gives the same image again.

Scheduler correspondences as in tests/test_e2e_parity.py (docs/samplers.md).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference import encode_to_posterior_mean, img2img_noise_as_diffusers
from test_sdxl import _diffusers_sdxl_folder

from ldmkit import checkpoint
from ldmkit.config import TINY_SDXL, TINY_SDXL_REFINER
from ldmkit.pipeline import GenerationParams, img2img, txt2img

pytestmark = pytest.mark.usefixtures("one_thread")
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
W, H = 32, 24  # latent 16 x 12 with the tiny autoencoder (f = 2)
PROMPT = "a red apple on a wooden table"


def _pixels(img) -> np.ndarray:
    return np.asarray(img).astype(np.int16)


def _ref_pixels(out) -> np.ndarray:
    return (out.images[0] * 255).round().astype(np.int16)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xl")
    pipe = _diffusers_sdxl_folder(TINY_SDXL, folder)
    return folder / "model", pipe


@pytest.fixture(scope="module")
def refiner(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xl-refiner")
    pipe = _diffusers_sdxl_folder(TINY_SDXL_REFINER, folder)
    return folder / "model", pipe


def _scheduler(case: str):
    import diffusers

    if case == "euler":
        return diffusers.EulerDiscreteScheduler(**SD, timestep_spacing="linspace")
    return diffusers.DPMSolverMultistepScheduler(**SD, algorithm_type="dpmsolver++", solver_order=2,
                                                 solver_type="midpoint", use_karras_sigmas=True,
                                                 final_sigmas_type="zero")


def _diffusers_txt2img(pipe, case: str, negative: str, steps: int, seed: int) -> np.ndarray:
    pipe.scheduler = _scheduler(case)
    latents = None
    if case == "dpmpp_2m":  # diffusers' DPM-Solver starts in x / sqrt(1 + sigma^2) space (see test_e2e_parity)
        z = torch.randn((1, 4, H // 2, W // 2), generator=torch.Generator().manual_seed(seed))
        sigma_max = 14.614641
        latents = z * sigma_max / math.sqrt(1 + sigma_max**2)
    # negative_prompt None is diffusers' zeroed negative (force_zeros_for_empty_prompt), A1111's for ""
    out = pipe(PROMPT, negative_prompt=negative or None, num_inference_steps=steps, guidance_scale=6.0,
               generator=torch.Generator().manual_seed(seed), height=H, width=W, output_type="np", latents=latents)
    return _ref_pixels(out)


CASES = {"euler": ("Euler", "uniform", 8), "dpmpp_2m": ("DPM++ 2M", "karras", 10)}


@pytest.mark.parametrize("negative", ["", "blurry, low quality"], ids=["zero-negative", "negative"])
@pytest.mark.parametrize("case", list(CASES))
def test_txt2img_matches_diffusers(base, case: str, negative: str):
    folder, pipe = base
    sampler, schedule, steps = CASES[case]
    ref = _diffusers_txt2img(pipe, case, negative, steps, seed=1234)
    model = checkpoint.load(folder)
    ours = txt2img(model, GenerationParams(PROMPT, negative_prompt=negative, steps=steps, cfg_scale=6.0,
                                           sampler=sampler, scheduler=schedule, seed=1234, width=W, height=H))[0]
    diff = np.abs(_pixels(ours) - ref).max()
    assert diff <= 2, f"max pixel difference {diff}/255"
    assert ref.std() > 5  # not a flat image
    info = ours.info["parameters"]
    assert f"Sampler: {sampler}" in info and f"Size: {W}x{H}" in info and "Model: model" in info


def _img2img_reference(i2i, monkeypatch, prompt, init, steps, strength, seed, **kw) -> np.ndarray:
    """diffusers' img2img with the posterior's mean (ldmkit encodes to the mean) and ldmkit given the noise
    diffusers' generator draws second (the first draw is diffusers' posterior sample)."""
    encode_to_posterior_mean(i2i, monkeypatch)
    img2img_noise_as_diffusers(monkeypatch)
    i2i.scheduler = _scheduler("euler")
    out = i2i(prompt, image=init, strength=strength, num_inference_steps=steps, guidance_scale=5.0,
              generator=torch.Generator().manual_seed(seed), output_type="np", **kw)
    return _ref_pixels(out)


def _init_image():
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8))


@pytest.mark.parametrize("which", ["base", "refiner"])
def test_img2img_and_refiner_match_diffusers(which: str, base, refiner, monkeypatch):
    """img2img with the base (size/crop ids) and the refiner (aesthetic score 6 / 2.5) vs
    StableDiffusionXLImg2ImgPipeline."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    folder, pipe = base if which == "base" else refiner
    i2i = pipe if which == "refiner" else StableDiffusionXLImg2ImgPipeline(**pipe.components)
    init = _init_image()
    steps, strength, seed = 10, 0.6, 7
    ref = _img2img_reference(i2i, monkeypatch, "a watercolor apple", init, steps, strength, seed,
                             negative_prompt="dark")
    model = checkpoint.load(folder)
    ours = img2img(model, GenerationParams("a watercolor apple", negative_prompt="dark", steps=steps, cfg_scale=5.0,
                                           sampler="Euler", scheduler="uniform", seed=seed, width=W, height=H,
                                           strength=strength), init)[0]
    diff = np.abs(_pixels(ours) - ref).max()
    assert diff <= 2, f"max pixel difference {diff}/255"
    assert "Denoising strength: 0.6" in ours.info["parameters"]


def test_single_file_output_in_diffusers(base, tmp_path):
    """ldmkit's single file (no stored config needed by diffusers) loads in from_single_file and gives the
    same image as ldmkit from that file."""
    from diffusers import StableDiffusionXLPipeline

    from ldmkit.checkpoint_sdxl import save_sdxl_single_file

    folder, _ = base
    path = tmp_path / "tiny-xl.safetensors"
    save_sdxl_single_file(checkpoint.load(folder), path)
    theirs = StableDiffusionXLPipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
    ref = _diffusers_txt2img(theirs, "euler", "blurry", 8, seed=99)
    model = checkpoint.load(path)
    ours = txt2img(model, GenerationParams(PROMPT, negative_prompt="blurry", steps=8, cfg_scale=6.0,
                                           sampler="Euler", scheduler="uniform", seed=99, width=W, height=H))[0]
    assert np.abs(_pixels(ours) - ref).max() <= 2
    assert f"Model hash: {checkpoint.model_hash(path)}" in ours.info["parameters"]


def test_base_plus_refiner_matches_diffusers(base, refiner):
    """The refiner as second expert: diffusers' base with denoising_end=0.5 (latents out) and the refiner with
    denoising_start=0.5, against ldmkit's txt2img_refined (A1111's refiner switch at; 0.5 rather than the usual
    0.8 so that the tiny random refiner's part is well above the tolerance)."""
    from ldmkit.sdxl import txt2img_refined

    (folder, pipe), (rfolder, rpipe) = base, refiner
    pipe.scheduler, rpipe.scheduler = _scheduler("euler"), _scheduler("euler")
    seed, steps = 21, 10
    kw = dict(negative_prompt="dark", num_inference_steps=steps, guidance_scale=5.0)
    latents = pipe(PROMPT, generator=torch.Generator().manual_seed(seed), height=H, width=W, denoising_end=0.5,
                   output_type="latent", **kw).images
    ref = _ref_pixels(rpipe(PROMPT, image=latents, denoising_start=0.5, output_type="np", **kw))
    steps_seen = []
    params = GenerationParams(PROMPT, negative_prompt="dark", steps=steps, cfg_scale=5.0, sampler="Euler",
                              scheduler="uniform", seed=seed, width=W, height=H)
    model = checkpoint.load(folder)
    ours = txt2img_refined(model, checkpoint.load(rfolder), params, switch_at=0.5,
                           callback=lambda d: steps_seen.append(d["i"]))[0]
    diff = np.abs(_pixels(ours) - ref).max()
    assert diff <= 2, f"max pixel difference {diff}/255"
    assert np.abs(_pixels(txt2img(model, params)[0]) - ref).max() > 4  # the refiner's part shows (8/255 here)
    assert steps_seen == list(range(steps))
    assert "Refiner: model, Refiner switch at: 0.5" in ours.info["parameters"]


def test_inpainting_model_matches_diffusers(tmp_path, monkeypatch):
    """A 9-channel SDXL inpainting model: mask and masked-image latent as extra input channels, vs
    StableDiffusionXLInpaintPipeline at strength 1."""
    from diffusers import StableDiffusionXLInpaintPipeline
    from PIL import Image
    from test_sdxl import TINY_SDXL_INPAINT

    from ldmkit.pipeline import inpaint

    pipe = _diffusers_sdxl_folder(TINY_SDXL_INPAINT, tmp_path)
    ip = StableDiffusionXLInpaintPipeline(**pipe.components)
    ip.scheduler = _scheduler("euler")
    encode_to_posterior_mean(ip, monkeypatch)  # diffusers samples the masked image's posterior
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[4:16, 8:24] = 255  # white: repaint
    image, mask = _init_image(), Image.fromarray(mask)
    seed, steps = 3, 8
    ref = _ref_pixels(ip(PROMPT, image=image, mask_image=mask, height=H, width=W, strength=1.0,
                         num_inference_steps=steps, guidance_scale=6.0, negative_prompt="dark",
                         generator=torch.Generator().manual_seed(seed), output_type="np"))
    model = checkpoint.load(tmp_path / "model")
    assert model.cfg.is_inpainting and model.cfg.is_sdxl
    ours = inpaint(model, GenerationParams(PROMPT, negative_prompt="dark", steps=steps, cfg_scale=6.0,
                                           sampler="Euler", scheduler="uniform", seed=seed, width=W, height=H,
                                           strength=1.0), image, mask)[0]
    diff = np.abs(_pixels(ours) - ref).max()
    assert diff <= 2, f"max pixel difference {diff}/255"


def test_turbo_one_step_matches_diffusers(base, tmp_path):
    """--model-type sdxl-turbo: native 512², 1 step of Euler ancestral on the trailing schedule without CFG (the
    settings travel with ldmkit's single file), vs diffusers' SDXL-Turbo recipe (EulerAncestralDiscreteScheduler,
    timestep_spacing="trailing", guidance_scale 0) on the same weights."""
    import diffusers

    from ldmkit.api import Pipeline
    from ldmkit.checkpoint_sdxl import save_sdxl_single_file

    folder, pipe = base
    path = tmp_path / "turbo.safetensors"
    save_sdxl_single_file(checkpoint.load(folder), path)
    turbo = checkpoint.load(path, model_type="sdxl-turbo")
    assert turbo.cfg.native_size == 512 and turbo.recommended.steps == 1
    save_sdxl_single_file(turbo, tmp_path / "turbo-marked.safetensors")
    again = checkpoint.load(tmp_path / "turbo-marked.safetensors")  # no --model-type needed any more
    assert again.cfg.native_size == 512 and again.recommended == turbo.recommended

    pipe.scheduler = diffusers.EulerAncestralDiscreteScheduler(**SD, timestep_spacing="trailing")
    out = pipe(PROMPT, num_inference_steps=1, guidance_scale=0.0, generator=torch.Generator().manual_seed(5),
               height=H, width=W, output_type="np")
    ours = Pipeline(again).txt2img(PROMPT, seed=5, width=W, height=H)[0]
    assert np.abs(_pixels(ours) - _ref_pixels(out)).max() <= 2
    info = ours.info["parameters"]
    assert "Steps: 1, Sampler: Euler a, Schedule type: Trailing, CFG scale: 1" in info
