"""Per-channel latent normalisation (diffusers' AutoencoderKL latents_mean / latents_std, the Playground v2.5
convention): the U-Net sees (z - latents_mean) * scaling_factor / latents_std.

- parity: a random tiny SDXL pipeline whose VAE has latents_mean / latents_std, saved by diffusers'
  save_pretrained, loads in ldmkit and txt2img / img2img give StableDiffusionXLPipeline's /
  StableDiffusionXLImg2ImgPipeline's image (max pixel difference <= 2/255); ldmkit's folder writer keeps them;
- closed form: `train unet` with latent_norm = "channel" stores per-channel mean / std (unbiased) of the seeded
  posterior draw, so those samples mapped to U-Net space have per-channel mean 0 and std 1 (1e-5); the run
  exports, loads and `ldmkit generate`s; a crashed run resumes exactly;
- bad input: a VAE config with latents_mean of the wrong length, NaN, std <= 0 or one without the other is
  refused in one line naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from shapes import write_shapes
from test_sdxl import _diffusers_sdxl_folder
from test_sdxl_pipeline import H, W, _diffusers_txt2img, _img2img_reference, _init_image, _pixels
from train_runs import assert_same_weights, crash_and_resume, tiny

from ldmkit import checkpoint, convert, latent_norm
from ldmkit.config import TINY_SDXL, VAEConfig
from ldmkit.pipeline import GenerationParams, img2img, txt2img

pytestmark = pytest.mark.usefixtures("one_thread")

MEAN, STD = (-1.92, -2.5, 0.46, 1.02), (1.48, 1.0, 1.2, 0.55)  # emoji2-like: far from zero mean
NORMED = TINY_SDXL.replace(vae=dataclasses.replace(TINY_SDXL.vae, scale_factor=0.5, latents_mean=MEAN,
                                                   latents_std=STD))


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xl-norm")
    pipe = _diffusers_sdxl_folder(NORMED, folder)
    assert pipe.vae.config.latents_mean == list(MEAN)  # diffusers' own config carries them
    saved = json.loads((folder / "model" / "vae" / "config.json").read_text())
    assert saved["latents_mean"] == list(MEAN) and saved["latents_std"] == list(STD)
    return folder / "model", pipe


def test_formulas_are_inverse_and_default_is_scale_only():
    z = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(0))
    u = latent_norm.to_unet(NORMED.vae, z)
    m, s = torch.tensor(MEAN).view(1, 4, 1, 1), torch.tensor(STD).view(1, 4, 1, 1)
    assert torch.allclose(u, (z - m) * 0.5 / s) and torch.allclose(latent_norm.from_unet(NORMED.vae, u), z, atol=1e-6)
    plain = VAEConfig()
    assert torch.equal(latent_norm.to_unet(plain, z), z * 0.18215)
    assert torch.equal(latent_norm.from_unet(plain, z), z / 0.18215)


def test_txt2img_matches_diffusers_sdxl_pipeline(xl):
    folder, pipe = xl
    ref = _diffusers_txt2img(pipe, "euler", "", 8, seed=1234)
    model = checkpoint.load(folder)
    assert model.cfg.vae.latents_mean == MEAN and model.cfg.vae.latents_std == STD
    ours = txt2img(model, GenerationParams("a red apple on a wooden table", steps=8, cfg_scale=6.0, sampler="Euler",
                                           scheduler="uniform", seed=1234, width=W, height=H))[0]
    diff = np.abs(_pixels(ours) - ref).max()
    assert diff <= 2, f"max pixel difference {diff}/255"
    assert ref.std() > 5
    # without the statistics the same U-Net output decodes to another image: they are applied, not ignored
    plain = checkpoint.load(folder)
    plain.cfg = plain.cfg.replace(vae=dataclasses.replace(plain.cfg.vae, latents_mean=None, latents_std=None))
    other = txt2img(plain, GenerationParams("a red apple on a wooden table", steps=8, cfg_scale=6.0, sampler="Euler",
                                            scheduler="uniform", seed=1234, width=W, height=H))[0]
    assert np.abs(_pixels(other) - ref).max() > 20


def test_img2img_encode_matches_diffusers_sdxl_img2img(xl, monkeypatch):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    folder, pipe = xl
    i2i = StableDiffusionXLImg2ImgPipeline(**pipe.components)
    init = _init_image()
    ref = _img2img_reference(i2i, monkeypatch, "a watercolor apple", init, 10, 0.6, 7, negative_prompt="dark")
    model = checkpoint.load(folder)
    ours = img2img(model, GenerationParams("a watercolor apple", negative_prompt="dark", steps=10, cfg_scale=5.0,
                                           sampler="Euler", scheduler="uniform", seed=7, width=W, height=H,
                                           strength=0.6), init)[0]
    diff = np.abs(_pixels(ours) - ref).max()
    assert diff <= 2, f"max pixel difference {diff}/255"


def test_ldmkit_writers_keep_the_statistics(xl, tmp_path):
    folder, _ = xl
    model = checkpoint.load(folder)
    checkpoint.save_single_file(model, tmp_path / "m.safetensors")
    assert checkpoint.load(tmp_path / "m.safetensors").cfg.vae == model.cfg.vae
    written = convert.diffusers_vae_config(model.cfg.vae)
    assert written["latents_mean"] == list(MEAN) and written["latents_std"] == list(STD)
    assert convert.diffusers_vae_config(VAEConfig())["latents_mean"] is None  # diffusers' own default


@pytest.mark.parametrize("change, says", [
    ({"latents_mean": [0.0, 1.0, 2.0]}, "latents_mean has 3 values but the VAE has 4 latent channels"),
    ({"latents_mean": [0.0, math.nan, 0.0, 0.0]}, "latents_mean[1] is nan, expected a finite number"),
    ({"latents_std": [1.0, 1.0, 0.0, 1.0]}, "latents_std[2] is 0.0, expected a number > 0"),
    ({"latents_std": None}, "latents_mean is set but latents_std is not"),
], ids=["length", "nan", "zero-std", "one-without-other"])
def test_bad_statistics_in_a_diffusers_folder_are_one_line_errors(xl, tmp_path, change, says):
    folder, _ = xl
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    cfg_path = bad / "vae" / "config.json"
    d = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**d, **change}))
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load(bad)
    msg = str(e.value)
    assert says in msg and "\n" not in msg and str(bad) in msg
    with pytest.raises(ValueError, match="latents_"):  # the same check on ldmkit's own configs
        VAEConfig(**{"latents_mean": MEAN, "latents_std": STD, **change})


# ---------------------------------------------------------------- training

SIZE = 16
ARCH_VAE = {"vae": {"ch": 16, "ch_mult": (1, 2, 4), "norm_groups": 8}}  # f = 4, as emoji2.toml


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    from ldmkit.train import train

    root = tmp_path_factory.mktemp("latent-norm")
    (root / "data").mkdir()
    data = write_shapes(root / "data", 9, SIZE)
    train(tiny("vae", size=SIZE, data=str(data), total_steps=2, arch=ARCH_VAE), root / "vae")
    return {"root": root, "data": data, "vae": root / "vae"}


def _unet(runs, **kw):
    return tiny("unet", size=SIZE, data=str(runs["data"]), vae=str(runs["vae"]), vocab="data", **kw)


def test_channel_norm_gives_zero_mean_unit_std_latents_and_exports(runs, tmp_path):
    from ldmkit import cli
    from ldmkit.checkpoint import read_safetensors
    from ldmkit.train import train
    from ldmkit.train.unet import LATENTS_FILE, read_vae_file

    cfg = _unet(runs, latent_norm="channel", total_steps=2)
    run = tmp_path / "ldm"
    train(cfg, run)
    vae_cfg, _ = read_vae_file(run)
    cache, _ = read_safetensors(run / LATENTS_FILE)
    g = torch.Generator().manual_seed(cfg.seed)  # the draw measure_scale_factor makes
    z = cache["mean"] + cache["std"] * torch.randn(cache["mean"].shape, generator=g)
    zd = z.double()
    assert vae_cfg.scale_factor == 1.0
    assert np.allclose(vae_cfg.latents_mean, zd.mean((0, 2, 3)).numpy(), atol=1e-9)
    assert np.allclose(vae_cfg.latents_std, zd.transpose(0, 1).flatten(1).std(1).numpy(), atol=1e-9)
    u = latent_norm.to_unet(vae_cfg, zd).transpose(0, 1).flatten(1)  # the U-Net's view, per channel
    assert u.mean(1).abs().max() < 1e-5 and (u.std(1) - 1).abs().max() < 1e-5
    # the default run keeps the single scale factor
    plain = tmp_path / "plain"
    train(_unet(runs, total_steps=1), plain)
    pcfg, _ = read_vae_file(plain)
    assert pcfg.latents_mean is None and pcfg.scale_factor == pytest.approx(float(1 / zd.std()), rel=1e-6)

    out = tmp_path / "m.safetensors"
    assert cli.main(["export", str(run), str(out)]) == 0
    model = checkpoint.load(out)
    assert model.cfg.vae == vae_cfg
    png = tmp_path / "g.png"
    assert cli.main(["generate", "a red circle", "--model", str(out), "--steps", "2", "--seed", "1",
                     "--width", str(SIZE), "--height", str(SIZE), "-o", str(png)]) == 0
    from PIL import Image

    [ref] = txt2img(model, GenerationParams(prompt="a red circle", steps=2, seed=1, width=SIZE, height=SIZE))
    assert np.array_equal(np.asarray(Image.open(png).convert("RGB")), np.asarray(ref))


def test_channel_norm_run_resumes_exactly(runs, tmp_path):
    ca, cb, _ = crash_and_resume(_unet(runs, latent_norm="channel"), tmp_path / "a", tmp_path / "b", at=3,
                                 checkpoint=2)
    assert_same_weights(ca, cb)
    assert ca["task"]["latents_mean"] == cb["task"]["latents_mean"] is not None


def test_bad_statistics_in_ldmkit_single_file_are_one_line_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    from ldmkit.checkpoint import CONFIG_METADATA_KEY, read_safetensors, save_single_file
    from ldmkit.config import TINY
    from ldmkit.model import StableDiffusion

    cfg = TINY.replace(vae=dataclasses.replace(TINY.vae, latents_mean=MEAN, latents_std=STD, scale_factor=1.0))
    good = tmp_path / "good.safetensors"
    save_single_file(StableDiffusion(cfg), good)
    assert checkpoint.load(good).cfg.vae == cfg.vae
    _, meta = read_safetensors(good)
    d = json.loads(meta[CONFIG_METADATA_KEY])
    d["vae"]["latents_std"] = [1.0, -0.5, 1.0, 1.0]
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(good), bad, {**meta, CONFIG_METADATA_KEY: json.dumps(d)})
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load(bad)
    assert "latents_std[1] is -0.5, expected a number > 0" in str(e.value) and "\n" not in str(e.value)


def test_bad_latent_norm_is_one_line(capsys) -> None:
    """--latent-norm takes scale or channel (argparse's one-line usage error); a config file's other value is named."""
    from ldmkit import cli
    from ldmkit.train.config import TrainConfig, TrainError, validate

    with pytest.raises(SystemExit) as e:
        cli.main(["train", "unet", "--data", "d", "--out", "o", "--latent-norm", "perchannel"])
    assert e.value.code == 2
    assert "argument --latent-norm: invalid choice: 'perchannel'" in capsys.readouterr().err
    with pytest.raises(TrainError, match="latent_norm must be scale or channel, got 'perchannel'"):
        validate(dataclasses.replace(TrainConfig(), latent_norm="perchannel"))
