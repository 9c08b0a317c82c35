"""Samplers: pure functions ``sample_x(model, x, sigmas, *, generator, callback, disable, **opts)``.

``model(x, sigma) -> denoised`` with sigma of shape [B] (see :mod:`ldmkit.denoisers`); ``x`` starts
at ``noise * sigmas[0]`` (or a noised image for img2img) and ``sigmas`` is any descending sequence,
normally ``n + 1`` values ending in 0 from :mod:`ldmkit.schedules`. Samplers keep no state between
calls, so one model can serve concurrent requests.

The update is computed in float32 (or x's dtype if wider) and the result is cast back to x's dtype.
Stochastic samplers draw noise on the CPU in float32 from ``generator`` so a seed gives the same
image on any device. ``callback`` receives ``{"i", "x", "sigma", "denoised"}`` after each model call
of step i.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import trange

from ldmkit.schedules import SCHEDULE_DISPLAY_NAMES, SCHEDULES, DiscreteSchedule, karras, lcm_boundary_scalings

Model = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[dict[str, Any]], None]
Sampler = Callable[..., Tensor]


# -- shared helpers --------------------------------------------------------------------------------------


def _prepare(x: Tensor, sigmas: Tensor | Iterable[float]) -> tuple[Tensor, list[float]]:
    """x upcast to at least float32, sigmas as Python floats (float64 step coefficients)."""
    s = [float(v) for v in (sigmas.tolist() if isinstance(sigmas, Tensor) else sigmas)]
    if len(s) < 2:
        raise ValueError(f"sigmas needs at least 2 values (start and end), got {len(s)}")
    if any(b > a for a, b in zip(s, s[1:], strict=False)):
        raise ValueError("sigmas must be non-increasing")
    return x.to(torch.promote_types(x.dtype, torch.float32)), s


def _call(model: Model, x: Tensor, sigma: float) -> Tensor:
    return model(x, x.new_full((x.shape[0],), sigma)).to(x.dtype)


def _randn(x: Tensor, generator: torch.Generator | None) -> Tensor:
    # CPU float32 noise: the same seed gives the same noise on CUDA, MPS and CPU.
    return torch.randn(x.shape, generator=generator, device="cpu", dtype=torch.float32).to(x)


def _steps(sigmas: list[float], disable: bool) -> Iterable[int]:
    return trange(len(sigmas) - 1, disable=disable)


def _report(callback: Callback | None, i: int, x: Tensor, sigma: float, denoised: Tensor) -> None:
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "denoised": denoised})


def _d(x: Tensor, sigma: float, denoised: Tensor) -> Tensor:
    """dx/dsigma of the probability-flow ODE (Karras et al. 2022, eq. 3): (x - D(x, sigma)) / sigma."""
    return (x - denoised) / sigma


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up): go deterministically to sigma_down, then add sigma_up of fresh noise.

    sigma_down^2 + sigma_up^2 = sigma_to^2. eta = 1 is the DDPM posterior variance, eta = 0 is DDIM.
    """
    if eta == 0 or sigma_to == 0:
        return sigma_to, 0.0
    up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    return math.sqrt(sigma_to**2 - up**2), up


def _churn(
    x: Tensor,
    sigma: float,
    n_steps: int,
    generator: torch.Generator | None,
    s_churn: float,
    s_tmin: float,
    s_tmax: float,
    s_noise: float,
) -> tuple[Tensor, float]:
    """Karras et al. (2022, alg. 2) "churn": raise the noise level to sigma_hat before the step."""
    gamma = min(s_churn / n_steps, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    if gamma <= 0:
        return x, sigma
    sigma_hat = sigma * (gamma + 1)
    return x + _randn(x, generator) * s_noise * math.sqrt(sigma_hat**2 - sigma**2), sigma_hat


# -- first- and second-order ODE solvers in sigma (Karras et al. 2022) ------------------------------------


def sample_euler(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    disable: bool = True,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> Tensor:
    """Euler on the probability-flow ODE, optional churn (Karras et al. 2022, alg. 2)."""
    dtype, (x, s) = x.dtype, _prepare(x, sigmas)
    for i in _steps(s, disable):
        x, sigma_hat = _churn(x, s[i], len(s) - 1, generator, s_churn, s_tmin, s_tmax, s_noise)
        denoised = _call(model, x, sigma_hat)
        _report(callback, i, x, s[i], denoised)
        x = x + _d(x, sigma_hat, denoised) * (s[i + 1] - sigma_hat)
    return x.to(dtype)


def sample_euler_a(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    disable: bool = True,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """Euler ancestral: an Euler step to sigma_down, then fresh noise up to the next sigma."""
    dtype, (x, s) = x.dtype, _prepare(x, sigmas)
    for i in _steps(s, disable):
        denoised = _call(model, x, s[i])
        _report(callback, i, x, s[i], denoised)
        down, up = ancestral_step(s[i], s[i + 1], eta)
        x = x + _d(x, s[i], denoised) * (down - s[i])
        if up > 0:
            x = x + _randn(x, generator) * (s_noise * up)
    return x.to(dtype)


def sample_heun(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    disable: bool = True,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> Tensor:
    """Heun's method, 2 model calls per step, Euler for the last step to 0 (Karras et al. 2022, alg. 2)."""
    dtype, (x, s) = x.dtype, _prepare(x, sigmas)
    for i in _steps(s, disable):
        x, sigma_hat = _churn(x, s[i], len(s) - 1, generator, s_churn, s_tmin, s_tmax, s_noise)
        denoised = _call(model, x, sigma_hat)
        _report(callback, i, x, s[i], denoised)
        x = _heun_step(model, x, sigma_hat, s[i + 1], denoised)
    return x.to(dtype)


def _heun_step(model: Model, x: Tensor, sigma: float, sigma_next: float, denoised: Tensor) -> Tensor:
    """One Heun step from sigma to sigma_next given D(x, sigma); Euler when sigma_next is 0."""
    d = _d(x, sigma, denoised)
    dt = sigma_next - sigma
    if sigma_next == 0:
        return x + d * dt
    x_2 = x + d * dt
    d_2 = _d(x_2, sigma_next, _call(model, x_2, sigma_next))
    return x + (d + d_2) * (dt / 2)


def restart_steps(sigmas: list[float]) -> list[tuple[float, float]]:
    """The (sigma, sigma_next) steps of A1111's Restart sampler (``sd_samplers_extra.restart_sampler``).

    Below 20 steps: the schedule's own steps. From 20 steps: a Karras schedule of ``steps - k * times`` steps
    between the schedule's ends, and after the step that reaches the sigma closest to 0.1, ``times`` restarts
    that go back to the sigma closest to 2 and descend again in k Karras steps (k = 9 once; from 36 steps
    k = steps // 4 twice). The number of steps is unchanged.
    """
    steps = len(sigmas) - 1
    if steps < 20:
        return list(zip(sigmas[:-1], sigmas[1:], strict=True))
    k, times = (steps // 4, 2) if steps >= 36 else (9, 1)
    main = karras(steps - k * times, sigmas[-2], sigmas[0]).tolist()
    lo = min(range(len(main)), key=lambda j: abs(main[j] - 0.1))  # first index wins ties, as torch.argmin
    hi = min(range(len(main)), key=lambda j: abs(main[j] - 2.0))
    out: list[tuple[float, float]] = []
    for i in range(len(main) - 1):
        out.append((main[i], main[i + 1]))
        if i + 1 == lo and hi < lo:
            restart = karras(k + 1, main[lo], main[hi]).tolist()[:-1]
            out += list(zip(restart[:-1], restart[1:], strict=True)) * times
    return out


def sample_restart(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    disable: bool = True,
    s_noise: float = 1.0,
) -> Tensor:
    """Restart sampling (Xu et al. 2023) as A1111 runs it: Heun steps on :func:`restart_steps`; each restart
    adds fresh noise from the low sigma back up to the high one, then integrates down again."""
    dtype, (x, s) = x.dtype, _prepare(x, sigmas)
    steps = restart_steps(s)
    last = steps[0][0]
    for i in trange(len(steps), disable=disable):
        sigma, sigma_next = steps[i]
        if sigma > last:
            x = x + _randn(x, generator) * (s_noise * math.sqrt(sigma**2 - last**2))
        denoised = _call(model, x, sigma)
        _report(callback, i, x, sigma, denoised)
        x = _heun_step(model, x, sigma, sigma_next, denoised)
        last = sigma_next
    return x.to(dtype)


def sample_dpm2(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    disable: bool = True,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver-2 (Lu et al. 2022) in k-diffusion's form: midpoint in log-sigma, Euler for the last step."""
    dtype, (x, s) = x.dtype, _prepare(x, sigmas)
    for i in _steps(s, disable):
        x, sigma_hat = _churn(x, s[i], len(s) - 1, generator, s_churn, s_tmin, s_tmax, s_noise)
        denoised = _call(model, x, sigma_hat)
        _report(callback, i, x, s[i], denoised)
        d = _d(x, sigma_hat, denoised)
        if s[i + 1] == 0:
            x = x + d * (s[i + 1] - sigma_hat)
        else:
            sigma_mid = math.sqrt(sigma_hat * s[i + 1])  # geometric mean = midpoint in log-sigma
            x_2 = x + d * (sigma_mid - sigma_hat)
            d_2 = _d(x_2, sigma_mid, _call(model, x_2, sigma_mid))
            x = x + d_2 * (s[i + 1] - sigma_hat)
    return x.to(dtype)


def lms_coefficient(order: int, sigmas: list[float], i: int, j: int) -> float:
    """Integral over [sigmas[i], sigmas[i+1]] of the Lagrange basis polynomial through sigmas[i-k], k < order,
    that is 1 at sigmas[i-j]. Exact (the integrand is a polynomial) rather than k-diffusion's ``quad``."""
    nodes = [sigmas[i - k] for k in range(order)]
    basis = np.polynomial.Polynomial([1.0])
    for k, node in enumerate(nodes):
        if k != j:
            basis = basis * np.polynomial.Polynomial([-node, 1.0]) / (nodes[j] - node)
    integral = basis.integ()
    return float(integral(sigmas[i + 1]) - integral(sigmas[i]))


def sample_lms(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    disable: bool = True,
    order: int = 4,
) -> Tensor:
    """Linear multistep (Adams-Bashforth in sigma) of up to ``order``, warming up from Euler."""
    dtype, (x, s) = x.dtype, _prepare(x, sigmas)
    ds: list[Tensor] = []  # derivatives, newest last
    for i in _steps(s, disable):
        denoised = _call(model, x, s[i])
        _report(callback, i, x, s[i], denoised)
        ds = [*ds, _d(x, s[i], denoised)][-order:]
        cur = min(i + 1, order)
        for j in range(cur):
            x = x + lms_coefficient(cur, s, i, j) * ds[-1 - j]
    return x.to(dtype)


# -- exponential integrators in lambda = -log(sigma) (DPM-Solver++, Lu et al. 2022b) ----------------------


def sample_dpmpp_2m(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    disable: bool = True,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b): second-order multistep in data prediction."""
    dtype, (x, s) = x.dtype, _prepare(x, sigmas)
    old: Tensor | None = None
    for i in _steps(s, disable):
        denoised = _call(model, x, s[i])
        _report(callback, i, x, s[i], denoised)
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i] / s[i + 1])
            d = denoised
            if old is not None:
                r = math.log(s[i - 1] / s[i]) / h  # h_last / h
                d = denoised + (denoised - old) / (2 * r)
            x = (s[i + 1] / s[i]) * x - math.expm1(-h) * d
        old = denoised
    return x.to(dtype)


def sample_dpmpp_2m_sde(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    disable: bool = True,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: Literal["midpoint", "heun"] = "midpoint",
) -> Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022b; k-diffusion ``sample_dpmpp_2m_sde``).

    Each step adds independent Gaussian noise. k-diffusion draws it from a Brownian tree (torchsde);
    the steps cover disjoint sigma intervals, so both give the same distribution, not the same image.
    """
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    dtype, (x, s) = x.dtype, _prepare(x, sigmas)
    old: Tensor | None = None
    h_last = 0.0
    for i in _steps(s, disable):
        denoised = _call(model, x, s[i])
        _report(callback, i, x, s[i], denoised)
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i] / s[i + 1])
            eta_h = eta * h
            one_minus = -math.expm1(-h - eta_h)  # 1 - exp(-(1 + eta) h)
            x = (s[i + 1] / s[i] * math.exp(-eta_h)) * x + one_minus * denoised
            if old is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + (one_minus / (-h - eta_h) + 1) * (1 / r) * (denoised - old)
                else:
                    x = x + (0.5 * one_minus / r) * (denoised - old)
            if eta:
                x = x + _randn(x, generator) * (s[i + 1] * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise)
            h_last = h
        old = denoised
    return x.to(dtype)


def brownian_noise(
    x: Tensor, generator: torch.Generator | None, sigma_from: float, sigma_mid: float, sigma_to: float
) -> tuple[Tensor, Tensor]:
    """Normalised Brownian increments (W(sigma_mid) - W(sigma_from), W(sigma_to) - W(sigma_from)).

    Both have unit variance and correlation sqrt((sigma_from - sigma_mid) / (sigma_from - sigma_to)),
    the joint law of torchsde's Brownian tree as k-diffusion's ``BrownianTreeNoiseSampler`` uses it.
    Built from two independent draws, one per sub-interval.
    """
    n1, n2 = _randn(x, generator), _randn(x, generator)
    a, b = math.sqrt(sigma_from - sigma_mid), math.sqrt(sigma_mid - sigma_to)
    return n1, (a * n1 + b * n2) / math.sqrt(a * a + b * b)


def sample_dpmpp_sde(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    disable: bool = True,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
) -> Tensor:
    """DPM-Solver++ (stochastic, 2 model calls per step; k-diffusion ``sample_dpmpp_sde``).

    Noise source: k-diffusion samples a torchsde Brownian tree W(sigma); the first sub-step needs
    the increment over [sigma_s, sigma_i] and the full step the one over [sigma_{i+1}, sigma_i].
    :func:`brownian_noise` draws both from ``generator`` with exactly the tree's joint distribution
    (not its realisation, so images differ from A1111's for the same seed).
    """
    dtype, (x, s) = x.dtype, _prepare(x, sigmas)
    for i in _steps(s, disable):
        denoised = _call(model, x, s[i])
        _report(callback, i, x, s[i], denoised)
        if s[i + 1] == 0:
            x = x + _d(x, s[i], denoised) * (s[i + 1] - s[i])
            continue
        t, t_next = -math.log(s[i]), -math.log(s[i + 1])
        h = t_next - t
        sigma_s = math.exp(-(t + h * r))
        if eta > 0:
            n1, noise_full = brownian_noise(x, generator, s[i], sigma_s, s[i + 1])
        else:
            n1 = noise_full = torch.zeros_like(x)
        # step 1: to the intermediate sigma_s
        down, up = ancestral_step(s[i], sigma_s, eta)
        x_2 = (down / s[i]) * x - math.expm1(math.log(down / s[i])) * denoised
        x_2 = x_2 + n1 * (s_noise * up)
        denoised_2 = _call(model, x_2, sigma_s)
        # step 2: full step with the combined estimate
        down, up = ancestral_step(s[i], s[i + 1], eta)
        fac = 1 / (2 * r)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (down / s[i]) * x - math.expm1(math.log(down / s[i])) * denoised_d
        x = x + noise_full * (s_noise * up)
    return x.to(dtype)



def sample_dpmpp_2m_sde_heun(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    disable: bool = True,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """A1111's "DPM++ 2M SDE Heun": :func:`sample_dpmpp_2m_sde` with ``solver_type="heun"``."""
    return sample_dpmpp_2m_sde(model, x, sigmas, generator=generator, callback=callback, disable=disable, eta=eta,
                               s_noise=s_noise, solver_type="heun")


def sample_dpmpp_3m_sde(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    disable: bool = True,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver++(3M) SDE (Lu et al. 2022b; k-diffusion ``sample_dpmpp_3m_sde``): third-order multistep in
    data prediction, warming up through first and second order; eta = 0 is the DPM-Solver++(3M) ODE solver.

    Noise as in :func:`sample_dpmpp_2m_sde`: one independent draw per step (the Brownian tree's increments
    over the steps' disjoint intervals have this law).
    """
    dtype, (x, s) = x.dtype, _prepare(x, sigmas)
    old: list[Tensor] = []  # previous denoised, newest first
    hs: list[float] = []  # previous step sizes in lambda, newest first
    for i in _steps(s, disable):
        denoised = _call(model, x, s[i])
        _report(callback, i, x, s[i], denoised)
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i] / s[i + 1])
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if len(old) >= 2:
                r0, r1 = hs[0] / h, hs[1] / h
                d1_0 = (denoised - old[0]) / r0
                d1_1 = (old[0] - old[1]) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif old:
                x = x + phi_2 * (denoised - old[0]) / (hs[0] / h)
            if eta:
                x = x + _randn(x, generator) * (s[i + 1] * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise)
            hs = [h, *hs][:2]
        old = [denoised, *old][:2]
    return x.to(dtype)

# -- DDIM / DDPM written in sigma space -------------------------------------------------------------------


def sample_ddim(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    disable: bool = True,
    eta: float = 0.0,
) -> Tensor:
    """DDIM (Song et al. 2021), eq. 12 divided by sqrt(alpha_bar_prev) so that it acts on x = x0 + sigma eps.

    With sigma^2 = (1 - a) / a the DDIM variance sigma_t(eta)^2 / alpha_bar_prev becomes the
    ancestral sigma_up^2 = eta^2 sigma'^2 (sigma^2 - sigma'^2) / sigma^2, so
    x' = x0 + sqrt(sigma'^2 - sigma_up^2) eps + sigma_up z: DDIM(eta) is Euler ancestral(eta), and
    DDIM(0) is Euler, in these coordinates.
    """
    dtype, (x, s) = x.dtype, _prepare(x, sigmas)
    for i in _steps(s, disable):
        denoised = _call(model, x, s[i])
        _report(callback, i, x, s[i], denoised)
        down, up = ancestral_step(s[i], s[i + 1], eta)
        eps = _d(x, s[i], denoised)
        x = denoised + eps * down
        if up > 0:
            x = x + _randn(x, generator) * up
    return x.to(dtype)


def sample_ddpm(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    disable: bool = True,
) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, eq. 7; diffusers' ``DDPMScheduler``, "fixed_small").

    The posterior q(x' | x, x0) in sigma space: mean x0 + (sigma'^2 / sigma^2)(x - x0), variance
    sigma'^2 (sigma^2 - sigma'^2) / sigma^2. Mathematically Euler ancestral with eta = 1.
    """
    dtype, (x, s) = x.dtype, _prepare(x, sigmas)
    for i in _steps(s, disable):
        denoised = _call(model, x, s[i])
        _report(callback, i, x, s[i], denoised)
        ratio = (s[i + 1] / s[i]) ** 2
        x = denoised + ratio * (x - denoised)
        if s[i + 1] > 0:
            x = x + _randn(x, generator) * (s[i + 1] * math.sqrt(1 - ratio))
    return x.to(dtype)



# Adams-Bashforth weights of the newest 1..4 eps values (PLMS assumes equal steps)
_PLMS_WEIGHTS = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def sample_plms(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    disable: bool = True,
) -> Tensor:
    """PLMS, pseudo linear multistep (Liu et al. 2022; CompVis ``PLMSSampler``, A1111's "PLMS", diffusers'
    ``PNDMScheduler(skip_prk_steps=True)``), written in sigma space like :func:`sample_ddim`.

    Each step is a DDIM step (= Euler in sigma) with eps replaced by the Adams-Bashforth combination of the
    last up to 4 eps = (x - D) / sigma; the first step is the pseudo improved Euler (Heun) step, so n steps
    cost n + 1 model calls. The constant weights assume equal steps in the timestep.
    """
    dtype, (x, s) = x.dtype, _prepare(x, sigmas)
    eps_old: list[Tensor] = []  # newest first
    for i in _steps(s, disable):
        denoised = _call(model, x, s[i])
        _report(callback, i, x, s[i], denoised)
        eps = _d(x, s[i], denoised)
        dt = s[i + 1] - s[i]
        if not eps_old:
            eps_prime = eps
            if s[i + 1] > 0:
                x_2 = x + eps * dt
                eps_prime = (eps + _d(x_2, s[i + 1], _call(model, x_2, s[i + 1]))) / 2
        else:
            history = [eps, *eps_old]
            eps_prime = sum(w * e for w, e in zip(_PLMS_WEIGHTS[len(history) - 1], history, strict=True))
        x = x + eps_prime * dt
        eps_old = [eps, *eps_old][:3]
    return x.to(dtype)

# -- UniPC (Zhao et al. 2023) ----------------------------------------------------------------------------


def _unipc_coeffs(rks: list[float], hh: float, order: int, variant: str) -> tuple[np.ndarray, np.ndarray, float]:
    """UniPC's linear system R rho = b for data prediction (hh = -h), and B(h)."""
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if variant == "bh1" else math.expm1(hh)
    rks_arr = np.asarray([*rks, 1.0], dtype=np.float64)
    rows, b = [], []
    factorial = 1
    for k in range(1, order + 1):
        rows.append(rks_arr ** (k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return np.stack(rows), np.asarray(b), b_h


def _unipc_update(
    x: Tensor,
    sigma_s0: float,
    sigma_t: float,
    ms: list[Tensor],
    sigma_ms: list[float],
    order: int,
    variant: str,
    model_t: Tensor | None = None,
) -> Tensor:
    """UniP (``model_t`` None) or UniC step from sigma_s0 to sigma_t using the x0 history ``ms``."""
    lam_s0, h = -math.log(sigma_s0), math.log(sigma_s0 / sigma_t)
    m0 = ms[-1]
    rks = [(-math.log(sigma_ms[-2 - k]) - lam_s0) / h for k in range(order - 1)]
    d1s = [(ms[-2 - k] - m0) / rk for k, rk in enumerate(rks)]
    R, b, b_h = _unipc_coeffs(rks, -h, order, variant)
    x_t = (sigma_t / sigma_s0) * x - math.expm1(-h) * m0
    if model_t is None:  # predictor
        if not d1s:
            return x_t
        rhos = [0.5] if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
        return x_t - b_h * sum(rho * d for rho, d in zip(rhos, d1s, strict=True))
    rhos = [0.5] if order == 1 else np.linalg.solve(R, b).tolist()  # corrector
    res = sum((rho * d for rho, d in zip(rhos[:-1], d1s, strict=True)), torch.zeros_like(x))
    return x_t - b_h * (res + rhos[-1] * (model_t - m0))


def sample_unipc(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    disable: bool = True,
    order: int = 2,
    variant: Literal["bh1", "bh2"] = "bh2",
    lower_order_final: bool = True,
    use_corrector: bool = True,
) -> Tensor:
    """UniPC (Zhao et al. 2023): multistep UniP predictor + UniC corrector, data prediction.

    Follows diffusers' ``UniPCMultistepScheduler`` (predict_x0, ``solver_type=variant``) with
    alpha = 1 and sigma_vp / alpha = sigma. The corrector reuses the next step's model call, so the
    cost is one call per step; the effective order is ``order + 1``.
    """
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    dtype, (x, s) = x.dtype, _prepare(x, sigmas)
    n = len(s) - 1
    ms: list[Tensor] = []
    sigma_ms: list[float] = []
    x_last: Tensor | None = None
    last_order = 1
    for i in _steps(s, disable):
        denoised = _call(model, x, s[i])
        if use_corrector and x_last is not None:
            x = _unipc_update(x_last, s[i - 1], s[i], ms, sigma_ms, last_order, variant, model_t=denoised)
        _report(callback, i, x, s[i], denoised)
        ms, sigma_ms = [*ms, denoised][-order:], [*sigma_ms, s[i]][-order:]
        if s[i + 1] == 0:
            x = denoised
            x_last = None
            continue
        this_order = min(order, n - i) if lower_order_final else order
        this_order = min(this_order, len(ms))
        x_last = x
        x = _unipc_update(x, s[i], s[i + 1], ms, sigma_ms, this_order, variant)
        last_order = this_order
    return x.to(dtype)


# -- consistency models: LCM (Luo et al. 2023) and TCD (Zheng et al. 2024) -----------------------------
# Both were distilled on the model's discrete VP timesteps, so each step needs the training timestep
# of its sigma (``schedule``, the model's own; SD's when None). Start them from VP noise
# (x = noise * sqrt(1 + sigma_max^2)), as diffusers' LCM/TCD pipelines do.


def _timestep(schedule: DiscreteSchedule, sigma: float) -> float:
    """Training timestep of sigma, snapped to the integer when within float error of one."""
    t = float(schedule.sigma_to_t(torch.tensor(sigma, dtype=torch.float64)))
    return float(round(t)) if abs(t - round(t)) < 1e-3 else t


def sample_lcm(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    disable: bool = True,
    schedule: DiscreteSchedule | None = None,
) -> Tensor:
    """Latent consistency model multistep sampling (Luo et al. 2023, alg. 1; diffusers ``LCMScheduler``).

    Each step maps x to the consistency output f = c_skip(t) x_vp + c_out(t) D(x, sigma) and re-noises
    it with fresh noise to the next sigma; the last step returns f itself.
    """
    dtype, (x, s) = x.dtype, _prepare(x, sigmas)
    schedule = schedule or DiscreteSchedule.sd()
    for i in _steps(s, disable):
        denoised = _call(model, x, s[i])
        c_skip, c_out = (float(c) for c in lcm_boundary_scalings(_timestep(schedule, s[i])))
        # the boundary condition mixes in the VP latent the network saw, x / sqrt(1 + sigma^2)
        f = denoised * c_out + x * (c_skip / math.sqrt(1 + s[i] ** 2))
        _report(callback, i, x, s[i], f)
        x = f if i == len(s) - 2 else f + _randn(f, generator) * s[i + 1]
    return x.to(dtype)


def sample_tcd(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    disable: bool = True,
    eta: float = 0.3,
    schedule: DiscreteSchedule | None = None,
) -> Tensor:
    """Trajectory consistency distillation's strategic stochastic sampling (Zheng et al. 2024; diffusers
    ``TCDScheduler``), ``eta`` = gamma in [0, 1].

    From sigma_t it jumps along the predicted trajectory to s = floor((1 - gamma) t_next) (x_s =
    D + sigma_s * eps), then adds fresh noise back up to sigma_next. gamma = 0 is deterministic (DDIM
    to t_next), gamma = 1 is a full consistency step like LCM's. The last step lands on t = 0.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"TCD gamma (eta) must be in [0, 1], got {eta}; 0.3 is the usual choice")
    dtype, (x, s) = x.dtype, _prepare(x, sigmas)
    schedule = schedule or DiscreteSchedule.sd()
    for i in _steps(s, disable):
        denoised = _call(model, x, s[i])
        _report(callback, i, x, s[i], denoised)
        t_s = math.floor((1 - eta) * _timestep(schedule, s[i + 1]))
        sigma_s = float(schedule.t_to_sigma(t_s))
        x_s = denoised + _d(x, s[i], denoised) * sigma_s
        if i == len(s) - 2:
            # diffusers returns the VP sample at t_s = 0 (sigma_min ~ 0.03, not 0): the same latent here
            x = x_s / math.sqrt(1 + sigma_s**2)
        elif eta > 0:
            x = x_s + _randn(x, generator) * math.sqrt(max(s[i + 1] ** 2 - sigma_s**2, 0.0))
        else:
            x = x_s
    return x.to(dtype)



# -- DPM-Solver with a step budget or adaptive steps (Lu et al. 2022; k-diffusion ``DPMSolver``) ------------
# Both integrate in t = -log(sigma) (lambda) from sigmas[0] to the smallest positive sigma and return x
# there, as k-diffusion's sample_dpm_fast/sample_dpm_adaptive do (A1111 gives them the model's full range).


class _EpsCache:
    """eps(x, t) = (x - D(x, sigma)) / sigma at t = -log(sigma), counting model calls."""

    def __init__(self, model: Model) -> None:
        self.model, self.calls = model, 0

    def __call__(self, x: Tensor, t: float) -> Tensor:
        self.calls += 1
        sigma = math.exp(-t)
        return (x - _call(self.model, x, sigma)) / sigma


def _dpm_solver_step(eps_fn: _EpsCache, x: Tensor, eps: Tensor, t: float, t_next: float, order: int,
                     r1: float | None = None) -> tuple[Tensor, Tensor | None]:
    """DPM-Solver-1/2/3 (Lu et al. 2022, alg. 1, 4, 5) from t to t_next given eps at t. Returns the result and
    the eps at the first intermediate point (for reuse: a 2nd-order step with r1 = 1/3 shares it with the
    3rd-order one)."""
    h = t_next - t
    sig = math.exp(-t_next)
    x_1 = x - sig * math.expm1(h) * eps
    if order == 1:
        return x_1, None
    r1 = r1 if r1 is not None else (0.5 if order == 2 else 1 / 3)
    s1 = t + r1 * h
    e1 = eps_fn(x - math.exp(-s1) * math.expm1(r1 * h) * eps, s1)
    if order == 2:
        return x_1 - sig / (2 * r1) * math.expm1(h) * (e1 - eps), e1
    r2 = 2 / 3
    s2 = t + r2 * h
    u2 = x - math.exp(-s2) * math.expm1(r2 * h) * eps
    u2 = u2 - math.exp(-s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (e1 - eps)
    e2 = eps_fn(u2, s2)
    return x_1 - sig / r2 * (math.expm1(h) / h - 1) * (e2 - eps), e1


def _ancestral_target(t: float, t_next: float, t_end: float, eta: float) -> tuple[float, float]:
    """(t to integrate to, noise std to add) for a step t -> t_next with ancestral noise eta."""
    if not eta:
        return t_next, 0.0
    down, _ = ancestral_step(math.exp(-t), math.exp(-t_next), eta)
    t_down = min(t_end, -math.log(down)) if down > 0 else t_end
    return t_down, math.sqrt(max(math.exp(-2 * t_next) - math.exp(-2 * t_down), 0.0))


def _t_range(s: list[float]) -> tuple[float, float]:
    positive = [v for v in s if v > 0]
    return -math.log(positive[0]), -math.log(positive[-1])


def sample_dpm_fast(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    disable: bool = True,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver-fast (Lu et al. 2022, sec. 3.4; k-diffusion ``sample_dpm_fast``): a budget of n = len(sigmas) - 1
    model calls spent on third-order steps evenly spaced in lambda (the last one or two of lower order).

    Only the schedule's ends matter. ``eta`` > 0 adds ancestral noise after each step; A1111 passes its
    "Eta for ancestral samplers" (default 1) to it, so the default here is 1 too; eta = 0 is the ODE solver.
    """
    dtype, (x, s) = x.dtype, _prepare(x, sigmas)
    nfe = len(s) - 1
    t_start, t_end = _t_range(s)
    m = nfe // 3 + 1
    ts = np.linspace(t_start, t_end, m + 1).tolist()
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    eps_fn = _EpsCache(model)
    for i in trange(len(orders), disable=disable):
        t, t_next = ts[i], ts[i + 1]
        t_target, noise_std = _ancestral_target(t, t_next, t_end, eta)
        eps = eps_fn(x, t)
        _report(callback, i, x, math.exp(-t), x - math.exp(-t) * eps)
        x, _ = _dpm_solver_step(eps_fn, x, eps, t, t_target, orders[i])
        if noise_std > 0:
            x = x + _randn(x, generator) * (noise_std * s_noise)
    return x.to(dtype)


def sample_dpm_adaptive(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    disable: bool = True,
    eta: float = 1.0,
    s_noise: float = 1.0,
    order: int = 3,
    rtol: float = 0.05,
    atol: float = 0.0078,
    h_init: float = 0.05,
    pcoeff: float = 0.0,
    icoeff: float = 1.0,
    dcoeff: float = 0.0,
    accept_safety: float = 0.81,
) -> Tensor:
    """Adaptive-step DPM-Solver-12/23 (Lu et al. 2022, sec. 3.4; k-diffusion ``sample_dpm_adaptive``).

    Each step compares a DPM-Solver-(order - 1) and a DPM-Solver-(order) result; a PID controller (k-diffusion's
    ``PIDStepSizeController``, default: integral only) accepts or rejects it and sets the next step size in
    lambda. The number of model calls is decided by the tolerances, not by the schedule: only its ends matter.
    The callback's ``i`` is the progress in lambda scaled to len(sigmas) - 1 steps. ``eta``: as
    :func:`sample_dpm_fast`. The error norm is taken over the whole batch, as k-diffusion does.
    """
    if order not in (2, 3):
        raise ValueError(f"DPM adaptive order must be 2 or 3, got {order}")
    dtype, (x, s) = x.dtype, _prepare(x, sigmas)
    n = len(s) - 1
    t_start, t_end = _t_range(s)
    eps_fn = _EpsCache(model)
    pid_order = 1.5 if eta else order
    b1 = (pcoeff + icoeff + dcoeff) / pid_order
    b2 = -(pcoeff + 2 * dcoeff) / pid_order
    b3 = dcoeff / pid_order
    inv_errs: list[float] = []
    h = abs(h_init)
    t, x_prev, steps = t_start, x, 0
    while t < t_end - 1e-5:
        t_next = min(t_end, t + h)
        t_target, noise_std = _ancestral_target(t, t_next, t_end, eta)
        eps = eps_fn(x, t)
        if order == 2:
            x_low, _ = _dpm_solver_step(eps_fn, x, eps, t, t_target, 1)
            x_high, _ = _dpm_solver_step(eps_fn, x, eps, t, t_target, 2)
        else:
            x_high, e1 = _dpm_solver_step(eps_fn, x, eps, t, t_target, 3)
            # the 2nd-order (r1 = 1/3) estimate from the same intermediate eps: no extra model call
            x_low = x - math.exp(-t_target) * math.expm1(t_target - t) * (eps + 1.5 * (e1 - eps))
        delta = torch.maximum(torch.maximum(x_low.abs(), x_prev.abs()) * rtol, torch.tensor(atol).to(x))
        error = float(torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5)
        if not math.isfinite(error):
            raise ValueError("DPM adaptive: the step error is not finite (the model returned NaN or inf)")
        # PID step size control (k-diffusion PIDStepSizeController.propose_step)
        inv = 1 / (error + 1e-8)
        inv_errs = [inv, *(inv_errs[1:] or [inv, inv])]
        factor = 1 + math.atan(inv_errs[0] ** b1 * inv_errs[1] ** b2 * inv_errs[2] ** b3 - 1)
        accept = factor >= accept_safety
        if accept:
            inv_errs = [inv_errs[0], inv_errs[0], inv_errs[1]]
        h *= factor
        steps += 1
        if accept:
            denoised = x - math.exp(-t) * eps
            x_prev = x_low
            x = x_high + (_randn(x, generator) * (noise_std * s_noise) if noise_std > 0 else 0)
            progress = (t - t_start) / (t_end - t_start) if t_end > t_start else 1.0
            _report(callback, min(int(progress * n), n - 1), x, math.exp(-t), denoised)
            t = t_next
        if steps > 100_000:
            raise ValueError("DPM adaptive did not finish in 100000 steps; raise rtol/atol")
    return x.to(dtype)

# -- registry ---------------------------------------------------------------------------------------------

_FUNCTIONS: dict[str, Sampler] = {
    "euler": sample_euler,
    "euler_a": sample_euler_a,
    "heun": sample_heun,
    "dpm2": sample_dpm2,
    "lms": sample_lms,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_2m_sde_heun": sample_dpmpp_2m_sde_heun,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "dpm_fast": sample_dpm_fast,
    "dpm_adaptive": sample_dpm_adaptive,
    "restart": sample_restart,
    "ddim": sample_ddim,
    "plms": sample_plms,
    "ddpm": sample_ddpm,
    "unipc": sample_unipc,
    "lcm": sample_lcm,
    "tcd": sample_tcd,
}

SAMPLER_DISPLAY_NAMES: dict[str, str] = {
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "dpm2": "DPM2",
    "lms": "LMS",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_sde": "DPM++ SDE",
    "dpmpp_2m_sde_heun": "DPM++ 2M SDE Heun",
    "dpmpp_3m_sde": "DPM++ 3M SDE",
    "dpm_fast": "DPM fast",
    "dpm_adaptive": "DPM adaptive",
    "restart": "Restart",
    "ddim": "DDIM",
    "plms": "PLMS",
    "ddpm": "DDPM",
    "unipc": "UniPC",
    "lcm": "LCM",
    "tcd": "TCD",
}

# Schedule used when a name carries none: A1111 >= 1.9's per-sampler defaults, DDIM/DDPM's own spacing.
DEFAULT_SCHEDULES: dict[str, str] = {
    "euler": "uniform",
    "euler_a": "uniform",
    "heun": "uniform",
    "dpm2": "karras",
    "lms": "uniform",
    "dpmpp_2m": "karras",
    "dpmpp_2m_sde": "exponential",
    "dpmpp_sde": "karras",
    "dpmpp_2m_sde_heun": "exponential",
    "dpmpp_3m_sde": "exponential",
    "dpm_fast": "uniform",  # only the ends are used: the model's full range, as A1111 passes it
    "dpm_adaptive": "uniform",
    "restart": "karras",
    "ddim": "ddim_uniform",
    "plms": "ddim_uniform",
    "ddpm": "ddim_uniform",
    "unipc": "uniform",
    "lcm": "lcm",
    "tcd": "lcm",  # TCDScheduler.set_timesteps makes the same original-50 skipping timesteps
}

# other spellings: k-diffusion/ComfyUI function names and A1111's k_* aliases
_ALIASES: dict[str, str] = {
    "euler_ancestral": "euler_a",
    "k_euler": "euler",
    "k_euler_a": "euler_a",
    "k_euler_ancestral": "euler_a",
    "k_heun": "heun",
    "dpm_2": "dpm2",
    "k_dpm_2": "dpm2",
    "k_lms": "lms",
    "k_dpmpp_2m": "dpmpp_2m",
    "k_dpmpp_sde": "dpmpp_sde",
    "k_dpmpp_2m_sde": "dpmpp_2m_sde",
    "k_dpmpp_2m_sde_heun": "dpmpp_2m_sde_heun",
    "k_dpmpp_3m_sde": "dpmpp_3m_sde",
    "k_dpm_fast": "dpm_fast",
    "k_dpm_ad": "dpm_adaptive",
    "uni_pc": "unipc",
}

SAMPLERS: dict[str, Sampler] = {**_FUNCTIONS, **{SAMPLER_DISPLAY_NAMES[k]: f for k, f in _FUNCTIONS.items()}}

_LOOKUP: dict[str, str] = {
    **{k: k for k in _FUNCTIONS},
    **{v.lower(): k for k, v in SAMPLER_DISPLAY_NAMES.items()},
    **_ALIASES,
}
# schedule suffixes of combined names ("DPM++ 2M Karras"); "Automatic" means the sampler's default
_SCHEDULE_SUFFIXES: dict[str, str | None] = {
    **{k: k for k in SCHEDULES},
    **{v.lower(): k for k, v in SCHEDULE_DISPLAY_NAMES.items()},
    "automatic": None,
}


def sampler_names() -> list[str]:
    """Short sampler names (keys of :data:`SAMPLER_DISPLAY_NAMES`)."""
    return list(_FUNCTIONS)


def scheduler_names() -> list[str]:
    """Short schedule names accepted by :func:`ldmkit.schedules.get_sigmas`."""
    return list(SCHEDULES)


def _norm(name: str) -> str:
    return " ".join(name.strip().lower().split())


def resolve_sampler(name: str) -> tuple[str, Sampler, str | None]:
    """``(short_name, function, schedule or None)`` for a short, A1111 or combined name, any case.

    "DPM++ 2M Karras" -> ("dpmpp_2m", sample_dpmpp_2m, "karras"); "Euler a" -> ("euler_a", ..., None).
    Generation code uses :func:`sampler_spec`, the same parse as one record.
    """
    key = _norm(name)
    if key in _LOOKUP:
        short = _LOOKUP[key]
        return short, _FUNCTIONS[short], None
    for suffix in sorted(_SCHEDULE_SUFFIXES, key=len, reverse=True):
        for sep in (" ", "_"):
            if key.endswith(sep + suffix) and key[: -len(suffix) - 1].strip() in _LOOKUP:
                short = _LOOKUP[key[: -len(suffix) - 1].strip()]
                return short, _FUNCTIONS[short], _SCHEDULE_SUFFIXES[suffix]
    valid = ", ".join(f"{k!r} ({SAMPLER_DISPLAY_NAMES[k]!r})" for k in _FUNCTIONS)
    suffixes = ", ".join(SCHEDULE_DISPLAY_NAMES.values())
    raise ValueError(
        f"unknown sampler {name!r}; valid samplers: {valid}, optionally followed by a schedule: {suffixes}"
    )


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler name resolved once, at the edge (CLI, API, server): everything generation needs to know."""

    name: str  # short name, e.g. "dpmpp_2m"
    fn: Sampler
    display: str  # A1111's name, e.g. "DPM++ 2M" (infotext, /sdapi/v1/samplers)
    schedule: str  # the schedule the name carries ("DPM++ 2M Karras"), else the sampler's default
    named_schedule: bool  # whether the name carried it (it then wins over "Automatic")
    vp_start: bool  # starts from N(0, 1) in the DDPM x_t space instead of sigma_max * N(0, 1)
    takes_eta: bool  # has an eta (noise amount; TCD's gamma) parameter
    takes_schedule: bool  # steps on the model's training timesteps (LCM, TCD): needs its DiscreteSchedule
    discard_penultimate: bool = False  # A1111's discard_next_to_last_sigma (DPM2, DPM++ 3M SDE)

    def start_scale(self, sigma: Tensor) -> Tensor:
        """What pure starting noise N(0, 1) is multiplied by at noise level ``sigma``."""
        return (sigma**2 + 1).sqrt() if self.vp_start else sigma

    def sigmas_for(self, steps: int, make: Callable[[int], Tensor]) -> Tensor:
        """The noise levels for ``steps`` steps from a schedule ``make(n)``: with ``discard_penultimate``, A1111's
        n + 1 levels less the next-to-last (so the last step does not land on the tiny sigma_min first)."""
        if not self.discard_penultimate:
            return make(steps)
        sigmas = make(steps + 1)
        return torch.cat([sigmas[:-2], sigmas[-1:]])


# samplers that start from N(0, 1) in the DDPM x_t space, as the CompVis/diffusers DDIM code does, rather
# than from sigma_max * N(0, 1) in k-diffusion's space (the consistency samplers too: diffusers'
# LCMScheduler/TCDScheduler have init_noise_sigma = 1)
VP_START: frozenset[str] = frozenset({"ddim", "ddpm", "plms", "unipc", "lcm", "tcd"})
# A1111's samplers with the option discard_next_to_last_sigma (modules/sd_samplers_kdiffusion.py)
DISCARD_PENULTIMATE: frozenset[str] = frozenset({"dpm2", "dpmpp_3m_sde"})


def sampler_spec(name: str) -> SamplerSpec:
    """The :class:`SamplerSpec` for any name :func:`resolve_sampler` accepts; ValueError listing the valid
    names otherwise."""
    short, fn, suffix = resolve_sampler(name)
    accepted = inspect.signature(fn).parameters
    return SamplerSpec(
        name=short, fn=fn, display=SAMPLER_DISPLAY_NAMES[short], schedule=suffix or DEFAULT_SCHEDULES[short],
        named_schedule=suffix is not None, vp_start=short in VP_START, takes_eta="eta" in accepted,
        takes_schedule="schedule" in accepted, discard_penultimate=short in DISCARD_PENULTIMATE,
    )


def default_schedule(name: str) -> str:
    """The schedule a sampler uses when its name does not carry one."""
    return sampler_spec(name).schedule


def sample(model: Model, x: Tensor, sigmas: Tensor, name: str, **kwargs: Any) -> Tensor:
    """Run the sampler called ``name`` (any spelling :func:`resolve_sampler` accepts)."""
    return resolve_sampler(name)[1](model, x, sigmas, **kwargs)
