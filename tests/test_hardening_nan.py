"""Hardening item 9 (issue 15): NaN/inf arguments refused; NaN during sampling is an error, not a black image.

(Non-finite weights refused at load: tests/test_hardening_files.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from ldmkit import checkpoint, cli
from ldmkit import pipeline as P
from ldmkit.config import TINY
from ldmkit.model import StableDiffusion

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("nan") / "tiny.safetensors"
    torch.manual_seed(0)
    checkpoint.save_single_file(StableDiffusion(TINY), path)
    return path


@pytest.mark.parametrize("flag,value", [("--cfg-scale", "nan"), ("--cfg-scale", "inf"), ("--eta", "NaN"),
                                        ("--cfg-scale", "-inf"), ("--cfg-scale", "1e999")])
def test_cli_refuses_non_finite_numbers(model_file, tmp_path, capsys, flag, value):
    out = tmp_path / "o.png"
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "x", "--model", str(model_file), "--steps", "1", "--width", "16", "--height", "16",
                  f"{flag}={value}", "-o", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "finite" in err and not out.exists()


def test_cli_refuses_nan_strength(model_file, tmp_path, capsys):
    init = tmp_path / "init.png"
    from PIL import Image

    Image.new("RGB", (16, 16), (200, 10, 10)).save(init)
    with pytest.raises(SystemExit) as e:
        cli.main(["img2img", "x", "--init-image", str(init), "--model", str(model_file), "--strength", "nan",
                  "-o", str(tmp_path / "o.png")])
    assert e.value.code == 2 and "--strength" in capsys.readouterr().err


@pytest.mark.parametrize("field", ["cfg_scale", "eta"])
def test_api_refuses_non_finite_settings(model_file, field):
    model = checkpoint.load(model_file)
    params = P.GenerationParams("x", steps=1, width=16, height=16, sampler="Euler a", **{field: math.nan})
    with pytest.raises(P.GenerationError, match=f"{field} must be a finite number"):
        P.txt2img(model, params)


def test_nan_during_sampling_is_an_error(model_file):
    """A U-Net whose output turns NaN (here: its last conv's bias, set after loading): the first model call
    that returns NaN stops the generation with a message, instead of decoding a black image."""
    model = checkpoint.load(model_file)
    with torch.no_grad():
        model.unet.out[-1].bias.fill_(float("nan"))
    params = P.GenerationParams("x", steps=3, width=16, height=16, sampler="Euler", cfg_scale=5.0, seed=1)
    with pytest.raises(P.GenerationError, match=r"NaN or infinite values at model call 1 .*CFG scale 5"):
        P.txt2img(model, params)


def test_huge_cfg_overflow_is_an_error(model_file):
    """A finite but absurd guidance scale overflows float32 to inf within a step or two: refused the same way."""
    model = checkpoint.load(model_file)
    params = P.GenerationParams("x", "blurry", steps=4, width=16, height=16, sampler="Euler", cfg_scale=1e38, seed=1)
    with pytest.raises(P.GenerationError, match="NaN or infinite"):
        P.txt2img(model, params)
