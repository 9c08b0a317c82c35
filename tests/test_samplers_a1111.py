"""A1111's remaining samplers (PLMS, DPM++ 2M SDE Heun, DPM++ 3M SDE, Restart, DPM fast, DPM adaptive) and
schedulers (simple, normal, beta, polyexponential, Align Your Steps, ...).

Evidence as in tests/test_samplers.py: closed-form convergence on a Gaussian denoiser, the data distribution
for stochastic samplers, diffusers' schedulers where one computes the same thing, and published formulas and
tables for the schedules.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_samplers import (
    MU,
    S_DATA,
    SD_BETAS,
    SIGMA_MAX,
    SIGMA_MIN,
    _run_diffusers,
    _x_T,
    assert_convergence_order,
    exact_flow,
    fake_eps_net,
    gaussian_denoiser,
)

from ldmkit import samplers as S
from ldmkit.denoisers import DiscreteDenoiser
from ldmkit.schedules import DiscreteSchedule, get_sigmas, karras

NEW_SAMPLERS = {
    # short name: (A1111 display name, default schedule, takes eta, starts from N(0, 1))
    "plms": ("PLMS", "ddim_uniform", False, True),
    "dpmpp_2m_sde_heun": ("DPM++ 2M SDE Heun", "exponential", True, False),
    "dpmpp_3m_sde": ("DPM++ 3M SDE", "exponential", True, False),
    "restart": ("Restart", "karras", False, False),
    "dpm_fast": ("DPM fast", "uniform", True, False),
    "dpm_adaptive": ("DPM adaptive", "uniform", True, False),
}


def _counting(model):
    calls = []

    def wrapped(x, sigma):
        calls.append(float(sigma[0]))
        return model(x, sigma)

    return wrapped, calls


# -- analytic: deterministic convergence ------------------------------------------------------------------

ORDER = [
    # name, options, step counts, min slope, max slope
    # PLMS's constant Adams-Bashforth weights assume equal steps: on a smoothly varying grid the weights are
    # off by O(h) relative, which leaves second order (k-diffusion-style LMS recomputes them: order 4).
    ("plms", {}, (32, 64), 1.8, 2.4),
    ("dpmpp_2m_sde_heun", {"eta": 0.0}, (32, 64), 1.85, 2.4),
    # k-diffusion's (and diffusers', and the DPM-Solver reference code's) 3M update weights the second
    # difference D2 by 0.5 - (e^-h - 1 + h)/h^2 = h/6 + O(h^2), half the exact integral h/3 + O(h^2), so it
    # is second order (with ~5x less error than 2M here, see below); doubling the weight measures 3.03. We
    # reproduce k-diffusion, as A1111 runs it.
    ("dpmpp_3m_sde", {"eta": 0.0}, (32, 64), 1.7, 2.3),
    ("dpm_fast", {"eta": 0.0}, (30, 60), 2.8, 3.8),  # third-order single steps
    ("restart", {}, (8, 16), 1.85, 2.5),  # below 20 steps Restart is Heun
]


@pytest.mark.parametrize("name,opts,ns,lo,hi", ORDER)
def test_new_sampler_convergence_order(name, opts, ns, lo, hi):
    assert_convergence_order(name, opts, ns, lo, hi)


@pytest.mark.parametrize("name,opts,tol", [
    ("plms", {}, 5e-3),
    ("dpmpp_2m_sde_heun", {"eta": 0.0}, 1e-2),
    ("dpmpp_3m_sde", {"eta": 0.0}, 2e-3),
    ("dpm_fast", {"eta": 0.0}, 1e-3),
    ("dpm_adaptive", {"eta": 0.0, "rtol": 1e-4, "atol": 1e-5}, 1e-3),
])  # fmt: skip
def test_new_sampler_reaches_exact_solution(name, opts, tol):
    x_T = _x_T()
    sigmas = karras(50, 0.002, SIGMA_MAX)
    out = S.SAMPLERS[name](gaussian_denoiser, x_T.float(), sigmas, **opts)  # production dtype
    assert out.dtype == torch.float32
    # DPM fast/adaptive stop at the smallest positive sigma, as k-diffusion's do
    end = 0.002 if name.startswith("dpm_") else 0.0
    err = (out.double() - exact_flow(x_T, SIGMA_MAX, end)).abs().max().item()
    assert err < tol, f"{name} {opts}: max error {err:.2e} >= {tol:.0e}"


def test_3m_is_more_accurate_than_2m():
    x_T = _x_T()
    sigmas = karras(32, SIGMA_MIN, SIGMA_MAX)[:-1]
    target = exact_flow(x_T, SIGMA_MAX, SIGMA_MIN)
    err_2m = (S.sample_dpmpp_2m(gaussian_denoiser, x_T, sigmas) - target).abs().max().item()
    err_3m = (S.sample_dpmpp_3m_sde(gaussian_denoiser, x_T, sigmas, eta=0.0) - target).abs().max().item()
    assert err_3m < err_2m / 3, (err_3m, err_2m)


def test_sde_samplers_at_eta_0_are_their_ode_solvers():
    x_T = _x_T(4)
    sigmas = karras(12, SIGMA_MIN, SIGMA_MAX)
    torch.testing.assert_close(
        S.sample_dpmpp_2m_sde_heun(gaussian_denoiser, x_T, sigmas, generator=torch.Generator().manual_seed(1)),
        S.sample_dpmpp_2m_sde(gaussian_denoiser, x_T, sigmas, generator=torch.Generator().manual_seed(1),
                              solver_type="heun"),
    )
    # 3M's warm-up steps are first order, then the exponential-integrator (phi_2, "heun") 2M step: on 2 steps
    # + the final jump to 0 it is 2M SDE Heun at eta = 0 exactly
    short = karras(3, SIGMA_MIN, SIGMA_MAX)
    torch.testing.assert_close(S.sample_dpmpp_3m_sde(gaussian_denoiser, x_T, short, eta=0.0),
                               S.sample_dpmpp_2m_sde_heun(gaussian_denoiser, x_T, short, eta=0.0))


def test_dpm_fast_spends_exactly_n_model_calls():
    x_T = _x_T(2)
    for n in (1, 2, 3, 4, 5, 9, 10):
        model, calls = _counting(gaussian_denoiser)
        S.sample_dpm_fast(model, x_T, karras(n, SIGMA_MIN, SIGMA_MAX), eta=0.0)
        assert len(calls) == n, (n, len(calls))
        assert calls[0] == pytest.approx(SIGMA_MAX)


def test_dpm_adaptive_tolerance_buys_accuracy_with_model_calls():
    x_T = _x_T()
    sigmas = karras(20, SIGMA_MIN, SIGMA_MAX)
    target = exact_flow(x_T, SIGMA_MAX, SIGMA_MIN)
    results = []
    for rtol, atol in ((0.05, 0.0078), (1e-3, 1e-4), (1e-5, 1e-6)):
        model, calls = _counting(gaussian_denoiser)
        out = S.sample_dpm_adaptive(model, x_T, sigmas, eta=0.0, rtol=rtol, atol=atol)
        results.append(((out - target).abs().max().item(), len(calls)))
    errs, nfes = zip(*results, strict=True)
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-4, results
    assert nfes[0] < nfes[1] < nfes[2] and all(n % 3 == 0 for n in nfes), results  # 3 calls per try at order 3
    model, calls = _counting(gaussian_denoiser)
    S.sample_dpm_adaptive(model, x_T, sigmas, eta=0.0, order=2)
    assert len(calls) % 2 == 0
    seen = []
    S.sample_dpm_adaptive(gaussian_denoiser, x_T, sigmas, eta=0.0, callback=seen.append)
    steps = [d["i"] for d in seen]
    assert steps == sorted(steps) and 0 <= steps[0] and steps[-1] <= 19  # progress mapped onto 20 steps
    with pytest.raises(ValueError, match="order must be 2 or 3"):
        S.sample_dpm_adaptive(gaussian_denoiser, x_T, sigmas, order=4)


# -- Restart (A1111 sd_samplers_extra.restart_sampler) ---------------------------------------------------


def test_restart_below_20_steps_is_heun():
    x_T = _x_T(4)
    sigmas = karras(19, SIGMA_MIN, SIGMA_MAX)
    torch.testing.assert_close(S.sample_restart(gaussian_denoiser, x_T, sigmas),
                               S.sample_heun(gaussian_denoiser, x_T, sigmas))


@pytest.mark.parametrize("steps,k,times", [(20, 9, 1), (35, 9, 1), (36, 9, 2), (50, 12, 2)])
def test_restart_step_list_follows_a1111(steps, k, times):
    sched = DiscreteSchedule.sd()
    sigmas = get_sigmas("karras", steps, sched).tolist()
    plan = S.restart_steps(sigmas)
    assert len(plan) == steps  # the restarts are paid for by a shorter main schedule
    main = karras(steps - k * times, sigmas[-2], sigmas[0]).tolist()
    lo = min(range(len(main)), key=lambda j: abs(main[j] - 0.1))
    hi = min(range(len(main)), key=lambda j: abs(main[j] - 2.0))
    restart = karras(k + 1, main[lo], main[hi]).tolist()[:-1]
    assert plan[:lo] == list(zip(main[:lo], main[1:lo + 1], strict=True))
    for r in range(times):  # each restart jumps back up to sigma ~ 2 and comes down to sigma ~ 0.1 in k steps
        seg = plan[lo + r * k: lo + (r + 1) * k]
        assert seg == list(zip(restart[:-1], restart[1:], strict=True))
        assert seg[0][0] == pytest.approx(main[hi]) and seg[-1][1] == pytest.approx(main[lo])
    assert plan[lo + times * k:] == list(zip(main[lo:-1], main[lo + 1:], strict=True))
    # model calls: Heun (2 per step) except the last step to 0 (Euler)
    model, calls = _counting(gaussian_denoiser)
    S.sample_restart(model, _x_T(2), torch.tensor(sigmas), generator=torch.Generator().manual_seed(0))
    assert len(calls) == 2 * steps - 1


# -- analytic: stochastic samplers reproduce the data distribution -------------------------------------------

STOCHASTIC = [
    ("dpmpp_2m_sde_heun", {}, karras, 100),
    ("dpmpp_3m_sde", {}, karras, 100),
    ("restart", {}, karras, 40),  # two restarts
    ("dpm_fast", {}, karras, 60),  # eta = 1: ancestral noise after each step
    ("dpm_adaptive", {}, karras, 20),
]


@pytest.mark.parametrize("name,opts,schedule,steps", STOCHASTIC)
def test_new_stochastic_sampler_matches_data_distribution(name, opts, schedule, steps):
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(8192, 8, generator=g) * SIGMA_MAX
    out = S.SAMPLERS[name](gaussian_denoiser, x_T, schedule(steps, SIGMA_MIN, SIGMA_MAX), generator=g, **opts)
    if name.startswith("dpm_"):  # they return x at sigma_min: data std sqrt(s^2 + sigma_min^2)
        out = MU + (out.double() - MU) * (S_DATA / math.sqrt(S_DATA**2 + SIGMA_MIN**2))
    mean, std = out.double().mean(0), out.double().std(0)
    assert (mean - MU).abs().max() < 0.03, mean
    assert abs(std.mean().item() - S_DATA) < 0.012, std
    assert (std - S_DATA).abs().max() < 0.025, std


@pytest.mark.parametrize("name", ["dpmpp_2m_sde_heun", "dpmpp_3m_sde", "restart", "dpm_fast", "dpm_adaptive"])
def test_new_stochastic_sampler_is_seeded(name):
    x_T = _x_T(4).float()
    sigmas = karras(24, SIGMA_MIN, SIGMA_MAX)  # Restart restarts from 20 steps

    def run(seed):
        return S.SAMPLERS[name](gaussian_denoiser, x_T, sigmas, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(7), run(7))
    assert (run(7) - run(8)).abs().max() > 1e-3


# -- parity with diffusers ---------------------------------------------------------------------------------


def _parity(cls_name, config, n, sampler, sigmas, opts=None, seed=None):
    """diffusers' VP scheduler vs our sampler started from the same unit noise (DPM-Solver rounds Karras t)."""
    diffusers = pytest.importorskip("diffusers")
    sched = DiscreteSchedule.sd()
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    ref = _run_diffusers(getattr(diffusers, cls_name)(**SD_BETAS, **config), n, z, seed)
    x = z * math.sqrt(1 + sigmas[0].item() ** 2)
    denoiser = DiscreteDenoiser(fake_eps_net, sched, quantize=cls_name == "DPMSolverMultistepScheduler")
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    out = S.SAMPLERS[sampler](denoiser, x, sigmas, generator=generator, **(opts or {}))
    err = (out - ref).abs().max().item()
    assert err <= 1e-5 * ref.abs().max().item(), f"max abs error {err:.2e}"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_plms_matches_diffusers_pndm():
    # PNDMScheduler(skip_prk_steps=True) is CompVis' PLMS: n + 1 model calls, the pseudo improved Euler first
    n = 20
    sigmas = get_sigmas("ddim_uniform", n, DiscreteSchedule.sd())
    _parity("PNDMScheduler", dict(skip_prk_steps=True, set_alpha_to_one=True, steps_offset=1,
                                  timestep_spacing="leading"), n, "plms", sigmas)


_DPM3 = dict(use_karras_sigmas=True, final_sigmas_type="zero")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_dpmpp_3m_sde_at_eta_0_matches_diffusers_dpmsolver_3():
    # diffusers' third-order sde-dpmsolver++ uses a different D2 weight than k-diffusion's (the 0.5 has the
    # other sign), so the SDE itself has no diffusers counterpart; at eta = 0 both are DPM-Solver++(3M).
    # n >= 15: diffusers keeps order 3 up to the last step, which is first order (to sigma 0) in both; the
    # second (warm-up) step is the phi_2 ("heun") second-order update in k-diffusion
    n = 20
    sigmas = get_sigmas("karras", n, DiscreteSchedule.sd())
    config = dict(algorithm_type="dpmsolver++", solver_order=3, solver_type="heun", **_DPM3)
    _parity("DPMSolverMultistepScheduler", config, n, "dpmpp_3m_sde", sigmas, opts={"eta": 0.0})


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_dpmpp_2m_sde_heun_matches_diffusers():
    n = 20
    sigmas = get_sigmas("karras", n, DiscreteSchedule.sd())
    _parity("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++", solver_order=2,
                                                solver_type="heun", **_DPM3), n,
            "dpmpp_2m_sde_heun", sigmas, seed=3)


# -- registry -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("short", list(NEW_SAMPLERS))
def test_new_sampler_registry(short):
    display, schedule, takes_eta, vp = NEW_SAMPLERS[short]
    for name in (short, display, display.upper()):
        spec = S.sampler_spec(name)
        assert (spec.name, spec.display, spec.schedule, spec.takes_eta, spec.vp_start) == (
            short, display, schedule, takes_eta, vp)
        assert not spec.named_schedule and not spec.takes_schedule
    spec = S.sampler_spec(f"{display} Karras")
    assert spec.name == short and spec.schedule == "karras" and spec.named_schedule


def test_a1111_aliases():
    for alias, short in [("k_dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun"), ("k_dpmpp_3m_sde", "dpmpp_3m_sde"),
                         ("k_dpm_fast", "dpm_fast"), ("k_dpm_ad", "dpm_adaptive"), ("restart", "restart"),
                         ("plms", "plms")]:
        assert S.resolve_sampler(alias)[0] == short


# -- schedules (A1111 modules/sd_schedulers.py, k-diffusion get_sigmas_polyexponential) -----------------------

SD = DiscreteSchedule.sd()


def test_simple_and_normal_schedules():
    # Simple: training sigmas at t = T - 1 - floor(i * T / n)
    torch.testing.assert_close(get_sigmas("simple", 4, SD), torch.cat([SD.sigmas[[999, 749, 499, 249]],
                                                                       torch.zeros(1, dtype=torch.float64)]))
    torch.testing.assert_close(get_sigmas("Simple", 3, SD)[:-1], SD.sigmas[[999, 666, 333]])
    # Normal: t = linspace(t(sigma_max), t(sigma_min), n) = linspace(999, 0, n), i.e. Uniform
    torch.testing.assert_close(get_sigmas("normal", 4, SD)[:-1], SD.sigmas[[999, 666, 333, 0]])
    torch.testing.assert_close(get_sigmas("normal", 25, SD), get_sigmas("uniform", 25, SD))


def test_polyexponential_schedule():
    from ldmkit.schedules import exponential, polyexponential

    torch.testing.assert_close(get_sigmas("polyexponential", 9, SD), exponential(9, SD.sigma_min, SD.sigma_max))
    sig = polyexponential(5, 0.1, 10.0, rho=2.0)
    ramp = torch.tensor([1, 0.75, 0.5, 0.25, 0], dtype=torch.float64) ** 2
    torch.testing.assert_close(sig[:-1], 0.1 * (10.0 / 0.1) ** ramp)


def test_beta_quantile_closed_forms_and_scipy():
    from ldmkit.schedules import beta, beta_ppf

    p = [0.0, 0.01, 0.2, 0.5, 0.77, 0.999, 1.0]
    # Beta(1, 1) is uniform; Beta(1/2, 1/2) is the arcsine law, ppf = sin^2(pi p / 2); Beta(a, 1): p^(1/a)
    for q in p:
        assert beta_ppf(q, 1.0, 1.0) == pytest.approx(q, abs=1e-14)
        assert beta_ppf(q, 0.5, 0.5) == pytest.approx(math.sin(math.pi * q / 2) ** 2, abs=1e-14)
        assert beta_ppf(q, 3.0, 1.0) == pytest.approx(q ** (1 / 3), abs=1e-14)
    # A1111: sigma_min + ppf(1 - linspace(0, 1, n), 0.6, 0.6) * (sigma_max - sigma_min), then 0
    stats = pytest.importorskip("scipy.stats")
    n = 10
    expected = [SD.sigma_min + stats.beta.ppf(1 - v, 0.6, 0.6) * (SD.sigma_max - SD.sigma_min)
                for v in torch.linspace(0, 1, n, dtype=torch.float64).tolist()]
    torch.testing.assert_close(get_sigmas("beta", n, SD), torch.tensor([*expected, 0.0], dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
    arcsine = beta(5, 0.1, 10.0, alpha=0.5, beta=0.5)[:-1]
    torch.testing.assert_close(arcsine, torch.tensor([0.1 + math.sin(math.pi * (1 - i / 4) / 2) ** 2 * 9.9
                                                      for i in range(5)], dtype=torch.float64))
    with pytest.raises(ValueError, match="alpha and beta must be > 0"):
        beta(5, 0.1, 10.0, alpha=0.0)


AYS_SD1 = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
AYS_SDXL = [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029]


def test_align_your_steps_tables():
    # NVIDIA's published values (AYS how-to page, as A1111's sd_schedulers.py ships them); A1111 takes the table
    # as-is at n = 11 and appends 0
    assert get_sigmas("align_your_steps", 11, SD).tolist() == [*AYS_SD1, 0.0]
    assert get_sigmas("Align Your Steps", 11, SD, sdxl=True).tolist() == [*AYS_SDXL, 0.0]
    # other n: log-linear interpolation at evenly spaced positions. n = 21 puts every other point on the table
    # and the ones between at geometric means of their neighbours.
    for table, sdxl in ((AYS_SD1, False), (AYS_SDXL, True)):
        sig = get_sigmas("align_your_steps", 21, SD, sdxl=sdxl)
        assert sig[-1] == 0 and len(sig) == 22
        torch.testing.assert_close(sig[0:21:2], torch.tensor(table, dtype=torch.float64), rtol=1e-12, atol=0)
        geo = [math.sqrt(a * b) for a, b in zip(table[:-1], table[1:], strict=True)]
        torch.testing.assert_close(sig[1:21:2], torch.tensor(geo, dtype=torch.float64), rtol=1e-12, atol=0)
    # n = 10: position j/9 falls at table index 10 j / 9
    sig = get_sigmas("align_your_steps", 10, SD)
    for j in range(10):
        pos = 10 * j / 9
        k = min(int(pos), 9)
        w = pos - k
        expected = math.exp((1 - w) * math.log(AYS_SD1[k]) + w * math.log(AYS_SD1[k + 1]))
        assert sig[j].item() == pytest.approx(expected, rel=1e-12)


def test_generation_plan_picks_the_ays_table_of_the_model_family():
    from types import SimpleNamespace

    from ldmkit import core
    from ldmkit import pipeline as P
    from ldmkit.config import TINY, TINY_SDXL

    params = P.GenerationParams("x", sampler="Euler", scheduler="align_your_steps", steps=11)
    for cfg, table in ((TINY, AYS_SD1), (TINY_SDXL, AYS_SDXL)):
        plan = core.plan(SimpleNamespace(cfg=cfg), params)
        assert plan.sigmas.tolist() == [*table, 0.0]
        assert plan.infotext_names == ("Euler", "Align Your Steps")



def test_plan_discards_the_penultimate_sigma_where_a1111_does():
    from types import SimpleNamespace

    from ldmkit import core
    from ldmkit import pipeline as P
    from ldmkit.config import TINY

    model = SimpleNamespace(cfg=TINY)
    for sampler, schedule in (("DPM++ 3M SDE", "exponential"), ("DPM2", "karras")):
        plan = core.plan(model, P.GenerationParams("x", sampler=sampler, steps=10))
        full = get_sigmas(schedule, 11, SD)  # A1111: steps + 1, then the next-to-last dropped
        assert plan.schedule == schedule and len(plan.sigmas) == 11
        torch.testing.assert_close(plan.sigmas, torch.cat([full[:-2], full[-1:]]))
        assert S.sampler_spec(sampler).discard_penultimate
    for sampler in ("DPM++ 2M SDE", "Euler", "PLMS", "DPM++ 2M SDE Heun"):
        plan = core.plan(model, P.GenerationParams("x", sampler=sampler, steps=10))
        torch.testing.assert_close(plan.sigmas, get_sigmas(plan.schedule, 10, SD))

# -- front ends: CLI and the A1111 server accept the new names -------------------------------------------------

NEW_SCHEDULES = {"simple": "Simple", "normal": "Normal", "beta": "Beta", "polyexponential": "Polyexponential",
                 "align_your_steps": "Align Your Steps", "sgm_uniform": "SGM Uniform", "ddim_uniform": "DDIM"}


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    from ldmkit import checkpoint
    from ldmkit.config import TINY
    from ldmkit.model import StableDiffusion

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("a1111") / "tiny.safetensors"
    checkpoint.save_single_file(StableDiffusion(TINY).eval(), path)
    return path


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("sampler,scheduler", [("DPM++ 3M SDE", "beta"), ("PLMS", None), ("Restart", "simple"),
                                               ("DPM adaptive", None), ("DPM++ 2M SDE Heun", "Align Your Steps")])
def test_cli_generates_with_new_samplers_and_schedulers(tiny_file, tmp_path, sampler, scheduler, capsys):
    from PIL import Image

    from ldmkit import cli

    out = tmp_path / "out.png"
    argv = ["generate", "a red apple", "--model", str(tiny_file), "--sampler", sampler, "--steps", "3", "--seed", "5",
            "--width", "16", "--height", "16", "--device", "cpu", "-o", str(out)]
    argv += ["--scheduler", scheduler] if scheduler else []
    assert cli.main(argv) == 0, capsys.readouterr().err
    with Image.open(out) as img:
        info = img.info["parameters"]
        assert f"Sampler: {sampler}," in info
        if scheduler:
            label = NEW_SCHEDULES.get(scheduler, scheduler)
            assert f"Schedule type: {label}" in info
        assert np.asarray(img.convert("RGB")).std() > 0  # not a blank image


@pytest.mark.usefixtures("one_thread")
def test_server_lists_and_runs_new_samplers_and_schedulers(tiny_file):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from ldmkit.server.app import create_app

    with TestClient(create_app(tiny_file, device="cpu", preview_interval=0)) as client:
        samplers = {s["name"]: s for s in client.get("/sdapi/v1/samplers").json()}
        assert {display for display, *_ in NEW_SAMPLERS.values()} <= set(samplers)
        assert "k_dpm_ad" in samplers["DPM adaptive"]["aliases"]
        listed = {s["name"]: s for s in client.get("/sdapi/v1/schedulers").json()}
        assert {k: listed[k]["label"] for k in NEW_SCHEDULES if k in listed} == NEW_SCHEDULES
        assert (listed["karras"]["default_rho"], listed["polyexponential"]["default_rho"]) == (7.0, 1.0)  # A1111's
        body = dict(prompt="a red apple", steps=2, width=16, height=16, seed=3)
        for sampler, scheduler in (("DPM++ 3M SDE", "beta"), ("PLMS", "automatic"), ("DPM fast", "Polyexponential")):
            r = client.post("/sdapi/v1/txt2img", json={**body, "sampler_name": sampler, "scheduler": scheduler})
            assert r.status_code == 200, r.text
            assert f"Sampler: {sampler}," in r.json()["info"]
        r = client.post("/sdapi/v1/txt2img", json={**body, "sampler_name": "Euler", "scheduler": "bogus"})
        assert r.status_code == 422 and "align_your_steps" in r.text
