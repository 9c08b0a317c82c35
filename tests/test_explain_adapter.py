"""The explain page with T2I-Adapter units (issue 16, part 7): the map the adapter read and the strength of the
feature it adds at each U-Net level per step (RMS after its weight; closed form: the adapter's own features x the
weight on the active steps, 'off' after its end), beside a ControlNet unit in the same generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_t2i_adapter import files  # noqa: F401 - a tiny SD, a full T2I-Adapter and a ControlNet

from ldmkit import checkpoint, controlnet, t2i_adapter
from ldmkit import pipeline as P
from ldmkit.explain import explain, write_page

pytestmark = pytest.mark.usefixtures("one_thread")


def test_explain_shows_adapter_features_per_level(files, tmp_path):  # noqa: F811
    model = checkpoint.load(files / "sd")
    img = Image.open(files / "map2.png")  # 24x16: the output size
    ad = t2i_adapter.make_unit(model, files / "ad", img, 24, 16, 0.8, 0.0, 0.5)
    cn = controlnet.make_unit(model, files / "cn", img, 24, 16, weight=1.0)
    params = P.GenerationParams("a pencil sketch of a house", steps=4, sampler="Euler", scheduler="uniform", seed=5,
                                width=24, height=16, cfg_scale=5, controlnets=(ad, cn))
    ex = explain(model, params)
    av, cv = ex.control
    assert (av.kind, av.index, cv.kind, cv.index) == ("adapter", 0, "controlnet", 1)
    feats = ad.features((16, 24), torch.device("cpu"))
    expect = [0.8 * float(f.float().pow(2).mean().sqrt()) for f in feats]
    assert av.rms.shape == (4, len(feats))
    np.testing.assert_allclose(av.rms[:2], [expect, expect], rtol=1e-5)  # the same features at each active step
    assert np.isnan(av.rms[2:]).all()  # end 0.5: off on steps 3 and 4
    assert (cv.rms > 0).all()  # the ControlNet's rows are found beside an adapter (matched by unit, not index)
    assert np.array_equal(np.asarray(av.map_image), np.asarray(img.convert("RGB")))
    assert np.array_equal(np.asarray(ex.image), np.asarray(P.txt2img(model, params)[0]))  # the generation's path
    text = write_page(ex, tmp_path / "page", model.tokenizer).read_text()
    assert "T2I-Adapter 0" in text and "level 1" in text and "full_adapter" in text and "ControlNet 1" in text
    assert (tmp_path / "page" / "control0.png").exists()
