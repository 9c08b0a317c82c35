"""From an A1111 request to images: checking it against the model and the limits, running it, answering.

Everything here is plain functions; :mod:`ldmkit.server.app` wires them to routes and the worker.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from PIL import Image, UnidentifiedImageError

from ldmkit import __version__, memory
from ldmkit import pipeline as P
from ldmkit.deepcache import branches
from ldmkit.images import convert as convert_image
from ldmkit.infotext import parse_infotext
from ldmkit.model import StableDiffusion
from ldmkit.samplers import SCHEDULE_DISPLAY_NAMES
from ldmkit.server import schemas as S
from ldmkit.server.checkpoints import CheckpointInfo
from ldmkit.server.samples import save_sample
from ldmkit.server.vaes import using_vae
from ldmkit.server.worker import Interrupted, JobContext, encode_png
from ldmkit.tiling import circular


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; beyond these it gets a 4xx, not an out-of-memory crash."""

    max_side: int = 2048  # width and height
    max_pixels: int = 2048 * 2048  # width * height * batch_size
    max_steps: int = 150
    max_batch_size: int = 8
    max_n_iter: int = 100
    max_upload_bytes: int = 32 << 20  # one base64 image
    max_input_pixels: int = 4096 * 4096  # an uploaded image, before it is resized
    max_memory_bytes: int | None = None  # working memory a request may need (None: what the machine has free)

    @property
    def max_body_bytes(self) -> int:  # a few images plus the JSON around them
        return 3 * self.max_upload_bytes + (1 << 20)


def field_error(loc: tuple, msg: str, value: Any = None) -> RequestValidationError:
    """A 422 in FastAPI's own format, naming the field."""
    return RequestValidationError([{"type": "value_error", "loc": ("body", *loc), "msg": msg, "input": value}])


# ---------------------------------------------------------------- images in and out


def decode_image(data: str, loc: tuple, limits: Limits) -> Image.Image:
    """A base64 image (a ``data:`` URL too), refused before decoding if it is too large."""
    name = ".".join(str(p) for p in loc)
    if data.startswith("data:"):
        data = data.partition(",")[2]
    if len(data) > limits.max_upload_bytes * 4 // 3:
        raise HTTPException(413, f"{name}: the image is {len(data) / 1e6:.1f} MB of base64; this server accepts "
                                 f"up to {limits.max_upload_bytes * 4 / 3 / 1e6:.1f} MB")
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise field_error(loc, f"not valid base64 ({e})") from None
    try:
        img = Image.open(io.BytesIO(raw))
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError):
        raise field_error(loc, "not an image PIL can read; send a base64 PNG, JPEG or WebP") from None
    except ValueError as e:  # PIL bounds what text chunks may inflate to (zip bombs) and says so this way
        raise field_error(loc, f"the image's metadata is too large to decode ({e}); strip it and resend") from None
    w, h = img.size
    if w * h > limits.max_input_pixels:
        raise HTTPException(413, f"{name}: the image is {w}x{h} = {w * h / 1e6:.1f} MP; this server accepts up "
                                 f"to {limits.max_input_pixels / 1e6:.1f} MP; downscale it first")
    try:
        img.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # ValueError: a text chunk bomb
        raise field_error(loc, f"the image cannot be decoded ({e})") from None
    return img


def png_info(img: Image.Image) -> dict:
    """A1111's /png-info: the parameters text, other text chunks, and the parsed fields."""
    text = img.info.get("parameters")
    items = {k: v for k, v in img.info.items() if k != "parameters" and isinstance(v, str | int | float)}
    if not isinstance(text, str) or not text:
        return {"info": "", "items": items, "parameters": {}}
    params: dict[str, Any] = parse_infotext(text)
    if "x" in params.get("Size", ""):
        params["Size-1"], params["Size-2"] = params["Size"].split("x", 1)
    return {"info": text, "items": items, "parameters": params}


# ---------------------------------------------------------------- requests -> generations


@dataclass(frozen=True)
class Generation:
    """One request, checked and resolved: what the worker runs."""

    kind: str  # "txt2img", "img2img" or "inpaint"
    params: P.GenerationParams  # seed resolved (never -1)
    n_iter: int
    sampling_steps: int  # model calls per image (img2img runs only part of the schedule)
    checkpoint: CheckpointInfo | None = None  # override_settings' model
    restore_model: bool = True
    init: Image.Image | None = None
    mask: Image.Image | None = None
    save: bool = False
    hires: Any = None  # ldmkit.hires.HiresParams: txt2img's hires fix (enable_hr)
    hires_upscaler: Callable[[], Any] | None = None  # loads its image upscaler (None: a latent mode)
    refiner: CheckpointInfo | None = None  # refiner_checkpoint: SDXL's second expert (txt2img, hires, img2img)
    refiner_switch_at: float = 0.8

    @property
    def all_seeds(self) -> list[int]:
        return P.resolve_seeds(self.params.seed, self.params.batch_size * self.n_iter)


def resolve_scheduler(name: str | None) -> str | None:
    """A1111 scheduler name or label -> ldmkit's short name; None for "automatic"."""
    if name is None or name.strip().lower() in ("", "automatic"):
        return None
    key = name.strip().lower()
    for short, label in SCHEDULE_DISPLAY_NAMES.items():
        if key in (short, label.lower(), short.replace("_", " ")):
            return short
    valid = ", ".join(["automatic", *SCHEDULE_DISPLAY_NAMES])
    raise field_error(("scheduler",), f"unknown scheduler {name!r}; valid schedulers: {valid}", name)


def check_size(model: StableDiffusion, req: S.GenerationRequest, limits: Limits) -> None:
    f = model.cfg.vae.downscale
    for name in ("width", "height"):
        v = getattr(req, name)
        if v > limits.max_side:
            raise field_error((name,), f"{name} {v} is larger than this server's limit of {limits.max_side}", v)
        if v % f:
            lo = max(f, v // f * f)
            raise field_error((name,), f"{name} {v} is not a multiple of {f} (this model's latent step); use "
                                       f"{lo} or {lo + f}", v)
    if req.steps > limits.max_steps:
        raise field_error(("steps",), f"steps {req.steps} is more than this server's limit of {limits.max_steps}",
                          req.steps)
    if req.batch_size > limits.max_batch_size:
        raise field_error(("batch_size",), f"batch_size {req.batch_size} is more than this server's limit of "
                                           f"{limits.max_batch_size}; use n_iter for more images", req.batch_size)
    if req.n_iter > limits.max_n_iter:
        raise field_error(("n_iter",), f"n_iter {req.n_iter} is more than this server's limit of "
                                       f"{limits.max_n_iter}", req.n_iter)
    pixels = req.width * req.height * req.batch_size
    if pixels > limits.max_pixels:
        raise field_error(("width",), f"{req.batch_size} x {req.width}x{req.height} = {pixels / 1e6:.1f} MP at once "
                                      f"is more than this server's limit of {limits.max_pixels / 1e6:.1f} MP; use a "
                                      "smaller size or batch_size", req.width)
    try:  # the size limit the machine sets: refused here, before any work, rather than killed half-way
        memory.check_fits(model, req.width, req.height, req.batch_size, limits.max_memory_bytes)
    except memory.TooLarge as e:
        raise field_error(("width",), str(e), req.width) from None


# DeepCache as server options (A1111 has none; named in its options' style), settable per request in
# override_settings: the full U-Net every N-th call (1 = off) and the branch the calls between recompute
DEEPCACHE_OPTIONS: dict[str, int] = {"deepcache_interval": 1, "deepcache_branch": 0}


def check_deepcache_option(key: str, value: Any, loc: tuple) -> None:
    """A 422 naming the option unless ``value`` is an integer it accepts (the branch's depth is checked per model)."""
    lo = 1 if key == "deepcache_interval" else 0
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        what = "1 = off, 3 = the full U-Net every 3rd call" if lo else "0 = the shallowest branch"
        raise field_error(loc, f"{key} must be an integer of at least {lo} ({what}), got {value!r}", value)


def deepcache_settings(model: StableDiffusion, overrides: dict, options: dict) -> dict[str, int]:
    """The request's DeepCache settings (override_settings, else the options) as GenerationParams fields."""
    values = {}
    for key, default in DEEPCACHE_OPTIONS.items():
        loc = ("override_settings", key) if key in overrides else (key,)
        values[key] = v = overrides.get(key, options.get(key, default))
        check_deepcache_option(key, v, loc)
    n = branches(model.unet)
    if values["deepcache_branch"] >= n:
        loc = ("override_settings", "deepcache_branch") if "deepcache_branch" in overrides else ("deepcache_branch",)
        raise field_error(loc, f"deepcache_branch {values['deepcache_branch']} is beyond this model's U-Net depth: "
                               f"use 0 to {n - 1}", values["deepcache_branch"])
    return {"deepcache": values["deepcache_interval"], "deepcache_branch": values["deepcache_branch"]}


def build_params(req: S.GenerationRequest, model: StableDiffusion, options: dict, limits: Limits,
                 strength: float = 0.75) -> P.GenerationParams:
    check_size(model, req, limits)
    overrides = req.override_settings or {}
    clip_skip = overrides.get("CLIP_stop_at_last_layers", options.get("CLIP_stop_at_last_layers", 1))
    from ldmkit.server.options import check_clip_skip  # the options module builds on this one

    loc = ("override_settings", "CLIP_stop_at_last_layers") if "CLIP_stop_at_last_layers" in overrides else (
        "CLIP_stop_at_last_layers",)
    check_clip_skip(clip_skip, model, loc)  # as many as the text encoder has layers
    deepcache = deepcache_settings(model, overrides, options)
    field = "sampler_name" if req.sampler_name else "sampler_index"
    sampler = req.sampler_name or req.sampler_index
    try:  # the sampler name is resolved here, once (GenerationParams.sampler_spec)
        params = P.GenerationParams(
            prompt=req.prompt, negative_prompt=req.negative_prompt, steps=req.steps, cfg_scale=req.cfg_scale,
            sampler=sampler, scheduler=resolve_scheduler(req.scheduler),
            seed=req.seed if req.seed >= 0 else random.randint(0, P.MAX_SEED),
            width=req.width, height=req.height, batch_size=req.batch_size,
            clip_skip=clip_skip if clip_skip > 1 else None, eta=req.eta, strength=strength, tiling=bool(req.tiling),
            **deepcache,
        )
    except P.GenerationError as e:
        raise field_error((field,), str(e), sampler) from None
    if not params.sampler_spec.takes_eta:
        params = params.replace(eta=None)  # A1111 clients send eta for every sampler; only some have one
    try:
        P.validate(params, model)
        P.plan(model, params)
    except P.GenerationError as e:
        raise field_error((), str(e)) from None
    return params


def partial_images(ctx: JobContext, gen: Generation, params: P.GenerationParams,
                   steps_run: int | None = None) -> list[Image.Image]:
    """An interrupted generation returns its last denoised estimate, as A1111 does; its infotext's "Steps"
    are the ``steps_run`` it got through, not the ones asked for (issue 15, item 6)."""
    if ctx.last_denoised is None:
        return []
    model, latents = ctx.model, ctx.last_denoised
    if steps_run is not None:
        params = params.replace(steps=max(1, min(steps_run, params.steps)))  # (hires: the first pass's count)
    extra = None if gen.kind == "txt2img" else {"Denoising strength": params.strength}
    return P.finish(model, params, latents, P.resolve_seeds(params.seed, len(latents)), P.plan(model, params), extra)


def prepare(req: S.GenerationRequest, kind: str, model: StableDiffusion, options: dict, limits: Limits,
            info: CheckpointInfo | None, can_save: bool, upscalers: Any = None,
            refiner: CheckpointInfo | None = None) -> Generation:
    """Check a request against ``model`` and the limits; decode its images. ``refiner``: the request's
    refiner_checkpoint, resolved."""
    # checked against the current model; an override model is checked again by the pipeline when it runs
    strength = req.denoising_strength if isinstance(req, S.Img2ImgRequest) else 0.75
    params = build_params(req, model, options, limits, strength=strength)
    init = mask = None
    if isinstance(req, S.Img2ImgRequest):
        init = decode_image(req.init_images[0], ("init_images", 0), limits)
        if req.mask:
            mask = convert_image(decode_image(req.mask, ("mask",), limits), "L")  # 16-bit by range
            from ldmkit.inpaint_a1111 import from_request

            try:  # mask blur, inversion, masked content, "only masked", noise multiplier: as A1111
                params = params.replace(inpaint=from_request(req))
            except P.GenerationError as e:
                raise field_error((), str(e)) from None
            kind = "inpaint"
    steps = params.steps if kind == "txt2img" else max(1, min(params.steps, int(params.steps * params.strength)))
    save = req.save_images and not req.do_not_save_samples and can_save
    from ldmkit.server.extras import hires_from_request  # (extras builds on this module)

    hires, hires_upscaler = hires_from_request(req, model, limits, upscalers) if kind == "txt2img" else (None, None)
    steps += (hires.steps or params.steps) if hires is not None else 0
    refiner, switch_at = check_refiner(req, kind, model, info, refiner, hires)
    return Generation(kind, params, req.n_iter, steps, info, req.override_settings_restore_afterwards,
                      init, mask, save, hires, hires_upscaler, refiner, switch_at)


def check_refiner(req: S.GenerationRequest, kind: str, model: StableDiffusion, info: CheckpointInfo | None,
                  refiner: CheckpointInfo | None, hires: Any) -> tuple[CheckpointInfo | None, float]:
    """refiner_checkpoint (already resolved to ``refiner``) and refiner_switch_at, checked: txt2img (with hires
    fix: in its second pass, A1111's default), img2img, not inpainting; with an SDXL base model (an override
    model is checked when it is loaded)."""
    switch_at = 0.8 if req.refiner_switch_at is None else req.refiner_switch_at
    if refiner is None:
        return None, switch_at
    if kind == "inpaint":
        raise field_error(("refiner_checkpoint",), "a refiner with a mask (inpainting) is not supported in "
                                                   "ldmkit; inpaint with the base, then img2img with the refiner",
                          req.refiner_checkpoint)
    if not 0.0 < switch_at < 1.0:
        raise field_error(("refiner_switch_at",), f"refiner_switch_at {switch_at:g} must be between 0 and 1 "
                                                  "(A1111's default: 0.8)", switch_at)
    if info is None:
        check_refiner_base(model)
    return refiner, switch_at


def check_refiner_base(model: StableDiffusion) -> None:
    """A 422 on refiner_checkpoint unless ``model`` is an SDXL base model."""
    if model.cfg.family != "sdxl":
        raise field_error(("refiner_checkpoint",), f"a refiner needs an SDXL base model; {model.source_name} is "
                                                   f"{model.cfg.family}", model.source_name)


def run_generation(ctx: JobContext, gen: Generation, load: Callable[[CheckpointInfo], StableDiffusion],
                   output_dir: str | os.PathLike | None = None,
                   vae_for: Callable[[StableDiffusion], Any] | None = None,
                   load_refiner: Callable[[CheckpointInfo], StableDiffusion] | None = None
                   ) -> tuple[list[Image.Image], StableDiffusion]:
    """In the worker: the n_iter batches, one after another; returns the images and the model used.

    ``vae_for(model)``: the VAE (the ``sd_vae`` option) that stands in for the model's own, or None;
    ``load_refiner(info)``: the refiner model for ``gen.refiner`` (the server keeps one loaded)."""
    original = (ctx.model, ctx.worker.checkpoint)
    if gen.checkpoint is not None and gen.checkpoint.filename != original[1].filename:
        ctx.set_model(load(gen.checkpoint), gen.checkpoint)
    try:
        model, images = ctx.model, []
        refiner = None
        if gen.refiner is not None:
            check_refiner_base(model)
            refiner = (load_refiner or load)(gen.refiner)
            if not refiner.cfg.is_sdxl:
                raise field_error(("refiner_checkpoint",), f"{gen.refiner.title} is not an SDXL model (it is "
                                                           f"{refiner.cfg.family}); use an SDXL refiner or base",
                                  gen.refiner.title)
        # the VAE swapped in first, so that tiling (circular padding) reaches it; both undone after
        with using_vae(model, vae_for(model) if vae_for else None), circular(model, gen.params.tiling):
            _run_batches(ctx, gen, model, images, refiner)
        if gen.save and output_dir is not None:
            for img in images:  # in samples_format, the client's task id made safe for a file name
                save_sample(img, Path(output_dir), ctx.job.task_id, ctx.worker.options)
        return images, model
    finally:
        if gen.restore_model:
            ctx.set_model(*original)


def _run_batches(ctx: JobContext, gen: Generation, model: StableDiffusion, images: list[Image.Image],
                 refiner: StableDiffusion | None = None) -> None:
    for k in range(gen.n_iter):
        p = gen.params.replace(seed=(gen.params.seed + k * gen.params.batch_size) % (P.MAX_SEED + 1))
        cb, done = _counted(ctx.step_callback(k, gen.n_iter, gen.sampling_steps))
        try:
            if gen.kind == "txt2img" and gen.hires is not None:
                from ldmkit.hires import txt2img_hires

                upscaler = gen.hires_upscaler() if gen.hires_upscaler is not None else None
                images += txt2img_hires(model, p, gen.hires, upscaler, callback=cb, refiner=refiner,
                                        switch_at=gen.refiner_switch_at)
            elif gen.kind == "txt2img" and refiner is not None:
                from ldmkit.sdxl import txt2img_refined

                images += txt2img_refined(model, refiner, p, gen.refiner_switch_at, callback=cb)
            elif gen.kind == "txt2img":
                images += P.txt2img(model, p, callback=cb)
            elif gen.kind == "img2img" and refiner is not None:
                from ldmkit.sdxl import img2img_refined

                images += img2img_refined(model, refiner, p, gen.init, gen.refiner_switch_at, callback=cb)
            elif gen.kind == "img2img":
                images += P.img2img(model, p, gen.init, callback=cb)
            else:
                images += P.inpaint(model, p, gen.init, gen.mask, callback=cb)
        except Interrupted:  # or Skipped (/sdapi/v1/skip): this batch ends; an interrupt ends them all
            images += partial_images(ctx, gen, p, done[0])
        if ctx.interrupted:
            break


def _counted(callback: Callable[[dict], None]) -> tuple[Callable[[dict], None], list[int]]:
    """``callback`` that also counts the sampler steps completed (in the returned one-element list)."""
    done = [0]

    def counted(d: dict) -> None:
        done[0] += 1  # this step is done, whether or not the callback then interrupts
        callback(d)

    return counted, done


def response_body(req: S.GenerationRequest, gen: Generation, images: list[Image.Image],
                  model: StableDiffusion, vae_name: str | None = None) -> dict:
    """A1111's txt2img/img2img response: base64 PNGs, the request echoed, and ``info`` as a JSON string."""
    p = gen.params
    seeds = gen.all_seeds
    sampler_name = p.sampler_spec.display
    extra: dict[str, Any] = {}
    steps = p.steps
    if images:  # an interrupted last batch: the steps it got through (its infotext says so)
        steps = int(parse_infotext(images[-1].info["parameters"]).get("Steps", steps))
        fields = parse_infotext(images[0].info["parameters"])
        extra["Schedule type"] = fields.get("Schedule type")
        sampler_name = fields.get("Sampler", sampler_name)
    if gen.hires is not None:  # A1111: Hires upscale/resize, steps, upscaler
        extra.update({k: v for k, v in gen.hires.infotext_fields().items() if k != "Denoising strength"})
    if images:  # the A1111 ControlNet extension's "ControlNet N" lines
        extra.update({k: v for k, v in fields.items() if k.startswith("ControlNet ")})
    if images and gen.refiner is not None:  # as the infotext writes them: "name [hash]", the fraction
        extra.update({k: fields[k] for k in ("Refiner", "Refiner switch at") if k in fields})
    if p.deepcache > 1:  # as A1111 lists an extension's settings
        extra["DeepCache"] = p.deepcache
        if p.deepcache_branch:
            extra["DeepCache branch"] = p.deepcache_branch
    info = {
        "prompt": p.prompt, "all_prompts": [p.prompt] * len(seeds),
        "negative_prompt": p.negative_prompt, "all_negative_prompts": [p.negative_prompt] * len(seeds),
        "seed": p.seed, "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(seeds),
        "subseed_strength": 0, "width": p.width, "height": p.height, "sampler_name": sampler_name,
        "scheduler": p.scheduler or "automatic", "cfg_scale": p.cfg_scale, "steps": steps,
        "batch_size": p.batch_size, "n_iter": gen.n_iter, "restore_faces": False,
        "face_restoration_model": None, "sd_model_name": model.source_name,
        "sd_model_hash": model.model_hash or None, "sd_vae_name": vae_name, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": (gen.hires and gen.hires.denoise) if gen.kind == "txt2img" else p.strength,
        "extra_generation_params": extra, "index_of_first_image": 0,
        "infotexts": [img.info["parameters"] for img in images], "styles": req.styles or [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": p.clip_skip or 1,
        "is_using_inpainting_conditioning": gen.kind == "inpaint" and model.cfg.is_inpainting,
        "version": f"ldmkit {__version__}",
    }
    parameters = req.model_dump()
    if isinstance(req, S.Img2ImgRequest) and not req.include_init_images:
        parameters["init_images"], parameters["mask"] = None, None
    encoded = [encode_png(img, img.info.get("parameters")) for img in images] if req.send_images else []
    return {"images": encoded, "parameters": parameters, "info": json.dumps(info)}
