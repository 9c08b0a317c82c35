"""The generation core: one path from settings to latents that every front-end shares.

The CLI, ``ldmkit.api``, the A1111 server, ``ldmkit explain``, ``bench/eval_emoji.py`` and the trainers'
sample previews all build a :class:`GenerationParams` (its sampler name is parsed there, once, into a
:class:`~ldmkit.samplers.SamplerSpec`) and then run::

    job = prepare(model, params)                    # seeds, plan, conditioning, starting noise
    latents = sample(model, job.plan, job.cond, job.uncond, job.noise,
                     init_latent=..., mask=..., callback=...)

``pipeline.py`` wraps this into txt2img / img2img / inpaint (latents in and images out). A model family
supplies two things: its conditioning (:func:`encode_conditioning` -> a :class:`Conditioning` per batch)
and a U-Net that reads it (``unet(x, t, context, y=...)``, see ``Conditioning.unet_kwargs``).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ldmkit import channels_last, lowmem, memory, prompt_schedule
from ldmkit.deepcache import DeepCacheUNet
from ldmkit.deepcache import check_settings as check_deepcache
from ldmkit.denoisers import CFGDenoiser, Conditioning, DiscreteDenoiser
from ldmkit.guards import FiniteDenoiser, non_finite_setting
from ldmkit.model import StableDiffusion
from ldmkit.models.unet import guidance_embedding
from ldmkit.prompt import encode_pair
from ldmkit.samplers import SCHEDULE_DISPLAY_NAMES, SamplerSpec, sampler_spec
from ldmkit.schedules import DiscreteSchedule, get_sigmas, schedule_short_name, sd_alphas_cumprod

StepCallback = Callable[[dict], None]
MAX_SEED = 2**32 - 1


class GenerationError(ValueError):
    """Bad generation settings; the message names the setting and a valid choice."""


@dataclass(frozen=True)
class GenerationParams:
    """Everything that determines an image; also what a PNG's infotext records.

    The sampler name is resolved when the params are made (a bad name is a :class:`GenerationError`
    there, at the edge); ``sampler_spec`` is the resolved record every later stage reads.
    """

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
    tiling: bool = False  # seamless texture: circular padding in the U-Net and VAE convs (A1111 "Tiling")
    inpaint: Any = None  # ldmkit.inpaint_a1111.InpaintSettings: A1111's mask blur/fill/crop (None: mask as given)
    # ControlNet units (ldmkit.controlnet.ControlUnit), their residuals summed at every step they are active,
    # and T2I-Adapter units (ldmkit.t2i_adapter.AdapterUnit), their features summed likewise
    controlnets: tuple = dataclasses.field(default=(), repr=False)
    # depth-conditioned models (512-depth-ema): the depth map (PIL image or (H, W) tensor; ldmkit.depth)
    depth_map: Any = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "controlnets", tuple(self.controlnets))
        try:
            spec = sampler_spec(self.sampler)
        except ValueError as e:
            raise GenerationError(str(e)) from None
        object.__setattr__(self, "_spec", spec)  # not a field: equality, repr and replace() see the name only

    @property
    def sampler_spec(self) -> SamplerSpec:
        return self._spec  # type: ignore[attr-defined]

    def replace(self, **changes: object) -> GenerationParams:
        return dataclasses.replace(self, **changes)


def validate(params: GenerationParams, model: StableDiffusion) -> None:
    """Raise a :class:`GenerationError` naming the first setting ``model`` cannot generate with."""
    f = model.cfg.vae.downscale
    for name in ("width", "height"):
        v = getattr(params, name)
        if v <= 0 or v % f:
            lo = max(f, v // f * f)
            raise GenerationError(f"{name} {v} is not a positive multiple of {f}; use {lo} or {lo + f}")
    if params.steps < 1:
        raise GenerationError(f"steps must be at least 1, got {params.steps}")
    if params.clip_skip is not None:  # every front-end, also a server override naming another model
        layers = model.cfg.text_layers
        if not 1 <= params.clip_skip <= layers:
            raise GenerationError(f"clip skip {params.clip_skip} is out of range: this model's text encoder has "
                                  f"{layers} layers, so use 1 to {layers}")
    if params.batch_size < 1:
        raise GenerationError(f"batch size must be at least 1, got {params.batch_size}")
    try:
        check_deepcache(model.unet, params.deepcache, params.deepcache_branch)
    except ValueError as e:
        raise GenerationError(str(e)) from None
    bad = non_finite_setting({"cfg_scale": params.cfg_scale, "eta": params.eta, "strength": params.strength})
    if bad:  # NaN passes the range checks below and draws a black image (hardening 9)
        raise GenerationError(bad)
    try:  # refused before any work rather than killed half-way by the kernel (hardening 1)
        memory.check_fits(model, params.width, params.height, params.batch_size)
    except memory.TooLarge as e:
        raise GenerationError(str(e)) from None
    if not 0.0 <= params.strength <= 1.0:  # 0: A1111 runs one step at the lowest noise level (the image back)
        raise GenerationError(f"strength must be in [0, 1], got {params.strength}")
    from ldmkit.depth import check as depth_problem

    if bad := depth_problem(model, params.depth_map):  # a depth model needs a map; other models take none
        raise GenerationError(bad)
    if params.controlnets:
        from ldmkit.controlnet import control_problem

        bad = control_problem(params.controlnets, model, params.deepcache)
        if bad:
            raise GenerationError(bad)
    if params.sampler_spec.name == "tcd" and params.eta is not None and not 0.0 <= params.eta <= 1.0:
        raise GenerationError(f"TCD gamma (eta) must be in [0, 1], got {params.eta:g}; 0.3 is the usual choice")


# ---------------------------------------------------------------- the plan: sampler, noise levels, guidance


def model_schedule(model: StableDiffusion) -> DiscreteSchedule:
    c = model.cfg
    return DiscreteSchedule(sd_alphas_cumprod(c.num_train_timesteps, c.beta_start, c.beta_end))


@dataclass(frozen=True)
class Plan:
    """How one generation samples: the resolved sampler, its noise levels, guidance and DeepCache."""

    spec: SamplerSpec
    schedule: str  # short name, e.g. "karras"
    sigmas: Tensor  # noise levels ending in 0: steps + 1 of them (img2img: the last part, see truncate)
    cfg_scale: float = 7.0
    eta: float | None = None  # passed on only to samplers with an eta parameter
    deepcache: int = 1
    deepcache_branch: int = 0
    seed: int = 0  # the first image's seed; ancestral/SDE samplers draw their fresh noise from seed + 1
    controlnets: tuple = ()  # ControlNet units (ldmkit.controlnet.ControlUnit)

    @property
    def sampler(self) -> str:
        """The sampler's short name, e.g. "dpmpp_2m"."""
        return self.spec.name

    @property
    def fn(self) -> Callable:
        return self.spec.fn

    @property
    def infotext_names(self) -> tuple[str, str]:
        """(sampler, schedule) as A1111's infotext names them."""
        return self.spec.display, SCHEDULE_DISPLAY_NAMES.get(self.schedule, self.schedule)

    def truncate(self, strength: float) -> Plan:
        """img2img runs only the last ``strength`` part of the schedule (as diffusers does)."""
        steps = len(self.sigmas) - 1
        n = max(1, min(steps, int(steps * strength)))
        return dataclasses.replace(self, sigmas=self.sigmas[steps - n:])


def plan(model: StableDiffusion, params: GenerationParams, seed: int | None = None) -> Plan:
    """The plan of ``params`` on ``model`` (whose training schedule gives the noise levels); ``seed``:
    the resolved first seed when ``params.seed`` is -1."""
    spec = params.sampler_spec
    schedule = schedule_short_name(params.scheduler or spec.schedule)
    if schedule == "automatic":
        schedule = spec.schedule
    try:
        sigmas = spec.sigmas_for(params.steps, lambda n: get_sigmas(schedule, n, model_schedule(model),
                                                                    sdxl=model.cfg.is_sdxl))
    except ValueError as e:
        raise GenerationError(str(e)) from None
    return Plan(spec, schedule, sigmas, params.cfg_scale, params.eta, params.deepcache, params.deepcache_branch,
                params.seed if seed is None else seed, params.controlnets)


def start_scale(sampler: str | SamplerSpec, sigma: Tensor) -> Tensor:
    """What pure starting noise N(0, 1) is multiplied by for this sampler at ``sigma``."""
    return (sampler if isinstance(sampler, SamplerSpec) else sampler_spec(sampler)).start_scale(sigma)


# ---------------------------------------------------------------- conditioning, seeds, noise


def encode_prompt(model: StableDiffusion, prompts: list[str], negatives: list[str],
                  clip_skip: int | None = None, cond_only: bool = False) -> tuple[Tensor, Tensor]:
    """SD1/SD2: prompts and negative prompts -> text embeddings (B, 77*k, D) that cross-attention reads
    (``cond_only``: the negatives are not encoded, see :func:`ldmkit.prompt.encode_pair`)."""
    try:
        return encode_pair(model, prompts, negatives, clip_skip or model.cfg.clip_skip, cond_only)
    finally:
        lowmem.release(model, "text_encoder")


def encode_conditioning(model: StableDiffusion, prompts: list[str], negatives: list[str],
                        params: GenerationParams, hires_steps: int | None = None
                        ) -> tuple[Conditioning, Conditioning]:
    """The model family's (cond, uncond) for a batch of prompts: the one place a family's conditioning
    is built. SD1/SD2: the token embeddings. SDXL (``ldmkit.sdxl.encode_conditioning``): token
    embeddings, pooled vector and size/crop ids from ``params``. Prompt editing, alternation and AND
    (``ldmkit.prompt_schedule``) encode each distinct text once and schedule them per model call
    (``hires_steps``: over a hires fix's second pass)."""
    return prompt_schedule.encode_scheduled(
        lambda p, n, cond_only=False: _encode_family(model, p, n, params, cond_only), list(prompts),
        list(negatives), params.steps, params.sampler_spec.name, hires_steps, cond_only=uncond_unused(model, params))


def uncond_unused(model: StableDiffusion, params: GenerationParams) -> bool:
    """True when guidance never reads the unconditional (negative prompt) half: CFG scale 1 (CFGDenoiser
    skips it) or a guidance-embedded U-Net (full LCM models take the scale as an input)."""
    return params.cfg_scale == 1 or bool(model.cfg.unet.time_cond_proj_dim)


def _encode_family(model: StableDiffusion, prompts: list[str], negatives: list[str],
                   params: GenerationParams, cond_only: bool = False) -> tuple[Conditioning, Conditioning]:
    if model.cfg.is_sdxl:
        from ldmkit import sdxl

        return sdxl.encode_conditioning(model, prompts, negatives, params)
    # cond_only (nothing reads the negatives' embeddings): one text-encoder pass fewer, as diffusers skips them
    cond, uncond = encode_prompt(model, prompts, negatives, params.clip_skip, cond_only)
    return Conditioning(cond), Conditioning(uncond)


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


def latent_shape(model: StableDiffusion, width: int, height: int) -> tuple[int, int, int]:
    f = model.cfg.vae.downscale
    return model.cfg.unet.out_channels, height // f, width // f


def blank_inpaint_condition(model: StableDiffusion, noise: Tensor) -> Tensor:
    """An inpainting model asked for a plain image: everything masked, nothing to keep (mask 1, latent 0)."""
    b, c, h, w = noise.shape
    extra = model.cfg.unet.in_channels - c - 1
    return torch.cat([torch.ones(b, 1, h, w), torch.zeros(b, extra, h, w)], dim=1).to(noise)


def concat_condition(model: StableDiffusion, params: GenerationParams, noise: Tensor) -> Tensor | None:
    """The image channels a U-Net reads beside the latent ``noise`` (B, C, h, w), or None: an inpainting
    model's everything-masked image (txt2img), a depth model's depth map at the latent size (ldmkit.depth)."""
    if model.cfg.is_inpainting:
        return blank_inpaint_condition(model, noise)
    if params.depth_map is not None:
        from ldmkit.depth import depth_condition

        return depth_condition(params.depth_map, tuple(noise.shape[-2:])).to(noise).expand(noise.shape[0], -1, -1, -1)
    return None


@dataclass(frozen=True)
class Job:
    """One generation, prepared: what :func:`sample` needs, plus the seeds for the infotext."""

    params: GenerationParams
    plan: Plan
    cond: Conditioning
    uncond: Conditioning
    seeds: list[int]
    noise: Tensor  # (B, C, h, w) standard normal


def prepare(model: StableDiffusion, params: GenerationParams, prompts: list[str] | None = None,
            seeds: list[int] | None = None, noise_fn: Callable[..., Tensor] | None = None) -> Job:
    """Check ``params`` against ``model``, resolve the seeds, plan, encode the prompts, draw the noise.

    ``prompts``/``seeds``: a batch of different prompts and seeds (bench/eval_emoji.py) instead of
    ``params.prompt`` ``batch_size`` times with seeds ``params.seed + i``; the negative prompt is shared.
    ``noise_fn(seeds, shape, device)`` draws the starting noise (default :func:`initial_noise`).
    An inpainting model gets the everything-masked image conditioning of txt2img.
    """
    validate(params, model)
    n = len(prompts) if prompts is not None else params.batch_size
    prompts = prompts if prompts is not None else [params.prompt] * n
    seeds = seeds if seeds is not None else resolve_seeds(params.seed, n)
    p = plan(model, params, seed=seeds[0])
    cond, uncond = encode_conditioning(model, prompts, [params.negative_prompt] * n, params)
    noise = (noise_fn or initial_noise)(seeds, latent_shape(model, params.width, params.height), model.device)
    if (image := concat_condition(model, params, noise)) is not None:
        cond, uncond = cond.replace(c_concat=image), uncond.replace(c_concat=image)
    return Job(params, p, cond, uncond, seeds, noise)


# ---------------------------------------------------------------- sampling


def make_denoiser(model: StableDiffusion, params: GenerationParams | Plan | None = None,
                  uncond_rows: int = 0) -> DiscreteDenoiser:
    """The model's denoiser for one generation; with DeepCache (interval > 1) its U-Net calls go through a
    DeepCache made for this generation alone (the feature cache is never shared between requests)."""
    net = model.unet
    if params is not None and params.deepcache > 1:
        net = DeepCacheUNet(model.unet, params.deepcache, params.deepcache_branch)
    if isinstance(params, Plan) and params.controlnets:  # (validate refuses DeepCache with a ControlNet)
        from ldmkit import controlnet_lllite, t2i_adapter
        from ldmkit.controlnet import ControlledUNet

        step_t = model_schedule(model).sigma_to_t(params.sigmas[:-1])
        nets = [u for u in params.controlnets
                if not isinstance(u, (t2i_adapter.AdapterUnit, controlnet_lllite.LLLiteUnit))]
        if nets:  # the first rows of a CFG call are unconditional (guess mode skips them)
            net = ControlledUNet(net, nets, step_t, uncond_rows)
        net = t2i_adapter.wrap(net, params.controlnets, step_t, model)  # T2I-Adapter units among them
        net = controlnet_lllite.wrap(net, params.controlnets, step_t, model, uncond_rows)  # LLLite: in the U-Net
    return DiscreteDenoiser(net, model_schedule(model), prediction=model.cfg.prediction,
                            dtype=getattr(model, "dtype", None))


def guided_denoiser(model: StableDiffusion, plan: Plan, cond: Conditioning, uncond: Conditioning | None,
                    batch: int) -> CFGDenoiser:
    """The classifier-free-guided denoiser; a guidance-embedded (full LCM) U-Net takes the scale as an
    input instead and needs no unconditional pass."""
    dim = model.cfg.unet.time_cond_proj_dim
    guide = prompt_schedule.ScheduledCFGDenoiser if prompt_schedule.scheduled(cond, uncond) else CFGDenoiser
    if dim:
        w = guidance_embedding(torch.full((batch,), plan.cfg_scale - 1), dim).to(cond.context.device)
        return guide(make_denoiser(model, plan), cond, None, 1.0, guidance_emb=w)
    return guide(make_denoiser(model, plan, batch if plan.cfg_scale != 1 else 0), cond, uncond, plan.cfg_scale)


class MaskedDenoiser:
    """Inpainting with an ordinary model: outside the mask, the denoised estimate is the original latent.

    Every sampler steps towards ``denoised``, so outside the mask the sample stays the original
    latent re-noised to the current sigma (A1111's approach), while inside it the model paints.
    """

    def __init__(self, inner: Callable[[Tensor, Tensor], Tensor], mask: Tensor, init_latent: Tensor):
        self.inner, self.mask, self.init_latent = inner, mask, init_latent

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self.init_latent * (1 - self.mask) + self.inner(x, sigma) * self.mask


def sample(model: StableDiffusion, plan: Plan, cond: Conditioning, uncond: Conditioning | None, noise: Tensor, *,
           init_latent: Tensor | None = None, mask: Tensor | None = None,
           callback: StepCallback | None = None) -> Tensor:
    """The reverse diffusion: ``plan``'s sampler steps the guided denoiser from ``plan.sigmas[0]`` to 0.

    ``noise`` (B, C, h, w) standard normal. Without ``init_latent`` it is the start (txt2img, scaled as
    the sampler expects); with it, the start is ``init_latent`` noised to ``sigmas[0]`` (img2img; give a
    truncated plan). ``mask`` (B or 1, 1, h, w; 1 = repaint) keeps ``init_latent`` outside the mask at
    every step (inpainting with an ordinary model). ``callback`` gets the sampler's ``{"i", "x", "sigma",
    "denoised"}`` after each step. Returns the final latents (B, C, h, w).
    """
    if mask is not None and init_latent is None:
        raise ValueError("a mask needs the init_latent it keeps outside the mask")
    if init_latent is None:
        x = noise * plan.spec.start_scale(plan.sigmas[0])
    else:
        init_latent = init_latent.expand_as(noise)
        x = init_latent + noise * plan.sigmas[0]
    return denoise(model, plan, cond, uncond, x, init_latent=init_latent if mask is not None else None, mask=mask,
                   callback=callback)


def denoise(model: StableDiffusion, plan: Plan, cond: Conditioning, uncond: Conditioning | None, x: Tensor, *,
            init_latent: Tensor | None = None, mask: Tensor | None = None,
            callback: StepCallback | None = None) -> Tensor:
    """:func:`sample` from a start ``x`` already at ``plan.sigmas[0]``: the one sampling loop."""
    spec, sigmas = plan.spec, plan.sigmas
    channels_last.prepare(model, "unet")  # NHWC weights on CPU unless opted out (ldmkit.channels_last)
    channels_last.prepare_controlnets(model, plan.controlnets)
    den: Callable[[Tensor, Tensor], Tensor] = guided_denoiser(model, plan, cond, uncond, x.shape[0])
    if mask is not None and init_latent is not None:
        den = MaskedDenoiser(den, mask, init_latent)
    den = FiniteDenoiser(den, plan.cfg_scale, GenerationError)  # NaN/inf stop here, not as a black image
    kwargs: dict = {"generator": torch.Generator().manual_seed(plan.seed + 1), "callback": callback}
    if plan.eta is not None and spec.takes_eta:
        kwargs["eta"] = plan.eta  # A1111 clients send eta with every sampler; only some use it
    if spec.takes_schedule:  # LCM/TCD step on the model's training timesteps
        kwargs["schedule"] = model_schedule(model)
    try:
        with torch.inference_mode():
            out = spec.fn(den, x, sigmas.to(x.device), **kwargs)
    finally:
        lowmem.release(model, "unet")
    if mask is not None and init_latent is not None:
        out = init_latent * (1 - mask) + out * mask
    return out
