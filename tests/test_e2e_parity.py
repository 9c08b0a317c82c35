"""A random tiny pipeline saved by diffusers loads in ldmkit and gives the same images.

Each case names the diffusers scheduler settings that correspond to an ldmkit sampler and schedule
(docs/samplers.md has the full table). Target: max pixel difference <= 2/255.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference import encode_to_posterior_mean, img2img_noise_as_diffusers, save_diffusers_pipeline

from ldmkit import checkpoint
from ldmkit.config import TINY, TINY_SD2
from ldmkit.pipeline import GenerationParams, img2img, txt2img

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
CASES = {
    # ldmkit sampler, schedule, steps -> diffusers scheduler
    "euler": ("Euler", "uniform", 10, "EulerDiscreteScheduler", dict(timestep_spacing="linspace")),
    "ddim": ("DDIM", "ddim_uniform", 10, "DDIMScheduler",
             dict(timestep_spacing="leading", steps_offset=1, clip_sample=False, set_alpha_to_one=True)),
    "dpmpp_2m": ("DPM++ 2M", "karras", 12, "DPMSolverMultistepScheduler",
                 dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", use_karras_sigmas=True,
                      final_sigmas_type="zero")),
}


def _diffusers_image(pipe, prompt, negative, steps, cfg_scale, seed, size, latents=None):
    out = pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=cfg_scale,
               generator=torch.Generator().manual_seed(seed), height=size[1], width=size[0], output_type="np",
               latents=latents)
    return (out.images[0] * 255).round().astype(np.int16)


@pytest.fixture(scope="module", params=[TINY, TINY_SD2], ids=lambda c: c.name)
def saved_pipeline(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param.name)
    pipe = save_diffusers_pipeline(request.param, folder)
    return request.param, folder, pipe


@pytest.mark.parametrize("case", list(CASES))
def test_txt2img_matches_diffusers(saved_pipeline, case):
    import diffusers

    cfg, folder, pipe = saved_pipeline
    sampler, schedule, steps, cls, settings = CASES[case]
    pred = "v_prediction" if cfg.prediction == "v" else "epsilon"
    pipe.scheduler = getattr(diffusers, cls)(**SD, prediction_type=pred, **settings)
    model = checkpoint.load(folder)
    assert model.cfg.prediction == cfg.prediction
    size, seed, prompt, negative = (24, 16), 1234, "a red apple on a wooden table", "blurry"

    latents = None
    if case == "dpmpp_2m":
        # diffusers' DPM-Solver starts from N(0, 1) in x_t = x / sqrt(1 + sigma^2) space; ldmkit's DPM++ 2M
        # (like k-diffusion/A1111) from sigma_max * N(0, 1). Same seed, same starting point:
        g = torch.Generator().manual_seed(seed)
        z = torch.randn((1, 4, size[1] // 2, size[0] // 2), generator=g)
        sigma_max = 14.614641
        latents = z * sigma_max / math.sqrt(1 + sigma_max**2)
    ref = _diffusers_image(pipe, prompt, negative, steps, 7.0, seed, size, latents)
    ours = txt2img(model, GenerationParams(prompt, negative_prompt=negative, steps=steps, cfg_scale=7.0,
                                           sampler=sampler, scheduler=schedule, seed=seed, width=size[0],
                                           height=size[1]))[0]
    diff = np.abs(np.asarray(ours).astype(np.int16) - ref).max()
    assert diff <= 2, f"max pixel difference {diff}/255"
    # and the images are not trivially flat (a broken decoder could make both grey)
    assert ref.std() > 5


def test_img2img_matches_diffusers(saved_pipeline, monkeypatch):
    """img2img runs the last ``strength`` of the schedule from the encoded image plus noise."""
    import diffusers
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    cfg, folder, pipe = saved_pipeline
    if cfg.prediction == "v":
        pytest.skip("one prediction type is enough for img2img")
    pipe.scheduler = diffusers.EulerDiscreteScheduler(**SD, timestep_spacing="linspace")
    i2i = StableDiffusionImg2ImgPipeline(**pipe.components)
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 24, 3), dtype=np.uint8))
    steps, strength, seed = 10, 0.6, 7

    # ldmkit encodes to the posterior mean; diffusers samples the posterior with the pipeline's generator
    # and then draws the noise from the same generator. Zero the posterior's std so diffusers uses the
    # mean too, and give ldmkit the noise that diffusers' generator produces second.
    encode_to_posterior_mean(i2i, monkeypatch)
    img2img_noise_as_diffusers(monkeypatch)
    ref = i2i("a watercolor apple", image=init, strength=strength, num_inference_steps=steps, guidance_scale=5.0,
              generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
    ref = (ref * 255).round().astype(np.int16)
    model = checkpoint.load(folder)
    ours = img2img(model, GenerationParams("a watercolor apple", steps=steps, cfg_scale=5.0, sampler="Euler",
                                           scheduler="uniform", seed=seed, width=24, height=16, strength=strength),
                   init)[0]
    diff = np.abs(np.asarray(ours).astype(np.int16) - ref).max()
    assert diff <= 2, f"max pixel difference {diff}/255"
