"""txt2img, img2img and inpainting as small functions over a loaded model.

The stages, in order: prompt -> token ids (tokenizer) -> text embeddings (text encoder) ->
starting noise -> U-Net steps through a sampler (classifier-free guidance) -> latent ->
decoder -> image. docs/architecture.md maps each to its function here.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ldmkit import __version__, lowmem
from ldmkit.deepcache import DeepCacheUNet
from ldmkit.deepcache import check_settings as check_deepcache
from ldmkit.denoisers import CFGDenoiser, DiscreteDenoiser
from ldmkit.images import convert as convert_image
from ldmkit.model import StableDiffusion
from ldmkit.models.unet import guidance_embedding
from ldmkit.prompt import encode_pair
from ldmkit.samplers import SAMPLER_DISPLAY_NAMES, SCHEDULE_DISPLAY_NAMES, default_schedule, resolve_sampler
from ldmkit.schedules import DiscreteSchedule, get_sigmas, schedule_short_name, sd_alphas_cumprod
from ldmkit.vae_tiling import decode as vae_decode
from ldmkit.vae_tiling import encode as vae_encode

StepCallback = Callable[[dict], None]
MAX_SEED = 2**32 - 1
# samplers that start from N(0, 1) in the DDPM x_t space, as the CompVis/diffusers DDIM code does,
# rather than from sigma_max * N(0, 1) in k-diffusion's space (the consistency samplers too: diffusers'
# LCMScheduler/TCDScheduler have init_noise_sigma = 1)
_VP_START = {"ddim", "ddpm", "unipc", "lcm", "tcd"}


@dataclass(frozen=True)
class GenerationParams:
    """Everything that determines an image; also what a PNG's infotext records."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float = 7.0
    sampler: str = "DPM++ 2M"
    scheduler: str | None = None  # None: the sampler's default ("Automatic" in A1111)
    seed: int = -1
    width: int = 512
    height: int = 512
    batch_size: int = 1
    clip_skip: int | None = None
    eta: float | None = None
    strength: float = 0.75  # img2img / inpaint: how much of the schedule to run
    deepcache: int = 1  # DeepCache interval: the full U-Net every N-th call, the shallow branch between; 1 = off
    deepcache_branch: int = 0  # DeepCache branch: how many skip levels the in-between calls recompute (0 = fewest)

    def replace(self, **changes: object) -> GenerationParams:
        return dataclasses.replace(self, **changes)


class GenerationError(ValueError):
    """Bad generation settings; the message names the setting and a valid choice."""


def validate(params: GenerationParams, model: StableDiffusion) -> None:
    f = model.cfg.vae.downscale
    for name in ("width", "height"):
        v = getattr(params, name)
        if v <= 0 or v % f:
            lo = max(f, v // f * f)
            raise GenerationError(f"{name} {v} is not a positive multiple of {f}; use {lo} or {lo + f}")
    if params.steps < 1:
        raise GenerationError(f"steps must be at least 1, got {params.steps}")
    if params.batch_size < 1:
        raise GenerationError(f"batch size must be at least 1, got {params.batch_size}")
    try:
        check_deepcache(model.unet, params.deepcache, params.deepcache_branch)
    except ValueError as e:
        raise GenerationError(str(e)) from None
    if not 0.0 < params.strength <= 1.0:
        raise GenerationError(f"strength must be in (0, 1], got {params.strength}")
    try:
        short = resolve_sampler(params.sampler)[0]
    except ValueError as e:
        raise GenerationError(str(e)) from None
    if short == "tcd" and params.eta is not None and not 0.0 <= params.eta <= 1.0:
        raise GenerationError(f"TCD gamma (eta) must be in [0, 1], got {params.eta:g}; 0.3 is the usual choice")


# ---------------------------------------------------------------- stages


def encode_prompt(model: StableDiffusion, prompts: list[str], negatives: list[str],
                  clip_skip: int | None = None) -> tuple[Tensor, Tensor]:
    """Prompts and negative prompts -> text embeddings (B, 77*k, D) that cross-attention reads."""
    try:
        return encode_pair(model, prompts, negatives, clip_skip or model.cfg.clip_skip)
    finally:
        lowmem.release(model, "text_encoder")


def resolve_seeds(seed: int, n: int) -> list[int]:
    """One seed per image, A1111 style: seed, seed+1, ...; -1 picks a random one."""
    if seed < 0:
        seed = random.randint(0, MAX_SEED)
    return [(seed + i) % (MAX_SEED + 1) for i in range(n)]


def initial_noise(seeds: list[int], shape: tuple[int, ...], device: torch.device) -> Tensor:
    """Standard normal noise, one CPU generator per seed, so a seed gives the same image on any device."""
    return torch.cat(
        [torch.randn((1, *shape), generator=torch.Generator().manual_seed(s), dtype=torch.float32) for s in seeds]
    ).to(device)


def model_schedule(model: StableDiffusion) -> DiscreteSchedule:
    c = model.cfg
    return DiscreteSchedule(sd_alphas_cumprod(c.num_train_timesteps, c.beta_start, c.beta_end))


def make_denoiser(model: StableDiffusion, params: GenerationParams | None = None) -> DiscreteDenoiser:
    """The model's denoiser for one generation; with ``params.deepcache`` > 1 its U-Net calls go through a
    DeepCache made for this generation alone (the feature cache is never shared between requests)."""
    net = model.unet
    if params is not None and params.deepcache > 1:
        net = DeepCacheUNet(model.unet, params.deepcache, params.deepcache_branch)
    return DiscreteDenoiser(net, model_schedule(model), prediction=model.cfg.prediction, dtype=model.dtype)


@dataclass(frozen=True)
class Plan:
    """The resolved sampler and noise levels of one generation."""

    sampler: str  # short name, e.g. "dpmpp_2m"
    fn: Callable
    schedule: str  # e.g. "karras"
    sigmas: Tensor  # steps + 1 noise levels, ending in 0

    @property
    def infotext_names(self) -> tuple[str, str]:
        return SAMPLER_DISPLAY_NAMES[self.sampler], SCHEDULE_DISPLAY_NAMES.get(self.schedule, self.schedule)


def plan(model: StableDiffusion, params: GenerationParams) -> Plan:
    """Sampler function and the full schedule of ``params.steps`` noise levels."""
    short, fn, suffix = resolve_sampler(params.sampler)
    schedule = schedule_short_name(params.scheduler or suffix or default_schedule(short))
    if schedule == "automatic":
        schedule = suffix or default_schedule(short)
    try:
        sigmas = get_sigmas(schedule, params.steps, model_schedule(model))
    except ValueError as e:
        raise GenerationError(str(e)) from None
    return Plan(short, fn, schedule, sigmas)


def start_scale(sampler: str, sigma: Tensor) -> Tensor:
    return (sigma**2 + 1).sqrt() if sampler in _VP_START else sigma


def run_sampler(model: StableDiffusion, params: GenerationParams, x: Tensor, sigmas: Tensor, sampler_fn: Callable,
                cond: Tensor, uncond: Tensor, seeds: list[int], *, c_concat: Tensor | None = None,
                mask: Tensor | None = None, init_latent: Tensor | None = None,
                callback: StepCallback | None = None) -> Tensor:
    """The reverse diffusion: a sampler stepping a guided denoiser from ``sigmas[0]`` to 0."""
    if model.cfg.unet.time_cond_proj_dim:
        # guidance-embedded (full LCM) U-Net: the guidance scale is an input, no unconditional pass
        w = guidance_embedding(x.new_full((x.shape[0],), params.cfg_scale - 1), model.cfg.unet.time_cond_proj_dim)
        den = CFGDenoiser(make_denoiser(model, params), cond, None, 1.0, c_concat=c_concat, guidance_emb=w)
    else:
        den = CFGDenoiser(make_denoiser(model, params), cond, uncond, params.cfg_scale, c_concat=c_concat)
    if mask is not None and init_latent is not None:
        den = MaskedDenoiser(den, mask, init_latent)
    gen = torch.Generator().manual_seed(seeds[0] + 1)  # fresh noise for ancestral/SDE samplers
    kwargs: dict = {"generator": gen, "callback": callback}
    accepted = inspect.signature(sampler_fn).parameters
    if params.eta is not None and "eta" in accepted:
        kwargs["eta"] = params.eta  # A1111 clients send eta with every sampler; only some use it
    if "schedule" in accepted:  # LCM/TCD step on the model's training timesteps
        kwargs["schedule"] = model_schedule(model)
    try:
        with torch.inference_mode():
            out = sampler_fn(den, x, sigmas.to(x.device), **kwargs)
    finally:
        lowmem.release(model, "unet")
    if mask is not None and init_latent is not None:
        out = init_latent * (1 - mask) + out * mask
    return out


class MaskedDenoiser:
    """Inpainting with an ordinary model: outside the mask, the denoised estimate is the original latent.

    Every sampler steps towards ``denoised``, so outside the mask the sample stays the original
    latent re-noised to the current sigma (A1111's approach), while inside it the model paints.
    """

    def __init__(self, inner: Callable[[Tensor, Tensor], Tensor], mask: Tensor, init_latent: Tensor):
        self.inner, self.mask, self.init_latent = inner, mask, init_latent

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self.init_latent * (1 - self.mask) + self.inner(x, sigma) * self.mask


def decode_latents(model: StableDiffusion, latents: Tensor) -> list[Image.Image]:
    """Latents (B, 4, h, w) -> RGB images; the KL decoder works on latent / scale_factor, a tiny
    autoencoder (TAESD, ``scaled_latents``) on the latent itself."""
    images = []
    scale = 1.0 if getattr(model.vae, "scaled_latents", False) else model.cfg.vae.scale_factor
    # tiled when asked, or when the image is large (vae_tiling.should_tile): bounded memory at 2048^2
    decode = functools.partial(vae_decode, model.vae, tiling=model.vae_tiling)
    with torch.inference_mode():
        for z in latents.split(1):  # one at a time keeps peak memory flat for batches
            x = decode(z.to(model.dtype) / scale).float()
            x = ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
            images.append(Image.fromarray(x[0].permute(1, 2, 0).cpu().numpy()))
    lowmem.release(model, "vae")
    return images


def encode_pixels(model: StableDiffusion, x: Tensor) -> Tensor:
    """Pixels (B, 3, H, W) in [-1, 1] -> scaled latent (B, 4, H/8, W/8): posterior mean x scale factor."""
    with torch.inference_mode():
        if getattr(model.vae, "scaled_latents", False):  # a tiny autoencoder returns the scaled latent
            return model.vae.encode(x.to(model.device, model.dtype)).float()
        mean, _ = vae_encode(model.vae, x.to(model.device, model.dtype), tiling=model.vae_tiling)
    return mean.float() * model.cfg.vae.scale_factor


def open_image(path: str | os.PathLike) -> Image.Image:
    """Read an image file fully, or raise a ValueError that names the file."""
    try:
        img = Image.open(path)
        img.load()
        return img
    except FileNotFoundError:
        raise ValueError(f"{path}: no such image file") from None
    except OSError as e:  # includes PIL's UnidentifiedImageError
        raise ValueError(f"{path}: cannot read the image ({e}); use a PNG or JPEG file") from None


def image_to_tensor(image: Image.Image, width: int, height: int) -> Tensor:
    """PIL image -> (1, 3, H, W) in [-1, 1], resized to the requested size."""
    image = convert_image(image, "RGB")  # 16-bit greyscale by range, not clipped to white
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return arr.permute(2, 0, 1)[None]


def mask_to_tensor(mask: Image.Image, width: int, height: int) -> Tensor:
    """Mask image -> (1, 1, H, W) in {0, 1}; white (>= 50%) marks what to repaint."""
    m = convert_image(mask, "L")
    if m.size != (width, height):
        m = m.resize((width, height), Image.Resampling.NEAREST)
    return (torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0) >= 0.5).float()[None, None]


def infotext(model: StableDiffusion, params: GenerationParams, seed: int, sampler_name: str,
             schedule: str, extra: dict[str, object] | None = None) -> str:
    """A1111's ``parameters`` text, which A1111, ComfyUI and civitai read back."""
    lines = [params.prompt]
    if params.negative_prompt:
        lines.append(f"Negative prompt: {params.negative_prompt}")
    fields = [
        ("Steps", params.steps), ("Sampler", sampler_name), ("Schedule type", schedule),
        ("CFG scale", f"{params.cfg_scale:g}"), ("Seed", seed), ("Size", f"{params.width}x{params.height}"),
    ]
    if model.model_hash:
        fields.append(("Model hash", model.model_hash))
    fields.append(("Model", model.source_name))
    fields.extend((extra or {}).items())
    if params.clip_skip and params.clip_skip > 1:
        fields.append(("Clip skip", params.clip_skip))
    if sampler_name == "TCD" and params.eta is not None:  # TCD's gamma changes the image: keep it reproducible
        fields.append(("Eta", f"{params.eta:g}"))
    if params.deepcache > 1:
        fields.append(("DeepCache", params.deepcache))
        if params.deepcache_branch:
            fields.append(("DeepCache branch", params.deepcache_branch))
    fields.append(("Version", f"ldmkit {__version__}"))
    lines.append(", ".join(f"{k}: {v}" for k, v in fields))
    return "\n".join(lines)


# ---------------------------------------------------------------- pipelines


def _prepare(model: StableDiffusion, params: GenerationParams) -> tuple:
    validate(params, model)
    p = plan(model, params)
    n = params.batch_size
    cond, uncond = encode_prompt(model, [params.prompt] * n, [params.negative_prompt] * n, params.clip_skip)
    seeds = resolve_seeds(params.seed, n)
    f = model.cfg.vae.downscale
    shape = (model.cfg.unet.out_channels, params.height // f, params.width // f)
    noise = initial_noise(seeds, shape, model.device)
    return p, cond, uncond, seeds, noise


def _finish(model: StableDiffusion, params: GenerationParams, latents: Tensor, seeds: list[int], p: Plan,
            extra: dict[str, object] | None = None) -> list[Image.Image]:
    sampler_name, schedule_name = p.infotext_names
    images = decode_latents(model, latents)
    for img, seed in zip(images, seeds, strict=True):
        img.info["parameters"] = infotext(model, params, seed, sampler_name, schedule_name, extra)
        img.info["seed"] = seed
    return images


def txt2img(model: StableDiffusion, params: GenerationParams,
            callback: StepCallback | None = None) -> list[Image.Image]:
    p, cond, uncond, seeds, noise = _prepare(model, params)
    c_concat = None
    if model.cfg.is_inpainting:
        # an inpainting model asked for a plain image: everything masked, nothing to keep
        b, _, h, w = noise.shape
        c_concat = torch.cat([torch.ones(b, 1, h, w), torch.zeros(b, 4, h, w)], dim=1).to(noise)
    x = noise * start_scale(p.sampler, p.sigmas[0])
    latents = run_sampler(model, params, x, p.sigmas, p.fn, cond, uncond, seeds, c_concat=c_concat,
                          callback=callback)
    return _finish(model, params, latents, seeds, p)


def _truncate(sigmas: Tensor, steps: int, strength: float) -> Tensor:
    """img2img runs only the last ``strength`` part of the schedule (as diffusers does)."""
    n = max(1, min(steps, int(steps * strength)))
    return sigmas[steps - n:]


def img2img(model: StableDiffusion, params: GenerationParams, init_image: Image.Image,
            callback: StepCallback | None = None) -> list[Image.Image]:
    p, cond, uncond, seeds, noise = _prepare(model, params)
    sigmas = _truncate(p.sigmas, params.steps, params.strength)
    init = encode_pixels(model, image_to_tensor(init_image, params.width, params.height)).expand_as(noise)
    x = init + noise * sigmas[0]
    latents = run_sampler(model, params, x, sigmas, p.fn, cond, uncond, seeds, callback=callback)
    return _finish(model, params, latents, seeds, p, {"Denoising strength": params.strength})


def inpaint(model: StableDiffusion, params: GenerationParams, init_image: Image.Image, mask_image: Image.Image,
            callback: StepCallback | None = None) -> list[Image.Image]:
    """Repaint the white part of ``mask_image``.

    9-channel inpainting models see the mask and the masked image as extra input channels;
    ordinary models keep the original latent outside the mask at every step.
    """
    p, cond, uncond, seeds, noise = _prepare(model, params)
    sigmas = _truncate(p.sigmas, params.steps, params.strength)
    f = model.cfg.vae.downscale
    image = image_to_tensor(init_image, params.width, params.height)
    mask = mask_to_tensor(mask_image, params.width, params.height)
    latent_mask = F.interpolate(mask, scale_factor=1 / f, mode="nearest").to(noise)
    init = encode_pixels(model, image).expand_as(noise)
    b = noise.shape[0]
    if model.cfg.is_inpainting:
        # the masked part becomes 0 (mid-grey), as the inpainting models were trained
        masked_latent = encode_pixels(model, image * (mask < 0.5))
        c_concat = torch.cat([latent_mask, masked_latent], dim=1).expand(b, -1, -1, -1)
        # the inpainting models were trained from pure noise at full strength
        x = (init + noise * sigmas[0]) if params.strength < 1.0 else noise * start_scale(p.sampler, sigmas[0])
        latents = run_sampler(model, params, x, sigmas, p.fn, cond, uncond, seeds, c_concat=c_concat,
                              callback=callback)
    else:
        x = init + noise * sigmas[0]
        latents = run_sampler(model, params, x, sigmas, p.fn, cond, uncond, seeds, mask=latent_mask,
                              init_latent=init, callback=callback)
    return _finish(model, params, latents, seeds, p, {"Denoising strength": params.strength})
