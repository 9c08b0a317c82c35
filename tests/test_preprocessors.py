"""The classical control-map preprocessors (issue 16, part 4) against OpenCV, closed forms, and the CLI.

References: ``cv2.Canny``, ``cv2.Sobel`` and ``cv2.adaptiveThreshold`` on random images; closed forms for the
colour grid, the palette, the DoG scribble, the resample and the shuffle; ``ldmkit preprocess`` for each name.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from ldmkit import cli
from ldmkit.preprocess import PREPROCESSORS, foreground_mask, preprocess


def _random(seed: int, h: int = 48, w: int = 64, blur: float = 1.0) -> np.ndarray:
    a = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    return cv2.GaussianBlur(a, (0, 0), blur) if blur else a


def _map(name: str, a: np.ndarray, **kw) -> np.ndarray:
    out = PREPROCESSORS[name](Image.fromarray(a), **kw) if kw else preprocess(name, Image.fromarray(a))
    assert out.mode == "RGB" and out.size == (a.shape[1], a.shape[0])
    return np.asarray(out)


@pytest.mark.parametrize("seed, blur", [(0, 0.0), (1, 0.8), (2, 1.2), (3, 2.0)])
def test_canny_is_opencvs(seed, blur):
    a = _random(seed, blur=blur)
    ref = cv2.Canny(a, 100, 200)
    assert np.array_equal(_map("canny", a)[..., 0], ref)
    assert np.array_equal(_map("canny", a, low=50, high=120)[..., 0], cv2.Canny(a, 50, 120))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_softedge_sobel_is_the_opencv_sobel_magnitude(seed):
    a = _random(seed, blur=0)
    grey = np.asarray(Image.fromarray(a).convert("L"), dtype=np.float64)
    g = cv2.GaussianBlur(grey, (0, 0), 1.0, borderType=cv2.BORDER_REPLICATE)
    gx = cv2.Sobel(g, cv2.CV_64F, 1, 0, ksize=3, borderType=cv2.BORDER_REPLICATE)
    gy = cv2.Sobel(g, cv2.CV_64F, 0, 1, ksize=3, borderType=cv2.BORDER_REPLICATE)
    mag = np.hypot(gx, gy)
    ref = np.round(mag * 255 / mag.max())
    assert np.abs(_map("softedge_sobel", a)[..., 0].astype(float) - ref).max() <= 1
    assert _map("softedge_sobel", np.full((8, 8, 3), 90, np.uint8)).max() == 0  # no edges: black


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lineart_adaptive_is_opencvs_adaptive_threshold(seed):
    a = _random(seed, blur=1.5)
    grey = np.asarray(Image.fromarray(a).convert("L"))
    ref = cv2.adaptiveThreshold(grey, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY_INV, 9, 8)
    ours = _map("lineart_adaptive", a)[..., 0]
    assert (ours != ref).mean() <= 0.002, (ours != ref).mean()  # the mean's rounding may differ at ties
    assert 0.02 < (ref > 0).mean() < 0.5


def test_scribble_xdog_draws_dark_strokes():
    a = np.full((64, 64, 3), 255, np.uint8)
    cv2.line(a, (5, 32), (58, 32), (0, 0, 0), 2)
    s = _map("scribble_xdog", a)[..., 0] > 0
    assert s[31:34, 8:56].all() and not s[:25].any() and not s[40:].any()  # the line, thickened, nothing else
    b = np.full((64, 64, 3), 255, np.uint8)
    cv2.circle(b, (32, 32), 16, (0, 0, 0), -1)
    s = _map("scribble_xdog", b)[..., 0] > 0
    yy, xx = np.mgrid[:64, :64]
    r = np.hypot(yy - 32, xx - 32)
    assert s[(r >= 8) & (r < 16)].all() and not s[(r < 6) | (r > 17)].any()  # a band inside the dark edge
    assert not _map("scribble_xdog", np.full((16, 16, 3), 200, np.uint8)).any()


def test_color_grid_keeps_flat_64_pixel_cells():
    cells = np.random.default_rng(0).integers(0, 256, (3, 4, 3)).astype(np.uint8)
    a = np.kron(cells, np.ones((64, 64, 1), np.uint8))  # 192 x 256: 3 x 4 flat cells of 64 px
    assert np.array_equal(_map("color", a), a)
    small = _map("color", _random(0, 16, 16))  # smaller than a cell: one flat colour
    assert (small == small[0, 0]).all()


def test_seg_palette_gives_at_most_k_flat_regions():
    rng = np.random.default_rng(0)
    colours = rng.integers(20, 235, (4, 3))
    labels = np.repeat(np.repeat(rng.integers(0, 4, (4, 4)), 12, 0), 12, 1)
    a = (colours[labels] + rng.integers(-3, 4, (48, 48, 3))).clip(0, 255).astype(np.uint8)
    out = _map("seg_palette", a, colors=4)
    assert len(np.unique(out.reshape(-1, 3), axis=0)) <= 4
    for k in range(4):
        region = out[labels == k]
        assert (region == region[0]).all() and np.abs(region[0].astype(int) - colours[k]).max() <= 3


def test_tile_resample():
    a = _random(0, blur=0)
    assert np.array_equal(_map("tile_resample", a), a)  # the extension's default rate 1: unchanged
    flat = np.kron(np.random.default_rng(1).integers(0, 256, (6, 8, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    out = _map("tile_resample", flat, rate=2.0)
    assert np.abs(out.astype(int) - flat).mean() < 12  # 8-px cells survive a 2x round trip, edges soften
    assert np.abs(out.astype(int) - flat).max() > 0


def test_shuffle_is_seeded_and_keeps_a_flat_image():
    a = _random(0, 64, 64)
    one, two = _map("shuffle", a), _map("shuffle", a)
    assert np.array_equal(one, two) and not np.array_equal(one, a)
    assert not np.array_equal(_map("shuffle", a, seed=1), one)
    assert (_map("shuffle", np.full((32, 32, 3), 77, np.uint8)) == 77).all()


def test_silhouette_of_an_image_on_white_and_of_a_mask():
    a = np.full((32, 32, 3), 255, np.uint8)
    a[8:24, 8:24] = (200, 30, 30)
    a[12:20, 12:20] = 255  # white inside the shape stays foreground
    expected = np.zeros((32, 32), bool)
    expected[8:24, 8:24] = True
    assert np.array_equal(foreground_mask(Image.fromarray(a)), expected)
    sil = _map("silhouette", a)[..., 0]
    assert np.array_equal(sil > 0, expected)
    assert np.array_equal(_map("silhouette", sil[..., None].repeat(3, 2))[..., 0], sil)  # a mask passes through


@pytest.mark.parametrize("name", sorted(PREPROCESSORS))
def test_preprocess_command_for_every_name(name, tmp_path, capsys):
    Image.fromarray(_random(0, 32, 32)).save(tmp_path / "in.png")
    rc = cli.main(["preprocess", name, str(tmp_path / "in.png"), "-o", str(tmp_path / "out.png")])
    assert rc in (0, None)
    out = np.asarray(Image.open(tmp_path / "out.png"))
    from ldmkit.controlnet_a1111 import run_preprocessor  # the map `--preprocessor NAME` makes (blur: sigma 9)

    assert np.array_equal(out, np.asarray(run_preprocessor(name, Image.open(tmp_path / "in.png"))))


def test_unknown_preprocessor_is_one_line_listing_the_names(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "in.png")
    assert cli.main(["preprocess", "hed", str(tmp_path / "in.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown preprocessor 'hed'" in err
    assert all(n in err for n in ("softedge_sobel", "scribble_xdog", "lineart_adaptive", "seg_palette", "shuffle"))
