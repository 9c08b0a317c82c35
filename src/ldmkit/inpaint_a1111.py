"""Inpainting as AUTOMATIC1111 does it (``modules/processing.py``: ``StableDiffusionProcessingImg2Img.init``
and ``apply_overlay``; ``modules/masking.py``).

1. The mask is made binary (> 128 is white), optionally inverted, then blurred (a Gaussian of
   ``mask_blur`` pixels, kernel ``2 * int(2.5 * blur + 0.5) + 1`` as OpenCV's ``GaussianBlur``).
2. "Only masked" (``full_res``): the blurred mask's bounding box plus ``padding`` pixels, grown to the output's
   aspect ratio, is cut out of the image and mask and scaled to the generation size.
3. The model repaints where the (rounded) blurred mask is white; ``fill`` chooses what the masked part
   starts from: 0 the image with the masked part blurred in from around it, 1 the original, 2 latent
   noise, 3 latent zeros.
4. After decoding, the original image is laid over the result with alpha = 1 - mask (whole image: the
   blurred mask doubled and clipped): outside the blur's reach every pixel is the original's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from ldmkit import pipeline as P
from ldmkit.core import GenerationError, GenerationParams, StepCallback
from ldmkit.images import convert as convert_image

FILL_MODES = ("fill", "original", "latent noise", "latent nothing")  # A1111's inpainting_fill 0..3


@dataclass(frozen=True)
class InpaintSettings:
    mask_blur: int = 4  # A1111's mask_blur_x (and _y unless given)
    mask_blur_y: int | None = None
    fill: int = 1  # index into FILL_MODES
    invert: bool = False  # repaint the black part
    full_res: bool = False  # "Only masked": work on the masked region at the full generation size
    full_res_padding: int = 32
    noise_multiplier: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.fill < len(FILL_MODES):
            raise GenerationError(f"inpainting_fill must be 0..3 ({', '.join(FILL_MODES)}), got {self.fill}")
        for name in ("mask_blur", "mask_blur_y", "full_res_padding"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= 256:
                raise GenerationError(f"{name} must be between 0 and 256 pixels, got {v}")
        if not 0.0 <= self.noise_multiplier <= 2.0:  # also refuses NaN
            raise GenerationError(f"initial_noise_multiplier must be in [0, 2], got {self.noise_multiplier}")


def from_request(req) -> InpaintSettings:
    """The settings of an A1111 img2img request (``mask_blur`` sets both blurs when given)."""
    blur_x = req.mask_blur if req.mask_blur is not None else req.mask_blur_x
    blur_y = req.mask_blur if req.mask_blur is not None else req.mask_blur_y
    noise = 1.0 if req.initial_noise_multiplier is None else req.initial_noise_multiplier
    return InpaintSettings(blur_x, blur_y, req.inpainting_fill, bool(req.inpainting_mask_invert),
                           req.inpaint_full_res, req.inpaint_full_res_padding, noise)


def gaussian_blur(mask: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """OpenCV's ``GaussianBlur`` along one axis of a uint8 image: kernel 2 * int(2.5 * sigma + 0.5) + 1,
    reflect-101 borders."""
    k = 2 * int(2.5 * sigma + 0.5) + 1
    r = k // 2
    w = np.exp(-((np.arange(k) - r) ** 2) / (2 * sigma * sigma))
    w /= w.sum()
    a = np.moveaxis(mask.astype(np.float64), axis, -1)
    n = a.shape[-1]
    idx = np.arange(-r, n + r)
    if n > 1:  # reflect-101: ... 2 1 | 0 1 2 ... n-1 | n-2 ...
        period = 2 * (n - 1)
        idx = np.abs(np.mod(idx, period))
        idx = np.where(idx >= n, period - idx, idx)
    else:
        idx = np.zeros_like(idx)
    padded = a[..., idx]
    out = sum(w[j] * padded[..., j:j + n] for j in range(k))
    return np.moveaxis(np.clip(np.round(out), 0, 255).astype(np.uint8), -1, axis)


def prepare_mask(mask: Image.Image, s: InpaintSettings) -> Image.Image:
    """Binary, inverted if asked, blurred: the mask A1111 works with (mode L, the image's size)."""
    m = convert_image(mask, "L").point(lambda v: 255 if v > 128 else 0)
    if s.invert:
        m = ImageOps.invert(m)
    a = np.asarray(m)
    if s.mask_blur > 0:
        a = gaussian_blur(a, s.mask_blur, axis=1)
    blur_y = s.mask_blur if s.mask_blur_y is None else s.mask_blur_y
    if blur_y > 0:
        a = gaussian_blur(a, blur_y, axis=0)
    return Image.fromarray(a, "L")


def crop_region(mask: Image.Image, padding: int, width: int, height: int) -> tuple[int, int, int, int] | None:
    """The mask's bounding box plus ``padding``, grown to ``width:height`` within the image (A1111's
    ``get_crop_region_v2`` + ``expand_crop_region``); None for an empty mask."""
    box = mask.getbbox()
    if box is None:
        return None
    iw, ih = mask.size
    x1, y1, x2, y2 = max(box[0] - padding, 0), max(box[1] - padding, 0), min(box[2] + padding, iw), \
        min(box[3] + padding, ih)
    if (x2 - x1) / (y2 - y1) > width / height:  # too wide: grow the height
        y1, y2 = _grow(y1, y2, int((x2 - x1) / (width / height) - (y2 - y1)), ih)
    else:  # too tall: grow the width
        x1, x2 = _grow(x1, x2, int((y2 - y1) * (width / height) - (x2 - x1)), iw)
    return x1, y1, x2, y2


def _grow(lo: int, hi: int, by: int, limit: int) -> tuple[int, int]:
    """[lo, hi) grown by ``by`` around its centre, shifted back inside [0, limit)."""
    lo, hi = lo - by // 2, hi + by - by // 2
    if hi >= limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, min(hi - lo, limit)
    return lo, hi


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill": the masked part replaced by ever less blurred copies of what surrounds it."""
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask))
    out = Image.new("RGBA", image.size)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(blurred)
    return out.convert("RGB")


def inpaint(model, params: GenerationParams, image: Image.Image, mask: Image.Image, settings: InpaintSettings,
            callback: StepCallback | None = None) -> list[Image.Image]:
    """Repaint the white part of ``mask`` as A1111 does; the result keeps every pixel the blurred mask leaves
    untouched. With ``full_res`` the images have ``image``'s size, otherwise the generation size.
    (``pipeline.inpaint`` with ``params.inpaint = settings`` is the same.)"""
    return P.inpaint(model, params.replace(inpaint=settings), image, mask, callback)


def run(model, params: GenerationParams, image: Image.Image, mask: Image.Image, settings: InpaintSettings,
        callback: StepCallback | None = None) -> list[Image.Image]:
    """:func:`inpaint`'s work, inside ``pipeline.inpaint`` (which sets up tiling)."""
    image = convert_image(image, "RGB")
    m = prepare_mask(mask.resize(image.size, Image.Resampling.NEAREST) if mask.size != image.size else mask,
                     settings)
    w, h = params.width, params.height
    region = crop_region(m, settings.full_res_padding, w, h) if settings.full_res else None
    if region is not None:
        overlay_mask, work_mask = m, m.crop(region).resize((w, h), Image.Resampling.LANCZOS)
        work = image.crop(region).resize((w, h), Image.Resampling.LANCZOS)
        base = image
    else:
        work = image if image.size == (w, h) else image.resize((w, h), Image.Resampling.LANCZOS)
        work_mask = m if m.size == (w, h) else m.resize((w, h), Image.Resampling.LANCZOS)
        overlay_mask = Image.fromarray(np.clip(np.asarray(work_mask, np.float32) * 2, 0, 255).astype(np.uint8))
        base = work
    overlay = Image.new("RGBa", base.size)  # the original where the mask is black, transparent where white
    overlay.paste(base.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(overlay_mask))
    overlay = overlay.convert("RGBA")
    if settings.fill == 0:
        work = fill_masked(work, work_mask)
    repaint = torch.from_numpy((np.asarray(work_mask, np.float32) / 255.0 >= 0.5).astype(np.float32))[None, None]
    f = model.cfg.vae.downscale  # A1111: the blurred mask resized (bicubic) to the latent, then rounded
    small = np.asarray(work_mask.convert("RGB").resize((w // f, h // f)), np.float32)[..., 0] / 255
    latent_mask = torch.from_numpy(np.around(small))[None, None]
    job, latents = P.inpaint_latents(model, params, P.image_to_tensor(work, w, h), repaint, callback,
                                     latent_fill=FILL_MODES[settings.fill],
                                     noise_multiplier=settings.noise_multiplier, latent_mask=latent_mask)
    extra: dict[str, object] = {"Denoising strength": params.strength, "Mask blur": settings.mask_blur}
    if settings.noise_multiplier != 1.0:
        extra["Noise multiplier"] = settings.noise_multiplier
    if settings.full_res:  # A1111's infotext names
        extra["Inpaint area"] = "Only masked"
        extra["Masked area padding"] = settings.full_res_padding
    out = []
    for img in P.finish(model, params, latents, job.seeds, job.plan, extra):
        info = img.info
        if region is not None:
            x1, y1, x2, y2 = region
            pasted = Image.new("RGBA", base.size)
            pasted.paste(img.resize((x2 - x1, y2 - y1), Image.Resampling.LANCZOS), (x1, y1))
            img = pasted
        img = img.convert("RGBA")
        img.alpha_composite(overlay)
        img = img.convert("RGB")
        img.info.update(info)
        out.append(img)
    return out
