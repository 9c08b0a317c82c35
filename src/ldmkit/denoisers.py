"""Denoisers: adapt a discrete-time eps/v network to ``model(x, sigma) -> denoised``.

Samplers only ever see a denoiser D(x, sigma) ~ E[x0 | x] on ``x = x0 + sigma * eps``. The network
parameterisations differ only in four scalings (Karras et al. 2022, table 1; Stability's
generative-models ``denoiser_scaling.py``)::

    D(x, sigma) = c_skip * x + c_out * net(c_in * x, c_noise, ...)

with c_in = 1 / sqrt(sigma^2 + 1) (back to the VP latent the network was trained on) and
c_noise = the fractional training timestep of sigma.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from ldmkit.schedules import DiscreteSchedule

Prediction = Literal["eps", "v"]
Denoiser = Callable[..., Tensor]


def _sigma_batch(sigma: Tensor | float, x: Tensor) -> Tensor:
    """sigma as a float32 tensor of shape [B] on x's device (a scalar is broadcast)."""
    sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or have shape [{x.shape[0]}], got {tuple(sigma.shape)}")
    return sigma


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (x.ndim - 1)))  # (B, 1, 1, 1)


class DiscreteDenoiser:
    """Wrap ``net(x_in, t, context, **kw) -> eps | v`` trained on a discrete DDPM schedule.

    ``quantize`` feeds the network the nearest integer timestep (k-diffusion's ``quantize=True``,
    A1111's "Enable quantization in K samplers", diffusers' rounded timesteps with Karras sigmas).
    ``dtype`` is the network's dtype: its input is cast to it and its output cast back, so the
    sampler's state stays in float32 while the U-Net runs in half precision.
    """

    def __init__(
        self,
        net: Callable[..., Tensor],
        schedule: DiscreteSchedule,
        prediction: Prediction = "eps",
        *,
        quantize: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
        self.net = net
        self.schedule = schedule
        self.prediction = prediction
        self.quantize = quantize
        self.dtype = dtype

    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) for sigma of shape [B]."""
        c_in = (sigma**2 + 1).rsqrt()
        c_noise = self.schedule.sigma_to_t(sigma, quantize=self.quantize)
        if self.prediction == "eps":  # D = x - sigma * eps
            return torch.ones_like(sigma), -sigma, c_in, c_noise
        # v = alpha * eps - sigma_vp * x0_vp  =>  D = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) * v
        return 1 / (sigma**2 + 1), -sigma * c_in, c_in, c_noise

    def __call__(
        self,
        x: Tensor,
        sigma: Tensor | float,
        context: Tensor | None = None,
        c_concat: Tensor | None = None,
        **kwargs: Any,
    ) -> Tensor:
        sigma = _sigma_batch(sigma, x)
        c_skip, c_out, c_in, c_noise = self.scalings(sigma)
        x_in = x * _bcast(c_in, x)
        if c_concat is not None:  # inpainting: [noisy latent, mask, masked-image latent] along channels
            x_in = torch.cat([x_in, c_concat.to(x_in)], dim=1)
        if self.dtype is not None:
            x_in = x_in.to(self.dtype)
            context = context.to(self.dtype) if context is not None else None
        out = self.net(x_in, c_noise, context, **kwargs).to(x.dtype)
        return x * _bcast(c_skip, x) + out * _bcast(c_out, x)


def _repeat_to(c: Tensor, batch: int, what: str) -> Tensor:
    if c.shape[0] == batch:
        return c
    if c.shape[0] == 1:
        return c.expand(batch, *c.shape[1:])
    raise ValueError(f"{what} has batch {c.shape[0]}, expected 1 or {batch}")


class CFGDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022) around a denoiser: uncond + scale * (cond - uncond).

    Both halves run in ONE network call on a doubled batch ``[uncond | cond]``. ``c_concat`` (the
    mask and masked-image latent of an inpainting model) is shared by both halves. With
    ``scale == 1`` the unconditional half is skipped.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        cond: Tensor,
        uncond: Tensor | None,
        scale: float,
        c_concat: Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        if uncond is None and scale != 1:
            raise ValueError(f"guidance scale {scale} needs an unconditional context (uncond=None)")
        if uncond is not None and uncond.shape[1:] != cond.shape[1:]:
            raise ValueError(
                f"cond {tuple(cond.shape)} and uncond {tuple(uncond.shape)} must match after the batch "
                "dimension; pad the shorter prompt to the same number of tokens"
            )
        self.denoiser = denoiser
        self.cond = cond
        self.uncond = uncond
        self.scale = float(scale)
        self.c_concat = c_concat
        self.kwargs = kwargs

    def __call__(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        b = x.shape[0]
        sigma = _sigma_batch(sigma, x)
        cond = _repeat_to(self.cond, b, "cond")
        cc = None if self.c_concat is None else _repeat_to(self.c_concat, b, "c_concat")
        if self.scale == 1:
            return self.denoiser(x, sigma, context=cond, c_concat=cc, **self.kwargs)
        assert self.uncond is not None
        uncond = _repeat_to(self.uncond, b, "uncond")
        both = self.denoiser(
            torch.cat([x, x]),  # (2B, C, H, W)
            torch.cat([sigma, sigma]),
            context=torch.cat([uncond, cond]),
            c_concat=None if cc is None else torch.cat([cc, cc]),
            **self.kwargs,
        )
        d_uncond, d_cond = both.chunk(2)
        return d_uncond + (d_cond - d_uncond) * self.scale
