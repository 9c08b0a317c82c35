"""bench/eval_emoji.py's mean-latent start (--start-mean) and its group contact sheet (--contact-sheet).

The second-generation emoji U-Net, trained on latents far from zero mean, draws from zero-mean noise as if
the image were that far off; --start-mean centres the first noise on the mean training latent. Checked
here: the mean against an independent computation (PIL pixels -> [-1, 1] -> the VAE's posterior mean ->
scale factor), a zero start equal to the ordinary txt2img start bit for bit, and the sheet's layout.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shapes import write_shapes

from ldmkit.config import TINY
from ldmkit.model import StableDiffusion

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 16


@pytest.fixture(scope="module")
def ev():
    spec = importlib.util.spec_from_file_location("eval_emoji", Path(__file__).parents[1] / "bench" / "eval_emoji.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def model() -> StableDiffusion:
    torch.manual_seed(0)
    return StableDiffusion(TINY.replace(extra={"image_size": SIZE})).eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    write_shapes(root, 9, SIZE)
    (root / "holdout.json").write_text(json.dumps({"keys": ["004"]}))
    return root


def test_latent_mean_is_the_scaled_mean_of_the_training_images_posterior_means(ev, model, data) -> None:
    got = ev.latent_mean(model, data)
    files = sorted(p for p in (data / "images").glob("*.png") if p.stem != "004")
    x = torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB"), np.float32) / 127.5 - 1 for p in files]))
    with torch.no_grad():
        mean, _ = model.vae.encode(x.permute(0, 3, 1, 2))
    want = mean.mean((0, 2, 3)) * model.cfg.vae.scale_factor
    assert got.shape == (1, model.cfg.unet.in_channels, 1, 1)
    assert torch.allclose(got.flatten(), want, atol=1e-5)


def test_zero_start_is_the_ordinary_start_and_a_mean_start_changes_the_image(ev, model) -> None:
    args = (model, ["a red circle", "a blue square"], [0, 1], 2, 5.0, SIZE)
    plain = ev.generate(*args)
    zero = ev.generate(*args, start=torch.zeros(1, 4, 1, 1))
    shifted = ev.generate(*args, start=torch.full((1, 4, 1, 1), 3.0))
    for a, b, c in zip(plain, zero, shifted, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
        assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_group_sheet_has_a_labelled_row_per_group(ev, tmp_path: Path) -> None:
    ims = [Image.new("RGB", (SIZE, SIZE), c) for c in ("red", "blue", "green")]
    rows = [("Smileys & Emotion", ims[:2], ["a", "b"]), ("Flags", ims[2:], ["c"])]
    ev.group_sheet(rows, tmp_path / "s.png", label_width=116)
    sheet = np.asarray(Image.open(tmp_path / "s.png").convert("RGB"))
    assert sheet.shape == (2 * (SIZE + 24), 116 + 2 * (SIZE + 8), 3)
    assert (sheet[4, 116 + 4] == (255, 0, 0)).all() and (sheet[SIZE + 24 + 4, 116 + 4] == (0, 128, 0)).all()
    assert (sheet[SIZE + 24 + 4, 116 + SIZE + 8 + 4] == 255).all()  # the short row is left white
    assert (sheet[:SIZE, :116] < 128).any()  # the group's name is written in the label column
    ev.group_sheet(rows, tmp_path / "p.png", colors=16)
    assert Image.open(tmp_path / "p.png").mode == "P"
