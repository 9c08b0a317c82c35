"""`ldmkit generate --adapter` with the A1111 map options (issue 16, found by probing): --resize-mode,
--control-threshold-a/b, --pixel-perfect and --processor-res were silently ignored for a T2I-Adapter (the map
was always stretched, the sliders unused), and --control-mode prompt ran balanced without a word. The map is now
made as the server makes it for an adapter unit (the same image, pixel for pixel), and a control mode other than
balanced, a control type, an LLLite batch or a hires-pass option is one line (they were ignored)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image
from test_controlnet_server_adapter import BODY, SKETCH, _b64, client, files  # noqa: F401 - fixtures

from ldmkit import controlnet_a1111 as A
from ldmkit.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_adapter_map_options_give_the_server_image(client, files, tmp_path):  # noqa: F811
    path = files / "cn" / SKETCH
    unit = {"module": "canny", "model": A.model_title(path), "image": _b64(files / "map.png"), "weight": 0.8,
            "resize_mode": "Crop and Resize", "threshold_a": 50, "threshold_b": 120, "processor_res": 64}
    r = client.post("/sdapi/v1/txt2img", json={**BODY, "alwayson_scripts": {"controlnet": {"args": [unit]}}})
    assert r.status_code == 200, r.text
    got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    argv = ["generate", "a stone house", "--model", str(files / "sd.safetensors"), "--steps", "4", "--sampler",
            "Euler", "--seed", "5", "--width", "24", "--height", "16", "--cfg-scale", "5", "--adapter", str(path),
            "--control-image", str(files / "map.png"), "--control-weight", "0.8", "--preprocessor", "canny"]
    out, stretched = tmp_path / "cli.png", tmp_path / "stretched.png"
    assert main([*argv, "--resize-mode", "crop-and-resize", "--control-threshold-a", "50",
                 "--control-threshold-b", "120", "--processor-res", "64", "-o", str(out)]) == 0
    assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(Image.open(out).convert("RGB")))
    assert main([*argv, "-o", str(stretched)]) == 0  # the options change the map, hence the image
    assert not np.array_equal(np.asarray(Image.open(stretched)), np.asarray(Image.open(out)))


@pytest.mark.parametrize("flags, says", [
    (["--control-mode", "prompt"], "is for ControlNets; a T2I-Adapter runs in the balanced mode"),
    (["--control-mode", "guess"], "is for ControlNets; a T2I-Adapter runs in the balanced mode"),
    (["--control-type", "canny"], "--control-type is not for a T2I-Adapter"),
    (["--lllite-batch", "cond-only"], "--lllite-batch is not for a T2I-Adapter"),
    (["--control-hr-option", "low", "--hires-scale", "2"], "--control-hr-option is not for a T2I-Adapter"),
])
def test_controlnet_only_options_on_an_adapter_are_one_line(files, capsys, flags, says):  # noqa: F811
    rc = main(["generate", "a stone house", "--model", str(files / "sd.safetensors"), "--steps", "1", "--width", "24",
               "--height", "16", "--adapter", str(files / "cn" / SKETCH), "--control-image", str(files / "map.png"),
               *flags])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and says in err, err
