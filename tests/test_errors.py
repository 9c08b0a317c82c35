"""Bad input gets a one-line error naming the problem; the CLI prints no traceback for it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ldmkit import checkpoint
from ldmkit.cli import main
from ldmkit.config import TINY
from ldmkit.model import StableDiffusion
from ldmkit.pipeline import GenerationError, GenerationParams, txt2img


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    checkpoint.save_single_file(StableDiffusion(TINY), path)
    return path


def _run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def test_truncated_file(tiny_file, tmp_path, capsys):
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(tiny_file.read_bytes()[: tiny_file.stat().st_size // 2])
    with pytest.raises(checkpoint.CheckpointError, match="truncated"):
        checkpoint.load(bad)
    code, err = _run_cli(capsys, "info", str(bad))
    assert code == 2 and "truncated" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_not_stable_diffusion(tmp_path):
    path = tmp_path / "classifier.safetensors"
    save_file({"fc.weight": torch.zeros(10, 4), "fc.bias": torch.zeros(10)}, path)
    with pytest.raises(checkpoint.CheckpointError, match="does not look like a Stable Diffusion checkpoint"):
        checkpoint.load(path)


def test_missing_key(tiny_file, tmp_path):
    sd = load_file(tiny_file)
    del sd["model.diffusion_model.out.2.weight"]
    path = tmp_path / "missing.safetensors"
    save_file(sd, path)
    with pytest.raises(checkpoint.CheckpointError, match=r"missing.*out\.2\.weight"):
        checkpoint.load(path)


def test_shape_mismatch(tmp_path):
    model = StableDiffusion(TINY)
    wrong = torch.zeros(1, 1)
    with pytest.raises(checkpoint.CheckpointError, match=r"time_embed\.0\.weight has shape \(1, 1\)"):
        sd = dict(model.unet.state_dict())
        sd["time_embed.0.weight"] = wrong
        checkpoint.load_strict(model.unet, sd, "unet")


def test_pickled_code_refused(tmp_path):
    path = tmp_path / "evil.ckpt"

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"state_dict": {"x": torch.zeros(1)}, "extra": Payload()}, path)
    with pytest.raises(checkpoint.CheckpointError, match="pickled Python objects"):
        checkpoint.load(path)


def test_bad_width_and_sampler(tiny_file):
    model = checkpoint.load(tiny_file)
    with pytest.raises(GenerationError, match="width 101 is not a positive multiple of 2; use 100 or 102"):
        txt2img(model, GenerationParams("x", width=101, steps=1))
    with pytest.raises(GenerationError, match="bogus"):
        txt2img(model, GenerationParams("x", sampler="bogus", width=16, height=16, steps=1))


def test_cli_user_errors(tiny_file, tmp_path, capsys):
    code, err = _run_cli(capsys, "generate", "x", "--model", str(tiny_file), "--width", "513", "--steps", "1")
    assert code == 2 and "width 513" in err and "Traceback" not in err
    from ldmkit.api import builtin_model_path

    # no --model: the built-in model if this installation has it, else a one-line "no model installed"
    code, err = _run_cli(capsys, "generate", "x", "--steps", "1", "-o", str(tmp_path / "builtin.png"))
    if builtin_model_path("emoji") is None:
        assert code == 2 and "no model installed" in err
    else:
        assert code == 0 and (tmp_path / "builtin.png").exists()
    code, err = _run_cli(capsys, "generate", "x", "--model", str(tiny_file), "--sampler", "bogus", "--width", "16",
                         "--height", "16")
    assert code == 2 and "bogus" in err
    notimg = tmp_path / "not_an_image.png"
    notimg.write_text("hello")
    code, err = _run_cli(capsys, "img2img", "x", "--model", str(tiny_file), "--init-image", str(notimg))
    assert code == 2 and "cannot read the image" in err and str(notimg) in err
    code, err = _run_cli(capsys, "generate", "x", "--model", str(tmp_path / "nope.safetensors"))
    assert code == 2 and "no such file" in err


def test_cli_process_has_no_traceback(tmp_path):
    """The real entry point, in its own process: one line on stderr, exit status 2."""
    proc = subprocess.run([sys.executable, "-m", "ldmkit", "generate", "x", "--model", str(tmp_path / "missing.ckpt")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("ldmkit: error:") and "Traceback" not in proc.stderr


def test_cli_generate_writes_png_with_parameters(tiny_file, tmp_path, capsys):
    out = tmp_path / "apple.png"
    code, _ = _run_cli(capsys, "generate", "a red apple", "--model", str(tiny_file), "--steps", "2", "--width", "16",
                       "--height", "24", "--seed", "42", "--negative-prompt", "blurry", "-o", str(out))
    assert code == 0
    img = Image.open(out)
    assert img.size == (16, 24)
    text = img.info["parameters"]
    assert text.startswith("a red apple\nNegative prompt: blurry\nSteps: 2, Sampler: DPM++ 2M, Schedule type: Karras")
    assert "Seed: 42" in text and "Size: 16x24" in text and "Model: tiny" in text
    # --from-png reproduces it exactly
    again = tmp_path / "again.png"
    assert _run_cli(capsys, "generate", "--from-png", str(out), "--model", str(tiny_file), "-o", str(again))[0] == 0
    assert Image.open(again).tobytes() == img.tobytes()
    # info prints the parameters
    assert main(["info", str(out)]) == 0
    assert "Seed: 42" in capsys.readouterr().out


def test_atomic_writes_keep_ordinary_permissions(tiny_file, tmp_path):
    """Outputs are written to a temporary file and renamed; they must still get the umask's permissions
    (mkstemp's 0600 would leave models and images unreadable to other users)."""
    import os
    import stat

    from ldmkit.infotext import save_png

    old = os.umask(0o022)
    try:
        model_out = tmp_path / "model.safetensors"
        checkpoint.save_single_file(checkpoint.load(tiny_file), model_out)
        png_out = save_png(Image.new("RGB", (8, 8)), tmp_path / "image.png")
    finally:
        os.umask(old)
    for path in (model_out, png_out):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert not list(tmp_path.glob(".*.tmp"))
