"""Hires. fix, as A1111 does it: generate at the base size, upscale (in latent space, or the decoded image with
an image upscaler), then run img2img at the target size with its own steps and denoising strength.

A1111's rules (``modules/processing.py``, ``StableDiffusionProcessingTxt2Img``):
- target: ``hr_resize_x/y`` when given (one of them: the other keeps the aspect ratio; both: scaled to cover,
  then the latent is cropped to fit), else ``int(side * hr_scale)``;
- latent upscale modes "Latent", "Latent (antialiased)", "Latent (bicubic)", ... interpolate the latent; any
  other name is an image upscaler (``resize_image``: the upscaler by max(w/W, h/H), then Lanczos to the size;
  "None": Lanczos alone), and the result is encoded again;
- second pass: fresh noise from the same seeds at the target size; ``steps = hr_second_pass_steps or steps``
  run as the last ``steps`` of a schedule of ``int(steps / min(denoising_strength, 0.999))`` steps
  (``setup_img2img_steps`` with the step count given);
- infotext: "Denoising strength", "Hires upscale" (or "Hires resize"), "Hires steps" (when set), "Hires upscaler";
  the "Size" stays the first pass's.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from ldmkit import core, prompt_schedule
from ldmkit.core import GenerationError, GenerationParams, StepCallback
from ldmkit.model import StableDiffusion
from ldmkit.tiling import per_generation

# A1111's shared.latent_upscale_modes: name -> (torch interpolation mode, antialias)
LATENT_UPSCALE_MODES = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}


@dataclass(frozen=True)
class HiresParams:
    """The second pass: A1111's hr_scale, hr_upscaler, hr_second_pass_steps (0: the first pass's),
    denoising_strength, hr_resize_x/y (0: from the scale)."""

    scale: float = 2.0
    upscaler: str = "Latent"
    steps: int = 0
    denoise: float = 0.7
    resize_x: int = 0
    resize_y: int = 0

    @property
    def latent_mode(self) -> tuple[str, bool] | None:
        return LATENT_UPSCALE_MODES.get(self.upscaler)

    def check(self) -> None:
        if not (math.isfinite(self.scale) and 1.0 <= self.scale <= 8.0) and not (self.resize_x or self.resize_y):
            raise GenerationError(f"hires scale must be from 1 to 8, got {self.scale:g}")
        if not 0.0 < self.denoise <= 1.0:
            raise GenerationError(f"hires denoising strength must be in (0, 1], got {self.denoise:g}")
        if self.steps < 0:
            raise GenerationError(f"hires steps must be >= 0 (0: as many as the first pass), got {self.steps}")
        if self.resize_x < 0 or self.resize_y < 0:
            raise GenerationError(f"hires resize must be >= 0, got {self.resize_x}x{self.resize_y}")

    def target(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(upscale_to_x, upscale_to_y, truncate_x, truncate_y) in pixels, as A1111 computes them."""
        rx, ry = self.resize_x, self.resize_y
        if rx == 0 and ry == 0:
            return int(width * self.scale), int(height * self.scale), 0, 0
        if ry == 0:
            return rx, rx * height // width, 0, 0
        if rx == 0:
            return ry * width // height, ry, 0, 0
        if width / height < rx / ry:
            to_x, to_y = rx, rx * height // width
        else:
            to_x, to_y = ry * width // height, ry
        return to_x, to_y, to_x - rx, to_y - ry

    def infotext_fields(self) -> dict[str, object]:
        fields: dict[str, object] = {"Denoising strength": f"{self.denoise:g}"}
        if self.resize_x == 0 and self.resize_y == 0:
            fields["Hires upscale"] = f"{self.scale:g}"
        else:
            fields["Hires resize"] = f"{self.resize_x}x{self.resize_y}"
        if self.steps:
            fields["Hires steps"] = self.steps
        fields["Hires upscaler"] = self.upscaler
        return fields

    @staticmethod
    def from_infotext(p: dict[str, str]) -> HiresParams | None:
        """The hires settings an infotext records (None: it has none)."""
        if not any(k in p for k in ("Hires upscale", "Hires resize", "Hires upscaler")):
            return None
        rx, _, ry = p.get("Hires resize", "0x0").partition("x")
        return HiresParams(scale=float(p.get("Hires upscale", 2.0)), upscaler=p.get("Hires upscaler", "Latent"),
                           steps=int(p.get("Hires steps", 0)), denoise=float(p.get("Denoising strength", 0.7)),
                           resize_x=int(rx or 0), resize_y=int(ry or 0))


def resolve_upscaler(name: str, upscaler_dir: str | os.PathLike | None = None, device: str | None = None):
    """The image upscaler ``name`` means: a latent mode (None), a built-in, a file, or a file stem in
    ``upscaler_dir`` (a name there, never a path: no separators or ``..``)."""
    from ldmkit.upscale import A1111_REALESRGAN_NAMES, UPSCALER_SUFFIXES, builtin_upscaler, load_upscaler

    if name in LATENT_UPSCALE_MODES:
        return None
    builtin = builtin_upscaler(name)
    if builtin is not None:
        return builtin
    if Path(name).is_file():
        return load_upscaler(name, device)
    stem = A1111_REALESRGAN_NAMES.get(name, name)  # "R-ESRGAN 4x+" -> RealESRGAN_x4plus.pth
    if upscaler_dir and "/" not in stem and "\\" not in stem and stem not in ("", ".", ".."):
        for suffix in UPSCALER_SUFFIXES:
            path = Path(upscaler_dir) / f"{stem}{suffix}"
            if path.is_file():
                return load_upscaler(path, device, name=name)
    where = f" in {upscaler_dir}" if upscaler_dir else ""
    raise GenerationError(f"hires upscaler {name!r}: no such file{where}; use a latent mode "
                          f"({', '.join(LATENT_UPSCALE_MODES)}), Lanczos, Nearest, None, or an upscaler file")


def _upscale_images(model: StableDiffusion, latents: torch.Tensor, upscaler, to: tuple[int, int],
                    size: tuple[int, int]) -> torch.Tensor:
    """Decode, upscale each image as A1111's resize_image (mode 0) does, encode at ``size``."""
    from ldmkit import pipeline as P
    from ldmkit.upscale import upscale

    tensors = []
    for img in P.decode_latents(model, latents):
        w, h = to
        if upscaler.module is None and upscaler.name == "None":
            img = img.resize((w, h), Image.Resampling.LANCZOS)
        else:
            scale = max(w / img.width, h / img.height)
            if scale > 1.0:
                img = upscale(img, upscaler, scale, multiple_of=8)
            if img.size != (w, h):
                img = img.resize((w, h), Image.Resampling.LANCZOS)
        tensors.append(P.image_to_tensor(img, *size))
    return P.encode_pixels(model, torch.cat(tensors))


@per_generation  # params.tiling: circular padding for both passes
def txt2img_hires(model: StableDiffusion, params: GenerationParams, hires: HiresParams, upscaler=None,
                  callback: StepCallback | None = None, refiner: StableDiffusion | None = None,
                  switch_at: float = 0.8) -> list[Image.Image]:
    """txt2img with a hires second pass. ``upscaler``: the loaded image upscaler for a non-latent
    ``hires.upscaler`` (see :func:`resolve_upscaler`). ``callback`` sees both passes' steps.
    ``refiner`` (SDXL): as A1111's default ``hires_fix_refiner_pass: second pass``, the first pass is the base's
    alone and in the hires pass the refiner takes over where the noise level reaches ``switch_at``
    (:func:`ldmkit.sdxl.switch_step`)."""
    from ldmkit import pipeline as P

    hires.check()
    mode = hires.latent_mode
    if mode is None and upscaler is None:
        upscaler = resolve_upscaler(hires.upscaler)
    f = model.cfg.vae.downscale
    to_x, to_y, trunc_x, trunc_y = hires.target(params.width, params.height)
    ty, tx = trunc_y // f, trunc_x // f  # A1111 crops the upscaled latent by the excess, centred
    final = ((to_x // f - tx) * f, (to_y // f - ty) * f)
    if final[0] <= 0 or final[1] <= 0:
        raise GenerationError(f"hires target {to_x}x{to_y} is too small")
    second = params.replace(width=final[0], height=final[1])
    core.validate(second, model)

    job = P._job(model, params)
    latents = core.sample(model, job.plan, job.cond, job.uncond, job.noise, callback=callback)
    if mode is not None:
        latents = F.interpolate(latents, size=(to_y // f, to_x // f), mode=mode[0], antialias=mode[1])
    else:
        latents = _upscale_images(model, latents, upscaler, (to_x, to_y), (to_x // f * f, to_y // f * f))
    latents = latents[:, :, ty // 2: latents.shape[2] - (ty + 1) // 2, tx // 2: latents.shape[3] - (tx + 1) // 2]

    steps = hires.steps or params.steps
    total = int(steps / min(hires.denoise, 0.999))
    plan = core.plan(model, second.replace(steps=total), seed=job.seeds[0])
    plan = dataclasses.replace(plan, sigmas=plan.sigmas[total - steps:])
    noise = core.initial_noise(job.seeds, tuple(latents.shape[1:]), model.device)
    cond, uncond = job.cond, job.uncond
    # SDXL: the size conditioning is the upscaled size's (A1111's calculate_hr_conds); prompt editing:
    # scheduled over the hires steps, counted on from the first pass (A1111's hires_steps)
    if model.cfg.is_sdxl or prompt_schedule.scheduled(cond, uncond):
        n = len(job.seeds)
        cond, uncond = core.encode_conditioning(model, [params.prompt] * n, [params.negative_prompt] * n,
                                                params.replace(width=to_x, height=to_y), hires_steps=steps)
    if (image := core.concat_condition(model, params, noise)) is not None:  # inpainting, depth: the new size's
        cond, uncond = cond.replace(c_concat=image), uncond.replace(c_concat=image)
    first = len(job.plan.sigmas) - 1

    def second_pass(d: dict) -> None:  # steps counted on from the first pass's (progress bars, the server)
        callback({**d, "i": d["i"] + first})

    refined = False
    if refiner is None:
        latents = core.sample(model, plan, cond, uncond, noise, init_latent=latents.to(noise),
                              callback=second_pass if callback else None)
    else:
        from ldmkit.sdxl import sample_refined
        from ldmkit.tiling import circular

        with circular(refiner, params.tiling):
            latents, refined = sample_refined(model, refiner, plan, cond, uncond, noise, params, switch_at,
                                              init_latent=latents.to(noise), size=(to_x, to_y),
                                              callback=second_pass if callback else None)
    name = upscaler.name if upscaler is not None and mode is None else hires.upscaler
    fields = dataclasses.replace(hires, upscaler=name).infotext_fields()
    if refined:
        from ldmkit.sdxl import refiner_fields

        fields.update(refiner_fields(refiner, switch_at))  # type: ignore[arg-type]
    return P.finish(model, params, latents, job.seeds, job.plan, fields)


# ---------------------------------------------------------------- ldmkit generate --hires-*


def add_hires_args(p) -> None:
    """The hires flags of ``ldmkit generate``."""
    p.add_argument("--hires-scale", type=float, default=None,
                   help="hires fix: generate at --width/--height, upscale by this (1-8), refine with img2img")
    p.add_argument("--hires-resize", default=None, metavar="WxH",
                   help="hires fix to this size instead of a scale (A1111's hr_resize_x/y; 0 for a side keeps "
                        "the aspect ratio; both: cover the box, then crop)")
    p.add_argument("--hires-upscaler", default=None,
                   help=f"{', '.join(LATENT_UPSCALE_MODES)} (default: Latent), Lanczos, Nearest, None, or an "
                        "upscaler file (ESRGAN, Real-ESRGAN, ...)")
    p.add_argument("--hires-steps", type=int, default=None, help="second-pass steps (default: as the first pass)")
    p.add_argument("--hires-denoise", type=float, default=None,
                   help="second-pass denoising strength in (0, 1] (default 0.7)")
    p.add_argument("--upscaler-dir", default=None, metavar="DIR",
                   help="where --hires-upscaler NAME (a file stem, as an infotext records it) is looked up")


def hires_from_args(args, device: str | None = None) -> tuple[HiresParams | None, object]:
    """(HiresParams, loaded image upscaler or None) from the flags; (None, None) without hires."""
    scale, resize = args.hires_scale, args.hires_resize
    if scale is None and resize is None:
        given = [f"--hires-{k}" for k in ("upscaler", "steps", "denoise") if getattr(args, f"hires_{k}") is not None]
        if given:
            raise ValueError(f"{given[0]} needs --hires-scale S or --hires-resize WxH (which turn hires fix on)")
        return None, None
    rx = ry = 0
    if resize is not None:
        try:
            rx, ry = (int(v) for v in resize.lower().split("x"))
        except ValueError:
            raise ValueError(f"--hires-resize must be WIDTHxHEIGHT, e.g. 1024x1024 (0 for a side: keep the "
                             f"aspect ratio); got {resize!r}") from None
        if rx <= 0 and ry <= 0:
            raise ValueError(f"--hires-resize {resize}: give at least one side")
    hires = HiresParams(scale=2.0 if scale is None else scale, upscaler=args.hires_upscaler or "Latent",
                        steps=args.hires_steps or 0, denoise=0.7 if args.hires_denoise is None else args.hires_denoise,
                        resize_x=rx, resize_y=ry)
    hires.check()
    return hires, resolve_upscaler(hires.upscaler, args.upscaler_dir, device)


def apply_png(args, p: dict[str, str]) -> None:
    """--from-png: the infotext's hires settings, unless given on the command line."""
    hires = HiresParams.from_infotext(p)
    if hires is None:
        return
    if args.hires_scale is None and args.hires_resize is None:
        if hires.resize_x or hires.resize_y:
            args.hires_resize = f"{hires.resize_x}x{hires.resize_y}"
        else:
            args.hires_scale = hires.scale
    for key, value in (("upscaler", hires.upscaler), ("steps", hires.steps), ("denoise", hires.denoise)):
        if getattr(args, f"hires_{key}") is None:
            setattr(args, f"hires_{key}", value)
