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
