"""ControlNet on the command line and the Python API, the preprocessors, and bad input (issue 16)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from reference import save_diffusers_pipeline
from test_controlnet import diffusers_controlnet

import ldmkit
from ldmkit import checkpoint
from ldmkit.cli import main
from ldmkit.config import TINY
from ldmkit.preprocess import canny_edges, preprocess

SETTINGS = ["--steps", "4", "--sampler", "Euler", "--scheduler", "uniform", "--seed", "5", "--width", "24",
            "--height", "16", "--cfg-scale", "5"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cn-cli")
    save_diffusers_pipeline(TINY, d / "sd")
    diffusers_controlnet(TINY.unet, hint=(8, 16), seed=3).save_pretrained(d / "cn")
    diffusers_controlnet(TINY.unet.__class__(**{**TINY.unet.__dict__, "context_dim": 48}), hint=(8, 16)
                         ).save_pretrained(d / "cn48")
    checkpoint.save_single_file(checkpoint.load(d / "sd"), d / "sd.safetensors")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(d / "map.png")  # 48x32: resized
    return d


def _run(capsys, *argv):
    rc = main(list(argv))
    return rc, capsys.readouterr()


def test_cli_equals_python_api(files, capsys, tmp_path):
    out = tmp_path / "cli.png"
    rc, cap = _run(capsys, "generate", "a stone house", "--model", str(files / "sd"), *SETTINGS,
                   "--controlnet", str(files / "cn"), "--control-image", str(files / "map.png"),
                   "--control-weight", "0.8", "--control-start", "0.25", "--control-end", "1", "-o", str(out))
    assert rc == 0, cap.err
    assert "resized to 24x16 (just resize)" in cap.err
    pipe = ldmkit.load(str(files / "sd"))
    unit = pipe.control_unit(files / "cn", Image.open(files / "map.png"), 24, 16, weight=0.8, start=0.25)
    api = pipe.txt2img("a stone house", steps=4, sampler="Euler", scheduler="uniform", seed=5, width=24, height=16,
                       cfg_scale=5, controlnets=[unit])[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(api.convert("RGB")))
    plain = pipe.txt2img("a stone house", steps=4, sampler="Euler", scheduler="uniform", seed=5, width=24, height=16,
                         cfg_scale=5)[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(api))


def test_canny_closed_form():
    """A white square on black: a closed one-pixel outline on its border, nothing elsewhere."""
    a = np.zeros((32, 32, 3), dtype=np.uint8)
    a[8:24, 8:24] = 255
    e = np.asarray(canny_edges(Image.fromarray(a)))[..., 0] > 0
    rows, cols = np.nonzero(e)
    assert rows.min() >= 7 and rows.max() <= 24 and cols.min() >= 7 and cols.max() <= 24
    assert not e[10:22, 10:22].any()  # inside: flat
    for r in range(10, 22):  # each inner row crosses the outline twice, once per side
        assert e[r].sum() == 2
    for c in range(10, 22):
        assert e[:, c].sum() == 2
    flat = np.asarray(canny_edges(Image.new("RGB", (16, 16), (90, 90, 90))))
    assert not flat.any()


def test_invert_and_threshold():
    img = Image.fromarray(np.array([[0, 100, 200, 255]], dtype=np.uint8)).convert("RGB")
    assert np.asarray(preprocess("invert", img))[0, :, 0].tolist() == [255, 155, 55, 0]
    assert np.asarray(preprocess("threshold", img))[0, :, 0].tolist() == [0, 0, 255, 255]


@pytest.mark.parametrize("case", ["other-family", "no-image", "unknown-preprocessor", "sd-checkpoint",
                                  "sd-unet-folder", "deepcache", "bad-range", "image-without-controlnet"])
def test_bad_input_one_line(files, capsys, case):
    base = ["generate", "a house", "--model", str(files / "sd"), *SETTINGS]
    cn, img = ["--controlnet", str(files / "cn")], ["--control-image", str(files / "map.png")]
    argv, expect = {
        "other-family": (["--controlnet", str(files / "cn48"), *img], "context 48"),
        "no-image": (cn, "--control-image"),
        "unknown-preprocessor": ([*cn, *img, "--preprocessor", "hed"], "unknown preprocessor 'hed'"),
        "sd-checkpoint": (["--controlnet", str(files / "sd.safetensors"), *img], "not a ControlNet"),
        "sd-unet-folder": (["--controlnet", str(files / "sd" / "unet"), *img], "not a ControlNet"),
        "deepcache": ([*cn, *img, "--deepcache", "3"], "DeepCache"),
        "bad-range": ([*cn, *img, "--control-start", "0.8", "--control-end", "0.2"], "start"),
        "image-without-controlnet": (img, "needs --controlnet"),
    }[case]
    rc, cap = _run(capsys, *base, *argv)
    assert rc == 2
    lines = [ln for ln in cap.err.splitlines() if ln.startswith("ldmkit: error")]
    assert len(lines) == 1 and expect in lines[0], cap.err
    assert "Traceback" not in cap.err


def test_preprocess_command(files, capsys, tmp_path):
    out = tmp_path / "edges.png"
    rc, cap = _run(capsys, "preprocess", "canny", str(files / "map.png"), "-o", str(out))
    assert rc == 0 and cap.out.strip() == str(out)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(canny_edges(Image.open(files / "map.png"))))
    rc, cap = _run(capsys, "preprocess", "hed", str(files / "map.png"))
    assert rc == 2 and cap.err.count("\n") == 1 and "unknown preprocessor 'hed'" in cap.err


def test_hires_fix_with_controlnet(files, capsys, tmp_path):
    """The second pass is larger: the map follows it (resized inside the denoiser), not refused."""
    out = tmp_path / "hires.png"
    rc, cap = _run(capsys, "generate", "a stone house", "--model", str(files / "sd"), *SETTINGS,
                   "--controlnet", str(files / "cn"), "--control-image", str(files / "map.png"),
                   "--hires-scale", "2", "--hires-upscaler", "Lanczos", "-o", str(out))
    assert rc == 0, cap.err
    assert Image.open(out).size == (48, 32)


def test_binary_is_otsu_and_blur_keeps_flat():
    """Otsu on two grey levels splits between them; a flat image stays flat under blur."""
    from ldmkit.preprocess import otsu_level

    a = np.full((10, 10), 40, dtype=np.uint8)
    a[:, 6:] = 200
    level = otsu_level(a)
    assert 40 <= level < 200
    out = np.asarray(preprocess("binary", Image.fromarray(a)))[..., 0]
    assert (out[:, :6] == 0).all() and (out[:, 6:] == 255).all()
    flat = Image.new("RGB", (12, 8), (30, 60, 90))
    assert np.array_equal(np.asarray(preprocess("blur", flat)), np.asarray(flat))


def test_info_describes_a_controlnet(files, capsys):
    rc, cap = _run(capsys, "info", str(files / "cn"))
    assert rc == 0
    assert cap.out.strip().startswith("ControlNet for context dim 32: model channels 32, levels (1, 2), "
                                      "1 hint downsamplings")
    rc, cap = _run(capsys, "info", str(files / "sd.safetensors"))  # an SD checkpoint is still described as one
    assert rc == 0 and cap.out.startswith("model:")
