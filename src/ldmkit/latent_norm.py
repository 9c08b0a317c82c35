"""VAE latent <-> U-Net latent: the one place the latent normalisation is applied.

Without per-channel statistics (SD1/SD2/SDXL) the U-Net sees ``z * scale_factor``. With diffusers'
``latents_mean`` / ``latents_std`` (the Playground v2.5 convention, an AutoencoderKL config option) it
sees ``(z - latents_mean) * scale_factor / latents_std``, as diffusers' SDXL pipelines encode
(StableDiffusionXLImg2ImgPipeline.prepare_latents) and decode (StableDiffusionXLPipeline.__call__:
``latents * latents_std / scaling_factor + latents_mean``).

Imports no torch (ldmkit.config uses :func:`checked_stats`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

    from ldmkit.config import VAEConfig


def _channel(values: tuple[float, ...], like: Tensor) -> Tensor:
    return like.new_tensor(values).view(1, -1, *([1] * (like.dim() - 2)))


def to_unet(cfg: VAEConfig, z: Tensor) -> Tensor:
    """A VAE latent (posterior mean or sample) -> what the U-Net sees."""
    if cfg.latents_mean is None or cfg.latents_std is None:
        return z * cfg.scale_factor
    return (z - _channel(cfg.latents_mean, z)) * cfg.scale_factor / _channel(cfg.latents_std, z)


def from_unet(cfg: VAEConfig, latents: Tensor) -> Tensor:
    """What the U-Net sees -> the VAE latent its decoder takes."""
    if cfg.latents_mean is None or cfg.latents_std is None:
        return latents / cfg.scale_factor
    return latents * _channel(cfg.latents_std, latents) / cfg.scale_factor + _channel(cfg.latents_mean,
                                                                                         latents)


def _floats(name: str, values: Any, channels: Any) -> tuple[float, ...]:
    if isinstance(values, str) or not hasattr(values, "__len__"):
        raise ValueError(f"{name} must be a list of {channels} numbers (one per latent channel), got {values!r:.60}")
    if isinstance(channels, int) and len(values) != channels:
        raise ValueError(f"{name} has {len(values)} values but the VAE has {channels} latent channels "
                         f"(z_channels / latent_channels): give one per channel")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError(f"{name}[{i}] is {v!r:.40}, expected a finite number")
        out.append(float(v))
    return tuple(out)


def checked_stats(mean: Any, std: Any, channels: Any) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """``latents_mean`` / ``latents_std`` as tuples of floats, or a one-line ValueError naming the bad value:
    both or neither, one finite number per latent channel, every std > 0."""
    if mean is None and std is None:
        return None, None
    if mean is None or std is None:
        given, missing = ("latents_mean", "latents_std") if std is None else ("latents_std", "latents_mean")
        raise ValueError(f"{given} is set but {missing} is not: give both per-channel lists or neither")
    mean, std = _floats("latents_mean", mean, channels), _floats("latents_std", std, channels)
    for i, s in enumerate(std):
        if s <= 0:
            raise ValueError(f"latents_std[{i}] is {s}, expected a number > 0")
    return mean, std
