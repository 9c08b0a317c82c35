"""Samplers, schedules and denoisers.

Three kinds of evidence:
1. Analytic: for data x0 ~ N(mu, s^2) the denoiser and the probability-flow ODE have closed forms,
   so deterministic samplers must converge to the exact solution at their order, and stochastic
   samplers must reproduce mean mu and std s.
2. Parity: with a fixed fake eps-network on the SD schedule, ldmkit matches diffusers' schedulers.
3. Plumbing: eps/v scalings, one batched CFG call, c_concat, registry names.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldmkit import samplers as S
from ldmkit.denoisers import CFGDenoiser, DiscreteDenoiser
from ldmkit.schedules import (
    DiscreteSchedule,
    ddim_uniform,
    get_sigmas,
    karras,
    scheduler_names,
    sd_alphas_cumprod,
    uniform,
)

# -- analytic Gaussian model -------------------------------------------------------------------------------

MU = torch.linspace(-1, 1, 8, dtype=torch.float64)
S_DATA = 0.5
SIGMA_MIN, SIGMA_MAX = 0.03, 14.6  # about SD's range


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x0 | x] for x0 ~ N(MU, S_DATA^2), x = x0 + sigma * eps."""
    sig = sigma.reshape(-1, 1).to(x.dtype)
    mu = MU.to(x.dtype)
    return mu + S_DATA**2 / (S_DATA**2 + sig**2) * (x - mu)


def exact_flow(x_start: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
    """Probability-flow ODE solution: x - mu scales with sqrt(s^2 + sigma^2)."""
    scale = math.sqrt(S_DATA**2 + sigma_to**2) / math.sqrt(S_DATA**2 + sigma_from**2)
    return MU + (x_start.double() - MU) * scale


def _x_T(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * SIGMA_MAX


DETERMINISTIC = [
    # name, options, max error after 50 Karras steps to sigma = 0, (step counts, min slope, max slope)
    ("euler", {}, 0.1, (32, 64), 0.9, 1.1),
    ("ddim", {"eta": 0.0}, 0.1, (32, 64), 0.9, 1.1),
    ("heun", {}, 1e-2, (32, 64), 1.85, 2.3),
    ("dpm2", {}, 1e-2, (32, 64), 1.85, 2.3),
    ("dpmpp_2m", {}, 1e-2, (32, 64), 1.85, 2.3),
    ("dpmpp_sde", {"eta": 0.0}, 1e-2, (32, 64), 1.85, 2.3),
    ("lms", {}, 2e-3, (32, 64), 3.4, 4.5),
    ("unipc", {}, 2e-3, (16, 32), 2.8, 4.0),
    ("unipc", {"variant": "bh1"}, 4e-3, (16, 32), 2.8, 4.0),
    ("unipc", {"order": 3, "lower_order_final": False}, 1e-3, (16, 32), 3.6, 4.8),
]


@pytest.mark.parametrize("name,opts,tol,_ns,_lo,_hi", DETERMINISTIC)
def test_deterministic_sampler_reaches_exact_solution(name, opts, tol, _ns, _lo, _hi):
    x_T = _x_T()
    sigmas = karras(50, 0.002, SIGMA_MAX)
    out = S.SAMPLERS[name](gaussian_denoiser, x_T.float(), sigmas, **opts)  # production dtype
    assert out.dtype == torch.float32
    err = (out.double() - exact_flow(x_T, SIGMA_MAX, 0.0)).abs().max().item()
    assert err < tol, f"{name} {opts}: max error {err:.2e} >= {tol:.0e}"


def assert_convergence_order(name, opts, ns, lo, hi):
    """The sampler's error against the exact flow falls as n^-order between the step counts ``ns``, with the
    order in [lo, hi]. Stops at sigma_min: the final jump sigma_min -> 0 has a fixed size, which would hide it."""
    x_T = _x_T()
    target = exact_flow(x_T, SIGMA_MAX, SIGMA_MIN)
    errs = []
    for n in ns:
        sigmas = karras(n, SIGMA_MIN, SIGMA_MAX)[:-1]
        errs.append((S.SAMPLERS[name](gaussian_denoiser, x_T, sigmas, **opts) - target).abs().max().item())
    slope = math.log(errs[0] / errs[1]) / math.log(ns[1] / ns[0])
    assert lo <= slope <= hi, f"{name} {opts}: order {slope:.2f} not in [{lo}, {hi}] (errors {errs})"


@pytest.mark.parametrize("name,opts,_tol,ns,lo,hi", DETERMINISTIC)
def test_deterministic_sampler_convergence_order(name, opts, _tol, ns, lo, hi):
    assert_convergence_order(name, opts, ns, lo, hi)


STOCHASTIC = [
    ("euler_a", {}, 400),
    ("ddpm", {}, 400),
    ("ddim", {"eta": 1.0}, 400),
    ("dpmpp_2m_sde", {}, 100),
    ("dpmpp_2m_sde", {"solver_type": "heun"}, 100),
    ("dpmpp_sde", {}, 50),
]


@pytest.mark.parametrize("name,opts,steps", STOCHASTIC)
def test_stochastic_sampler_matches_data_distribution(name, opts, steps):
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(8192, 8, generator=g) * SIGMA_MAX
    out = S.SAMPLERS[name](gaussian_denoiser, x_T, karras(steps, SIGMA_MIN, SIGMA_MAX), generator=g, **opts)
    mean, std = out.double().mean(0), out.double().std(0)
    # standard errors: 0.5 / sqrt(8192) = 0.0055 for the mean, 0.004 for each std
    assert (mean - MU).abs().max() < 0.03, mean
    assert abs(std.mean().item() - S_DATA) < 0.012, std
    assert (std - S_DATA).abs().max() < 0.025, std


@pytest.mark.parametrize("name,opts,_steps", STOCHASTIC)
def test_stochastic_sampler_is_seeded(name, opts, _steps):
    x_T = _x_T(4).float()
    sigmas = karras(6, SIGMA_MIN, SIGMA_MAX)

    def run(seed):
        return S.SAMPLERS[name](gaussian_denoiser, x_T, sigmas, generator=torch.Generator().manual_seed(seed), **opts)

    assert torch.equal(run(7), run(7))
    assert (run(7) - run(8)).abs().max() > 1e-3


def test_brownian_noise_has_brownian_tree_correlation():
    x = torch.zeros(200_000)
    first, full = S.brownian_noise(x, torch.Generator().manual_seed(0), 4.0, 3.0, 1.0)
    assert first.std().item() == pytest.approx(1, abs=0.01) and full.std().item() == pytest.approx(1, abs=0.01)
    corr = (first * full).mean().item()
    assert corr == pytest.approx(math.sqrt((4.0 - 3.0) / (4.0 - 1.0)), abs=0.01)


def test_ddim_is_euler_and_ddpm_is_euler_ancestral_in_sigma_space():
    x_T = _x_T(4)
    sigmas = karras(12, SIGMA_MIN, SIGMA_MAX)
    torch.testing.assert_close(
        S.sample_ddim(gaussian_denoiser, x_T, sigmas), S.sample_euler(gaussian_denoiser, x_T, sigmas)
    )
    runs = [
        f(gaussian_denoiser, x_T, sigmas, generator=torch.Generator().manual_seed(3), **kw)
        for f, kw in ((S.sample_ddpm, {}), (S.sample_euler_a, {}), (S.sample_ddim, {"eta": 1.0}))
    ]
    torch.testing.assert_close(runs[0], runs[1])
    torch.testing.assert_close(runs[1], runs[2])
    # eta = 0 turns the SDE samplers into their ODE counterparts
    torch.testing.assert_close(
        S.sample_dpmpp_2m_sde(gaussian_denoiser, x_T, sigmas, eta=0.0),
        S.sample_dpmpp_2m(gaussian_denoiser, x_T, sigmas),
    )


def test_lms_coefficients_match_quadrature():
    sigmas = karras(10, SIGMA_MIN, SIGMA_MAX).tolist()
    i, order = 5, 4
    nodes = [sigmas[i - k] for k in range(order)]
    grid = np.linspace(sigmas[i], sigmas[i + 1], 20001)
    for j in range(order):
        basis = np.prod([(grid - nodes[k]) / (nodes[j] - nodes[k]) for k in range(order) if k != j], axis=0)
        quad = float(np.sum((basis[1:] + basis[:-1]) / 2 * np.diff(grid)))
        assert S.lms_coefficient(order, sigmas, i, j) == pytest.approx(quad, rel=1e-6, abs=1e-9)
    # the coefficients integrate a constant derivative exactly
    total = sum(S.lms_coefficient(order, sigmas, i, j) for j in range(order))
    assert total == pytest.approx(sigmas[i + 1] - sigmas[i], rel=1e-12)


def test_callback_half_precision_and_sigma_batch():
    seen, sigma_shapes = [], []

    def model(x, sigma):
        sigma_shapes.append((tuple(sigma.shape), x.dtype))
        return gaussian_denoiser(x, sigma)

    sigmas = karras(5, SIGMA_MIN, SIGMA_MAX)
    x = _x_T(3).half()
    out = S.sample_dpmpp_2m(model, x, sigmas, callback=seen.append)
    assert out.dtype == torch.float16
    assert set(sigma_shapes) == {((3,), torch.float32)}  # the update runs in float32
    assert [d["i"] for d in seen] == list(range(5))
    assert [d["sigma"] for d in seen] == pytest.approx(sigmas[:-1].tolist())
    assert all(set(d) == {"i", "x", "sigma", "denoised"} for d in seen)


# -- schedules -------------------------------------------------------------------------------------------


def test_discrete_schedule_sd():
    sched = DiscreteSchedule.sd()
    assert sched.sigma_min == pytest.approx(0.029168, rel=1e-4)
    assert sched.sigma_max == pytest.approx(14.614642, rel=1e-5)
    t = torch.tensor([0.0, 0.25, 1.0, 499.5, 998.9, 999.0], dtype=torch.float64)
    torch.testing.assert_close(sched.sigma_to_t(sched.t_to_sigma(t)).double(), t, atol=1e-4, rtol=0)
    assert sched.sigma_to_t(sched.t_to_sigma(torch.tensor(41.4)), quantize=True).item() == 41
    assert sched.sigma_to_t(torch.tensor([0.0, 1e3])).tolist() == [0.0, 999.0]  # clamped
    # linear and log interpolation agree on the training timesteps
    ti = torch.arange(1000, dtype=torch.float64)
    torch.testing.assert_close(sched.t_to_sigma(ti, "linear"), sched.t_to_sigma(ti), rtol=1e-12, atol=0)
    torch.testing.assert_close(sched.sigmas, ((1 - sd_alphas_cumprod()) / sd_alphas_cumprod()).sqrt())


@pytest.mark.parametrize("name", scheduler_names())
def test_named_schedules(name):
    sigmas = get_sigmas(name, 10, DiscreteSchedule.sd())
    assert sigmas.shape == (11,) and sigmas[-1] == 0
    assert bool((sigmas[1:] < sigmas[:-1]).all())


def test_schedule_values_and_errors():
    sched = DiscreteSchedule.sd()
    k = karras(10, sched.sigma_min, sched.sigma_max)
    assert k[0].item() == pytest.approx(sched.sigma_max) and k[-2].item() == pytest.approx(sched.sigma_min)
    torch.testing.assert_close(ddim_uniform(10, sched)[:-1], sched.sigmas[torch.arange(901, 0, -100)])
    torch.testing.assert_close(uniform(4, sched)[:-1], sched.sigmas[[999, 666, 333, 0]])
    with pytest.raises(ValueError, match="karras"):
        get_sigmas("bogus", 10, sched)


# -- parity with diffusers ---------------------------------------------------------------------------------

SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def fake_eps_net(x_in, t, context=None):
    """A fixed smooth function of (x, t) standing in for the U-Net."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1)
    return 0.5 * torch.tanh(x_in) + 0.3 * torch.sin(t / 150) * x_in.roll(1, dims=1) + 0.1 * torch.cos(t / 70)


def _run_diffusers(scheduler, n, z, seed=None, **step_kwargs):
    scheduler.set_timesteps(n)
    latents = z * scheduler.init_noise_sigma
    if seed is not None:
        step_kwargs["generator"] = torch.Generator().manual_seed(seed)
    for t in scheduler.timesteps:
        eps = fake_eps_net(scheduler.scale_model_input(latents, t), t)
        latents = scheduler.step(eps, t, latents, **step_kwargs).prev_sample
    return latents


def _case(label, cls, n, sampler, schedule, seed=None, opts=None, **config):
    return pytest.param(cls, config, n, sampler, schedule, opts or {}, seed, id=label)


_DPM = dict(use_karras_sigmas=True, solver_order=2, solver_type="midpoint", final_sigmas_type="zero")
_UNIPC = dict(use_karras_sigmas=True, solver_type="bh2", final_sigmas_type="zero")
_LEADING = dict(timestep_spacing="leading", steps_offset=1, clip_sample=False)
_LINSPACE = dict(timestep_spacing="linspace")
PARITY = [
    # label, diffusers class, steps, ldmkit sampler, schedule, generator seed, sampler options, class config
    _case("euler", "EulerDiscreteScheduler", 10, "euler", "uniform", **_LINSPACE),
    _case("euler-25", "EulerDiscreteScheduler", 25, "euler", "uniform_linear", **_LINSPACE),
    _case("euler_a", "EulerAncestralDiscreteScheduler", 10, "euler_a", "uniform", seed=5, **_LINSPACE),
    _case("heun", "HeunDiscreteScheduler", 10, "heun", "uniform", **_LINSPACE),
    _case("dpm2", "KDPM2DiscreteScheduler", 10, "dpm2", "uniform", **_LINSPACE),
    _case("lms", "LMSDiscreteScheduler", 20, "lms", "uniform", **_LINSPACE),  # order 4 in both
    _case("dpmpp_2m", "DPMSolverMultistepScheduler", 20, "dpmpp_2m", "karras", algorithm_type="dpmsolver++", **_DPM),
    _case(
        "dpmpp_2m_sde", "DPMSolverMultistepScheduler", 20, "dpmpp_2m_sde", "karras", seed=3,
        algorithm_type="sde-dpmsolver++", **_DPM,
    ),
    _case("unipc", "UniPCMultistepScheduler", 20, "unipc", "karras", solver_order=2, **_UNIPC),
    _case("unipc-3", "UniPCMultistepScheduler", 20, "unipc", "karras", opts={"order": 3}, solver_order=3, **_UNIPC),
    _case("ddim", "DDIMScheduler", 50, "ddim", "ddim_uniform", set_alpha_to_one=True, **_LEADING),
    _case(
        "ddim-eta", "DDIMScheduler", 10, "ddim", "ddim_uniform", seed=4, opts={"eta": 0.7},
        set_alpha_to_one=True, **_LEADING,
    ),
    _case("ddim-sd-config", "DDIMScheduler", 50, "ddim", "ddim_to_sigma_min", set_alpha_to_one=False, **_LEADING),
    _case("ddpm", "DDPMScheduler", 50, "ddpm", "ddim_uniform", seed=4, variance_type="fixed_small", **_LEADING),
]  # fmt: skip
_K_SPACE = (
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "LMSDiscreteScheduler",
)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notices from inside diffusers
@pytest.mark.parametrize("cls,config,n,sampler,schedule,opts,seed", PARITY)
def test_parity_with_diffusers(cls, config, n, sampler, schedule, opts, seed):
    diffusers = pytest.importorskip("diffusers")
    sched = DiscreteSchedule.sd()
    if schedule == "uniform_linear":  # fractional t: diffusers interpolates sigma linearly
        sigmas = uniform(n, sched, interpolation="linear")
    elif schedule == "ddim_to_sigma_min":  # set_alpha_to_one=False stops at alpha_bar[0]
        sigmas = torch.cat([ddim_uniform(n, sched)[:-1], torch.tensor([sched.sigma_min], dtype=torch.float64)])
    else:
        sigmas = get_sigmas(schedule, n, sched)
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    step_kwargs = {"eta": opts["eta"]} if "eta" in opts else {}  # DDIMScheduler.step(eta=...)
    ref = _run_diffusers(getattr(diffusers, cls)(**SD_BETAS, **config), n, z, seed, **step_kwargs)

    vp = cls not in _K_SPACE
    # diffusers' VP schedulers start from unit-variance x_vp = x / sqrt(1 + sigma^2); the k-diffusion
    # ones (linspace spacing) from z * sigma_max. DPM-Solver/UniPC round Karras timesteps: quantize.
    x = z * (math.sqrt(1 + sigmas[0].item() ** 2) if vp else sigmas[0].item())
    denoiser = DiscreteDenoiser(fake_eps_net, sched, quantize=schedule == "karras")
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    out = S.SAMPLERS[sampler](denoiser, x, sigmas, generator=generator, **opts)
    if vp:  # back to diffusers' coordinates (a no-op at sigma = 0)
        out = out / math.sqrt(1 + sigmas[-1].item() ** 2)
    err = (out - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= 1e-5 * scale, f"max abs error {err:.2e} at output scale {scale:.1f}"


# -- denoisers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_discrete_denoiser_recovers_x0_from_oracle(prediction):
    sched = DiscreteSchedule.sd()
    x0 = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    t_train = torch.tensor([100, 700])
    sigma = sched.sigmas[t_train].float()
    x = x0 + sigma.reshape(-1, 1, 1, 1) * eps

    def oracle(x_in, t, context):
        ab = sched.alphas_cumprod[t.round().long()].float().reshape(-1, 1, 1, 1)
        torch.testing.assert_close(x_in, ab.sqrt() * x0 + (1 - ab).sqrt() * eps)  # c_in: back to x_vp
        return eps if prediction == "eps" else ab.sqrt() * eps - (1 - ab).sqrt() * x0

    torch.testing.assert_close(DiscreteDenoiser(oracle, sched, prediction)(x, sigma), x0, atol=1e-5, rtol=1e-5)


def test_cfg_batches_both_halves_in_one_call_with_c_concat():
    calls = []

    def net(x_in, t, context, flag=None):
        calls.append((tuple(x_in.shape), tuple(context.shape), flag))
        # depends on the context and on the concatenated channels
        return x_in[:, :4] * 0.1 + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1) + x_in[:, 4:].mean(1, keepdim=True)

    sched = DiscreteSchedule.sd()
    den = DiscreteDenoiser(net, sched)
    x = torch.randn(2, 4, 3, 3)
    cond, uncond = torch.randn(2, 5, 6), torch.randn(1, 5, 6)
    c_concat = torch.randn(2, 5, 3, 3)  # mask + masked-image latent of a 9-channel inpainting U-Net
    sigma = torch.tensor(3.0)

    out = CFGDenoiser(den, cond, uncond, 7.5, c_concat=c_concat, flag="k")(x, sigma)
    assert calls == [((4, 9, 3, 3), (4, 5, 6), "k")]
    d_c = den(x, sigma, context=cond, c_concat=c_concat, flag="k")
    d_u = den(x, sigma, context=uncond.expand(2, -1, -1), c_concat=c_concat, flag="k")
    torch.testing.assert_close(out, d_u + 7.5 * (d_c - d_u))

    calls.clear()
    torch.testing.assert_close(CFGDenoiser(den, cond, uncond, 1.0, c_concat=c_concat)(x, sigma), d_c)
    assert calls == [((2, 9, 3, 3), (2, 5, 6), None)]  # scale 1 skips the unconditional half
    with pytest.raises(ValueError, match="pad"):
        CFGDenoiser(den, cond, torch.randn(1, 7, 6), 5.0)


# -- registry -----------------------------------------------------------------------------------------


def test_resolve_sampler_names():
    assert S.resolve_sampler("DPM++ 2M Karras") == ("dpmpp_2m", S.sample_dpmpp_2m, "karras")
    assert S.resolve_sampler("Euler a") == ("euler_a", S.sample_euler_a, None)
    assert S.resolve_sampler("euler_a") == ("euler_a", S.sample_euler_a, None)
    assert S.resolve_sampler("  dpm++ 2m   sde exponential") == ("dpmpp_2m_sde", S.sample_dpmpp_2m_sde, "exponential")
    assert S.resolve_sampler("DPM++ SDE Karras")[::2] == ("dpmpp_sde", "karras")
    assert S.resolve_sampler("LMS SGM Uniform")[::2] == ("lms", "sgm_uniform")
    assert S.resolve_sampler("UniPC")[0] == "unipc"
    assert S.default_schedule("DPM++ 2M") == "karras" and S.default_schedule("DDIM") == "ddim_uniform"
    for bad in ("bogus", "euler karras karras", "DPM++ 2M Bogus"):
        with pytest.raises(ValueError, match="valid samplers.*dpmpp_2m"):
            S.resolve_sampler(bad)
    assert set(S.sampler_names()) == {
        "euler", "euler_a", "heun", "dpm2", "lms", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde", "ddim", "ddpm", "unipc",
        "lcm", "tcd", "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "dpm_fast", "dpm_adaptive", "restart", "plms",
    }  # fmt: skip
    assert "Euler a" in S.SAMPLERS and "DPM++ 2M" in S.SAMPLERS and "karras" in S.scheduler_names()
    x_T = _x_T(2)
    sigmas = karras(4, SIGMA_MIN, SIGMA_MAX)
    torch.testing.assert_close(
        S.sample(gaussian_denoiser, x_T, sigmas, "DPM++ 2M Karras"), S.sample_dpmpp_2m(gaussian_denoiser, x_T, sigmas)
    )
