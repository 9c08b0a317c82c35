"""ControlNet Union (xinsir's controlnet-union-sdxl-1.0 / ProMax) against diffusers on a random tiny SDXL config:
residuals against ``diffusers.ControlNetUnionModel`` (one map, two maps in one call; folder and lone file;
relative error <= 1e-4), whole images against ``StableDiffusionXLControlNetUnionPipeline`` (<= 2/255), control
types by name, ``--control-type`` on the command line, ``ldmkit info`` and the one-line errors.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from PIL import Image
from reference import _perturb_norms, rel_err
from test_controlnet import diffusers_controlnet_config
from test_controlnet_cli import SETTINGS, _run
from test_controlnet_sdxl import CFG, NEGATIVE, PROMPT, SEED, SIZE, _inputs, assert_matches_reference

from ldmkit import checkpoint
from ldmkit.config import TINY, TINY_SDXL
from ldmkit.controlnet import ControlNetError, ControlUnit, control_map, describe_file, load_controlnet
from ldmkit.controlnet_a1111 import model_title
from ldmkit.controlnet_files import control_type, control_types
from ldmkit.infotext import parse_infotext, read_parameters
from ldmkit.models.controlnet_union import UnionControlNet
from ldmkit.models.unet import sdxl_vector
from ldmkit.pipeline import GenerationParams, txt2img

HINT = (8, 16)


def diffusers_union(unet_cfg, seed=0, types=8):
    from diffusers import ControlNetUnionModel

    accepted = set(inspect.signature(ControlNetUnionModel.__init__).parameters)
    c = {k: v for k, v in diffusers_controlnet_config(unet_cfg, HINT).items() if k in accepted}
    mc = unet_cfg.model_channels
    torch.manual_seed(seed)
    net = ControlNetUnionModel(**c, num_control_type=types, num_trans_channel=mc, num_trans_head=8,
                               num_trans_layer=2, num_proj_channel=mc).eval()
    _perturb_norms(net)
    g = torch.Generator().manual_seed(seed + 5)
    for name, p in net.named_parameters():
        if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out",
                            "spatial_ch_projs", "transformer_layes")):
            p.data.copy_(0.2 * torch.randn(p.shape, generator=g))
    return net


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("union")
    net = diffusers_union(TINY_SDXL.unet, seed=2)
    net.save_pretrained(folder / "union")
    return folder, net


def _ref(net, x, t, ctx, pooled, ids, maps, types, scale):
    onehot = torch.zeros(x.shape[0], net.config.num_control_type)
    onehot[:, types] = 1
    with torch.no_grad():
        return net(x, t, encoder_hidden_states=ctx, controlnet_cond=maps, control_type=onehot,
                   control_type_idx=list(types), conditioning_scale=scale,
                   added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}, return_dict=False)


@pytest.mark.parametrize("types, scale", [([3], 0.7), ([1, 0], 0.6)], ids=["one-map", "two-maps"])
def test_union_residuals_match_diffusers(saved, types, scale):
    folder, ref = saved
    x, hint, t, ctx, pooled, ids = _inputs()
    hint = hint[..., :16, :24]  # hint encoder (8, 16): one halving
    maps = [hint, hint.flip(-1)][: len(types)]
    down, mid = _ref(ref, x, t, ctx, pooled, ids, maps, types, scale if len(types) == 1 else [scale] * len(types))
    for path in (folder / "union", folder / "union" / "diffusion_pytorch_model.safetensors"):
        ours = load_controlnet(path, TINY_SDXL.unet)
        assert isinstance(ours, UnionControlNet) and ours.cfg.num_types == 8 and ours.cfg.trans_layers == 2
        with torch.no_grad():
            r = ours(x, torch.cat(maps, dim=1), t, ctx, sdxl_vector(pooled, ids), types=types, weight=scale)
        if len(types) == 1:
            r = r.scaled(scale)  # one map: the unit scales the residuals (ControlledUNet)
        assert len(r.down) == len(down)
        assert max(rel_err(a, b) for a, b in zip(r.down, down, strict=True)) <= 1e-4
        assert rel_err(r.mid, mid) <= 1e-4
    # the type matters: another type, other residuals
    with torch.no_grad():
        other = ours(x, torch.cat(maps, dim=1), t, ctx, sdxl_vector(pooled, ids), types=[5] * len(types))
    assert rel_err(other.mid, mid) > 1e-2


def test_control_type_names():
    assert control_type("openpose") == 0 and control_type("Depth") == 1 and control_type("scribble") == 2
    assert control_type("canny") == 3 == control_type("Hard Edge") == control_type("lineart") == control_type("3")
    assert control_type("Normal Map") == 4 and control_type("seg") == 5 and control_type("tile") == 6
    assert control_type("inpaint") == 7 and control_types("depth+openpose") == (1, 0)
    with pytest.raises(ValueError, match="unknown ControlNet Union control type 'sparkles'"):
        control_type("sparkles")
    with pytest.raises(ValueError, match="not one of this ControlNet Union's 6"):
        control_type("tile", 6)  # the first release has 6 types; tile and repaint came with ProMax


@pytest.fixture(scope="module")
def pipe(tmp_path_factory, saved):
    import diffusers
    from test_sdxl import _diffusers_sdxl_folder

    folder = tmp_path_factory.mktemp("union-pipe")
    p = _diffusers_sdxl_folder(TINY_SDXL, folder)
    p.scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                   timestep_spacing="linspace")
    rng = np.random.default_rng(0)
    maps = [Image.fromarray(rng.integers(0, 255, (SIZE[1], SIZE[0], 3), dtype=np.uint8)) for _ in range(2)]
    for i, m in enumerate(maps):
        m.save(folder / f"map{i}.png")
    return folder, p, saved[1], maps


STEPS = 6


@pytest.mark.parametrize("types, scale, start, end", [([3], 0.8, 0.0, 1.0), ([3], 1.0, 0.25, 0.75),
                                                     ([1, 0], 0.7, 0.0, 1.0)], ids=["one-map", "window", "two-maps"])
def test_union_image_matches_diffusers_pipeline(pipe, saved, types, scale, start, end):
    """(With several maps only the whole window: outside it diffusers still runs the union network with the maps'
    contributions zeroed, ldmkit leaves the unit out, as the A1111 extension and ComfyUI do.)"""
    from diffusers import StableDiffusionXLControlNetUnionPipeline

    folder, p, net, maps = pipe
    maps = maps[: len(types)]
    comps = {k: v for k, v in p.components.items()
             if k in inspect.signature(StableDiffusionXLControlNetUnionPipeline.__init__).parameters}
    ref_pipe = StableDiffusionXLControlNetUnionPipeline(**comps, controlnet=net)
    out = ref_pipe(PROMPT, control_image=maps, control_mode=types, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                   guidance_scale=CFG, generator=torch.Generator().manual_seed(SEED), width=SIZE[0], height=SIZE[1],
                   controlnet_conditioning_scale=scale, control_guidance_start=start,
                   control_guidance_end=end, output_type="np")
    ref = (out.images[0] * 255).round().astype(np.int16)
    model = checkpoint.load(folder / "model")
    cn = load_controlnet(saved[0] / "union", model.cfg.unet)
    hint = torch.cat([control_map(m, *SIZE) for m in maps], dim=1)
    unit = ControlUnit(cn, hint, scale, start, end, control_types=tuple(types))
    assert_matches_reference(model, unit, ref, STEPS)


def test_cli_control_type_and_errors(pipe, saved, capsys, tmp_path):
    folder, _, _, maps = pipe
    union = str(saved[0] / "union")
    out = tmp_path / "cli.png"
    m0, m1 = str(folder / "map0.png"), str(folder / "map1.png")
    rc, cap = _run(capsys, "generate", PROMPT, "--model", str(folder / "model"), *SETTINGS, "--controlnet", union,
                   "--control-image", f"{m0}+{m1}", "--control-type", "depth+openpose", "--control-weight", "0.8",
                   "-o", str(out))
    assert rc == 0, cap.err
    model = checkpoint.load(folder / "model")
    hint = torch.cat([control_map(m, *SIZE) for m in maps], dim=1)
    unit = ControlUnit(load_controlnet(union, model.cfg.unet), hint, 0.8, control_types=(1, 0))
    api = txt2img(model, GenerationParams(PROMPT, steps=4, sampler="Euler", scheduler="uniform", seed=5, width=24,
                                          height=16, cfg_scale=5, controlnets=(unit,)))[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(api.convert("RGB")))
    # two maps in one unit: the extension's type names joined with "+", read back by --control-type
    line = parse_infotext(read_parameters(out))["ControlNet 0"]
    assert line.endswith(", Union Control Type: Depth+OpenPose"), line
    assert control_types(line.rsplit(": ", 1)[1]) == (1, 0)
    bad = [
        (["--controlnet", union, "--control-image", m0], "is a ControlNet Union: name the map's control type"),
        (["--controlnet", union, "--control-image", m0, "--control-type", "sparkles"], "unknown ControlNet Union"),
        (["--controlnet", union, "--control-image", m0, "--control-type", "depth+canny"], "names 2 map(s) but 1"),
    ]
    for extra, msg in bad:
        rc, cap = _run(capsys, "generate", PROMPT, "--model", str(folder / "model"), *SETTINGS, *extra,
                       "-o", str(tmp_path / "bad.png"))
        assert rc != 0 and msg in cap.err and len(cap.err.strip().splitlines()) == 1, cap.err


def test_union_family_error_and_info(saved, capsys):
    folder, _ = saved
    with pytest.raises(ControlNetError, match="is for SDXL-like .* but the model is .*: use a") as e:
        load_controlnet(folder / "union", TINY.unet)
    assert "\n" not in str(e.value)
    for path in (folder / "union", folder / "union" / "diffusion_pytorch_model.safetensors"):
        line = describe_file(path)
        assert line.startswith("ControlNet Union (8 control types: openpose, depth,") and "for SDXL" in line
        rc, cap = _run(capsys, "info", str(path))
        assert rc == 0 and "ControlNet Union (8 control types" in cap.out, cap


def test_a1111_units_union_and_control_lora(pipe, saved, capsys, tmp_path):
    """The A1111 API: a unit naming a ControlNet Union with the extension's union_control_type, and one naming a
    Control-LoRA (built over the server's model), give the CLI's images; a Union without a type runs as
    --control-type auto (the extension's Unknown); an unknown type is a 422."""
    pytest.importorskip("fastapi")
    import base64
    import io
    import shutil

    from fastapi.testclient import TestClient
    from test_control_lora import _make
    from test_controlnet import diffusers_controlnet

    from ldmkit.controlnet import read_controlnet
    from ldmkit.server.app import create_app

    folder, _, _, _ = pipe
    (tmp_path / "cn").mkdir()
    shutil.copytree(saved[0] / "union", tmp_path / "cn" / "union-tiny")
    diffusers_controlnet(TINY_SDXL.unet, hint=HINT, seed=9).save_pretrained(tmp_path / "known")
    model = checkpoint.load(folder / "model")
    _make({k: v.clone() for k, v in model.unet.state_dict().items()}, read_controlnet(tmp_path / "known"),
          tmp_path / "cn" / "control-lora-tiny.safetensors", rank=4)
    app = create_app(folder / "model", controlnet_dir=tmp_path / "cn", preview_interval=None, device="cpu")
    client = TestClient(app, raise_server_exceptions=False)
    buf = io.BytesIO()
    Image.open(folder / "map0.png").save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    common = {"prompt": PROMPT, "steps": 4, "seed": 5, "width": 24, "height": 16, "cfg_scale": 5,
              "sampler_name": "Euler"}
    try:
        titles = client.get("/controlnet/model_list").json()["model_list"]
        assert {t.split(" [")[0] for t in titles} >= {"union-tiny", "control-lora-tiny"}
        got = {}
        for name, extra in (("union-tiny", {"union_control_type": "Depth"}), ("control-lora-tiny", {})):
            unit = {"module": "none", "model": name, "image": b64, "weight": 0.8, "resize_mode": "Just Resize", **extra}
            r = client.post("/sdapi/v1/txt2img", json={**common, "alwayson_scripts": {"controlnet": {"args": [unit]}}})
            assert r.status_code == 200, r.text
            got[name] = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
            info = r.json()["info"]
            assert ("Union Control Type: Depth" in info) == (name == "union-tiny"), info
        # no union_control_type (the extension's default "Unknown"): auto, no control type, as the extension runs it
        unit = {"module": "none", "model": "union-tiny", "image": b64, "weight": 0.8, "resize_mode": "Just Resize"}
        r = client.post("/sdapi/v1/txt2img", json={**common, "alwayson_scripts": {"controlnet": {"args": [unit]}}})
        assert r.status_code == 200 and "Union Control Type: Unknown" in r.json()["info"], r.text
        got["union-auto"] = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
        unit |= {"union_control_type": "Sparkles"}
        r = client.post("/sdapi/v1/txt2img", json={**common, "alwayson_scripts": {"controlnet": {"args": [unit]}}})
        assert r.status_code == 422 and "union_control_type" in r.text, r.text
    finally:
        app.state.worker.stop()
    settings = ["--steps", "4", "--sampler", "Euler", "--seed", "5", "--width", "24", "--height", "16",
                "--cfg-scale", "5", "--control-image", str(folder / "map0.png"), "--control-weight", "0.8"]
    for key, name, extra in (("union-tiny", "union-tiny", ["--control-type", "depth"]),
                             ("union-auto", "union-tiny", ["--control-type", "auto"]),
                             ("control-lora-tiny", "control-lora-tiny.safetensors", [])):
        out = tmp_path / f"{key}.png"
        rc, cap = _run(capsys, "generate", PROMPT, "--model", str(folder / "model"), *settings, "--controlnet",
                       str(tmp_path / "cn" / name), *extra, "-o", str(out))
        assert rc == 0, cap.err
        ref = got[key]
        assert np.array_equal(np.asarray(ref.convert("RGB")), np.asarray(Image.open(out).convert("RGB"))), name


def test_explain_shows_a_union_units_maps(pipe, saved, tmp_path):
    """The explain page with a two-map Union unit: both maps side by side, the types named, residual RMS per block."""
    from ldmkit.explain import explain, write_page

    folder, _, _, maps = pipe
    model = checkpoint.load(folder / "model")
    hint = torch.cat([control_map(m, *SIZE) for m in maps], dim=1)
    unit = ControlUnit(load_controlnet(saved[0] / "union", model.cfg.unet), hint, 0.7, control_types=(1, 0))
    params = GenerationParams(PROMPT, steps=3, sampler="Euler", seed=5, width=24, height=16, cfg_scale=5,
                              controlnets=(unit,))
    ex = explain(model, params)
    view = ex.control[0]
    assert view.map_image.size == (2 * SIZE[0], SIZE[1])
    assert np.array_equal(np.asarray(view.map_image)[:, SIZE[0]:], np.asarray(maps[1].convert("RGB")))
    assert view.rms.shape == (3, len(unit.model.zero_convs) + 1) and (view.rms > 0).all()
    page = write_page(ex, tmp_path / "page", model.tokenizer).read_text()
    assert "ControlNet Union: depth + openpose" in page


@pytest.mark.parametrize("types", [6, 8], ids=["union", "promax"])
def test_full_size_union_layout(types):
    """The released architecture (xinsir's config.json: the SDXL ControlNet plus num_control_type 6 / 8, 320-wide
    tokens, 1 transformer layer), on the meta device: every converted name and shape is a parameter of ldmkit's
    UnionControlNet built for the SDXL base U-Net."""
    from diffusers import ControlNetUnionModel

    from ldmkit.config import SDXL_BASE
    from ldmkit.controlnet import config_from_weights, diffusers_to_original
    from ldmkit.controlnet_files import split_union

    accepted = set(inspect.signature(ControlNetUnionModel.__init__).parameters)
    c = {k: v for k, v in diffusers_controlnet_config(SDXL_BASE.unet).items() if k in accepted}
    with torch.device("meta"):
        ref = ControlNetUnionModel(**c, num_control_type=types).state_dict()
    net, extras = split_union(ref)
    sd = {**diffusers_to_original(net), **extras}
    cfg = config_from_weights(sd, SDXL_BASE.unet)
    assert (cfg.num_types, cfg.trans_channels, cfg.trans_layers, cfg.proj_channels, cfg.type_embed_dim) == (
        types, 320, 1, 320, 256)
    assert cfg.unet.transformer_depth == SDXL_BASE.unet.transformer_depth and cfg.hint_channels == (16, 32, 96, 256)
    with torch.device("meta"):
        ours = UnionControlNet(cfg).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in sd.items()}


def test_cli_union_beside_a_plain_controlnet(pipe, saved, capsys, tmp_path):
    """--control-type per unit: a Union's type, and none for the plain SDXL ControlNet beside it (same image as the
    Python API's two units); a type on the plain one alone is a one-line error."""
    from test_controlnet import diffusers_controlnet

    folder, _, _, maps = pipe
    diffusers_controlnet(TINY_SDXL.unet, hint=HINT, seed=8).save_pretrained(tmp_path / "plain")
    union, plain, m0, m1 = str(saved[0] / "union"), str(tmp_path / "plain"), folder / "map0.png", folder / "map1.png"
    out = tmp_path / "two.png"
    rc, cap = _run(capsys, "generate", PROMPT, "--model", str(folder / "model"), *SETTINGS, "--controlnet", union,
                   "--control-image", str(m0), "--control-type", "seg", "--controlnet", plain, "--control-image",
                   str(m1), "--control-type", "none", "-o", str(out))
    assert rc == 0, cap.err
    model = checkpoint.load(folder / "model")
    units = (ControlUnit(load_controlnet(union, model.cfg.unet), control_map(maps[0], *SIZE), control_types=(5,)),
             ControlUnit(load_controlnet(plain, model.cfg.unet), control_map(maps[1], *SIZE)))
    api = txt2img(model, GenerationParams(PROMPT, steps=4, sampler="Euler", scheduler="uniform", seed=5, width=24,
                                          height=16, cfg_scale=5, controlnets=units))[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(api.convert("RGB")))
    # infotext: the Union unit's type as the extension's union_control_type ("Segmentation" for type 5), named as
    # its field_to_displaytext names fields; the plain unit's line as the extension writes it, with no such field
    text = read_parameters(out)
    fields = parse_infotext(text)
    union_line, plain_line = fields["ControlNet 0"], fields["ControlNet 1"]
    assert union_line.endswith(", Control Mode: Balanced, Union Control Type: Segmentation"), union_line
    assert plain_line == (f"Module: none, Model: {model_title(plain)}, Weight: 1.0, Resize Mode: Just Resize, "
                          "Processor Res: -1, Threshold A: -1.0, Threshold B: -1.0, Guidance Start: 0.0, "
                          "Guidance End: 1.0, Pixel Perfect: False, Control Mode: Balanced"), plain_line
    # round trip: the unit read back as the extension's ControlNetUnit.parse reads it, its type given back to
    # --control-type, draws the same image
    unit0 = dict(item.strip().split(": ") for item in union_line.split(","))
    assert unit0["Union Control Type"] == "Segmentation" and unit0["Model"] == model_title(union)
    again = tmp_path / "again.png"
    rc, cap = _run(capsys, "generate", PROMPT, "--model", str(folder / "model"), *SETTINGS, "--controlnet", union,
                   "--control-image", str(m0), "--control-type", unit0["Union Control Type"], "--controlnet", plain,
                   "--control-image", str(m1), "--control-type", "none", "-o", str(again))
    assert rc == 0, cap.err
    assert np.array_equal(np.asarray(Image.open(again).convert("RGB")), np.asarray(Image.open(out).convert("RGB")))
    assert read_parameters(again) == text
    rc, cap = _run(capsys, "generate", PROMPT, "--model", str(folder / "model"), *SETTINGS, "--controlnet", plain,
                   "--control-image", str(m1), "--control-type", "depth", "-o", str(tmp_path / "bad.png"))
    assert rc != 0 and "is a plain ControlNet: drop --control-type" in cap.err
    assert len(cap.err.strip().splitlines()) == 1, cap.err
