"""The explain page with a ControlNet (issue 16, part 7): the map it read and its residuals' strength per block
and step, recorded from the generation's own path (the image is txt2img's)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_controlnet_cli import SETTINGS, _run, files  # noqa: F401 - the tiny SD + ControlNet files

from ldmkit import checkpoint
from ldmkit import pipeline as P
from ldmkit.controlnet import make_unit
from ldmkit.explain import explain, write_page

pytestmark = pytest.mark.usefixtures("one_thread")


def test_explain_records_the_map_and_residuals_per_block(files, tmp_path):  # noqa: F811
    model = checkpoint.load(files / "sd")
    img = Image.open(files / "map.png")
    base = P.GenerationParams("a stone house", steps=4, sampler="Euler", scheduler="uniform", seed=5, width=24,
                              height=16, cfg_scale=5)
    runs = []
    for w in (0.5, 1.0):
        unit = make_unit(model, files / "cn", img, 24, 16, weight=w, start=0.5)
        runs.append((unit, explain(model, base.replace(controlnets=(unit,)))))
    (unit, ex), (_, ex2) = runs
    view = ex.control[0]
    blocks = len(unit.model.zero_convs) + 1
    assert view.rms.shape == (4, blocks)
    assert np.isnan(view.rms[:2]).all() and (view.rms[2:] > 0).all()  # off before start = 0.5
    # the first active step sees the same latent under both weights: the residuals scale with the weight
    np.testing.assert_allclose(ex2.control[0].rms[2], 2 * view.rms[2], rtol=1e-4)
    assert np.array_equal(np.asarray(view.map_image), (unit.image[0].permute(1, 2, 0).numpy() * 255).round()
                          .astype(np.uint8))
    same = P.txt2img(model, base.replace(controlnets=(unit,)))[0]  # explain runs txt2img's own path
    assert np.array_equal(np.asarray(ex.image), np.asarray(same))
    page = write_page(ex, tmp_path / "page", model.tokenizer)
    text = page.read_text()
    assert 'id="controlnet"' in text and "skip 1" in text and "middle" in text and ">off<" in text
    assert (tmp_path / "page" / "control0.png").exists()


def test_explain_cli_takes_controlnet_flags(files, capsys, tmp_path):  # noqa: F811
    rc, cap = _run(capsys, "explain", "a stone house", "--model", str(files / "sd"), "--steps", "3", "--width",
                   "24", "--height", "16", "--controlnet", str(files / "cn"), "--control-image",
                   str(files / "map.png"), "--control-mode", "prompt", "-o", str(tmp_path / "ex"))
    assert rc == 0, cap.err
    html = (tmp_path / "ex" / "index.html").read_text()
    assert "ControlNet 0" in html and "My prompt is more important" in html
    rc, cap = _run(capsys, "explain", "x", "--model", str(files / "sd"), "--controlnet", str(files / "cn"))
    assert rc == 2 and "--control-image" in cap.err and "Traceback" not in cap.err
