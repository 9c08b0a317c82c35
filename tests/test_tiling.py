"""Tiling (seamless textures, A1111's "Tiling"): circular padding in the U-Net and VAE for one generation.

Checks against closed forms and references: a circular conv equals the plain conv of a wrap-padded input;
with every conv circular, the whole generation commutes with a circular shift of the starting noise (the
image wraps: shifting the noise by k latent pixels shifts the image by k x 2 pixels, edge columns included),
which zero padding breaks; diffusers with every Conv2d set to padding_mode='circular' draws the same image;
the model is bit-for-bit unchanged afterwards, also after an error.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import save_diffusers_pipeline
from torch import nn

from ldmkit import checkpoint, tiling
from ldmkit import pipeline as P
from ldmkit.config import TINY
from ldmkit.model import StableDiffusion

pytestmark = pytest.mark.usefixtures("one_thread")
W, H = 24, 16  # image size; latent 12 x 8 (the tiny VAE downscales by 2, the tiny U-Net downsamples once)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return StableDiffusion(TINY).eval()


def _modes(model) -> list[str]:
    return [m.padding_mode for net in (model.unet, model.vae) for m in net.modules() if isinstance(m, nn.Conv2d)]


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _params(**kw) -> P.GenerationParams:
    return P.GenerationParams("a tiled floor", steps=4, sampler="Euler", cfg_scale=5.0, seed=3, width=W, height=H,
                              **kw)


def test_circular_conv_is_conv_of_wrapped_input(model):
    """Every padded conv of the U-Net and VAE, inside ``circular``: conv(x) == conv2d(wrap_pad(x)) exactly."""
    g = torch.Generator().manual_seed(0)
    checked = 0
    with tiling.circular(model):
        for m in [*model.unet.modules(), *model.vae.modules()]:
            if not isinstance(m, nn.Conv2d) or m.padding == (0, 0):
                continue
            x = torch.randn(1, m.in_channels, 6, 10, generator=g)
            ph, pw = m.padding
            wrapped = torch.cat([x[..., -pw:], x, x[..., :pw]], dim=-1)  # columns wrap...
            wrapped = torch.cat([wrapped[..., -ph:, :], wrapped, wrapped[..., :ph, :]], dim=-2)  # ...and rows
            ref = F.conv2d(wrapped, m.weight, m.bias, m.stride, 0, m.dilation, m.groups)
            with torch.no_grad():
                assert torch.equal(m(x), ref)
            checked += 1
    assert checked > 10
    assert set(_modes(model)) == {"zeros"}


def test_image_wraps_around(model, monkeypatch):
    """Noise rolled by k latent pixels -> the same image rolled by 2k pixels (the edges continue each other);
    without tiling the zero-padded borders make the two differ."""
    shift = 2  # a multiple of the U-Net's downsampling, so every level's grid shifts by whole pixels
    draw = P.initial_noise

    def rolled(seeds, shape, device):
        return torch.roll(draw(seeds, shape, device), shifts=(shift, shift), dims=(-2, -1))

    def images(tiled: bool) -> tuple[np.ndarray, np.ndarray]:
        a = np.asarray(P.txt2img(model, _params(tiling=tiled))[0]).astype(np.int16)
        with monkeypatch.context() as m:
            m.setattr(P, "initial_noise", rolled)
            b = np.asarray(P.txt2img(model, _params(tiling=tiled))[0]).astype(np.int16)
        return np.roll(a, (2 * shift, 2 * shift), axis=(0, 1)), b

    a, b = images(True)
    assert a.std() > 5  # not a flat image
    assert np.abs(a - b).max() <= 1, np.abs(a - b).max()
    a, b = images(False)
    assert np.abs(a - b).max() > 20  # zero padding: the borders do not wrap


def test_model_unchanged_after_generation_and_error(model):
    before, modes = _state(model), _modes(model)
    img = P.txt2img(model, _params(tiling=True))[0]
    assert "Tiling: True" in img.info["parameters"]
    assert "Tiling" not in P.txt2img(model, _params())[0].info["parameters"]

    def boom(d: dict) -> None:
        assert _modes(model) == ["circular"] * len(modes)  # circular while it runs
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        P.txt2img(model, _params(tiling=True), callback=boom)
    init = img.convert("RGB")
    P.img2img(model, _params(tiling=True, strength=0.5), init)
    after = _state(model)
    assert _modes(model) == modes == ["zeros"] * len(modes)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_nested_circular_restores_outer_state(model):
    with tiling.circular(model):
        with tiling.circular(model, False):
            assert set(_modes(model)) == {"circular"}
        with tiling.circular(model):
            pass
        assert set(_modes(model)) == {"circular"}
    assert set(_modes(model)) == {"zeros"}


def test_matches_diffusers_with_circular_convs(tmp_path):
    """diffusers' pipeline with every Conv2d set to padding_mode='circular' (what A1111 does) == ldmkit's tiling."""
    pipe = save_diffusers_pipeline(TINY, tmp_path)
    for net in (pipe.unet, pipe.vae):
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.padding_mode = "circular"
    model = checkpoint.load(tmp_path)
    params = _params(tiling=True, negative_prompt="blurry")
    out = pipe(params.prompt, negative_prompt=params.negative_prompt, num_inference_steps=params.steps,
               guidance_scale=params.cfg_scale, generator=torch.Generator().manual_seed(params.seed), height=H,
               width=W, output_type="np")
    ref = (out.images[0] * 255).round().astype(np.int16)
    ours = np.asarray(P.txt2img(model, params)[0]).astype(np.int16)
    plain = np.asarray(P.txt2img(model, params.replace(tiling=False))[0]).astype(np.int16)
    assert np.abs(ours - ref).max() <= 2, np.abs(ours - ref).max()
    assert np.abs(plain - ref).max() > 10  # the comparison can tell tiling from no tiling
    assert ref.std() > 5


def test_cli_tiling_and_from_png(tmp_path, model):
    from ldmkit import cli
    from ldmkit.infotext import read_parameters

    path = tmp_path / "tiny.safetensors"
    checkpoint.save_single_file(model, path)
    first, again = tmp_path / "a.png", tmp_path / "b.png"
    argv = ["generate", "a tiled floor", "--model", str(path), "--steps", "2", "--sampler", "Euler", "--seed", "5",
            "--width", str(W), "--height", str(H)]
    assert cli.main([*argv, "--tiling", "-o", str(first)]) == 0
    assert "Tiling: True" in read_parameters(first)
    assert cli.main(["generate", "--model", str(path), "--from-png", str(first), "-o", str(again)]) == 0
    assert "Tiling: True" in read_parameters(again)
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))


def test_server_tiling(tmp_path):
    pytest.importorskip("fastapi")
    import base64
    import io
    import json

    from fastapi.testclient import TestClient
    from PIL import Image

    from ldmkit.server.app import create_app

    torch.manual_seed(0)
    path = tmp_path / "tiny.safetensors"
    checkpoint.save_single_file(StableDiffusion(TINY), path)
    app = create_app(path, device="cpu", preview_interval=None)
    try:
        c = TestClient(app, raise_server_exceptions=False)
        body = {"prompt": "a tiled floor", "steps": 2, "width": W, "height": H, "seed": 1, "sampler_name": "Euler"}
        tiled = c.post("/sdapi/v1/txt2img", json={**body, "tiling": True})
        assert tiled.status_code == 200, tiled.text
        info = json.loads(tiled.json()["info"])
        assert "Tiling: True" in info["infotexts"][0]
        plain = c.post("/sdapi/v1/txt2img", json=body).json()
        assert "Tiling" not in json.loads(plain["info"])["infotexts"][0]
        a, b = (np.asarray(Image.open(io.BytesIO(base64.b64decode(r["images"][0])))).astype(np.int16)
                for r in (tiled.json(), plain))
        assert np.abs(a - b).max() > 0
        assert set(_modes(app.state.worker.model)) == {"zeros"}  # the served model is left as it was
    finally:
        app.state.worker.stop()


def test_tiled_vae_wraps_too(model):
    """The tiled decoder/encoder (large images, --vae-tiling) reads its halos around the border under
    tiling: tile by tile == the whole circular decode/encode."""
    from ldmkit import vae_tiling

    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, TINY.vae.z_channels, 12, 20, generator=g)
    x = torch.rand(1, 3, 24, 40, generator=g) * 2 - 1
    with torch.no_grad(), tiling.circular(model):
        whole, tiled = model.vae.decode(z), vae_tiling.tiled_decode(model.vae, z, tile=8)
        enc, tiled_enc = model.vae.encode(x)[0], vae_tiling.tiled_encode(model.vae, x, tile=8)[0]
    with torch.no_grad():
        plain = model.vae.decode(z)
    assert (whole - tiled).abs().max() < 1e-4
    assert (enc - tiled_enc).abs().max() < 1e-4
    assert (whole - plain).abs().max() > 1e-2  # circular differs from zero padding at the borders


def test_sdxl_refiner_tiles_both_models():
    """Base + refiner: both models pad circularly while they run (seen from each expert's steps), restored after."""
    from ldmkit.config import TINY_SDXL, TINY_SDXL_REFINER
    from ldmkit.sdxl import StableDiffusionXL, txt2img_refined

    torch.manual_seed(0)
    base, refiner = StableDiffusionXL(TINY_SDXL).eval(), StableDiffusionXL(TINY_SDXL_REFINER).eval()
    seen: list[tuple[int, set[str], set[str]]] = []
    params = _params(tiling=True).replace(width=16, height=16)
    img = txt2img_refined(base, refiner, params, switch_at=0.5,
                          callback=lambda d: seen.append((d["i"], set(_modes(base)), set(_modes(refiner)))))[0]
    assert [i for i, _, _ in seen] == [0, 1, 2, 3]
    assert all(b == r == {"circular"} for _, b, r in seen)
    assert set(_modes(base)) == set(_modes(refiner)) == {"zeros"}
    assert "Tiling: True" in img.info["parameters"]
