"""Few-step sampling: LCM, TCD, trailing spacing, guidance-embedded LCM U-Nets, model-recommended settings.

References: diffusers' LCMScheduler, TCDScheduler and EulerDiscreteScheduler(timestep_spacing="trailing")
step for step on a fixed fake network (<= 1e-5), the same schedulers in diffusers' StableDiffusionPipeline
and LatentConsistencyModelPipeline on random tiny weights (<= 2/255 per pixel), and the closed-form
consistency function of Gaussian data.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from reference import save_diffusers_pipeline
from test_samplers import MU, S_DATA, SD_BETAS, _run_diffusers, fake_eps_net

from ldmkit import api, checkpoint, convert
from ldmkit import samplers as S
from ldmkit.cli import main
from ldmkit.config import TINY
from ldmkit.denoisers import DiscreteDenoiser
from ldmkit.infotext import parse_infotext, read_parameters
from ldmkit.model import StableDiffusion
from ldmkit.pipeline import GenerationError, GenerationParams, txt2img
from ldmkit.recommended import RECOMMENDED_METADATA_KEY, apply_recommended, recommended_metadata
from ldmkit.schedules import DiscreteSchedule, get_sigmas

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

# -- schedules ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 8, 16, 50])
def test_lcm_and_tcd_schedules_are_diffusers_timesteps(n):
    from diffusers import LCMScheduler, TCDScheduler

    sched = DiscreteSchedule.sd()
    t = sched.sigma_to_t(get_sigmas("lcm", n, sched)[:-1]).round().long()
    for cls in (LCMScheduler, TCDScheduler):
        ref = cls(**SD_BETAS)
        ref.set_timesteps(n)
        assert t.tolist() == ref.timesteps.tolist(), cls.__name__


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6, 8, 16, 25])
def test_trailing_schedule_is_diffusers_trailing(n):
    from diffusers import EulerDiscreteScheduler

    ref = EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="trailing")
    ref.set_timesteps(n)
    ours = get_sigmas("trailing", n, DiscreteSchedule.sd())
    assert ours.shape == (n + 1,)
    t = DiscreteSchedule.sd().sigma_to_t(ours[:-1]).round()
    assert t.tolist() == ref.timesteps.tolist()
    torch.testing.assert_close(ours.float(), ref.sigmas.float(), rtol=1e-5, atol=0)  # diffusers: float32 betas


def test_lcm_schedule_refuses_more_than_its_original_steps():
    with pytest.raises(ValueError, match="at most 50 steps"):
        get_sigmas("lcm", 51, DiscreteSchedule.sd())


# -- step-for-step parity on a fixed fake network ----------------------------------------------------------

PARITY = [
    # label, diffusers class, class config, steps, ldmkit sampler, schedule, sampler options
    ("lcm-1", "LCMScheduler", {}, 1, "lcm", "lcm", {}),
    ("lcm-4", "LCMScheduler", {}, 4, "lcm", "lcm", {}),
    ("lcm-8", "LCMScheduler", {}, 8, "lcm", "lcm", {}),
    ("lcm-50", "LCMScheduler", {}, 50, "lcm", "lcm", {}),
    ("tcd-4", "TCDScheduler", {}, 4, "tcd", "lcm", {"eta": 0.3}),
    ("tcd-8-g0", "TCDScheduler", {}, 8, "tcd", "lcm", {"eta": 0.0}),
    ("tcd-6-g0.7", "TCDScheduler", {}, 6, "tcd", "lcm", {"eta": 0.7}),
    ("tcd-3-g1", "TCDScheduler", {}, 3, "tcd", "lcm", {"eta": 1.0}),
    ("euler-trailing-1", "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, 1, "euler", "trailing", {}),
    ("euler-trailing-4", "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, 4, "euler", "trailing", {}),
    ("euler_a-trailing-4", "EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}, 4, "euler_a",
     "trailing", {}),
]  # fmt: skip
_VP = {"LCMScheduler", "TCDScheduler"}


@pytest.mark.parametrize("cls,config,n,sampler,schedule,opts", [pytest.param(*c[1:], id=c[0]) for c in PARITY])
def test_steps_match_diffusers(cls, config, n, sampler, schedule, opts):
    import diffusers

    sched = DiscreteSchedule.sd()
    sigmas = get_sigmas(schedule, n, sched)
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    ref = _run_diffusers(getattr(diffusers, cls)(**SD_BETAS, **config), n, z, seed=5, **opts)
    # LCM/TCD start from unit-variance VP noise (init_noise_sigma = 1), Euler from sigma_max * z
    x = z * (math.sqrt(1 + sigmas[0].item() ** 2) if cls in _VP else sigmas[0].item())
    out = S.SAMPLERS[sampler](DiscreteDenoiser(fake_eps_net, sched), x, sigmas,
                              generator=torch.Generator().manual_seed(5), **opts)
    err, scale = (out - ref).abs().max().item(), ref.abs().max().item()
    assert err <= 1e-5 * scale, f"max abs error {err:.2e} at output scale {scale:.2f}"


def test_tcd_rejects_gamma_outside_unit_interval():
    with pytest.raises(ValueError, match=r"gamma \(eta\) must be in \[0, 1\]"):
        S.sample_tcd(lambda x, s: x, torch.zeros(1, 2), torch.tensor([1.0, 0.0]), eta=1.5)


# -- analytic: the exact consistency function of Gaussian data ----------------------------------------------


def consistency_fn(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """f(x, sigma): where the probability-flow ODE from (x, sigma) lands at sigma = 0, for x0 ~ N(MU, S^2)."""
    s = sigma.reshape(-1, 1).double()
    return (MU + (x.double() - MU) * S_DATA / (S_DATA**2 + s**2).sqrt()).to(x.dtype)


def test_lcm_with_exact_consistency_function_samples_the_data():
    sigmas = get_sigmas("lcm", 4, DiscreteSchedule.sd())
    z = torch.randn(20000, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_t = z * math.sqrt(1 + sigmas[0].item() ** 2)
    # one step is the ODE's endpoint (c_skip(999) ~ 2.5e-9)
    one = S.sample_lcm(consistency_fn, x_t, torch.tensor([sigmas[0].item(), 0.0], dtype=torch.float64))
    exact = MU + (x_t - MU) * S_DATA / math.sqrt(S_DATA**2 + sigmas[0].item() ** 2)
    assert (one - exact).abs().max().item() < 1e-6
    # four steps with fresh noise: still samples of N(MU, S^2)
    out = S.sample_lcm(consistency_fn, x_t, sigmas, generator=torch.Generator().manual_seed(1))
    assert (out.mean(0) - MU).abs().max().item() < 0.02
    assert (out.std(0) - S_DATA).abs().max().item() < 0.02


# -- whole images against diffusers' pipelines -------------------------------------------------------------

SIZE, SEED, PROMPT = (24, 16), 77, "a red apple on a wooden table"
IMAGE_CASES = [
    # label, ldmkit sampler, schedule, steps, cfg, eta, diffusers scheduler, its config
    ("lcm-cfg1", "LCM", None, 4, 1.0, None, "LCMScheduler", {}),
    ("lcm-cfg2", "LCM", None, 2, 2.0, None, "LCMScheduler", {}),
    ("tcd-cfg1", "TCD", None, 4, 1.0, 0.3, "TCDScheduler", {}),
    ("tcd-cfg3", "TCD", None, 3, 3.0, 0.6, "TCDScheduler", {}),
    ("euler-trailing-cfg1", "Euler", "trailing", 1, 1.0, None, "EulerDiscreteScheduler",
     {"timestep_spacing": "trailing"}),
    ("euler-trailing-cfg5", "Euler", "trailing", 4, 5.0, None, "EulerDiscreteScheduler",
     {"timestep_spacing": "trailing"}),
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory, one_thread):
    folder = tmp_path_factory.mktemp("tiny-sd")
    pipe = save_diffusers_pipeline(TINY, folder)
    return folder, pipe


def _ref_image(pipe, steps, cfg, eta=None, **kw) -> np.ndarray:
    # ldmkit draws the starting noise from the seed and step noise from seed + 1: give diffusers the same
    g = torch.Generator().manual_seed(SEED)
    latents = torch.randn((1, 4, SIZE[1] // 2, SIZE[0] // 2), generator=g)
    if eta is not None:
        kw["eta"] = eta
    out = pipe(PROMPT, num_inference_steps=steps, guidance_scale=cfg, generator=torch.Generator().manual_seed(SEED + 1),
               height=SIZE[1], width=SIZE[0], output_type="np", latents=latents, **kw)
    return (out.images[0] * 255).round().astype(np.int16)


def _ours(model, **kw) -> np.ndarray:
    img = txt2img(model, GenerationParams(PROMPT, seed=SEED, width=SIZE[0], height=SIZE[1], **kw))[0]
    return np.asarray(img).astype(np.int16)


@pytest.mark.parametrize("sampler,schedule,steps,cfg,eta,cls,config", [pytest.param(*c[1:], id=c[0])
                                                                        for c in IMAGE_CASES])
def test_txt2img_matches_diffusers(tiny_pipeline, sampler, schedule, steps, cfg, eta, cls, config):
    import diffusers

    folder, pipe = tiny_pipeline
    pipe.scheduler = getattr(diffusers, cls)(**SD, **config)
    ref = _ref_image(pipe, steps, cfg, eta)
    ours = _ours(checkpoint.load(folder), sampler=sampler, scheduler=schedule, steps=steps, cfg_scale=cfg, eta=eta)
    diff = np.abs(ours - ref).max()
    assert diff <= 2, f"max pixel difference {diff}/255"
    assert ref.std() > 5  # not trivially flat


@pytest.fixture(scope="module")
def lcm_unet_pipeline(tmp_path_factory, one_thread):
    """A random tiny guidance-embedded U-Net (LCM_Dreamshaper_v7's architecture) in diffusers' LCM pipeline."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    cfg = TINY.replace(unet=dataclasses.replace(TINY.unet, time_cond_proj_dim=256))
    folder = tmp_path_factory.mktemp("tiny-lcm")
    sd_pipe = save_diffusers_pipeline(cfg, folder)
    lcm = LatentConsistencyModelPipeline(**{k: v for k, v in sd_pipe.components.items() if k != "image_encoder"})
    lcm.scheduler = LCMScheduler(**SD)
    return folder, lcm


@pytest.mark.parametrize("steps,cfg", [(4, 8.5), (2, 1.0)])
def test_guidance_embedded_unet_matches_lcm_pipeline(lcm_unet_pipeline, steps, cfg):
    folder, lcm = lcm_unet_pipeline
    model = checkpoint.load(folder)
    assert model.cfg.unet.time_cond_proj_dim == 256
    ref = _ref_image(lcm, steps, cfg)
    ours = _ours(model, sampler="LCM", steps=steps, cfg_scale=cfg)
    diff = np.abs(ours - ref).max()
    assert diff <= 2, f"max pixel difference {diff}/255"
    assert ref.std() > 5


def test_guidance_embedded_unet_single_file_roundtrip(lcm_unet_pipeline, tmp_path):
    from safetensors import safe_open

    folder, lcm = lcm_unet_pipeline
    model = checkpoint.load(folder)
    path = tmp_path / "lcm.safetensors"
    checkpoint.save_single_file(model, path)
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    # the name community LCM single files use (diffusers' name under the LDM U-Net prefix)
    assert "model.diffusion_model.time_embedding.cond_proj.weight" in keys
    # detected from the key alone, without ldmkit's stored config
    unet = {k.removeprefix(convert.UNET_PREFIX): v for k, v in model.unet.state_dict().items()}
    assert convert._unet_config_from_weights(
        {k: v for k, v in unet.items()}, "sd1").time_cond_proj_dim == 256
    again = checkpoint.load(path)
    torch.testing.assert_close(again.unet.time_embedding.cond_proj.weight, lcm.unet.time_embedding.cond_proj.weight)
    # a guidance-embedded model without stored recommendations implies LCM settings
    assert again.recommended is not None and again.recommended.sampler == "LCM"


def test_guidance_embedding_formula():
    """VDM's embedding of 1000 w (sin half, then cos), diffusers' get_guidance_scale_embedding."""
    from diffusers import LatentConsistencyModelPipeline

    from ldmkit.models.unet import guidance_embedding

    w = torch.tensor([0.0, 1.5, 7.5])
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=256)
    torch.testing.assert_close(guidance_embedding(w, 256), ref, rtol=1e-6, atol=1e-6)


# -- model-recommended settings ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recommending_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("rec") / "fast.safetensors"
    meta = recommended_metadata("LCM", 3, 1.5, scheduler="trailing")
    checkpoint.save_single_file(StableDiffusion(TINY), path, metadata=meta)
    return path


def test_recommended_metadata_roundtrip(recommending_file, tmp_path, capsys):
    meta = recommended_metadata("TCD", 4, 1.0)
    assert set(meta) == {RECOMMENDED_METADATA_KEY} and all(isinstance(v, str) for v in meta.values())
    rec = checkpoint.load(recommending_file).recommended
    assert (rec.sampler, rec.scheduler, rec.steps, rec.cfg_scale) == ("LCM", "trailing", 3, 1.5)
    assert main(["info", str(recommending_file)]) == 0
    assert '"sampler": "LCM"' in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown sampler"):
        recommended_metadata("Nope", 4, 1.0)
    with pytest.raises(ValueError, match="steps"):
        recommended_metadata("LCM", 0, 1.0)
    # the settings survive a re-save (ldmkit convert)
    model = checkpoint.load(recommending_file)
    checkpoint.save_single_file(model, tmp_path / "again.safetensors")
    assert checkpoint.load(tmp_path / "again.safetensors").recommended == rec


def test_recommended_settings_fill_only_what_is_not_given():
    from ldmkit.recommended import Recommended

    rec = Recommended(sampler="LCM", scheduler="lcm", steps=4, cfg_scale=1.0)
    assert apply_recommended({}, rec) == {"sampler": "LCM", "scheduler": "lcm", "steps": 4, "cfg_scale": 1.0}
    assert apply_recommended({"steps": 8, "cfg_scale": None}, rec)["steps"] == 8
    # another sampler than the recommended one keeps its own default schedule
    assert apply_recommended({"sampler": "Euler"}, rec) == {"sampler": "Euler", "steps": 4, "cfg_scale": 1.0}


def test_python_api_uses_recommended_settings(recommending_file):
    pipe = api.load(recommending_file, device="cpu")
    p = pipe._params("x", {})
    assert (p.sampler, p.scheduler, p.steps, p.cfg_scale) == ("LCM", "trailing", 3, 1.5)
    p = pipe._params("x", {"steps": 2, "cfg_scale": 4.0, "sampler": "Euler a"})
    assert (p.sampler, p.scheduler, p.steps, p.cfg_scale) == ("Euler a", None, 2, 4.0)


def test_cli_uses_recommended_settings_and_flags_override(recommending_file, tmp_path, capsys):
    out = tmp_path / "a.png"
    assert main(["generate", "x", "--model", str(recommending_file), "--width", "16", "--height", "16",
                 "--seed", "1", "-o", str(out)]) == 0
    p = parse_infotext(read_parameters(out))
    assert (p["Sampler"], p["Schedule type"], p["Steps"], p["CFG scale"]) == ("LCM", "Trailing", "3", "1.5")
    assert main(["generate", "x", "--model", str(recommending_file), "--width", "16", "--height", "16",
                 "--seed", "1", "--steps", "2", "--cfg-scale", "2", "--sampler", "Euler a", "-o", str(out)]) == 0
    p = parse_infotext(read_parameters(out))
    assert (p["Sampler"], p["Schedule type"], p["Steps"], p["CFG scale"]) == ("Euler a", "Uniform", "2", "2")


def test_cli_few_step_recipes_and_bad_gamma(recommending_file, tmp_path, capsys):
    plain = tmp_path / "plain.safetensors"
    checkpoint.save_single_file(StableDiffusion(TINY), plain)
    out = tmp_path / "turbo.png"
    # the SD-Turbo recipe of issue 12
    assert main(["generate", "a red apple", "--model", str(plain), "--sampler", "Euler a", "--scheduler",
                 "sgm_uniform", "--steps", "1", "--cfg-scale", "1", "--width", "16", "--height", "16",
                 "-o", str(out)]) == 0
    p = parse_infotext(read_parameters(out))
    assert (p["Sampler"], p["Schedule type"], p["Steps"]) == ("Euler a", "SGM Uniform", "1")
    # and the PNG's settings (display-name schedule included) reproduce it
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(out), "--model", str(plain), "-o", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    assert main(["generate", "a red apple", "--model", str(plain), "--sampler", "TCD", "--steps", "2", "--eta", "0.6",
                 "--width", "16", "--height", "16", "-o", str(out)]) == 0
    p = parse_infotext(read_parameters(out))
    assert (p["Sampler"], p["Schedule type"], p["Eta"]) == ("TCD", "LCM", "0.6")
    assert main(["generate", "--from-png", str(out), "--model", str(plain), "-o", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    capsys.readouterr()
    code = main(["generate", "a red apple", "--model", str(plain), "--sampler", "TCD", "--eta", "1.5",
                 "--width", "16", "--height", "16", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "gamma" in err and "[0, 1]" in err
    with pytest.raises(GenerationError, match="gamma"):
        txt2img(checkpoint.load(plain), GenerationParams("x", sampler="TCD", eta=-0.1, width=16, height=16))


def test_sampler_names_everywhere():
    assert S.resolve_sampler("LCM")[0] == "lcm" and S.resolve_sampler("tcd")[0] == "tcd"
    assert S.SAMPLER_DISPLAY_NAMES["lcm"] == "LCM" and S.SAMPLER_DISPLAY_NAMES["tcd"] == "TCD"
    assert S.default_schedule("LCM") == "lcm" and S.default_schedule("TCD") == "lcm"
    assert "trailing" in S.scheduler_names() and "lcm" in S.scheduler_names()


def test_server_lists_and_validates_few_step_samplers(tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from ldmkit.server.app import create_app

    torch.manual_seed(0)
    app = create_app(StableDiffusion(TINY), preview_interval=None, device="cpu")
    with TestClient(app) as client:
        assert {"LCM", "TCD"} <= {s["name"] for s in client.get("/sdapi/v1/samplers").json()}
        assert {"trailing", "lcm"} <= {s["name"] for s in client.get("/sdapi/v1/schedulers").json()}
        body = dict(prompt="a red apple", steps=2, width=16, height=16, seed=3, cfg_scale=1)
        r = client.post("/sdapi/v1/txt2img", json={**body, "sampler_name": "TCD", "eta": 1.5})
        assert r.status_code == 422 and "gamma" in r.text
        r = client.post("/sdapi/v1/txt2img", json={**body, "sampler_name": "LCM"})
        assert r.status_code == 200, r.text
        info = json.loads(r.json()["info"])
        assert info["sampler_name"] == "LCM" and "Sampler: LCM, Schedule type: LCM" in info["infotexts"][0]


def test_lora_recommendations_apply(recommending_file, tmp_path):
    """An LCM-LoRA written with recommended settings (as ``ldmkit train lcm`` exports it) brings them along."""
    from ldmkit.lora import inject_lora, save_lora

    torch.manual_seed(0)
    plain = tmp_path / "plain.safetensors"
    checkpoint.save_single_file(StableDiffusion(TINY), plain)
    lora = tmp_path / "lcm-lora.safetensors"
    save_lora(inject_lora(StableDiffusion(TINY), rank=2, alpha=2.0), lora,
              metadata=recommended_metadata("TCD", 2, 1.0))
    p = api.load(plain, device="cpu", loras=[(str(lora), 1.0)])._params("x", {})
    assert (p.sampler, p.steps, p.cfg_scale) == ("TCD", 2, 1.0)
    p = api.load(plain, device="cpu", loras=[(str(lora), 1.0)])._params("x", {"sampler": "Euler", "steps": 9})
    assert (p.sampler, p.steps, p.cfg_scale) == ("Euler", 9, 1.0)
    out = tmp_path / "o.png"
    assert main(["generate", "x", "--model", str(plain), "--lora", str(lora), "--width", "16", "--height", "16",
                 "-o", str(out)]) == 0
    info = parse_infotext(read_parameters(out))
    assert (info["Sampler"], info["Steps"], info["CFG scale"]) == ("TCD", "2", "1")
