"""Live previews: cheap pictures of the image forming, made from the sampler's denoised latent at each step.

Every preview decoder has one signature: ``decoder(latents) -> list[PIL.Image]``, where ``latents`` is
(B, 4, h, w) in the space the U-Net sees (already multiplied by the VAE's scale factor). The kinds are
A1111's ``show_progress_type`` values:

- "Approx cheap": a fixed linear map from the 4 latent channels to RGB, at latent resolution
  (1/8 of the image side); costs nothing. A1111's matrix for SD1/SD2 latents, a fitted one for others.
- "TAESD": the tiny autoencoder's decoder (about 1.2M parameters), full resolution, a few ms per image.
- "Full": the model's own VAE decoder; exact, but can cost as much as a sampling step.
- "Approx NN": A1111's small convolutional approximation; ldmkit has no such network and uses the
  tiny decoder when one is given, else "Approx cheap".
"""

from __future__ import annotations

import itertools
import os
import weakref
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ldmkit.model import StableDiffusion

PreviewDecoder = Callable[[Tensor], list[Image.Image]]
PREVIEW_TYPES = ("Approx cheap", "Approx NN", "TAESD", "Full")

# latent channel (row) -> R, G, B (column) for SD1 and SD2 latents (both use the same KL-f8 autoencoder).
# Source: AUTOMATIC1111/stable-diffusion-webui, modules/sd_vae_approx.py, cheap_approximation(), which
# cites https://discuss.huggingface.co/t/decoding-latents-to-rgb-without-upscaling/23204/2 ; A1111 applies
# it to the scaled latent and maps the result from [-1, 1] to [0, 1] (sd_samplers_common.py).
APPROX_CHEAP_SD = torch.tensor([
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
])


def to_images(x: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images, as A1111 converts previews (scale by 255, truncate)."""
    x = ((x.float() * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8)  # truncation, like numpy's astype
    return [Image.fromarray(np.ascontiguousarray(im.permute(1, 2, 0).cpu().numpy())) for im in x]


def approx_cheap(latents: Tensor, coeffs: Tensor = APPROX_CHEAP_SD, bias: Tensor | None = None) -> list[Image.Image]:
    """A1111's "Approx cheap" preview: RGB = latent channels x (C, 3) matrix (+ bias), one pixel per latent."""
    if latents.shape[1] != coeffs.shape[0]:
        raise ValueError(f"the Approx cheap preview maps {coeffs.shape[0]} latent channels to RGB, but this "
                         f"model's latents have {latents.shape[1]}; use the TAESD or Full preview")
    x = torch.einsum("blhw,lr->brhw", latents.detach().float().cpu(), coeffs)  # (B, 3, h, w)
    if bias is not None:
        x = x + bias[None, :, None, None]
    return to_images(x)


SD_SCALE_FACTOR = 0.18215  # SD1/SD2's KL-f8 latent space: the one A1111's matrix was fitted to
_FITTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # autoencoder -> (coeffs, bias)


def cheap_map(model: StableDiffusion) -> tuple[Tensor, Tensor | None]:
    """The Approx cheap map for this model's latents: A1111's for SD1/SD2, else one fitted to its autoencoder.

    A1111's matrix means nothing in another latent space: on the built-in emoji model's latents it is
    138/255 RMSE from the final image (box-downscaled), against 49 for this fit and 27 for the best linear
    map of that very latent. The fit: 27 solid colours ({-1, 0, 1}^3) through the model's encoder, then
    least squares latent -> RGB with a bias; done once per autoencoder.
    """
    c = model.cfg.vae
    if (c.z_channels == APPROX_CHEAP_SD.shape[0] and abs(c.scale_factor - SD_SCALE_FACTOR) < 1e-6
            and c.latents_mean is None):
        return APPROX_CHEAP_SD, None
    if model.vae not in _FITTED:
        from ldmkit.pipeline import encode_pixels

        colours = torch.tensor(list(itertools.product((-1.0, 0.0, 1.0), repeat=3)))  # (27, 3)
        side = 4 * c.downscale
        latents = encode_pixels(model, colours[:, :, None, None].expand(-1, -1, side, side)).cpu()  # (27, C, 4, 4)
        x = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        x = torch.cat([x, torch.ones(len(x), 1)], dim=1).double()
        y = colours[:, None, :].expand(-1, 16, -1).reshape(-1, 3).double()
        w = torch.linalg.lstsq(x, y).solution.float()  # (C + 1, 3)
        _FITTED[model.vae] = (w[:-1], w[-1])
    return _FITTED[model.vae]


def approx_cheap_for(model: StableDiffusion) -> PreviewDecoder:
    """"Approx cheap" with the map that fits this model's latent space (see :func:`cheap_map`)."""
    coeffs, bias = cheap_map(model)
    return lambda latents: approx_cheap(latents, coeffs, bias)


def full_decoder(model: StableDiffusion) -> PreviewDecoder:
    """The model's own VAE decoder (whichever VAE it has at the time of the call)."""
    from ldmkit.pipeline import decode_latents

    return lambda latents: decode_latents(model, latents)


class TinyPreview:
    """The decoder of a tiny autoencoder (TAESD) as a preview decoder, on the CPU in float32."""

    def __init__(self, tiny: torch.nn.Module):
        self.tiny = tiny

    def fits(self, model: StableDiffusion) -> bool:
        """Whether it reads this model's latents (a server may switch to a model it was not made for)."""
        from ldmkit.models import taesd

        try:
            taesd.check_compatible(self.tiny, model)
        except ValueError:
            return False
        return True

    def __call__(self, latents: Tensor) -> list[Image.Image]:
        with torch.inference_mode():
            x = self.tiny.decode(latents.detach().float().cpu())  # the tiny decoder reads the scaled latent
        return to_images(x)


def tiny_decoder(path: str | os.PathLike, model: StableDiffusion | None = None) -> TinyPreview:
    """The decoder of a tiny autoencoder (TAESD) file, diffusers ``AutoencoderTiny`` folder or built-in name,
    checked against ``model`` when given."""
    from ldmkit.models import taesd

    tiny = taesd.load_taesd(path)
    if model is not None:
        taesd.check_compatible(tiny, model, f"--preview-vae {path}")
    return TinyPreview(tiny)


def resolve(kind: str, model: StableDiffusion, tiny: TinyPreview | None = None) -> PreviewDecoder:
    """The decoder for an A1111 ``show_progress_type``; TAESD / Approx NN fall back to Approx cheap
    without a tiny decoder that fits ``model``."""
    key = kind.strip().lower()
    if key == "full":
        return full_decoder(model)
    if key in ("taesd", "approx nn"):
        return tiny if tiny is not None and tiny.fits(model) else approx_cheap_for(model)
    if key == "approx cheap":
        return approx_cheap_for(model)
    raise ValueError(f"unknown preview type {kind!r}; valid: {', '.join(PREVIEW_TYPES)}")


def preview_writer(path: str | os.PathLike, decoder: PreviewDecoder) -> Callable[[dict], None]:
    """A step callback that writes the first image's preview to ``path`` after every step, atomically
    (a viewer that reloads the file never sees half a PNG)."""
    from ldmkit.atomic import replacing

    path = Path(path)

    def write(d: dict) -> None:
        image = decoder(d["denoised"][:1])[0]
        with replacing(path) as tmp:
            image.save(tmp, format="PNG")

    return write
