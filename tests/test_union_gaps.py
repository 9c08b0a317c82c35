"""ControlNet Union: "auto" (no control type) and per-map weights/windows in one unit (issue 16's open gaps).

- auto: ComfyUI's SetUnionControlNetType "auto" and the A1111 extension's union_control_type "Unknown" both call
  the network with ``control_type=[]`` (comfy/cldm/cldm.py, the extension's scripts/cldm.py): the all-zero type
  vector is still embedded into the time embedding, and the map goes the plain ControlNet way (hint encoder output
  added to the first block's, no task embedding, no transformer). diffusers' ``ControlNetUnionModel`` has no such
  call, but its modules express the definition: control_type all zeros and no listed map (the zero vector's
  embedding, nothing fused), with ``controlnet_cond_embedding(map)`` added to ``conv_in``'s output by a hook.
  Residuals within 1e-4 of that.
- per-map weights: diffusers' ``conditioning_scale`` list for one union model given several maps (the model), and
  the pipeline's ``controlnet_conditioning_scale`` / ``control_guidance_start`` / ``control_guidance_end`` lists
  (one per map of one ``ControlNetUnionModel``): residuals <= 1e-4, images <= 2/255.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
from PIL import Image
from reference import rel_err
from test_controlnet_cli import SETTINGS, _run
from test_controlnet_sdxl import CFG, NEGATIVE, PROMPT, SEED, SIZE, _inputs, assert_matches_reference
from test_controlnet_union import STEPS, _ref, pipe, saved  # noqa: F401 - fixtures

from ldmkit import checkpoint
from ldmkit.config import TINY_SDXL
from ldmkit.controlnet import ControlUnit, control_map, load_controlnet
from ldmkit.infotext import parse_infotext, read_parameters
from ldmkit.models.controlnet_union import AUTO
from ldmkit.models.unet import sdxl_vector
from ldmkit.pipeline import GenerationParams, txt2img


def _ref_auto(net, x, t, ctx, pooled, ids, cmap):
    """The A1111 extension's / ComfyUI's control_type=[] call, with diffusers' modules (see the module docstring)."""
    zero = torch.zeros(x.shape[0], net.config.num_control_type)
    h = net.conv_in.register_forward_hook(lambda _m, _a, out: out + net.controlnet_cond_embedding(cmap))
    try:
        with torch.no_grad():
            return net(x, t, encoder_hidden_states=ctx, controlnet_cond=[], control_type=zero, control_type_idx=[],
                       added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}, return_dict=False)
    finally:
        h.remove()


def test_auto_residuals_match_the_definition_on_diffusers_modules(saved):  # noqa: F811
    folder, ref = saved
    x, hint, t, ctx, pooled, ids = _inputs()
    hint = hint[..., :16, :24]
    down, mid = _ref_auto(ref, x, t, ctx, pooled, ids, hint)
    ours = load_controlnet(folder / "union", TINY_SDXL.unet)
    with torch.no_grad():
        r = ours(x, hint, t, ctx, sdxl_vector(pooled, ids), types=[AUTO])
    assert max(rel_err(a, b) for a, b in zip(r.down, down, strict=True)) <= 1e-4
    assert rel_err(r.mid, mid) <= 1e-4
    # it is neither a typed call nor the map ignored
    typed = _ref(ref, x, t, ctx, pooled, ids, [hint], [3], 1.0)
    assert rel_err(r.mid, typed[1]) > 1e-2
    blind = _ref_auto(ref, x, t, ctx, pooled, ids, torch.zeros_like(hint))
    assert rel_err(r.mid, blind[1]) > 1e-2


def test_per_map_weights_residuals_match_diffusers(saved):  # noqa: F811
    folder, ref = saved
    x, hint, t, ctx, pooled, ids = _inputs()
    hint = hint[..., :16, :24]
    maps = [hint, hint.flip(-1)]
    down, mid = _ref(ref, x, t, ctx, pooled, ids, maps, [1, 0], [0.8, 0.3])
    ours = load_controlnet(folder / "union", TINY_SDXL.unet)
    with torch.no_grad():
        r = ours(x, torch.cat(maps, dim=1), t, ctx, sdxl_vector(pooled, ids), types=[1, 0], weight=[0.8, 0.3])
        same = ours(x, torch.cat(maps, dim=1), t, ctx, sdxl_vector(pooled, ids), types=[1, 0], weight=0.8)
    assert max(rel_err(a, b) for a, b in zip(r.down, down, strict=True)) <= 1e-4
    assert rel_err(r.mid, mid) <= 1e-4
    assert rel_err(same.mid, mid) > 1e-3  # one weight for both is another result


def test_per_map_weights_and_windows_image_matches_diffusers_pipeline(pipe, saved):  # noqa: F811
    """One ControlNetUnionModel, two maps: controlnet_conditioning_scale [0.8, 0.5], control_guidance_start
    [0, 0.25], control_guidance_end [1, 0.75] (the second map acts in steps 3-4 of 6, the first in all)."""
    from diffusers import StableDiffusionXLControlNetUnionPipeline

    folder, p, net, maps = pipe
    comps = {k: v for k, v in p.components.items()
             if k in inspect.signature(StableDiffusionXLControlNetUnionPipeline.__init__).parameters}
    ref_pipe = StableDiffusionXLControlNetUnionPipeline(**comps, controlnet=net)
    out = ref_pipe(PROMPT, control_image=maps, control_mode=[1, 0], negative_prompt=NEGATIVE,
                   num_inference_steps=STEPS, guidance_scale=CFG, generator=torch.Generator().manual_seed(SEED),
                   width=SIZE[0], height=SIZE[1], controlnet_conditioning_scale=[0.8, 0.5],
                   control_guidance_start=[0.0, 0.25], control_guidance_end=[1.0, 0.75], output_type="np")
    ref = (out.images[0] * 255).round().astype(np.int16)
    model = checkpoint.load(folder / "model")
    cn = load_controlnet(saved[0] / "union", model.cfg.unet)
    hint = torch.cat([control_map(m, *SIZE) for m in maps], dim=1)
    unit = ControlUnit(cn, hint, 0.8, 0.0, 1.0, control_types=(1, 0), map_weights=(0.8, 0.5),
                       map_windows=((0.0, 1.0), (0.25, 0.75)))
    assert_matches_reference(model, unit, ref, STEPS)


def test_cli_auto_and_per_map_values(pipe, saved, capsys, tmp_path):  # noqa: F811
    """--control-type auto, and --control-weight/start/end with one value per map (joined with +), give the Python
    API's images; the infotext says Unknown (the extension's value) and 0.8+0.5; bad values are one line each."""
    folder, _, _, maps = pipe
    union, m0, m1 = str(saved[0] / "union"), str(folder / "map0.png"), str(folder / "map1.png")
    model = checkpoint.load(folder / "model")
    cn = load_controlnet(union, model.cfg.unet)
    gen = dict(steps=4, sampler="Euler", scheduler="uniform", seed=5, width=24, height=16, cfg_scale=5)
    base = ["generate", PROMPT, "--model", str(folder / "model"), *SETTINGS, "--controlnet", union]
    rc, cap = _run(capsys, *base, "--control-image", m0, "--control-type", "auto", "--control-weight", "0.7",
                   "-o", str(tmp_path / "auto.png"))
    assert rc == 0, cap.err
    unit = ControlUnit(cn, control_map(maps[0], *SIZE), 0.7, control_types=(AUTO,))
    api = txt2img(model, GenerationParams(PROMPT, **gen, controlnets=(unit,)))[0]
    auto = np.asarray(Image.open(tmp_path / "auto.png").convert("RGB"))
    assert np.array_equal(auto, np.asarray(api.convert("RGB")))
    line = parse_infotext(read_parameters(tmp_path / "auto.png"))["ControlNet 0"]
    assert line.endswith(", Union Control Type: Unknown"), line

    rc, cap = _run(capsys, *base, "--control-image", f"{m0}+{m1}", "--control-type", "depth+openpose",
                   "--control-weight", "0.8+0.5", "--control-start", "0+0.25", "--control-end", "1+0.75",
                   "-o", str(tmp_path / "per-map.png"))
    assert rc == 0, cap.err
    hint = torch.cat([control_map(m, *SIZE) for m in maps], dim=1)
    unit = ControlUnit(cn, hint, 0.8, control_types=(1, 0), map_weights=(0.8, 0.5),
                       map_windows=((0.0, 1.0), (0.25, 0.75)))
    api = txt2img(model, GenerationParams(PROMPT, **gen, controlnets=(unit,)))[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "per-map.png").convert("RGB")),
                          np.asarray(api.convert("RGB")))
    line = parse_infotext(read_parameters(tmp_path / "per-map.png"))["ControlNet 0"]
    assert "Weight: 0.8+0.5" in line and "Guidance Start: 0+0.25" in line and "Guidance End: 1+0.75" in line, line
    bad = [
        (["--control-image", f"{m0}+{m1}", "--control-type", "depth+openpose", "--control-weight", "0.8+0.5+0.1"],
         "gives 3 values for 2 maps"),
        (["--control-image", m0, "--control-type", "depth", "--control-weight", "0.8+0.5"],
         "per-map weights/windows (a+b) are for a ControlNet Union unit with several maps"),
        (["--control-image", f"{m0}+{m1}", "--control-type", "auto+depth"], "auto (no control type) reads one map"),
        (["--control-image", m0, "--control-type", "depth", "--control-weight", "lots"], "'lots' is not a number"),
        (["--control-image", f"{m0}+{m1}", "--control-type", "depth+openpose", "--control-start", "0.5+0.9",
          "--control-end", "0.4+1"], "must satisfy 0 <= start < end <= 1"),
    ]
    for extra, msg in bad:
        rc, cap = _run(capsys, *base, *extra, "-o", str(tmp_path / "bad.png"))
        assert rc != 0 and msg in cap.err and "Traceback" not in cap.err, (extra, cap.err)
        assert len(cap.err.strip().splitlines()) == 1, cap.err


def test_explain_names_auto_and_per_map_values(pipe, saved, tmp_path):  # noqa: F811
    from ldmkit.explain import explain, write_page

    folder, _, _, maps = pipe
    model = checkpoint.load(folder / "model")
    cn = load_controlnet(saved[0] / "union", model.cfg.unet)
    hint = torch.cat([control_map(m, *SIZE) for m in maps], dim=1)
    units = (ControlUnit(cn, hint, 0.8, control_types=(1, 0), map_weights=(0.8, 0.5),
                         map_windows=((0.0, 1.0), (0.5, 1.0))),
             ControlUnit(cn, hint[:, :3], 0.6, control_types=(AUTO,)))
    ex = explain(model, GenerationParams(PROMPT, steps=2, sampler="Euler", seed=5, width=24, height=16, cfg_scale=5,
                                         controlnets=units))
    page = write_page(ex, tmp_path / "page", model.tokenizer).read_text()
    assert "per map: weight 0.8 in 0–1 + weight 0.5 in 0.5–1" in page and "ControlNet Union: auto (no type)" in page
    assert all(np.isfinite(v.rms).all() and (v.rms > 0).all() for v in ex.control)
