"""txt2img, img2img and inpainting as small functions over a loaded model: images in and out.

The stages, in order: prompt -> token ids (tokenizer) -> text embeddings (text encoder) ->
starting noise -> U-Net steps through a sampler (classifier-free guidance) -> latent ->
decoder -> image. The middle, settings to latents, is :mod:`ldmkit.core` (shared by every
front-end); this module adds the image side. docs/architecture.md maps each stage to its function.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ldmkit import __version__, channels_last, latent_norm, lowmem
from ldmkit.core import (  # noqa: F401  (re-exported: the pipeline's public names since before the core)
    MAX_SEED,
    GenerationError,
    GenerationParams,
    Job,
    MaskedDenoiser,
    Plan,
    StepCallback,
    denoise,
    encode_prompt,
    initial_noise,
    make_denoiser,
    model_schedule,
    plan,
    prepare,
    resolve_seeds,
    sample,
    start_scale,
    validate,
)
from ldmkit.images import convert as convert_image
from ldmkit.model import StableDiffusion
from ldmkit.networks import last_report
from ldmkit.tiling import per_generation
from ldmkit.vae_tiling import decode as vae_decode
from ldmkit.vae_tiling import encode as vae_encode


def decode_latents(model: StableDiffusion, latents: Tensor) -> list[Image.Image]:
    """Latents (B, 4, h, w) -> RGB images; the KL decoder works on latent_norm.from_unet(latent) (latent /
    scale_factor, or per channel with latents_mean/std), a tiny autoencoder (TAESD, ``scaled_latents``) on the
    latent itself."""
    images = []
    channels_last.prepare(model, "vae")
    scaled = getattr(model.vae, "scaled_latents", False)
    # tiled when asked, or when the image is large (vae_tiling.should_tile): bounded memory at 2048^2
    decode = functools.partial(vae_decode, model.vae, tiling=model.vae_tiling)
    with torch.inference_mode():
        for z in latents.split(1):  # one at a time keeps peak memory flat for batches
            z = z.to(getattr(model, "vae_dtype", model.dtype))  # SDXL fp16: fp32 VAE
            x = decode(z if scaled else latent_norm.from_unet(model.cfg.vae, z)).float()
            x = ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
            images.append(Image.fromarray(x[0].permute(1, 2, 0).cpu().numpy()))
    lowmem.release(model, "vae")
    return images


def encode_pixels(model: StableDiffusion, x: Tensor) -> Tensor:
    """Pixels (B, 3, H, W) in [-1, 1] -> U-Net latent (B, 4, H/8, W/8): latent_norm.to_unet(posterior mean)."""
    channels_last.prepare(model, "vae")
    with torch.inference_mode():
        if getattr(model.vae, "scaled_latents", False):  # a tiny autoencoder returns the scaled latent
            return model.vae.encode(x.to(model.device, model.dtype)).float()
        dtype = getattr(model, "vae_dtype", model.dtype)  # an fp16 SDXL model's VAE runs in fp32 (sdxl.upcast_vae)
        mean, _ = vae_encode(model.vae, x.to(model.device, dtype), tiling=model.vae_tiling)
    return latent_norm.to_unet(model.cfg.vae, mean.float())


def open_image(path: str | os.PathLike) -> Image.Image:
    """Read an image file fully, or raise a ValueError that names the file."""
    try:
        img = Image.open(path)
        img.load()
        if img.getexif().get(0x0112, 1) != 1:  # a phone photo's EXIF orientation: upright, as viewers and
            from PIL import ImageOps  # diffusers' load_image show it (a control map would come out rotated)

            img = ImageOps.exif_transpose(img)
        return img
    except FileNotFoundError:
        raise ValueError(f"{path}: no such image file") from None
    except OSError as e:  # includes PIL's UnidentifiedImageError
        raise ValueError(f"{path}: cannot read the image ({e}); use a PNG or JPEG file") from None
    except Image.DecompressionBombError as e:  # PIL's size guard (e.g. 30000x30000): refused before decoding
        raise ValueError(f"{path}: too large to open ({e}); downscale it first") from None


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
    fields.extend(last_report(model).infotext_fields().items())  # the prompt's <lora:...> (ldmkit.networks)
    if params.controlnets:  # as the A1111 ControlNet extension writes its units
        from ldmkit.controlnet_a1111 import infotext_fields

        fields.extend(infotext_fields(params.controlnets).items())
    if params.clip_skip and params.clip_skip > 1:
        fields.append(("Clip skip", params.clip_skip))
    if params.tiling:  # as A1111 writes it
        fields.append(("Tiling", "True"))
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


def _job(model: StableDiffusion, params: GenerationParams) -> Job:
    # this module's initial_noise, looked up at call time: the parity tests give it diffusers' draw order
    return prepare(model, params, noise_fn=initial_noise)


def finish(model: StableDiffusion, params: GenerationParams, latents: Tensor, seeds: list[int], p: Plan,
           extra: dict[str, object] | None = None) -> list[Image.Image]:
    """Latents -> images with their infotext and seed."""
    sampler_name, schedule_name = p.infotext_names
    images = decode_latents(model, latents)
    for img, seed in zip(images, seeds, strict=True):
        img.info["parameters"] = infotext(model, params, seed, sampler_name, schedule_name, extra)
        img.info["seed"] = seed
    return images


def txt2img_latents(model: StableDiffusion, params: GenerationParams,
                    callback: StepCallback | None = None) -> tuple[Job, Tensor]:
    """txt2img up to the final latents: the prepared job and its latents (explain records the stages)."""
    from ldmkit.sdxl import check_txt2img

    check_txt2img(model)  # an SDXL refiner cannot start from noise
    job = _job(model, params)
    return job, sample(model, job.plan, job.cond, job.uncond, job.noise, callback=callback)


@per_generation  # params.tiling: circular padding for this generation only
def txt2img(model: StableDiffusion, params: GenerationParams,
            callback: StepCallback | None = None) -> list[Image.Image]:
    job, latents = txt2img_latents(model, params, callback)
    return finish(model, params, latents, job.seeds, job.plan)


@per_generation
def img2img(model: StableDiffusion, params: GenerationParams, init_image: Image.Image,
            callback: StepCallback | None = None) -> list[Image.Image]:
    job = _job(model, params)
    init = encode_pixels(model, image_to_tensor(init_image, params.width, params.height))
    latents = sample(model, job.plan.truncate(params.strength), job.cond, job.uncond, job.noise, init_latent=init,
                     callback=callback)
    return finish(model, params, latents, job.seeds, job.plan, {"Denoising strength": params.strength})


@per_generation
def inpaint(model: StableDiffusion, params: GenerationParams, init_image: Image.Image, mask_image: Image.Image,
            callback: StepCallback | None = None) -> list[Image.Image]:
    """Repaint the white part of ``mask_image``.

    9-channel inpainting models see the mask and the masked image as extra input channels;
    ordinary models keep the original latent outside the mask at every step.
    """
    if params.inpaint is not None:  # A1111's mask blur, masked content, "only masked", original pasted back
        from ldmkit import inpaint_a1111

        return inpaint_a1111.run(model, params, init_image, mask_image, params.inpaint, callback)
    image = image_to_tensor(init_image, params.width, params.height)
    mask = mask_to_tensor(mask_image, params.width, params.height)
    job, latents = inpaint_latents(model, params, image, mask, callback)
    return finish(model, params, latents, job.seeds, job.plan, {"Denoising strength": params.strength})


def inpaint_latents(model: StableDiffusion, params: GenerationParams, image: Tensor, mask: Tensor,
                    callback: StepCallback | None = None, *, latent_fill: str = "original",
                    noise_multiplier: float = 1.0, latent_mask: Tensor | None = None) -> tuple[Job, Tensor]:
    """:func:`inpaint` on tensors: ``image`` (1, 3, H, W) in [-1, 1], ``mask`` (1, 1, H, W), 1 = repaint.

    ``latent_fill`` (A1111's "masked content" for the latent): "original", "latent noise" (the seeds' noise
    inside the mask) or "latent nothing" (zeros inside the mask); ``noise_multiplier`` scales the starting
    noise (A1111's ``initial_noise_multiplier``); ``latent_mask`` (1, 1, h, w): the ordinary model's mask in the
    latent (default: ``mask`` sampled down)."""
    job = _job(model, params)
    p = job.plan.truncate(params.strength)
    f = model.cfg.vae.downscale
    concat_mask = F.interpolate(mask, scale_factor=1 / f, mode="nearest").to(job.noise)
    latent_mask = concat_mask if latent_mask is None else latent_mask.to(job.noise)
    init = encode_pixels(model, image)
    if latent_fill == "latent noise":
        init = init * (1 - latent_mask) + job.noise * latent_mask
    elif latent_fill == "latent nothing":
        init = init * (1 - latent_mask)
    if noise_multiplier != 1.0:
        job = dataclasses.replace(job, noise=job.noise * noise_multiplier)
    if model.cfg.is_inpainting:
        # the masked part becomes 0 (mid-grey), as the inpainting models were trained
        masked_latent = encode_pixels(model, image * (mask < 0.5))
        c_concat = torch.cat([concat_mask, masked_latent], dim=1).expand(job.noise.shape[0], -1, -1, -1)
        cond, uncond = job.cond.replace(c_concat=c_concat), job.uncond.replace(c_concat=c_concat)
        # the inpainting models were trained from pure noise at full strength
        latents = sample(model, p, cond, uncond, job.noise, init_latent=init if params.strength < 1.0 else None,
                         callback=callback)
    else:
        latents = sample(model, p, job.cond, job.uncond, job.noise, init_latent=init, mask=latent_mask,
                         callback=callback)
    return job, latents
