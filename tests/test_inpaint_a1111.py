"""Inpainting as A1111 does it (ldmkit.inpaint_a1111): mask blur, the original pasted back outside the blurred
mask, "only masked" crops, masked-content modes, mask inversion, the initial noise multiplier."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter1d

from ldmkit import pipeline as P
from ldmkit.config import TINY
from ldmkit.core import GenerationError
from ldmkit.inpaint_a1111 import InpaintSettings, crop_region, gaussian_blur, inpaint, prepare_mask
from ldmkit.model import StableDiffusion

pytestmark = pytest.mark.usefixtures("one_thread")

S = 64


@pytest.fixture(scope="module")
def model() -> StableDiffusion:
    torch.manual_seed(0)
    return StableDiffusion(TINY).eval()


def _image_and_mask(box=(24, 20, 40, 36)):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (S, S, 3), dtype=np.uint8))
    mask = np.zeros((S, S), np.uint8)
    x1, y1, x2, y2 = box
    mask[y1:y2, x1:x2] = 255
    return image, Image.fromarray(mask)


def test_blur_is_opencvs_gaussian():
    # OpenCV's GaussianBlur: kernel 2 * int(2.5 * sigma + 0.5) + 1 (radius = truncate 2.5), reflect-101 borders
    # (scipy's "mirror")
    a = np.random.default_rng(1).integers(0, 256, (20, 33), dtype=np.uint8)
    for sigma in (1, 4, 7):
        want = np.clip(np.round(gaussian_filter1d(a.astype(np.float64), sigma, axis=1, mode="mirror",
                                                  truncate=2.5)), 0, 255)
        assert np.abs(gaussian_blur(a, sigma, axis=1).astype(int) - want).max() <= 1


def test_pixels_outside_the_blurred_mask_are_unchanged(model):
    image, mask = _image_and_mask()
    params = P.GenerationParams("a red square", steps=2, seed=1, width=S, height=S, strength=0.9)
    settings = InpaintSettings(mask_blur=4)
    out = np.asarray(inpaint(model, params, image, mask, settings)[0])
    reach = np.asarray(prepare_mask(mask, settings)) > 0  # where the blurred mask is not 0
    orig = np.asarray(image)
    assert np.array_equal(out[~reach], orig[~reach])
    assert (~reach).mean() > 0.7  # most of the image is outside the blur's reach
    inside = np.asarray(mask) > 0
    assert np.abs(out[inside].astype(int) - orig[inside]).mean() > 5  # and inside it was repainted


def test_invert_repaints_the_black_part(model):
    image, mask = _image_and_mask()
    params = P.GenerationParams("grass", steps=2, seed=2, width=S, height=S)
    settings = InpaintSettings(mask_blur=0, invert=True)
    out = np.asarray(inpaint(model, params, image, mask, settings)[0])
    white = np.asarray(mask) > 0
    assert np.array_equal(out[white], np.asarray(image)[white])
    assert not np.array_equal(out[~white], np.asarray(image)[~white])


def test_only_masked_crops_and_pastes_back(model):
    big = Image.fromarray(np.random.default_rng(3).integers(0, 256, (96, 128, 3), dtype=np.uint8))
    mask = np.zeros((96, 128), np.uint8)
    mask[40:50, 60:80] = 255
    mask = Image.fromarray(mask)
    # bbox (60, 40, 80, 50) + 8 = (52, 32, 88, 58): 36 x 26, grown to 1:1 -> 36 x 36, centred
    assert crop_region(mask, 8, 64, 64) == (52, 27, 88, 63)
    params = P.GenerationParams("a pear", steps=2, seed=4, width=S, height=S)
    settings = InpaintSettings(mask_blur=2, full_res=True, full_res_padding=8)
    out = inpaint(model, params, big, mask, settings)[0]
    assert out.size == big.size
    assert "Mask blur: 2, Inpaint area: Only masked, Masked area padding: 8" in out.info["parameters"]
    reach = np.asarray(prepare_mask(mask, settings)) > 0
    assert np.array_equal(np.asarray(out)[~reach], np.asarray(big)[~reach])
    assert not np.array_equal(np.asarray(out)[reach], np.asarray(big)[reach])


@pytest.mark.parametrize("fill", [1, 2, 3])
def test_masked_content_and_noise_multiplier(model, monkeypatch, fill):
    image, mask = _image_and_mask((16, 16, 48, 48))
    seen = {}
    real = P.sample

    def spy(model_, plan, cond, uncond, noise, **kw):
        seen.update(noise=noise, init=kw["init_latent"], mask=kw["mask"])
        return real(model_, plan, cond, uncond, noise, **kw)

    monkeypatch.setattr(P, "sample", spy)
    params = P.GenerationParams("sky", steps=2, seed=5, width=S, height=S)
    inpaint(model, params, image, mask, InpaintSettings(mask_blur=0, fill=fill, noise_multiplier=0.5))
    job = P._job(model, params)
    enc = P.encode_pixels(model, P.image_to_tensor(image, S, S))
    m = seen["mask"]
    f = model.cfg.vae.downscale
    assert m.sum() == (32 // f) ** 2  # the 32 px square in latent pixels
    want = {1: enc, 2: enc * (1 - m) + job.noise * m, 3: enc * (1 - m)}[fill]
    torch.testing.assert_close(seen["init"], want)
    torch.testing.assert_close(seen["noise"], job.noise * 0.5)


def test_fill_starts_from_the_surroundings(model, monkeypatch):
    image = Image.new("RGB", (S, S), (200, 40, 40))
    _, mask = _image_and_mask()
    image.paste((0, 0, 255), (24, 20, 40, 36))  # blue under the mask disappears with "fill"
    seen = {}
    real = P.encode_pixels

    def spy(model_, x):
        seen["x"] = x
        return real(model_, x)

    monkeypatch.setattr(P, "encode_pixels", spy)
    params = P.GenerationParams("sky", steps=1, seed=5, width=S, height=S)
    inpaint(model, params, image, mask, InpaintSettings(mask_blur=0, fill=0))
    x = seen["x"][0]  # (3, H, W) in [-1, 1]
    centre = x[:, 28, 32]
    assert centre[0] > 0.4 and centre[2] < -0.4  # red, not blue


def test_bad_settings_are_one_line_errors():
    with pytest.raises(GenerationError, match="inpainting_fill"):
        InpaintSettings(fill=4)
    with pytest.raises(GenerationError, match="initial_noise_multiplier"):
        InpaintSettings(noise_multiplier=float("nan"))


def test_a1111_request_fields(model):
    import base64
    import io

    from fastapi.exceptions import RequestValidationError

    from ldmkit.server import schemas
    from ldmkit.server.generation import Limits, prepare

    image, mask = _image_and_mask()
    data = []
    for im in (image, mask):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        data.append(base64.b64encode(buf.getvalue()).decode())
    req = schemas.Img2ImgRequest(init_images=[data[0]], mask=data[1], width=S, height=S, steps=2, mask_blur_x=3,
                           inpainting_fill=3, inpaint_full_res=False, inpainting_mask_invert=1,
                           initial_noise_multiplier=0.8)
    gen = prepare(req, "img2img", model, {}, Limits(), None, False)
    assert gen.kind == "inpaint"
    assert gen.params.inpaint == InpaintSettings(3, 4, 3, True, False, 0, 0.8)
    assert prepare(req.model_copy(update={"mask_blur": 6}), "img2img", model, {}, Limits(), None,
                   False).params.inpaint.mask_blur_y == 6
    with pytest.raises(RequestValidationError) as e:
        prepare(req.model_copy(update={"inpainting_fill": 7}), "img2img", model, {}, Limits(), None, False)
    assert "inpainting_fill must be 0..3" in e.value.errors()[0]["msg"]


def test_cli_inpaint_keeps_the_original_outside_the_blurred_mask(model, tmp_path, capsys):
    from ldmkit import checkpoint, cli

    path = tmp_path / "tiny.safetensors"
    checkpoint.save_single_file(model, path)
    image, mask = _image_and_mask()
    image.save(tmp_path / "init.png")
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    argv = ["inpaint", "a pear", "--model", str(path), "--init-image", str(tmp_path / "init.png"), "--mask",
            str(tmp_path / "mask.png"), "--steps", "2", "--seed", "3", "--width", str(S), "--height", str(S),
            "--device", "cpu", "--mask-blur", "3", "--masked-content", "latent-nothing", "-o", str(out)]
    assert cli.main(argv) == 0
    settings = InpaintSettings(mask_blur=3, fill=3)
    params = P.GenerationParams("a pear", steps=2, seed=3, width=S, height=S, strength=1.0, inpaint=settings)
    want = P.inpaint(checkpoint.load(path), params, image, mask)[0]
    with Image.open(out) as got:
        assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want))
        keep = np.asarray(prepare_mask(mask, settings)) == 0
        assert np.array_equal(np.asarray(got.convert("RGB"))[keep], np.asarray(image)[keep])
    with pytest.raises(SystemExit) as e:
        cli.main(argv[:-2] + ["--masked-content", "noise", "-o", str(out)])
    assert e.value.code == 2
    capsys.readouterr()
