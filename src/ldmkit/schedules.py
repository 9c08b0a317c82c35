"""Noise schedules: the discrete training schedule, sigma <-> timestep, and sampling sigma sequences.

Everything works in k-diffusion's variance-exploding parameterisation: a noisy latent is
``x = x0 + sigma * eps`` with ``sigma = sqrt((1 - alpha_bar) / alpha_bar)``. The VP latent that
the network was trained on (and that diffusers' DDIM/DPM-Solver/UniPC schedulers step) is
``x_vp = x / sqrt(1 + sigma**2)``; the denoisers in :mod:`ldmkit.denoisers` do that scaling.

A sampling schedule is ``n + 1`` descending sigmas that end in 0: ``n`` model evaluations for a
first-order sampler, the last step landing on the clean sample.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor

Interpolation = Literal["log", "linear"]


def sd_alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """alpha_bar_t of Stable Diffusion's "scaled linear" schedule: betas = linspace(sqrt(b0), sqrt(b1), T)**2."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def _work_dtype(device: torch.device) -> torch.dtype:
    # float64 keeps t exact to ~1e-12; MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


@dataclass(frozen=True, eq=False)
class DiscreteSchedule:
    """The training schedule of a discrete-time model (DDPM/LDM): sigma_t for integer t in [0, T).

    ``sigma_to_t`` interpolates linearly in log-sigma between neighbouring training timesteps, as
    k-diffusion's ``DiscreteSchedule`` and diffusers' ``_sigma_to_t`` both do. ``t_to_sigma`` does
    the same by default (k-diffusion, hence A1111); ``interpolation="linear"`` interpolates sigma
    itself, as diffusers' ``EulerDiscreteScheduler`` does for ``timestep_spacing="linspace"``. The
    two agree at integer t; between them they differ by up to 1.5% in sigma for t < 1 and 0.5% above.
    """

    alphas_cumprod: Tensor
    sigmas: Tensor = field(init=False)  # ascending, float64, index = training timestep
    log_sigmas: Tensor = field(init=False)

    def __post_init__(self) -> None:
        ac = torch.as_tensor(self.alphas_cumprod, dtype=torch.float64).cpu()
        if ac.ndim != 1 or ac.numel() < 2:
            raise ValueError(f"alphas_cumprod must be a 1-D tensor of length >= 2, got shape {tuple(ac.shape)}")
        sigmas = ((1 - ac) / ac).sqrt()
        if not bool((sigmas[1:] > sigmas[:-1]).all()):
            raise ValueError("alphas_cumprod must be strictly decreasing (sigmas strictly increasing)")
        object.__setattr__(self, "alphas_cumprod", ac)
        object.__setattr__(self, "sigmas", sigmas)
        object.__setattr__(self, "log_sigmas", sigmas.log())

    @classmethod
    def sd(
        cls, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
    ) -> DiscreteSchedule:
        """Stable Diffusion 1.x/2.x schedule (sigma_min ~ 0.0292, sigma_max ~ 14.61)."""
        return cls(sd_alphas_cumprod(num_train_timesteps, beta_start, beta_end))

    @property
    def num_timesteps(self) -> int:
        return self.sigmas.numel()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: Tensor | float, quantize: bool = False) -> Tensor:
        """Fractional training timestep whose log-sigma matches; ``quantize`` rounds to the nearest one.

        Rounding t is the same as picking the nearest training sigma in log space (k-diffusion's
        ``quantize=True``) and as diffusers' ``timesteps.round()`` for Karras sigmas.
        Sigmas outside [sigma_min, sigma_max] clamp to t = 0 or T - 1. Returns float32 on sigma's device.
        """
        sigma = torch.as_tensor(sigma)
        dtype = _work_dtype(sigma.device)
        log_sigmas = self.log_sigmas.to(sigma.device, dtype)
        log_sigma = sigma.to(dtype).clamp_min(1e-10).log()
        low = (torch.searchsorted(log_sigmas, log_sigma.reshape(-1), right=True) - 1).clamp(0, self.num_timesteps - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((log_sigma.reshape(-1) - lo) / (hi - lo)).clamp(0, 1)
        t = (low + w).reshape(sigma.shape)
        if quantize:
            t = t.round()
        return t.float()

    def t_to_sigma(self, t: Tensor | float, interpolation: Interpolation = "log") -> Tensor:
        """sigma at fractional timestep t (see the class docstring for ``interpolation``)."""
        t = torch.as_tensor(t)
        dtype = _work_dtype(t.device)
        t = t.to(dtype).clamp(0, self.num_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_timesteps - 2)
        w = t - low
        if interpolation == "log":
            table = self.log_sigmas.to(t.device, dtype)
            return ((1 - w) * table[low] + w * table[low + 1]).exp()
        if interpolation == "linear":
            table = self.sigmas.to(t.device, dtype)
            return (1 - w) * table[low] + w * table[low + 1]
        raise ValueError(f"interpolation must be 'log' or 'linear', got {interpolation!r}")


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _check_n(n: int) -> None:
    if n < 1:
        raise ValueError(f"number of steps must be >= 1, got {n}")


# -- continuous schedules: functions of (n, sigma_min, sigma_max), as in k-diffusion ------------------


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022, eq. 5): sigma_i^(1/rho) evenly spaced, rho = 7."""
    _check_n(n)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def exponential(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """log-sigma evenly spaced between sigma_max and sigma_min."""
    _check_n(n)
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp())


def polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> Tensor:
    """k-diffusion ``get_sigmas_polyexponential`` (A1111 "Polyexponential", rho = 1): log-sigma follows
    ramp**rho for ramp from 1 to 0; rho = 1 is :func:`exponential`."""
    _check_n(n)
    ramp = torch.linspace(1, 0, n, dtype=torch.float64) ** rho
    return _append_zero((ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)).exp())


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for aa in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + aa * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < 1e-16:
            break
    return h


def beta_cdf(x: float, a: float, b: float) -> float:
    """Regularised incomplete beta function I_x(a, b), the CDF of the Beta(a, b) distribution."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1 - front * _betacf(b, a, 1 - x) / b


def beta_ppf(p: float, a: float, b: float) -> float:
    """Quantile of Beta(a, b) (scipy's ``stats.beta.ppf``) by bisection on :func:`beta_cdf`: the CDF is
    monotone, so this cannot miss, and 200 halvings reach float64 resolution."""
    if p <= 0:
        return 0.0
    if p >= 1:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if beta_cdf(mid, a, b) < p else (lo, mid)
    return (lo + hi) / 2


def beta(n: int, sigma_min: float, sigma_max: float, alpha: float = 0.6, beta: float = 0.6) -> Tensor:
    """A1111 "Beta" ("Beta Sampling is All You Need", Lee et al. 2024): sigma = sigma_min + q (sigma_max - sigma_min)
    with q the Beta(alpha, beta) quantiles of 1 - linspace(0, 1, n); A1111's default alpha = beta = 0.6.

    (ComfyUI's "beta" differs: it picks training timesteps at those quantiles.)
    """
    _check_n(n)
    if alpha <= 0 or beta <= 0:
        raise ValueError(f"beta schedule alpha and beta must be > 0, got {alpha}, {beta}")
    q = [beta_ppf(1 - float(v), alpha, beta) for v in np.linspace(0, 1, n)]
    return _append_zero(sigma_min + torch.tensor(q, dtype=torch.float64) * (sigma_max - sigma_min))


# Align Your Steps (Sabour et al. 2024): NVIDIA's optimised 10-step noise levels as A1111 ships them
# (modules/sd_schedulers.py, from research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html).
AYS_SIGMAS: dict[str, tuple[float, ...]] = {
    "sd1": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
}


def loglinear_interp(values: Tensor | list[float], num: int) -> Tensor:
    """``num`` values through a decreasing sequence, linear in log(value) at evenly spaced positions (AYS)."""
    ys = np.log(np.asarray(values, dtype=np.float64)[::-1])
    new = np.interp(np.linspace(0, 1, num), np.linspace(0, 1, len(ys)), ys)
    return torch.from_numpy(np.exp(new)[::-1].copy())


def align_your_steps(n: int, schedule: DiscreteSchedule | None = None, sdxl: bool = False) -> Tensor:
    """A1111 "Align Your Steps": the 11 AYS noise levels of the model family (SDXL or else SD 1.x) as n = 11
    steps, log-linearly interpolated to n values otherwise, then 0.

    (ComfyUI's AlignYourStepsScheduler instead takes 10 steps as native and ends on 0 in place of 0.029.)
    """
    _check_n(n)
    table = AYS_SIGMAS["sdxl" if sdxl else "sd1"]
    sigmas = torch.tensor(table, dtype=torch.float64) if n == len(table) else loglinear_interp(table, n)
    return _append_zero(sigmas)

def lcm_boundary_scalings(timestep: Tensor | float, sigma_data: float = 0.5,
                          timestep_scaling: float = 10.0) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) of a latent consistency model at training timestep t (Luo et al. 2023, eq. 9).

    f(x_t, t) = c_skip(t) * x_t + c_out(t) * x0_pred(x_t, t) in the VP space the network saw, so that
    f is the identity at t = 0 (the consistency boundary condition). LCM scales t by 10 so that
    c_skip is ~0 and c_out ~1 away from t = 0 (diffusers ``LCMScheduler`` and the LCM training scripts).
    """
    t = torch.as_tensor(timestep, dtype=torch.float64) * timestep_scaling
    c_skip = sigma_data**2 / (t**2 + sigma_data**2)
    c_out = t / (t**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


# -- discrete schedules: spacings of the model's training timesteps ------------------------------------


def uniform(n: int, schedule: DiscreteSchedule, interpolation: Interpolation = "log") -> Tensor:
    """A1111 "Automatic"/"Uniform", k-diffusion ``get_sigmas``: t = linspace(T - 1, 0, n).

    diffusers ``timestep_spacing="linspace"``; pass ``interpolation="linear"`` to reproduce
    ``EulerDiscreteScheduler`` exactly when the t are fractional (e.g. 25 steps).
    """
    _check_n(n)
    t = torch.linspace(schedule.num_timesteps - 1, 0, n, dtype=torch.float64)
    return _append_zero(schedule.t_to_sigma(t, interpolation))


def ddim_uniform(n: int, schedule: DiscreteSchedule, steps_offset: int = 1) -> Tensor:
    """DDIM/DDPM "leading" spacing, t = [0, k, 2k, ...] + steps_offset with k = T // n, reversed.

    diffusers ``timestep_spacing="leading", steps_offset=1`` (Stable Diffusion's shipped scheduler
    config) and A1111's "DDIM" scheduler. The final step goes to sigma = 0, i.e. alpha_bar = 1 as
    with ``set_alpha_to_one=True``.
    """
    _check_n(n)
    k = schedule.num_timesteps // n
    if k < 1:
        raise ValueError(f"ddim_uniform needs n <= {schedule.num_timesteps} steps, got {n}")
    t = torch.arange(n - 1, -1, -1, dtype=torch.float64) * k + steps_offset
    return _append_zero(schedule.t_to_sigma(t))


def sgm_uniform(n: int, schedule: DiscreteSchedule) -> Tensor:
    """A1111/ComfyUI "SGM Uniform": n evenly spaced t from T - 1 down to (not including) 0.

    Close to diffusers ``timestep_spacing="trailing"``: the first step starts at pure noise and the
    last model call is at t = (T - 1) / n rather than t = 0.
    """
    _check_n(n)
    t = torch.linspace(schedule.num_timesteps - 1, 0, n + 1, dtype=torch.float64)[:-1]
    return _append_zero(schedule.t_to_sigma(t))


def trailing(n: int, schedule: DiscreteSchedule) -> Tensor:
    """diffusers ``timestep_spacing="trailing"``: t = round(T - i T / n) - 1 for i < n (Lin et al. 2024, table 2).

    The first step starts at t = T - 1 (pure noise); SD-Turbo, Hyper-SD and SDXL-Lightning were
    distilled for it and need it at 1-4 steps. Integer timesteps, so exact on any interpolation.
    """
    _check_n(n)
    T = schedule.num_timesteps
    if n > T:
        raise ValueError(f"the trailing schedule takes at most {T} steps, got {n}")
    # np.arange and np.round (half to even) exactly as diffusers writes them, so the t are identical
    t = (np.arange(T, 0, -T / n).round() - 1)[:n]
    return _append_zero(schedule.t_to_sigma(torch.from_numpy(t)))


def lcm(n: int, schedule: DiscreteSchedule, original_steps: int = 50) -> Tensor:
    """Latent consistency models' skipping schedule (diffusers ``LCMScheduler``/``TCDScheduler.set_timesteps``).

    The model was distilled on ``original_steps`` timesteps t = k - 1, 2k - 1, ..., T - 1 with
    k = T // original_steps (Luo et al. 2023, "skipping-step"); n of them are taken at evenly spaced
    indices from the top: 4 steps -> t = 999, 759, 499, 259.
    """
    _check_n(n)
    if n > original_steps:
        raise ValueError(f"the lcm schedule takes at most {original_steps} steps (the distillation's own "
                         f"schedule), got {n}; use fewer steps or another scheduler")
    k = schedule.num_timesteps // original_steps
    origin = (np.arange(1, original_steps + 1) * k - 1)[::-1]
    t = origin[np.floor(np.linspace(0, original_steps, n, endpoint=False)).astype(np.int64)]
    return _append_zero(schedule.t_to_sigma(torch.from_numpy(t.astype(np.float64))))


def simple(n: int, schedule: DiscreteSchedule) -> Tensor:
    """A1111/ComfyUI "Simple": the training sigmas at t = T - 1 - floor(i T / n), i < n."""
    _check_n(n)
    T = schedule.num_timesteps
    t = [T - 1 - int(i * (T / n)) for i in range(n)]
    return _append_zero(schedule.sigmas[t].clone())


def normal(n: int, schedule: DiscreteSchedule) -> Tensor:
    """A1111/ComfyUI "Normal": t = linspace(t(sigma_max), t(sigma_min), n) = linspace(T - 1, 0, n), which is
    :func:`uniform` (k-diffusion's ``get_sigmas``)."""
    return uniform(n, schedule)

def _karras(n: int, schedule: DiscreteSchedule, rho: float = 7.0) -> Tensor:
    return karras(n, schedule.sigma_min, schedule.sigma_max, rho)


def _exponential(n: int, schedule: DiscreteSchedule) -> Tensor:
    return exponential(n, schedule.sigma_min, schedule.sigma_max)


def _polyexponential(n: int, schedule: DiscreteSchedule, rho: float = 1.0) -> Tensor:
    return polyexponential(n, schedule.sigma_min, schedule.sigma_max, rho)


def _beta(n: int, schedule: DiscreteSchedule, alpha: float = 0.6, beta_: float = 0.6) -> Tensor:
    return beta(n, schedule.sigma_min, schedule.sigma_max, alpha, beta_)

SCHEDULES: dict[str, Callable[..., Tensor]] = {
    "uniform": uniform,
    "karras": _karras,
    "exponential": _exponential,
    "ddim_uniform": ddim_uniform,
    "sgm_uniform": sgm_uniform,
    "trailing": trailing,
    "lcm": lcm,
    "polyexponential": _polyexponential,
    "simple": simple,
    "normal": normal,
    "beta": _beta,
    "align_your_steps": align_your_steps,
}

# A1111 display names (the "Schedule type" dropdown and the suffix of legacy names like "DPM++ 2M Karras").
SCHEDULE_DISPLAY_NAMES: dict[str, str] = {
    "uniform": "Uniform",
    "karras": "Karras",
    "exponential": "Exponential",
    "ddim_uniform": "DDIM",
    "sgm_uniform": "SGM Uniform",
    "trailing": "Trailing",
    "lcm": "LCM",
    "polyexponential": "Polyexponential",
    "simple": "Simple",
    "normal": "Normal",
    "beta": "Beta",
    "align_your_steps": "Align Your Steps",
}


def scheduler_names() -> list[str]:
    """Short names accepted by :func:`get_sigmas`."""
    return list(SCHEDULES)


def schedule_short_name(name: str) -> str:
    """The short name of a schedule given by short or display name, any case ("SGM Uniform" -> "sgm_uniform");
    unknown names come back lower-cased for :func:`get_sigmas` to reject."""
    key = " ".join(name.strip().lower().split())
    by_display = {v.lower(): k for k, v in SCHEDULE_DISPLAY_NAMES.items()}
    return by_display.get(key, key)


def get_sigmas(name: str, n: int, schedule: DiscreteSchedule, *, sdxl: bool = False, **kwargs: object) -> Tensor:
    """n + 1 descending float64 sigmas ending in 0 for the schedule called ``name`` (short or display name).

    ``sdxl``: the model is SDXL (only schedules tabulated per model family, Align Your Steps, read it).
    """
    fn = SCHEDULES.get(schedule_short_name(name))
    if fn is None:
        raise ValueError(f"unknown schedule {name!r}; valid schedules: {', '.join(SCHEDULES)}")
    if "sdxl" in inspect.signature(fn).parameters:
        kwargs["sdxl"] = sdxl
    return fn(n, schedule, **kwargs)
