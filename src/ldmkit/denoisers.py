"""Denoisers: adapt a discrete-time eps/v network to ``model(x, sigma) -> denoised``.

Samplers only ever see a denoiser D(x, sigma) ~ E[x0 | x] on ``x = x0 + sigma * eps``. The network
parameterisations differ only in four scalings (Karras et al. 2022, table 1; Stability's
generative-models ``denoiser_scaling.py``)::

    D(x, sigma) = c_skip * x + c_out * net(c_in * x, c_noise, ...)

with c_in = 1 / sqrt(sigma^2 + 1) (back to the VP latent the network was trained on) and
c_noise = the fractional training timestep of sigma.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Conditioning:
    """Everything a U-Net reads besides the noisy latent and the timestep, for a batch of B images.

    Built by the model family (SD1/SD2: ``pipeline.encode_conditioning``; SDXL: its own encoders) and
    read by its U-Net through :meth:`unet_kwargs`; samplers and CFG never look inside.
    """

    context: Tensor  # (B, T, D) token embeddings, the keys and values of cross-attention
    pooled: Tensor | None = None  # (B, P) SDXL: pooled, projected text embedding
    ids: Tensor | None = None  # (B, n) SDXL: original size, crop top-left, target size (refiner: aesthetic score)
    c_concat: Tensor | None = None  # (B, 1 + C, h, w) inpainting models: mask and masked-image latent

    def __post_init__(self) -> None:
        if (self.pooled is None) != (self.ids is None):
            raise ValueError("SDXL conditioning needs both the pooled text embedding and the size/crop ids")

    @property
    def batch(self) -> int:
        return self.context.shape[0]

    @property
    def y(self) -> Tensor | None:
        """SDXL's vector conditioning (``models.unet.sdxl_vector``), None for SD1/SD2."""
        if self.pooled is None:
            return None
        from ldmkit.models.unet import sdxl_vector

        return sdxl_vector(self.pooled, self.ids)

    def unet_kwargs(self) -> dict[str, Tensor]:
        """Keyword arguments of ``denoiser(x, sigma, ...)`` beyond x and sigma (``y`` only where there is one)."""
        kw: dict[str, Tensor] = {"context": self.context}
        if self.c_concat is not None:
            kw["c_concat"] = self.c_concat
        y = self.y
        if y is not None:
            kw["y"] = y
        return kw

    def replace(self, **changes: Any) -> Conditioning:
        return dataclasses.replace(self, **changes)

    def expand(self, batch: int) -> Conditioning:
        """Each tensor repeated to ``batch`` rows (from 1 row or already ``batch``)."""
        return Conditioning(**{f.name: None if (v := getattr(self, f.name)) is None else _repeat_to(v, batch, f.name)
                               for f in dataclasses.fields(self)})

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        """Batches side by side, e.g. ``[uncond, cond]`` for one CFG call."""
        out = {}
        for f in dataclasses.fields(Conditioning):
            vals = [getattr(p, f.name) for p in parts]
            if any(v is None for v in vals) and not all(v is None for v in vals):
                raise ValueError(f"cannot batch conditionings with and without {f.name}")
            out[f.name] = None if vals[0] is None else torch.cat(vals)
        return Conditioning(**out)


def as_conditioning(c: Tensor | Conditioning | None, c_concat: Tensor | None = None) -> Conditioning | None:
    """A bare context tensor as a :class:`Conditioning` (with ``c_concat`` unless it has its own)."""
    if c is None:
        return None
    if isinstance(c, Tensor):
        return Conditioning(c, c_concat=c_concat)
    return c if c_concat is None or c.c_concat is not None else c.replace(c_concat=c_concat)


class CFGDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022) around a denoiser: uncond + scale * (cond - uncond).

    Both halves run in ONE network call on a doubled batch ``[uncond | cond]``. ``cond``/``uncond`` are
    :class:`Conditioning` values (a bare tensor is a context); ``c_concat`` (the mask and masked-image
    latent of an inpainting model) is shared by both halves. With ``scale == 1`` the unconditional half
    is skipped.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        cond: Tensor | Conditioning,
        uncond: Tensor | Conditioning | None,
        scale: float,
        c_concat: Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        if uncond is None and scale != 1:
            raise ValueError(f"guidance scale {scale} needs an unconditional context (uncond=None)")
        cond_c, uncond_c = as_conditioning(cond, c_concat), as_conditioning(uncond, c_concat)
        assert cond_c is not None
        if uncond_c is not None and uncond_c.context.shape[1:] != cond_c.context.shape[1:]:
            raise ValueError(
                f"cond {tuple(cond_c.context.shape)} and uncond {tuple(uncond_c.context.shape)} must match after "
                "the batch dimension; pad the shorter prompt to the same number of tokens"
            )
        self.denoiser = denoiser
        self.cond = cond_c
        self.uncond = uncond_c
        self.scale = float(scale)
        self.kwargs = kwargs

    def __call__(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        b = x.shape[0]
        sigma = _sigma_batch(sigma, x)
        cond = self.cond.expand(b)
        if self.scale == 1:
            return self.denoiser(x, sigma, **cond.unet_kwargs(), **self.kwargs)
        assert self.uncond is not None
        both = Conditioning.cat([self.uncond.expand(b), cond])
        d_uncond, d_cond = self.denoiser(
            torch.cat([x, x]),  # (2B, C, H, W)
            torch.cat([sigma, sigma]),
            **both.unet_kwargs(),
            **self.kwargs,
        ).chunk(2)
        return d_uncond + (d_cond - d_uncond) * self.scale
