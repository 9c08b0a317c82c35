"""Bad and odd input to the map features (issue 16), found by trying them as a new user would: each case is a
one-line CLI error or a 4xx from the server, or the right map, never a traceback, a 500 or a silent wrong map.
References: OpenCV's Otsu threshold, the A1111 extension's HWC3 (alpha over white) in closed form."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ldmkit.cli import main
from ldmkit.preprocess import otsu_level, preprocess

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(capsys, *argv):
    rc = main(list(argv))
    return rc, capsys.readouterr()


@pytest.mark.parametrize("grey", [0, 90, 255])
def test_binary_of_a_flat_image_is_opencvs(grey, capsys, tmp_path):
    """A flat image has nothing to split: Otsu's level is 0, as cv2.threshold(THRESH_OTSU) gives (it was a
    'All-NaN slice encountered' error on the CLI and a 500 from /controlnet/detect)."""
    import cv2

    flat = np.full((8, 12), grey, dtype=np.uint8)
    level = cv2.threshold(flat, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)[0]
    assert otsu_level(flat) == level == 0
    Image.fromarray(flat).save(tmp_path / "flat.png")
    rc, cap = _run(capsys, "preprocess", "binary", str(tmp_path / "flat.png"), "-o", str(tmp_path / "b.png"))
    assert rc == 0, cap.err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b.png"))[..., 0], (flat > level) * 255)
    rng = np.random.default_rng(grey)
    for _ in range(50):  # one to four grey levels, or noise: the same split as OpenCV's
        a = rng.choice(rng.integers(0, 256, rng.integers(1, 5)), (7, 9)).astype(np.uint8)
        ref = cv2.threshold(a, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)[0]
        assert np.array_equal(np.asarray(preprocess("binary", Image.fromarray(a)))[..., 0], (a > ref) * 255)


def _hwc3(rgba: np.ndarray) -> np.ndarray:
    """The A1111 extension's (and lllyasviel's annotator) HWC3 for 4 channels, restated."""
    alpha = rgba[..., 3:].astype(np.float32) / 255.0
    return (rgba[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)


def test_preprocessors_read_16_bit_by_range_and_transparency_over_white(capsys, tmp_path):
    """A 16-bit greyscale PNG was clipped to white by PIL's convert (a silent black/white map); a line drawing on
    a transparent background (RGB 0 under alpha 0) came out all black. Both now read as the extension reads them,
    on the CLI (preprocess), in a ControlNet unit's map (control_image) and in /controlnet/detect's path."""
    from ldmkit.controlnet_a1111 import control_image

    rng = np.random.default_rng(0)
    v16 = rng.integers(0, 65536, (20, 30), dtype=np.uint16)
    Image.fromarray(v16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I;16")
    rc, cap = _run(capsys, "preprocess", "invert", str(tmp_path / "g16.png"), "-o", str(tmp_path / "inv.png"))
    assert rc == 0, cap.err
    want = 255 - np.rint(v16 * (255.0 / 65535.0)).astype(np.int32)
    assert np.abs(np.asarray(Image.open(tmp_path / "inv.png"))[..., 0] - want).max() == 0

    sketch = np.zeros((24, 32, 4), dtype=np.uint8)  # transparent black background
    sketch[5:19, 10, 3] = 255  # an opaque black vertical line
    sketch[12, 4:28] = (200, 30, 30, 128)  # a half-transparent red one
    Image.fromarray(sketch, "RGBA").save(tmp_path / "sketch.png")
    rc, cap = _run(capsys, "preprocess", "invert", str(tmp_path / "sketch.png"), "-o", str(tmp_path / "s.png"))
    assert rc == 0, cap.err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "s.png")), 255 - _hwc3(sketch))
    hint, _ = control_image(Image.open(tmp_path / "sketch.png"), 32, 24, "none")
    assert np.array_equal(np.asarray(hint), _hwc3(sketch))
    la = Image.fromarray(sketch, "RGBA").convert("LA")
    assert np.array_equal(np.asarray(preprocess("none", la)), _hwc3(np.asarray(la.convert("RGBA"))))

