"""Inpainting: 9-channel models against diffusers; ordinary models by exact limiting cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from reference import encode_to_posterior_mean, save_diffusers_pipeline

from ldmkit import checkpoint
from ldmkit.config import TINY
from ldmkit.pipeline import GenerationParams, decode_latents, encode_pixels, image_to_tensor, img2img, inpaint

W, H = 24, 16
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _image_and_mask():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8))
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[4:12, 6:18] = 255  # white: repaint
    return image, Image.fromarray(mask)


def _pixels(img) -> np.ndarray:
    return np.asarray(img).astype(np.int16)


def test_inpainting_model_matches_diffusers(tmp_path, monkeypatch):
    import diffusers
    from diffusers import StableDiffusionInpaintPipeline

    cfg = TINY.replace(name="tiny-inpaint", unet=TINY.unet.__class__(**{**TINY.unet.__dict__, "in_channels": 9}))
    pipe = save_diffusers_pipeline(cfg, tmp_path)
    pipe.scheduler = diffusers.EulerDiscreteScheduler(**SD, timestep_spacing="linspace")
    ip = StableDiffusionInpaintPipeline(**pipe.components)
    # diffusers samples the masked image's posterior with the pipeline's generator; use the mean, as ldmkit
    encode_to_posterior_mean(ip, monkeypatch)
    image, mask = _image_and_mask()
    seed, steps = 3, 8
    ref = ip("a green pear", image=image, mask_image=mask, height=H, width=W, strength=1.0, num_inference_steps=steps,
             guidance_scale=6.0, generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
    model = checkpoint.load(tmp_path)
    assert model.cfg.is_inpainting
    ours = inpaint(model, GenerationParams("a green pear", steps=steps, cfg_scale=6.0, sampler="Euler",
                                           scheduler="uniform", seed=seed, width=W, height=H, strength=1.0),
                   image, mask)[0]
    diff = np.abs(_pixels(ours) - (ref * 255).round().astype(np.int16)).max()
    assert diff <= 2, f"max pixel difference {diff}/255"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    from ldmkit.model import StableDiffusion

    path = tmp_path_factory.mktemp("m") / "tiny.safetensors"
    checkpoint.save_single_file(StableDiffusion(TINY), path)
    return checkpoint.load(path)


def test_ordinary_model_keeps_unmasked_area(tiny_model):
    """With a black mask nothing may change: the result is exactly the autoencoder's reconstruction."""
    image, _ = _image_and_mask()
    params = GenerationParams("a green pear", steps=4, sampler="Euler", seed=1, width=W, height=H, strength=1.0)
    out = inpaint(tiny_model, params, image, Image.new("L", (W, H), 0))[0]
    recon = decode_latents(tiny_model, encode_pixels(tiny_model, image_to_tensor(image, W, H)))[0]
    assert np.array_equal(np.asarray(out), np.asarray(recon))


def test_ordinary_model_full_mask_is_img2img(tiny_model):
    """With a white mask everything is repainted: the same as img2img at the same strength and seed."""
    image, _ = _image_and_mask()
    params = GenerationParams("a green pear", steps=4, sampler="Euler", seed=1, width=W, height=H, strength=0.8)
    out = inpaint(tiny_model, params, image, Image.new("L", (W, H), 255))[0]
    ref = img2img(tiny_model, params, image)[0]
    assert np.array_equal(np.asarray(out), np.asarray(ref))


def test_ordinary_model_partial_mask(tiny_model, monkeypatch):
    """In latent space: outside the mask the result is exactly the original latent, inside it is new.

    (Compared before decoding: the decoder's mid-block attention lets every latent pixel reach every
    image pixel, so pixel-space equality outside the mask is not expected.)
    """
    from ldmkit import pipeline as P

    captured = {}

    def capture(model, z):
        captured["z"] = z
        return [Image.new("RGB", (W, H))]

    monkeypatch.setattr(P, "decode_latents", capture)
    image, mask = _image_and_mask()
    params = GenerationParams("a green pear", steps=4, sampler="Euler", seed=1, width=W, height=H, strength=1.0)
    P.inpaint(tiny_model, params, image, mask)
    z = captured["z"]
    init = encode_pixels(tiny_model, image_to_tensor(image, W, H))
    m = torch.nn.functional.interpolate(P.mask_to_tensor(mask, W, H), scale_factor=0.5, mode="nearest") > 0.5
    m = m.expand_as(z)
    assert torch.equal(z[~m], init[~m])
    assert (z[m] - init[m]).abs().mean() > 0.1
