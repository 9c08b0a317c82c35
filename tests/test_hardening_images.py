"""Hardening item 8 (issue 15): 16-bit greyscale images (PIL mode I;16) are converted by range, not clipped.

Reference: a 16-bit value v is the 8-bit value v / 257 (65535 -> 255), the PNG specification's
scaling between bit depths; PIL's own ``convert`` clips v > 255 to 255 instead.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit import images
from ldmkit import pipeline as P
from ldmkit.data.datasets import load_image, open_rgb  # load_image: the one image reader of training (issue 18)

RAMP16 = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
WANT8 = np.rint(RAMP16 / 257.0)


@pytest.fixture
def png16(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(RAMP16).save(path)
    assert Image.open(path).mode == "I;16"
    return path


def test_to_8bit_by_range(png16):
    got = np.asarray(images.to_8bit(Image.open(png16)), dtype=np.float64)
    assert np.abs(got - WANT8).max() <= 0.5
    # 32-bit I and float F images: by their values' range
    assert np.asarray(images.to_8bit(Image.fromarray(RAMP16.astype(np.int32)))).max() == 255
    f = Image.fromarray((RAMP16 / 65535.0).astype(np.float32))
    assert np.abs(np.asarray(images.to_8bit(f), dtype=np.float64) - WANT8).max() <= 1
    rgb = Image.new("RGB", (4, 4), (1, 2, 3))
    assert images.to_8bit(rgb) is rgb


def test_img2img_input(png16):
    x = P.image_to_tensor(Image.open(png16), 32, 32)  # (1, 3, H, W) in [-1, 1]
    want = torch.from_numpy(WANT8 / 127.5 - 1.0).float()
    for c in range(3):
        assert (x[0, c] - want).abs().max() <= 1 / 127.5


def test_mask(png16):
    m = P.mask_to_tensor(Image.open(png16), 32, 32)
    want = torch.from_numpy(WANT8 / 255.0 >= 0.5).float()
    assert torch.equal(m[0, 0], want)
    assert 0.45 < m.mean().item() < 0.55  # clipping made 99.6% of it white


def test_training_images(png16):
    want = torch.from_numpy(WANT8)
    got = load_image(png16, 32)  # (3, 32, 32) uint8
    assert (got.float() - want).abs().max() <= 1
    rgb = np.asarray(open_rgb(png16), dtype=np.float64)
    assert rgb.shape == (32, 32, 3) and np.abs(rgb[..., 0] - WANT8).max() <= 0.5


def test_server_mask(png16):
    """An A1111 inpainting request with a 16-bit mask: the mask the pipeline gets is the rescaled one."""
    import base64

    from ldmkit.config import TINY
    from ldmkit.model import StableDiffusion
    from ldmkit.server import schemas as S
    from ldmkit.server.generation import Limits, prepare

    data = base64.b64encode(png16.read_bytes()).decode()
    req = S.Img2ImgRequest(init_images=[data], mask=data, width=32, height=32, steps=2)
    gen = prepare(req, "img2img", StableDiffusion(TINY), {}, Limits(), None, False)
    assert gen.kind == "inpaint"
    assert np.abs(np.asarray(gen.mask, dtype=np.float64) - WANT8).max() <= 0.5
