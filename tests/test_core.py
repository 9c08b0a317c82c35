"""The generation core (ldmkit.core): every front-end takes one path, the sampler name is parsed once at
the edge, and the conditioning type carries SDXL's vector conditioning to the U-Net."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit import checkpoint, cli, core, samplers
from ldmkit import pipeline as P
from ldmkit.config import SD15, SD21, SDXL_BASE, TINY, TINY_SDXL
from ldmkit.denoisers import Conditioning
from ldmkit.explain import explain
from ldmkit.model import StableDiffusion
from ldmkit.models.unet import UNetModel, sdxl_vector
from ldmkit.sdxl import StableDiffusionXL

pytestmark = pytest.mark.usefixtures("one_thread")

W, H = 24, 16


@pytest.fixture(scope="module")
def model() -> StableDiffusion:
    torch.manual_seed(0)
    return StableDiffusion(TINY).eval()


@pytest.fixture(scope="module")
def tiny_file(model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("core") / "tiny.safetensors"
    checkpoint.save_single_file(model, path)
    return path


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M Karras", "LCM"])
def test_cli_and_explain_make_the_same_image(tiny_file, tmp_path, sampler, capsys):
    out = tmp_path / "cli.png"
    argv = ["generate", "a red apple", "--model", str(tiny_file), "--sampler", sampler, "--steps", "3",
            "--cfg-scale", "5", "--seed", "11", "--width", str(W), "--height", str(H), "--negative-prompt",
            "blurry", "--device", "cpu", "-o", str(out)]
    assert cli.main(argv) == 0
    capsys.readouterr()
    loaded = checkpoint.load(tiny_file)
    params = P.GenerationParams("a red apple", negative_prompt="blurry", steps=3, cfg_scale=5.0, sampler=sampler,
                                seed=11, width=W, height=H)
    ex = explain(loaded, params)
    with Image.open(out) as img:
        assert np.array_equal(_pixels(img), _pixels(ex.image))
        assert img.info["parameters"] == ex.image.info["parameters"]
    assert len(ex.steps) == 3


def test_inpainting_model_txt2img_is_the_same_everywhere(tmp_path):
    # explain used to build its own (differently sized) everything-masked conditioning
    torch.manual_seed(1)
    inp = StableDiffusion(TINY.replace(unet=TINY.unet.__class__(**{**TINY.unet.__dict__, "in_channels": 9}))).eval()
    params = P.GenerationParams("a pear", steps=2, sampler="Euler", seed=3, width=W, height=H)
    assert np.array_equal(_pixels(explain(inp, params).image), _pixels(P.txt2img(inp, params)[0]))


def test_eval_emoji_generates_through_the_core(model):
    spec = importlib.util.spec_from_file_location("eval_emoji", Path(__file__).parents[1] / "bench" / "eval_emoji.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    got = mod.generate(model, ["a red apple"], [5], steps=3, cfg_scale=5.0, size=16, sampler="DPM++ 2M")
    want = P.txt2img(model, P.GenerationParams("a red apple", steps=3, cfg_scale=5.0, seed=5, width=16, height=16))
    assert np.array_equal(_pixels(got[0]), _pixels(want[0]))


def test_sampler_name_is_resolved_once_at_the_edge(model, monkeypatch):
    calls = []
    real = samplers.resolve_sampler
    monkeypatch.setattr(samplers, "resolve_sampler", lambda name: calls.append(name) or real(name))
    params = P.GenerationParams("x", sampler="DPM++ 2M SDE Karras", steps=2, width=16, height=16, seed=1)
    assert calls == ["DPM++ 2M SDE Karras"]
    spec = params.sampler_spec
    assert (spec.name, spec.display, spec.schedule, spec.named_schedule) == ("dpmpp_2m_sde", "DPM++ 2M SDE",
                                                                           "karras", True)
    assert spec.takes_eta and not spec.vp_start and not spec.takes_schedule
    img = P.txt2img(model, params)[0]
    assert calls == ["DPM++ 2M SDE Karras"]  # validate, plan, sample and the infotext read the record
    assert "Sampler: DPM++ 2M SDE, Schedule type: Karras" in img.info["parameters"]


def test_bad_sampler_is_one_error_at_the_edge(tiny_file, capsys):
    with pytest.raises(P.GenerationError, match="unknown sampler 'Euler b'.*'Euler a'"):
        P.GenerationParams("x", sampler="Euler b")
    for command in ("generate", "explain"):
        assert cli.main([command, "x", "--model", str(tiny_file), "--sampler", "Euler b", "--steps", "1"]) == 2
        err = capsys.readouterr().err  # one line: no traceback, no progress bar begun
        assert err.count("\n") == 1 and err.startswith("ldmkit: error: unknown sampler 'Euler b'")


def test_sampler_records():
    lcm, ddim, euler = (samplers.sampler_spec(n) for n in ("LCM", "ddim", "k_euler"))
    assert (lcm.vp_start, lcm.takes_schedule, lcm.takes_eta, lcm.schedule) == (True, True, False, "lcm")
    assert (ddim.vp_start, ddim.takes_eta, ddim.schedule) == (True, True, "ddim_uniform")
    assert (euler.name, euler.vp_start, euler.takes_eta, euler.schedule) == ("euler", False, False, "uniform")
    s = torch.tensor(14.6)
    assert float(lcm.start_scale(s)) == pytest.approx(math.sqrt(14.6**2 + 1)) and euler.start_scale(s) is s
    tcd = samplers.sampler_spec("TCD")
    assert tcd.takes_eta and tcd.takes_schedule and tcd.vp_start


def test_native_size_lives_with_the_config():
    assert (SD15.native_size, SD21.native_size, SDXL_BASE.native_size) == (512, 768, 1024)
    assert TINY.replace(extra={"image_size": 64}).native_size == 64


def test_plan_truncates_for_img2img(model):
    p = core.plan(model, P.GenerationParams("x", steps=10, sampler="Euler"))
    q = p.truncate(0.6)
    assert len(q.sigmas) == 7 and torch.equal(q.sigmas, p.sigmas[4:]) and q.spec is p.spec


def test_conditioning_batches_and_checks():
    c = Conditioning(torch.randn(1, 5, 6), pooled=torch.randn(1, 3), ids=torch.tensor([[16.0, 24, 0, 0, 16, 24]]))
    both = Conditioning.cat([c.expand(2), c.expand(2)])
    assert both.context.shape == (4, 5, 6) and both.pooled.shape == (4, 3) and both.ids.shape == (4, 6)
    assert both.y.shape == (4, 3 + 6 * 256)
    assert set(Conditioning(torch.zeros(1, 5, 6)).unet_kwargs()) == {"context"}
    with pytest.raises(ValueError, match="both the pooled"):
        Conditioning(torch.zeros(1, 5, 6), pooled=torch.zeros(1, 3))
    with pytest.raises(ValueError, match="with and without pooled"):
        Conditioning.cat([c, Conditioning(torch.zeros(1, 5, 6))])


def test_sdxl_conditioning_reaches_the_unet():
    """A tiny SDXL through core.sample equals CFG Euler written out by hand with unet(..., y=sdxl_vector(...))."""
    torch.manual_seed(2)
    xl = StableDiffusionXL(TINY_SDXL).eval()
    xl.compute_dtype = None  # not in low-memory mode
    unet: UNetModel = xl.unet
    ctx, pooled = xl.encode(["a red apple", ""])
    ids = torch.tensor([[H, W, 0, 0, H, W]] * 2, dtype=torch.float32)  # original size, crop, target size
    cond = Conditioning(ctx[:1], pooled[:1], ids[:1])
    uncond = Conditioning(ctx[1:], pooled[1:], ids[1:])
    params = P.GenerationParams("unused", steps=3, sampler="Euler", cfg_scale=5.0, width=W, height=H, seed=0)
    plan = core.plan(xl, params)
    noise = torch.randn(1, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(4))
    got = core.sample(xl, plan, cond, uncond, noise)

    sched = core.model_schedule(xl)
    s = plan.sigmas.tolist()
    x = noise * s[0]
    y = torch.cat([sdxl_vector(pooled[1:], ids[1:]), sdxl_vector(pooled[:1], ids[:1])])
    with torch.inference_mode():
        for i in range(len(s) - 1):
            t = sched.sigma_to_t(torch.tensor([s[i]] * 2))
            eps = unet(torch.cat([x, x]) / math.sqrt(s[i] ** 2 + 1), t, torch.cat([ctx[1:], ctx[:1]]), y=y)
            d_u, d_c = (x - s[i] * eps).chunk(2)
            d = d_u + 5.0 * (d_c - d_u)
            x = x + (x - d) / s[i] * (s[i + 1] - s[i])
    torch.testing.assert_close(got, x, rtol=1e-4, atol=2e-4)  # float32 ordering; the ids change it by far more
    # and the ids matter: another target size is another image
    other = core.sample(xl, plan, cond.replace(ids=ids[:1] * 2), uncond.replace(ids=ids[1:] * 2), noise)
    assert (other - got).abs().max() > 1e-2


def test_deepcache_passes_sdxl_vector_conditioning():
    from ldmkit.deepcache import DeepCacheUNet

    torch.manual_seed(3)
    unet = UNetModel(TINY_SDXL.unet).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 500.0])
    ctx, y = torch.randn(2, 5, TINY_SDXL.unet.context_dim), torch.randn(2, TINY_SDXL.unet.adm_in_channels)
    with torch.inference_mode():
        assert torch.equal(DeepCacheUNet(unet, interval=1)(x, t, ctx, y=y), unet(x, t, ctx, y=y))
        shallow = []
        for y2 in (y, y * 0):  # the same full call, then a shallow call with another y
            cached = DeepCacheUNet(unet, interval=2)
            cached(x, t, ctx, y=y)
            shallow.append(cached(x, t, ctx, y=y2))
            assert cached.shallow_calls == 1
    assert (shallow[0] - shallow[1]).abs().max() > 1e-3  # the shallow branch reads y (time embedding) too


def test_api_server_and_cli_make_the_same_image(tiny_file, tmp_path, capsys):
    pytest.importorskip("fastapi")
    import base64
    import io

    from fastapi.testclient import TestClient

    from ldmkit import api
    from ldmkit.server.app import create_app

    settings = dict(negative_prompt="blurry", steps=3, cfg_scale=5.0, seed=21, width=W, height=H)
    ours = api.load(tiny_file, device="cpu").txt2img("a red apple", sampler="DPM++ 2M", scheduler="karras",
                                                     **settings)[0]
    out = tmp_path / "cli.png"
    assert cli.main(["generate", "a red apple", "--model", str(tiny_file), "--sampler", "DPM++ 2M Karras", "--steps",
                     "3", "--cfg-scale", "5", "--seed", "21", "--width", str(W), "--height", str(H),
                     "--negative-prompt", "blurry", "--device", "cpu", "-o", str(out)]) == 0
    capsys.readouterr()
    r = TestClient(create_app(tiny_file, device="cpu", preview_interval=0)).post(
        "/sdapi/v1/txt2img",
        json={**settings, "prompt": "a red apple", "sampler_name": "DPM++ 2M", "scheduler": "karras"})
    assert r.status_code == 200, r.text
    served = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    with Image.open(out) as from_cli:
        assert np.array_equal(_pixels(ours), _pixels(from_cli))
        assert np.array_equal(_pixels(ours), _pixels(served))
