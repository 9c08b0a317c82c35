"""DeepCache (Ma et al. 2023): the reference is the plain U-Net itself.

A full call must be bit-identical to ``UNetModel.forward``; a shallow call given the feature cached from
the same input must be too (the deep part it skips would have computed exactly that feature); with
interval 1 every sampler's output is torch.equal to sampling without the cache; with interval N the
deep part runs on calls 0, N, 2N, ... only.
"""

from __future__ import annotations

import base64
import dataclasses
import inspect
import io
import json

import pytest
import torch
from PIL import Image

from ldmkit import checkpoint
from ldmkit import pipeline as P
from ldmkit.api import Pipeline
from ldmkit.cli import main
from ldmkit.config import TINY
from ldmkit.deepcache import DeepCacheUNet, branches, unet_forward
from ldmkit.denoisers import CFGDenoiser, DiscreteDenoiser
from ldmkit.model import StableDiffusion
from ldmkit.models.unet import UNetModel, guidance_embedding
from ldmkit.samplers import default_schedule, resolve_sampler, sampler_names
from ldmkit.schedules import DiscreteSchedule, get_sigmas, sd_alphas_cumprod

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def unet() -> UNetModel:
    torch.manual_seed(0)
    return UNetModel(TINY.unet).eval()


@pytest.fixture(scope="module")
def tiny_model() -> StableDiffusion:
    torch.manual_seed(0)
    return StableDiffusion(TINY).eval()


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory, tiny_model):
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    checkpoint.save_single_file(tiny_model, path)
    return path


def _inputs(shape=(2, 4, 7, 5)):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g)
    # two text contexts whatever the batch: the samplers' tests use them as cond and uncond
    return x, torch.tensor([981.0, 37.5])[: shape[0]], torch.randn(max(2, shape[0]), 77, 32, generator=g)


@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (2, 4, 7, 5)])  # 7x5: odd sides take the upsample-to-size path
def test_full_and_shallow_calls_equal_the_unet_exactly(unet, shape):
    x, t, ctx = _inputs(shape)
    with torch.inference_mode():
        ref = unet(x, t, ctx)
        for b in range(branches(unet)):
            full, feature = unet_forward(unet, x, t, ctx, b)
            shallow, _ = unet_forward(unet, x, t, ctx, b, cached=feature)
            assert torch.equal(full, ref), f"branch {b}: full call differs from UNetModel.forward"
            assert torch.equal(shallow, ref), f"branch {b}: shallow call on its own cache differs"


def test_guidance_embedded_unet(unet):
    """Full LCM U-Nets take the guidance scale as an embedding; both calls pass it through."""
    torch.manual_seed(2)
    g_unet = UNetModel(dataclasses.replace(TINY.unet, time_cond_proj_dim=16)).eval()
    x, t, ctx = _inputs()
    w = guidance_embedding(torch.tensor([7.0, 3.0]), 16)
    with torch.inference_mode():
        ref = g_unet(x, t, ctx, guidance_emb=w)
        full, feature = unet_forward(g_unet, x, t, ctx, 1, guidance_emb=w)
        shallow, _ = unet_forward(g_unet, x, t, ctx, 1, cached=feature, guidance_emb=w)
        cached = DeepCacheUNet(g_unet, interval=2, branch=1)
        calls = [cached(x, t, ctx, guidance_emb=w) for _ in range(2)]
    assert torch.equal(full, ref) and torch.equal(shallow, ref)
    assert torch.equal(calls[0], ref) and torch.equal(calls[1], ref) and cached.shallow_calls == 1


def test_shallow_call_runs_only_the_branch(unet):
    """Branch b runs input blocks 0..b and the last b+1 output blocks; nothing deeper."""
    x, t, ctx = _inputs()
    n = branches(unet)
    ran: list[str] = []
    parts = {f"in{i}": m for i, m in enumerate(unet.input_blocks)}
    parts |= {f"out{i}": m for i, m in enumerate(unet.output_blocks)} | {"mid": unet.middle_block}
    hooks = [m.register_forward_hook(lambda *_, k=k: ran.append(k)) for k, m in parts.items()]
    try:
        for b in range(n):
            with torch.inference_mode():
                _, feature = unet_forward(unet, x, t, ctx, b)
                ran.clear()
                unet_forward(unet, x, t, ctx, b, cached=feature)
            assert ran == [f"in{i}" for i in range(b + 1)] + [f"out{j}" for j in range(n - 1 - b, n)]
    finally:
        for h in hooks:
            h.remove()


def _sample(net, name: str, x: torch.Tensor, ctx: torch.Tensor, steps: int = 4) -> torch.Tensor:
    sched = DiscreteSchedule(sd_alphas_cumprod(1000, 0.00085, 0.012))
    short, fn, suffix = resolve_sampler(name)
    sigmas = get_sigmas(suffix or default_schedule(short), steps, sched)
    den = CFGDenoiser(DiscreteDenoiser(net, sched), ctx[:1], ctx[1:], 5.0)
    kw = {"generator": torch.Generator().manual_seed(7)} if "generator" in inspect.signature(fn).parameters else {}
    with torch.inference_mode():
        return fn(den, x * P.start_scale(short, sigmas[0]), sigmas, **kw)


@pytest.mark.parametrize("name", sampler_names())
def test_interval_one_is_exact_for_every_sampler(unet, name):
    x, _, ctx = _inputs((1, 4, 8, 8))
    cached = DeepCacheUNet(unet, interval=1)
    out = _sample(cached, name, x, ctx)
    assert torch.equal(out, _sample(unet, name, x, ctx))
    assert cached.calls == cached.full_calls > 0 and cached.shallow_calls == 0


@pytest.mark.parametrize("name", ["Euler", "Heun", "DPM++ 2M"])
def test_interval_three_runs_the_deep_part_every_third_call(unet, name):
    x, _, ctx = _inputs((1, 4, 8, 8))
    calls: list[bool] = []  # per U-Net call: did the middle block run?
    h_mid = unet.middle_block.register_forward_hook(lambda *_: calls.__setitem__(-1, True))
    h_in = unet.input_blocks[0].register_forward_hook(lambda *_: calls.append(False))
    try:
        cached = DeepCacheUNet(unet, interval=3)
        _sample(cached, name, x, ctx, steps=7)
    finally:
        h_mid.remove()
        h_in.remove()
    assert len(calls) == cached.calls >= 7  # Heun calls twice per step
    assert calls == [i % 3 == 0 for i in range(len(calls))]
    assert cached.full_calls == sum(calls) and cached.shallow_calls == len(calls) - sum(calls)


def test_a_call_of_another_shape_runs_in_full(unet):
    cached = DeepCacheUNet(unet, interval=3)
    x, t, ctx = _inputs((2, 4, 8, 8))
    with torch.inference_mode():
        cached(x, t, ctx)
        out = cached(x[:1], t[:1], ctx[:1])  # call 1 would be shallow, but the cache is for batch 2
        assert torch.equal(out, unet(x[:1], t[:1], ctx[:1]))
    assert cached.full_calls == 2


def test_pipeline_threads_deepcache_and_records_it(tiny_model):
    """txt2img with deepcache=3: the deep part runs on steps 0, 3, 6 of 7; the infotext says so; each
    generation gets a fresh cache (a second run gives the same image)."""
    mids: list[int] = []
    hook = tiny_model.unet.middle_block.register_forward_hook(lambda *_: mids.append(1))
    try:
        params = P.GenerationParams("a red apple", steps=7, sampler="Euler", seed=3, width=16, height=16, deepcache=3)
        a = P.txt2img(tiny_model, params)[0]
        assert len(mids) == 3
        b = P.txt2img(tiny_model, params)[0]
        plain = P.txt2img(tiny_model, params.replace(deepcache=1))[0]
    finally:
        hook.remove()
    assert a.tobytes() == b.tobytes()
    assert len(mids) == 3 + 3 + 7
    assert "DeepCache: 3" in a.info["parameters"] and "DeepCache" not in plain.info["parameters"]
    branch2 = P.txt2img(tiny_model, params.replace(deepcache_branch=2))[0]
    assert "DeepCache: 3, DeepCache branch: 2" in branch2.info["parameters"]
    # the Python API takes the same options
    via_api = Pipeline(tiny_model).txt2img("a red apple", steps=7, sampler="Euler", seed=3, width=16, height=16,
                                           deepcache=3)[0]
    assert via_api.tobytes() == a.tobytes()


@pytest.mark.parametrize("interval, branch, match", [
    (0, 0, "deepcache interval must be an integer of at least 1"),
    (-3, 0, "deepcache interval must be an integer of at least 1"),
    (3, 4, "deepcache branch 4 is beyond this U-Net's depth: use 0 to 3"),
    (3, -1, "deepcache branch -1"),
])
def test_bad_settings_are_refused(tiny_model, interval, branch, match):
    params = P.GenerationParams("x", width=16, height=16, deepcache=interval, deepcache_branch=branch)
    with pytest.raises(P.GenerationError, match=match):
        P.validate(params, tiny_model)
    with pytest.raises(ValueError, match=match):
        DeepCacheUNet(tiny_model.unet, interval, branch)


def test_cli_flag_infotext_and_from_png(tiny_file, tmp_path, capsys):
    out = tmp_path / "a.png"
    argv = ["generate", "a red apple", "--model", str(tiny_file), "--steps", "4", "--width", "16", "--height", "16",
            "--seed", "5", "--deepcache", "3", "--deepcache-branch", "1", "-o", str(out)]
    assert main(argv) == 0
    text = Image.open(out).info["parameters"]
    assert "DeepCache: 3, DeepCache branch: 1" in text
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(out), "--model", str(tiny_file), "-o", str(again)]) == 0
    assert Image.open(again).tobytes() == Image.open(out).tobytes()
    assert "DeepCache: 3, DeepCache branch: 1" in Image.open(again).info["parameters"]
    capsys.readouterr()
    for bad, word in ((["--deepcache", "0"], "deepcache interval"), (["--deepcache", "-1"], "deepcache interval"),
                      (["--deepcache", "3", "--deepcache-branch", "9"], "deepcache branch 9"),
                      (["--deepcache-branch", "1"], "--deepcache-branch needs --deepcache")):
        code = main(["generate", "x", "--model", str(tiny_file), "--steps", "1", "--width", "16", "--height", "16",
                     "-o", str(tmp_path / "bad.png"), *bad])
        err = capsys.readouterr().err.strip()
        assert code == 2 and word in err and "\n" not in err and "Traceback" not in err, err


def test_server_override_and_options(tiny_model):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from ldmkit.server.app import create_app

    c = TestClient(create_app(tiny_model))
    body = {"prompt": "a red apple", "steps": 4, "width": 16, "height": 16, "seed": 5, "sampler_name": "Euler"}
    r = c.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"deepcache_interval": 3}})
    assert r.status_code == 200, r.text
    expected = P.txt2img(tiny_model, P.GenerationParams("a red apple", steps=4, sampler="Euler", seed=5, width=16,
                                                       height=16, deepcache=3))[0]
    got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert got.tobytes() == expected.tobytes()
    assert got.info["parameters"] == expected.info["parameters"] and "DeepCache: 3" in got.info["parameters"]
    assert json.loads(r.json()["info"])["extra_generation_params"]["DeepCache"] == 3
    for override, loc in (({"deepcache_interval": 0}, "deepcache_interval"),
                          ({"deepcache_interval": "3"}, "deepcache_interval"),
                          ({"deepcache_branch": 7}, "deepcache_branch")):
        r = c.post("/sdapi/v1/txt2img", json={**body, "override_settings": override})
        assert r.status_code == 422, r.text
        assert r.json()["detail"][0]["loc"][-2:] == ["override_settings", loc]
    assert c.post("/sdapi/v1/options", json={"deepcache_interval": 0}).status_code == 422
    assert c.get("/sdapi/v1/options").json()["deepcache_interval"] == 1
    assert c.post("/sdapi/v1/options", json={"deepcache_interval": 3}).status_code == 200
    r = c.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200 and "DeepCache: 3" in r.json()["info"]
