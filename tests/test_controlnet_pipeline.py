"""Whole images with ControlNets against diffusers.StableDiffusionControlNetPipeline (issue 16, part 1).

The tiny random pipeline of test_e2e_parity plus random ControlNets saved by diffusers; ldmkit loads
both folders and must give the same image (<= 2/255) with controlnet_conditioning_scale,
control_guidance_start/end, and two ControlNets at once (diffusers' MultiControlNetModel).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from reference import encode_to_posterior_mean, img2img_noise_as_diffusers, save_diffusers_pipeline
from test_controlnet import diffusers_controlnet

from ldmkit import checkpoint
from ldmkit.config import TINY, TINY_SD2
from ldmkit.controlnet import ControlUnit, control_map, load_controlnet
from ldmkit.pipeline import GenerationParams, txt2img

SIZE = (24, 16)  # the tiny VAE halves: latents 12x8, and a hint encoder with one stride-2 stage
PROMPT, NEGATIVE, STEPS, CFG, SEED = "a stone house by a lake", "blurry", 10, 6.0, 77


@pytest.fixture(scope="module", params=[TINY, TINY_SD2], ids=lambda c: c.name)
def setup(request, tmp_path_factory):
    import diffusers

    cfg = request.param  # SD2: v-prediction, linear projections, 8-wide heads
    folder = tmp_path_factory.mktemp(f"cn-pipe-{cfg.name}")
    pipe = save_diffusers_pipeline(cfg, folder / "sd")
    pipe.scheduler = diffusers.EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="linspace",
        prediction_type="v_prediction" if cfg.prediction == "v" else "epsilon")
    nets = []
    for i in range(2):
        net = diffusers_controlnet(cfg.unet, hint=(8, 16), seed=10 + i)
        net.save_pretrained(folder / f"cn{i}")
        nets.append(net)
    rng = np.random.default_rng(0)
    maps = [Image.fromarray(rng.integers(0, 255, (SIZE[1], SIZE[0], 3), dtype=np.uint8)) for _ in range(2)]
    return folder, pipe, nets, maps


def _diffusers(setup, idx, scales, starts, ends, guess=False):
    from diffusers import StableDiffusionControlNetPipeline

    _, pipe, nets, maps = setup
    multi = len(idx) > 1
    cn = [nets[i] for i in idx] if multi else nets[idx[0]]
    p = StableDiffusionControlNetPipeline(**pipe.components, controlnet=cn)
    one = (lambda v: v) if multi else (lambda v: v[0])
    out = p(PROMPT, image=one([maps[i] for i in idx]), negative_prompt=NEGATIVE, num_inference_steps=STEPS,
            guidance_scale=CFG, generator=torch.Generator().manual_seed(SEED), width=SIZE[0], height=SIZE[1],
            controlnet_conditioning_scale=one(list(scales)), control_guidance_start=one(list(starts)),
            control_guidance_end=one(list(ends)), guess_mode=guess, output_type="np")
    return (out.images[0] * 255).round().astype(np.int16)


def _ours(setup, idx, scales, starts, ends, guess=False):
    folder, _, _, maps = setup
    model = checkpoint.load(folder / "sd")
    units = [ControlUnit(load_controlnet(folder / f"cn{i}", model.cfg.unet), control_map(maps[i], *SIZE), w, s, e,
                         guess)
             for i, w, s, e in zip(idx, scales, starts, ends, strict=True)]
    params = GenerationParams(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, cfg_scale=CFG, sampler="Euler",
                              scheduler="uniform", seed=SEED, width=SIZE[0], height=SIZE[1], controlnets=units)
    return np.asarray(txt2img(model, params)[0]).astype(np.int16), model


CASES = {
    "one": ([0], [0.7], [0.0], [1.0]),
    "start-end": ([1], [1.0], [0.2], [0.7]),
    "two": ([0, 1], [0.8, 0.5], [0.0, 0.3], [1.0, 0.8]),
    "guess-mode": ([0, 1], [1.0, 0.6], [0.0, 0.1], [1.0, 0.9], True),  # diffusers' guess_mode=True
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_diffusers_controlnet_pipeline(setup, case):
    ref = _diffusers(setup, *CASES[case])
    ours, model = _ours(setup, *CASES[case])
    diff = np.abs(ours - ref).max()
    assert diff <= 2, f"max pixel difference {diff}/255"
    # the ControlNet changed the image: compare with the same generation without it
    plain = np.asarray(txt2img(model, GenerationParams(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, cfg_scale=CFG,
                                                       sampler="Euler", scheduler="uniform", seed=SEED,
                                                       width=SIZE[0], height=SIZE[1]))[0]).astype(np.int16)
    assert np.abs(plain - ref).max() > 6  # well beyond the 2/255 parity margin
    assert ref.std() > 5


def test_img2img_matches_diffusers_controlnet_img2img(setup, monkeypatch):
    """img2img: start/end are fractions of the steps that run (diffusers counts the truncated timesteps)."""
    from diffusers import StableDiffusionControlNetImg2ImgPipeline

    from ldmkit.pipeline import img2img

    folder, pipe, nets, maps = setup
    if pipe.scheduler.config.prediction_type != "epsilon":
        pytest.skip("one prediction type is enough for img2img")
    i2i = StableDiffusionControlNetImg2ImgPipeline(**pipe.components, controlnet=nets[0])
    init = Image.fromarray(np.random.default_rng(5).integers(0, 255, (SIZE[1], SIZE[0], 3), dtype=np.uint8))
    encode_to_posterior_mean(i2i, monkeypatch)  # both use the posterior mean
    img2img_noise_as_diffusers(monkeypatch)
    ref = i2i(PROMPT, image=init, control_image=maps[0], strength=0.7, num_inference_steps=STEPS, guidance_scale=CFG,
              generator=torch.Generator().manual_seed(SEED), controlnet_conditioning_scale=0.9,
              control_guidance_start=0.2, control_guidance_end=0.8, output_type="np").images[0]
    ref = (ref * 255).round().astype(np.int16)
    model = checkpoint.load(folder / "sd")
    unit = ControlUnit(load_controlnet(folder / "cn0", model.cfg.unet), control_map(maps[0], *SIZE), 0.9, 0.2, 0.8)
    ours = img2img(model, GenerationParams(PROMPT, steps=STEPS, cfg_scale=CFG, sampler="Euler", scheduler="uniform",
                                           seed=SEED, width=SIZE[0], height=SIZE[1], strength=0.7,
                                           controlnets=[unit]), init)[0]
    diff = np.abs(np.asarray(ours).astype(np.int16) - ref).max()
    assert diff <= 2, f"max pixel difference {diff}/255"
    # the guidance window mattered: the same unit acting on every step gives another image
    always = ControlUnit(unit.model, unit.image, 0.9)
    ungated = img2img(model, GenerationParams(PROMPT, steps=STEPS, cfg_scale=CFG, sampler="Euler", scheduler="uniform",
                                              seed=SEED, width=SIZE[0], height=SIZE[1], strength=0.7,
                                              controlnets=[always]), init)[0]
    assert np.abs(np.asarray(ungated).astype(np.int16) - ref).max() > 2


@pytest.mark.parametrize("sampler,calls_per_step", [("Euler", 1), ("Heun", 2), ("DPM2", 2)])
def test_window_counts_sampler_steps(sampler, calls_per_step):
    """A window [0.2, 0.7] of 10 steps acts on steps 2..6 (i/n >= 0.2, (i+1)/n <= 0.7): every model call of those
    steps, second-order samplers' intermediate calls included, and no other (A1111 counts sampling steps)."""
    from ldmkit.controlnet import ControlledUNet
    from ldmkit.core import model_schedule
    from ldmkit.denoisers import DiscreteDenoiser
    from ldmkit.models.controlnet import ControlNet, ControlNetConfig
    from ldmkit.samplers import sampler_spec
    from ldmkit.schedules import get_sigmas

    class Model:  # what model_schedule reads
        cfg = TINY

    sched = model_schedule(Model())
    spec = sampler_spec(sampler)
    sigmas = get_sigmas(spec.schedule, 10, sched).float()
    net = ControlNet(ControlNetConfig(TINY.unet, hint_channels=(8, 16))).eval()
    unit = ControlUnit(net, torch.rand(1, 3, 16, 24), 1.0, 0.2, 0.7)
    seen = []

    def unet(x, t, context, control=None):
        seen.append((float(t[0]), control is not None))
        return torch.zeros_like(x)

    den = DiscreteDenoiser(ControlledUNet(unet, [unit], sched.sigma_to_t(sigmas[:-1])), sched)
    with torch.no_grad():
        spec.fn(lambda x, s: den(x, s, context=torch.zeros(1, 7, 32)), torch.zeros(1, 4, 8, 12), sigmas)
    steps_t = sched.sigma_to_t(sigmas[:-1])
    on = [i for i, t in enumerate(steps_t.tolist()) if any(abs(t - u) < 1e-4 and c for u, c in seen)]
    assert on == [2, 3, 4, 5, 6]
    assert sum(c for _, c in seen) == 5 * calls_per_step


def test_inpainting_model_with_controlnet(tmp_path, monkeypatch):
    """A 9-channel inpainting U-Net: the ControlNet reads only the 4 latent channels (diffusers'
    StableDiffusionControlNetInpaintPipeline), whole image <= 2/255."""
    import dataclasses

    import diffusers
    from diffusers import StableDiffusionControlNetInpaintPipeline

    from ldmkit.pipeline import inpaint

    cfg = TINY.replace(name="tiny-inpaint", unet=dataclasses.replace(TINY.unet, in_channels=9))
    pipe = save_diffusers_pipeline(cfg, tmp_path / "sd")
    pipe.scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                                      beta_schedule="scaled_linear", timestep_spacing="linspace")
    net = diffusers_controlnet(TINY.unet, hint=(8, 16), seed=21)  # a ControlNet of the 4-channel U-Net
    net.save_pretrained(tmp_path / "cn")
    ip = StableDiffusionControlNetInpaintPipeline(**pipe.components, controlnet=net)
    original = ip.vae.encode

    def mean_only(*args, **kwargs):  # as test_inpaint: both use the posterior mean
        out = original(*args, **kwargs)
        out.latent_dist.std = torch.zeros_like(out.latent_dist.std)
        return out

    monkeypatch.setattr(ip.vae, "encode", mean_only)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (SIZE[1], SIZE[0], 3), dtype=np.uint8))
    mask = np.zeros((SIZE[1], SIZE[0]), dtype=np.uint8)
    mask[4:12, 6:18] = 255
    mask = Image.fromarray(mask)
    cmap = Image.fromarray(rng.integers(0, 255, (SIZE[1], SIZE[0], 3), dtype=np.uint8))
    ref = ip(PROMPT, image=image, mask_image=mask, control_image=cmap, height=SIZE[1], width=SIZE[0], strength=1.0,
             num_inference_steps=8, guidance_scale=CFG, generator=torch.Generator().manual_seed(3),
             controlnet_conditioning_scale=0.9, output_type="np").images[0]
    ref = (ref * 255).round().astype(np.int16)
    model = checkpoint.load(tmp_path / "sd")
    unit = ControlUnit(load_controlnet(tmp_path / "cn", model.cfg.unet), control_map(cmap, *SIZE), 0.9)
    ours = inpaint(model, GenerationParams(PROMPT, steps=8, cfg_scale=CFG, sampler="Euler", scheduler="uniform", seed=3,
                                           width=SIZE[0], height=SIZE[1], strength=1.0, controlnets=[unit]),
                   image, mask)[0]
    diff = np.abs(np.asarray(ours).astype(np.int16) - ref).max()
    assert diff <= 2, f"max pixel difference {diff}/255"
