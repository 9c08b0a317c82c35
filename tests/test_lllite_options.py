"""ControlNet-LLLite options (issue 16's open gaps): sd-scripts' CFG-row options, the hires-fix option, control modes
as the A1111 extension treats them, and the explain page's per-block strengths.

References (no library runs LLLite): sd-scripts ``networks/control_net_lllite.py`` ``LLLiteModule.forward`` with
``set_batch_cond_only(cond_only, zeros)`` restated here with torch.nn.functional (batch_cond_only: the module reads
``x[1::2]`` and adds to those rows only; use_zeros_for_batch_uncond: the condition embedding of rows ``0::2`` is
zero; for one image the CFG batch is [negative, prompt], so row 1 is the prompt's); the A1111 extension's
``scripts/controlnet_lllite.py`` (its patch reads weight, start and end only: control modes change nothing); and for
the explain page, the RMS of the restated formula's addition at the first step.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from test_controlnet_cli import _run
from test_controlnet_lllite import GEN, SIZE, _image, files, lllite_file, one_linear, reference_delta  # noqa: F401

from ldmkit import checkpoint
from ldmkit.controlnet import trace_residuals
from ldmkit.controlnet_lllite import LLLiteUnit, applied, build, load_lllite
from ldmkit.hires import HiresParams, txt2img_hires
from ldmkit.pipeline import GenerationParams

LAYER = "input_blocks.3.1.transformer_blocks.0.attn1.to_k"


def _sd_scripts_forward(sd, k, x, cmap, weight, cond_only, zeros):
    """LLLiteModule.forward's addition to the Linear's input, with set_batch_cond_only(cond_only, zeros), restated
    (x: [negative, prompt] rows of one image)."""
    if cond_only:
        out = torch.zeros_like(x)
        out[1::2] = reference_delta(sd, k, x[1::2], cmap, weight)
        return out
    if zeros:  # cx[0::2] = 0: the negative row's condition embedding is zero; the module still runs there
        h = F.relu(F.linear(x[0::2], sd[f"{k}.down.0.weight"], sd[f"{k}.down.0.bias"]))
        cond = sd[f"{k}.mid.0.weight"].shape[1] - h.shape[-1]
        c = torch.zeros(*h.shape[:-1], cond)
        h = F.relu(F.linear(torch.cat([c, h], dim=-1), sd[f"{k}.mid.0.weight"], sd[f"{k}.mid.0.bias"]))
        out = reference_delta(sd, k, x, cmap, weight)
        out[0::2] = F.linear(h, sd[f"{k}.up.0.weight"], sd[f"{k}.up.0.bias"]) * weight
        return out
    return reference_delta(sd, k, x, cmap, weight)


@pytest.mark.parametrize("batch", ["both", "cond-only", "zeros-uncond"])
def test_batch_modes_match_sd_scripts(batch):
    g, root, k, sd = one_linear()
    net = build(sd, root, 8)
    cmap = torch.rand(1, 3, 16, 24, generator=g)
    x = torch.randn(2, 6, 6, generator=g)  # [negative, prompt]: uncond_rows 1
    unit = LLLiteUnit(net, cmap, 0.7, batch=batch)
    with torch.no_grad(), applied(root, [(net, unit.embeddings((16, 24), x.device), 0.7, unit.batch)], 1):
        ours = root["proj"](x)
    with torch.no_grad():
        d = _sd_scripts_forward(sd, k, x, cmap, 0.7, batch == "cond-only", batch == "zeros-uncond")
        ref = F.linear(x + d, root["proj"].weight, root["proj"].bias)
        plain = root["proj"](x)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)
    if batch == "cond-only":  # the negative prompt's row untouched
        assert torch.equal(ours[0], plain[0]) and not torch.allclose(ours[1], plain[1], atol=1e-3)


def test_cli_lllite_batch_and_errors(files, capsys, tmp_path):  # noqa: F811
    import ldmkit

    base = ["generate", "a stone house", "--model", str(files / "xl.safetensors"), *GEN, "--controlnet",
            str(files / "lllite.safetensors"), "--control-image", str(files / "map.png")]
    got = {}
    for batch in ("both", "cond-only", "zeros-uncond"):
        rc, cap = _run(capsys, *base, "--lllite-batch", batch, "-o", str(tmp_path / f"{batch}.png"))
        assert rc == 0, cap.err
        got[batch] = _image(tmp_path / f"{batch}.png")
    assert not np.array_equal(got["both"], got["cond-only"]) and not np.array_equal(got["both"], got["zeros-uncond"])
    from ldmkit.infotext import parse_infotext, read_parameters

    line = parse_infotext(read_parameters(tmp_path / "cond-only.png"))["ControlNet 0"]
    assert line.endswith(", Control Mode: Balanced, LLLite Batch: cond-only"), line
    assert "LLLite Batch" not in parse_infotext(read_parameters(tmp_path / "both.png"))["ControlNet 0"]
    pipe = ldmkit.load(str(files / "xl.safetensors"))
    unit = pipe.control_unit(files / "lllite.safetensors", Image.open(files / "map.png"), *SIZE,
                             lllite_batch="cond-only")
    api = pipe.txt2img("a stone house", steps=4, sampler="Euler", scheduler="uniform", seed=5, width=SIZE[0],
                       height=SIZE[1], cfg_scale=5, controlnets=[unit])[0]
    assert np.array_equal(got["cond-only"], np.asarray(api.convert("RGB")))
    bad = [(["--lllite-batch", "sparkles"], "--lllite-batch 'sparkles': use one of both, cond-only, zeros-uncond"),
           (["--control-mode", "prompt"], "has no effect on a ControlNet-LLLite"),
           (["--control-weight", "0.5+0.5"], "per-map weights/windows (a+b) are for a ControlNet Union unit"),
           (["--control-type", "depth"], "takes no control type")]
    for extra, msg in bad:
        rc, cap = _run(capsys, *base, *extra, "-o", str(tmp_path / "bad.png"))
        assert rc != 0 and msg in cap.err and "Traceback" not in cap.err, (extra, cap.err)
        assert len(cap.err.strip().splitlines()) == 1, cap.err


def test_hr_option_and_the_a1111_api(files, capsys, tmp_path):  # noqa: F811
    """--control-hr-option low/high: the LLLite acts in the first / second pass only (U-Net calls it acts in, from
    the trace); the A1111 API's hr_option "Low res only" with enable_hr gives the CLI's image; lllite_batch on the
    API; bad values are 422s."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from ldmkit.server.app import create_app

    model = checkpoint.load(files / "xl.safetensors")
    net = load_lllite(files / "lllite.safetensors", model)
    cmap = torch.rand(1, 3, SIZE[1], SIZE[0], generator=torch.Generator().manual_seed(0))
    params = GenerationParams("a house", steps=3, sampler="Euler", seed=2, width=SIZE[0], height=SIZE[1],
                              cfg_scale=4)
    calls, images = {}, {}
    for opt in ("Both", "Low res only", "High res only"):
        unit = LLLiteUnit(net, cmap, 0.9, hr_option=opt)
        with trace_residuals() as rows:
            images[opt] = np.asarray(txt2img_hires(model, params.replace(controlnets=(unit,)),
                                                   HiresParams(2.0, "Latent", steps=2, denoise=0.6))[0])
        calls[opt] = len(rows)
    assert calls["Both"] == calls["Low res only"] + calls["High res only"] and calls["Low res only"] == 3
    assert calls["High res only"] > 0
    assert len({images[o].tobytes() for o in images}) == 3

    hires = ["--hires-scale", "2", "--hires-upscaler", "Lanczos", "--hires-denoise", "0.5"]
    rc, cap = _run(capsys, "generate", "a stone house", "--model", str(files / "xl.safetensors"), *GEN, *hires,
                   "--controlnet", str(files / "lllite.safetensors"), "--control-image", str(files / "map.png"),
                   "--control-hr-option", "low", "--lllite-batch", "cond-only", "-o", str(tmp_path / "cli.png"))
    assert rc == 0, cap.err
    (tmp_path / "cn").mkdir()
    (tmp_path / "cn" / "lllite-tiny.safetensors").write_bytes((files / "lllite.safetensors").read_bytes())
    app = create_app(files / "xl.safetensors", controlnet_dir=tmp_path / "cn", preview_interval=None, device="cpu")
    client = TestClient(app, raise_server_exceptions=False)
    buf = io.BytesIO()
    Image.open(files / "map.png").save(buf, format="PNG")
    unit = {"module": "none", "model": "lllite-tiny", "image": base64.b64encode(buf.getvalue()).decode(),
            "resize_mode": "Just Resize", "hr_option": "Low res only", "lllite_batch": "cond-only"}
    body = {"prompt": "a stone house", "steps": 4, "seed": 5, "width": SIZE[0], "height": SIZE[1], "cfg_scale": 5,
            "sampler_name": "Euler", "scheduler": "Uniform", "enable_hr": True, "hr_scale": 2,
            "hr_upscaler": "Lanczos", "denoising_strength": 0.5,
            "alwayson_scripts": {"controlnet": {"args": [unit]}}}
    try:
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
        api = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
        for field, value in (("hr_option", "Sometimes"), ("lllite_batch", "sparkles")):
            bad = client.post("/sdapi/v1/txt2img", json=body | {"alwayson_scripts": {"controlnet": {"args": [
                unit | {field: value}]}}})
            assert bad.status_code == 422 and field in bad.text, bad.text
    finally:
        app.state.worker.stop()
    assert np.array_equal(api, _image(tmp_path / "cli.png"))


def test_explain_table_per_block(files, tmp_path):  # noqa: F811
    """One module (input block 3's attn1.to_k): the explain page's strength at step 1 in block "input 3" is the RMS
    of the restated formula's addition to that layer's input at the first U-Net call; off after the window."""
    from ldmkit.explain import explain, write_page

    model = checkpoint.load(files / "xl.safetensors")
    sd = lllite_file(model.unet, 2, seed=3, only=LAYER)
    save_file(sd, tmp_path / "one.safetensors")
    net = load_lllite(tmp_path / "one.safetensors", model)
    cmap = torch.rand(1, 3, SIZE[1], SIZE[0], generator=torch.Generator().manual_seed(0))
    unit = LLLiteUnit(net, cmap, 0.9, end=0.5)
    seen = []
    h = dict(model.unet.named_modules())[LAYER].register_forward_pre_hook(lambda _m, a: seen.append(a[0].clone()))
    try:
        ex = explain(model, GenerationParams("a house", steps=4, sampler="Euler", seed=2, width=SIZE[0],
                                             height=SIZE[1], cfg_scale=4, controlnets=(unit,)))
    finally:
        h.remove()
    view = ex.control[0]
    assert view.kind == "lllite" and view.blocks == ("input 3",)
    k = "lllite_unet_" + LAYER.replace(".", "_")
    ref = reference_delta(sd, k, seen[0], cmap, 0.9).pow(2).mean().sqrt()
    assert abs(view.rms[0, 0] - float(ref)) <= 1e-4 * float(ref)
    assert np.isfinite(view.rms[:2]).all() and np.isnan(view.rms[2:]).all()  # end 0.5 of 4 steps
    page = write_page(ex, tmp_path / "page", model.tokenizer).read_text()
    assert "ControlNet-LLLite 0" in page and "input 3 block" in page
