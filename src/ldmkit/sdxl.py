"""Stable Diffusion XL (Podell et al. 2023) as one object: U-Net, autoencoder, two text encoders, two tokenizers.

What differs from SD1/SD2 (see docs/architecture.md): the prompt goes through CLIP ViT-L *and* OpenCLIP
ViT-bigG/14, both read at the penultimate layer without the final norm and concatenated to 2048 channels;
bigG's pooled, projected output and the image size/crop ids form a vector ``y`` that the U-Net adds to its
time embedding (``models.unet.sdxl_vector``). The refiner has only the bigG encoder.

Encoders are numbered as in the single file (``conditioner.embedders.{i}``): the base's ``text_encoder`` is
CLIP-L and ``text_encoder_2`` bigG; the refiner's ``text_encoder`` is bigG.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ldmkit.config import ModelConfig
from ldmkit.denoisers import Conditioning
from ldmkit.model import StableDiffusion
from ldmkit.models.clip import CLIPTextModel
from ldmkit.models.tokenizer import CLIPTokenizer
from ldmkit.prompt import embedding_matcher, pad_to, reweight, token_embeddings, tokenize_chunks

if TYPE_CHECKING:
    from PIL import Image

    from ldmkit.core import GenerationParams


class StableDiffusionXL(StableDiffusion):
    """SDXL base, refiner or inpainting model; attribute names match the parts of a diffusers folder.

    A StableDiffusion (device, dtype, low-memory and tiling switches, source file and hash) with a second
    encoder and tokenizer; ``tokenizer`` is the first of ``tokenizers``.
    """

    def __init__(self, cfg: ModelConfig, tokenizers: list[CLIPTokenizer] | None = None):
        if not cfg.is_sdxl:
            raise ValueError(f"{cfg.name}: family {cfg.family!r} is not SDXL; use ldmkit.model.StableDiffusion")
        # the first tokenizer pads as its encoder was trained (CLIP-L: end token); bigG's pads with id 0
        tokenizers = tokenizers or [CLIPTokenizer.default(cfg.pad_with_eos, cfg.text.max_positions)] + (
            [CLIPTokenizer.default(False, cfg.text2.max_positions)] if cfg.text2 is not None else [])
        super().__init__(cfg, tokenizer=tokenizers[0])
        if cfg.text2 is not None:
            self.text_encoder_2 = CLIPTextModel(cfg.text2)
        self.tokenizers = tokenizers
        for tok, enc in zip(tokenizers, self.encoders, strict=False):
            tok.context_length = enc.cfg.max_positions
        if len(self.tokenizers) != len(self.encoders):
            raise ValueError(f"{cfg.name}: {len(self.encoders)} text encoders but {len(self.tokenizers)} tokenizers")
        if not self.encoders[-1].cfg.projection_dim:
            raise ValueError(f"{cfg.name}: the last text encoder has no text_projection, so no pooled output")

    @property
    def vae_dtype(self) -> torch.dtype:
        """The dtype the autoencoder computes in: the model's, except fp32 where :func:`upcast_vae` kept an fp16
        model's SDXL autoencoder in fp32."""
        if self.compute_dtype is not None:
            return self.compute_dtype
        return next(self.vae.parameters()).dtype

    @property
    def encoders(self) -> list[CLIPTextModel]:
        return [self.text_encoder] + ([self.text_encoder_2] if self.cfg.text2 is not None else [])

    def parts(self) -> dict[str, nn.Module]:
        names = ["text_encoder", "text_encoder_2"][: len(self.encoders)]
        return {"unet": self.unet, "vae": self.vae, **dict(zip(names, self.encoders, strict=True))}

    def encode_chunks(self, prompt: str) -> tuple[Tensor, Tensor]:
        """One prompt -> (context (1, 77 k, sum of widths), pooled (1, projection_dim)).

        A1111's syntax (emphasis, BREAK, chunks of 75 tokens) for every encoder alike; each encoder's
        hidden states are weighted and mean-rescaled on their own, as A1111 wraps each embedder; the pooled
        vector is the first chunk's, unweighted (A1111's ``zs[0].pooled``).
        """
        zs, pooled = [], None
        for enc, tok in zip(self.encoders, self.tokenizers, strict=True):
            # textual inversion (ldmkit.embeddings): an SDXL file's clip_l / clip_g vectors, by encoder width
            chunks = tokenize_chunks(tok, prompt, embedding_matcher(self, tok, enc.cfg.width))
            device = next(enc.parameters()).device
            ids = torch.tensor([c.tokens for c in chunks], device=device)  # (k, 77)
            w = torch.tensor([c.weights for c in chunks], device=device, dtype=torch.float32)
            with torch.inference_mode():
                hidden, pool = enc.hidden_and_pooled(ids, skip=self.cfg.clip_skip,
                                                     embeddings=token_embeddings(enc, ids, chunks))
            zs.append(reweight(hidden.float(), w))
            if pool is not None:
                pooled = pool[:1].float()
        if len({z.shape[0] for z in zs}) != 1:
            raise ValueError("the tokenizers split the prompt into different numbers of chunks")
        z = torch.cat(zs, dim=-1)  # (k, 77, 768 + 1280)
        assert pooled is not None
        return z.reshape(1, -1, z.shape[-1]), pooled

    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Prompts -> (context (B, 77 k, 2048), pooled (B, 1280)); shorter prompts padded with empty chunks
        to the longest, as A1111 does."""
        cache = {p: self.encode_chunks(p) for p in dict.fromkeys(prompts)}
        longest = max(z.shape[1] for z, _ in cache.values())
        if any(z.shape[1] != longest for z, _ in cache.values()):
            empty = self.encode_chunks("")[0]
            cache = {p: (pad_to(z, longest, empty), pool) for p, (z, pool) in cache.items()}
        return torch.cat([cache[p][0] for p in prompts]), torch.cat([cache[p][1] for p in prompts])


# ---------------------------------------------------------------- conditioning for the generation core

# A1111's defaults (sdxl_refiner_high/low_aesthetic_score; diffusers' aesthetic_score/negative_aesthetic_score)
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5


def micro_ids(cfg: ModelConfig, width: int, height: int, negative: bool = False) -> Tensor:
    """The size/crop ids of one image, (1, n), as A1111 sends them: original size = target size = the image's,
    crop top-left (0, 0). Base: (h, w, top, left, target h, target w); refiner: (h, w, top, left, aesthetic
    score), the low score for the negative prompt."""
    if cfg.family == "sdxl-refiner":
        last = [NEGATIVE_AESTHETIC_SCORE if negative else AESTHETIC_SCORE]
    else:
        last = [height, width]
    return torch.tensor([[height, width, 0, 0, *last]], dtype=torch.float32)


def encode_conditioning(model: StableDiffusionXL, prompts: list[str], negatives: list[str],
                        params: GenerationParams) -> tuple[Conditioning, Conditioning]:
    """(cond, uncond) of a batch for ``core.sample``: token embeddings of both encoders, the pooled bigG vector
    and the size/crop (refiner: aesthetic) ids. An empty negative prompt is zeros, context and pooled alike,
    as in A1111 (``force_zero_embeddings``) and diffusers (``force_zeros_for_empty_prompt``)."""
    from ldmkit import lowmem
    from ldmkit.networks import apply_prompt_networks

    prompts, negatives, _ = apply_prompt_networks(model, list(prompts), list(negatives))
    zero_negative = all(n == "" for n in negatives)
    try:
        ctx, pooled = model.encode(prompts if zero_negative else prompts + negatives)
    finally:
        for part in model.parts():
            if part.startswith("text_encoder"):
                lowmem.release(model, part)
    n = len(prompts)
    if zero_negative:  # zeros for one chunk; a longer prompt pads it with the empty prompt's chunks (A1111)
        zeros = torch.zeros_like(ctx[:1, : model.cfg.text.max_positions])
        if ctx.shape[1] > zeros.shape[1]:
            with torch.inference_mode():
                zeros = pad_to(zeros, ctx.shape[1], model.encode_chunks("")[0].to(ctx))
        neg_ctx, neg_pooled = zeros.expand(n, -1, -1), torch.zeros_like(pooled[:1]).expand(n, -1)
    else:
        ctx, neg_ctx, pooled, neg_pooled = ctx[:n], ctx[n:], pooled[:n], pooled[n:]
    ids = micro_ids(model.cfg, params.width, params.height).to(ctx.device).expand(n, -1)
    neg_ids = micro_ids(model.cfg, params.width, params.height, negative=True).to(ctx.device).expand(n, -1)
    return Conditioning(ctx, pooled, ids), Conditioning(neg_ctx, neg_pooled, neg_ids)


def upcast_vae(model: StableDiffusion, vae: str | os.PathLike | None = None) -> None:
    """An fp16 SDXL model keeps its autoencoder in fp32: the original SDXL VAE overflows in fp16 (black or NaN
    images; diffusers' ``force_upcast``, A1111's --no-half-vae). Not for a tiny autoencoder, nor for a ``--vae``
    folder whose config says it runs in fp16 (``force_upcast: false``, as the fp16-fix VAE's)."""
    import json
    from pathlib import Path

    if not model.cfg.is_sdxl or next(model.vae.parameters()).dtype != torch.float16:
        return
    if getattr(model.vae, "scaled_latents", False) or model.compute_dtype is not None:
        return  # tiny autoencoder; low-memory mode computes in fp32 anyway
    config = Path(vae) / "config.json" if vae is not None else None
    if config is not None and config.is_file() and json.loads(config.read_text()).get("force_upcast") is False:
        return
    model.vae.float()


def check_txt2img(model: StableDiffusion) -> None:
    """A refiner only ever learnt the last, low-noise steps (t < 200 of 1000): started from pure noise it
    draws mush, so txt2img with it is refused, naming what to do instead."""
    if model.cfg.family == "sdxl-refiner":
        from ldmkit.core import GenerationError

        raise GenerationError(f"{model.source_name} is an SDXL refiner, which only finishes images (it was trained "
                              "on the last, low-noise steps): generate with an SDXL base model and refine the "
                              "result with `ldmkit img2img --model REFINER --strength 0.3`")


def txt2img_refined(base: StableDiffusionXL, refiner: StableDiffusionXL, params: GenerationParams,
                    switch_at: float = 0.8, callback: Callable[[dict], None] | None = None) -> list[Image.Image]:
    """txt2img with a refiner as second expert (A1111's ``refiner_checkpoint`` / ``refiner_switch_at``, diffusers'
    ``denoising_end`` / ``denoising_start``): the base samples the first ``switch_at`` of the noise levels, the
    refiner, with its own conditioning (aesthetic score), the rest from the base's latents. Each part is one
    sampler run, so a multistep sampler starts afresh at the switch, as in diffusers. ``params.tiling``: both
    models' convolutions pad circularly for the generation."""
    from ldmkit.tiling import circular

    with circular(base, params.tiling), circular(refiner, params.tiling):
        return _txt2img_refined(base, refiner, params, switch_at, callback)


def _txt2img_refined(base: StableDiffusionXL, refiner: StableDiffusionXL, params: GenerationParams,
                     switch_at: float, callback: Callable[[dict], None] | None) -> list[Image.Image]:
    from ldmkit import pipeline

    check_refiner(refiner)
    check_switch_at(switch_at)
    check_txt2img(base)
    job = pipeline._job(base, params)
    x, used = sample_refined(base, refiner, job.plan, job.cond, job.uncond, job.noise, params, switch_at,
                             callback=callback, base_steps=1)
    return pipeline.finish(base, params, x, job.seeds, job.plan, refiner_fields(refiner, switch_at) if used else None)


def img2img_refined(base: StableDiffusionXL, refiner: StableDiffusionXL, params: GenerationParams,
                    init_image: Image.Image, switch_at: float = 0.8,
                    callback: Callable[[dict], None] | None = None) -> list[Image.Image]:
    """img2img with a refiner (A1111's img2img ``refiner_checkpoint``): the base denoises the image from
    ``params.strength`` until the noise level of ``switch_at`` (:func:`switch_step`), the refiner the rest; at a
    strength below 1 - switch_at the refiner does all of it (and the base's part is none)."""
    from ldmkit import pipeline
    from ldmkit.tiling import circular

    check_refiner(refiner)
    check_switch_at(switch_at)
    with circular(base, params.tiling), circular(refiner, params.tiling):
        job = pipeline._job(base, params)
        init = pipeline.encode_pixels(base, pipeline.image_to_tensor(init_image, params.width, params.height))
        x, used = sample_refined(base, refiner, job.plan.truncate(params.strength), job.cond, job.uncond, job.noise,
                                 params, switch_at, init_latent=init, callback=callback)
        extra: dict[str, object] = {"Denoising strength": params.strength}
        return pipeline.finish(base, params, x, job.seeds, job.plan,
                               {**extra, **(refiner_fields(refiner, switch_at) if used else {})})


def switch_step(model: StableDiffusion, sigmas: Tensor, switch_at: float) -> int:
    """The first step the refiner takes: A1111's rule (``sd_samplers_common.apply_refiner``; diffusers'
    ``denoising_end`` is the same cut): a step's progress is ``(999 - t) / 1000`` with ``t`` the training
    timestep whose sigma is nearest the step's, and the refiner takes over at the first step whose progress
    reaches ``switch_at``. ``len(sigmas) - 1`` when no step reaches it (the refiner never runs)."""
    from ldmkit.core import model_schedule

    table = model_schedule(model).sigmas
    t = (table[None, :] - sigmas[:-1, None].double().cpu()).abs().argmin(dim=1)
    hits = torch.nonzero((len(table) - 1 - t) / len(table) >= switch_at)
    return int(hits[0, 0]) if len(hits) else len(sigmas) - 1


def sample_refined(base: StableDiffusion, refiner: StableDiffusion, plan, cond: Conditioning, uncond: Conditioning,
                   noise: Tensor, params: GenerationParams, switch_at: float, *, init_latent: Tensor | None = None,
                   callback: Callable[[dict], None] | None = None, base_steps: int = 0,
                   size: tuple[int, int] | None = None) -> tuple[Tensor, bool]:
    """``core.sample`` of ``plan`` with the refiner as second expert from :func:`switch_step` on, each part one
    sampler run (a multistep sampler starts afresh at the switch, as in diffusers). ``base_steps``: the fewest
    steps the base keeps (txt2img: 1, so neither expert's part is empty); ``size``: (width, height) of the
    refiner's size conditioning (hires fix: the upscaled size; default the params'). Returns the latents and
    whether the refiner ran."""
    from ldmkit import core

    steps = len(plan.sigmas) - 1
    k = min(steps, max(base_steps, switch_step(base, plan.sigmas, switch_at)))
    if base_steps and k == steps:
        k = steps - 1  # txt2img: at least one step each
    if k > 0:
        x = core.sample(base, dataclasses.replace(plan, sigmas=plan.sigmas[: k + 1]), cond, uncond, noise,
                        init_latent=init_latent, callback=callback)
    elif init_latent is None:
        x = noise * plan.spec.start_scale(plan.sigmas[0])
    else:
        x = init_latent.expand_as(noise) + noise * plan.sigmas[0]
    if k == steps:
        return x, False
    n = noise.shape[0]
    p = params if size is None else params.replace(width=size[0], height=size[1])
    rcond, runcond = encode_conditioning(refiner, [params.prompt] * n, [params.negative_prompt] * n, p)

    def shifted(d: dict) -> None:  # step numbers go on from the base's
        if callback is not None:
            callback({**d, "i": d["i"] + k})

    # control units (ControlNets, T2I-Adapters) are made for the base model: the refiner's part runs without them
    x = core.denoise(refiner, dataclasses.replace(plan, sigmas=plan.sigmas[k:], controlnets=()), rcond, runcond,
                     x.to(refiner.device), callback=shifted)
    return x.to(noise.device), True


def refiner_fields(refiner: StableDiffusion, switch_at: float) -> dict[str, object]:
    """The infotext fields A1111 writes for a refiner: ``Refiner: name [hash]``, ``Refiner switch at``."""
    ref_hash = f" [{refiner.model_hash}]" if refiner.model_hash else ""
    return {"Refiner": f"{refiner.source_name}{ref_hash}", "Refiner switch at": f"{switch_at:g}"}


def check_refiner(refiner: StableDiffusion) -> None:
    if not refiner.cfg.is_sdxl:
        from ldmkit.core import GenerationError

        raise GenerationError(f"refiner {refiner.source_name} is not an SDXL model")


def check_switch_at(switch_at: float) -> None:
    if not 0.0 < switch_at < 1.0:
        from ldmkit.core import GenerationError

        raise GenerationError(f"refiner switch at {switch_at:g} must be between 0 and 1 (A1111's default: 0.8)")


def add_refiner_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--refiner", default=None, metavar="MODEL",
                   help="SDXL: a second model (the SDXL refiner) that finishes the image from --refiner-switch-at "
                        "(A1111's Refiner; with hires fix, in the second pass)")
    p.add_argument("--refiner-switch-at", type=float, default=0.8, metavar="F",
                   help="progress through the noise levels (A1111's: 1 - timestep/1000) at which the refiner takes "
                        "over from the base model (default 0.8)")


def refiner_from_args(args: argparse.Namespace, base: StableDiffusion) -> StableDiffusion | None:
    """The ``--refiner`` model, loaded like the base (device, low-memory mode), or None."""
    if not getattr(args, "refiner", None):
        return None
    if not base.cfg.is_sdxl:
        raise ValueError(f"--refiner needs an SDXL base model; {base.source_name} is {base.cfg.family}")
    check_switch_at(args.refiner_switch_at)
    from ldmkit import api

    refiner = api.load(args.refiner, device=args.device, low_memory=args.low_memory).model
    if not refiner.cfg.is_sdxl:
        raise ValueError(f"--refiner {args.refiner}: an SDXL model (refiner or base) is needed, this is "
                         f"{refiner.cfg.family}")
    return refiner
