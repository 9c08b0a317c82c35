"""Issue 16's last gaps: per-unit --lllite-batch beside other units; a ControlNet Union unit's per-map values through
the A1111 API (ldmkit's fields) equal to the command line's; a broken folder in --controlnet-dir named with its reason.

References: sd-scripts' set_batch_cond_only is per LLLite network (one per unit), so a plain ControlNet beside it
takes no such option; the command line's image for `--control-weight 0.8+0.5 --control-start 0+0.25` (itself checked
against diffusers' StableDiffusionXLControlNetUnionPipeline in test_union_gaps.py) is the reference for the API unit.
"""

from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from test_controlnet_cli import _run
from test_controlnet_lllite import GEN, SIZE, _image, files  # noqa: F401 - tiny SDXL + LLLite files
from test_controlnet_union import HINT, pipe, saved  # noqa: F401 - tiny SDXL + Union ControlNet


@pytest.fixture(scope="module")
def mixed(files):  # noqa: F811
    """The LLLite fixture's folder with a plain SDXL ControlNet beside the LLLite."""
    from test_controlnet import diffusers_controlnet

    from ldmkit.config import TINY_SDXL

    if not (files / "plain-cn").exists():
        diffusers_controlnet(TINY_SDXL.unet, hint=HINT, seed=4).save_pretrained(files / "plain-cn")
    return files


def test_lllite_batch_given_once_is_the_lllite_units_and_pairs_per_unit(mixed, capsys, tmp_path):
    import ldmkit

    f = mixed
    base = ["generate", "a stone house", "--model", str(f / "xl.safetensors"), *GEN,
            "--controlnet", str(f / "plain-cn"), "--control-image", str(f / "map.png"),
            "--controlnet", str(f / "lllite.safetensors"), "--control-image", str(f / "map.png")]
    rc, cap = _run(capsys, *base, "--lllite-batch", "cond-only", "-o", str(tmp_path / "once.png"))
    assert rc == 0, cap.err
    assert "--lllite-batch cond-only: for the ControlNet-LLLite unit(s) only; not for" in cap.err
    rc, cap = _run(capsys, *base, "--lllite-batch", "-", "--lllite-batch", "cond-only", "-o", str(tmp_path / "pu.png"))
    assert rc == 0, cap.err
    rc, cap = _run(capsys, *base, "-o", str(tmp_path / "both.png"))
    assert rc == 0, cap.err
    sd = ldmkit.load(str(f / "xl.safetensors"))
    img = Image.open(f / "map.png")
    units = [sd.control_unit(f / "plain-cn", img, *SIZE),
             sd.control_unit(f / "lllite.safetensors", img, *SIZE, lllite_batch="cond-only")]
    api = sd.txt2img("a stone house", steps=4, sampler="Euler", scheduler="uniform", seed=5, width=SIZE[0],
                       height=SIZE[1], cfg_scale=5, controlnets=units)[0]
    ref = np.asarray(api.convert("RGB"))
    assert np.array_equal(_image(tmp_path / "once.png"), ref) and np.array_equal(_image(tmp_path / "pu.png"), ref)
    assert not np.array_equal(_image(tmp_path / "both.png"), ref)  # the option acts
    bad = [(["--lllite-batch", "cond-only", "--lllite-batch", "cond-only"],
            "--lllite-batch cond-only (the first) pairs with"),
           (["--lllite-batch", "zeros-uncond", "--lllite-batch", "sparkles"], "--lllite-batch 'sparkles': use one of"),
           (["--lllite-batch", "-", "--lllite-batch", "-", "--lllite-batch", "both"], "--lllite-batch given 3 times")]
    for extra, msg in bad:
        rc, cap = _run(capsys, *base, *extra, "-o", str(tmp_path / "bad.png"))
        assert rc != 0 and msg in cap.err and "Traceback" not in cap.err, (extra, cap.err)
        assert len(cap.err.strip().splitlines()) == 1, cap.err
    rc, cap = _run(capsys, "generate", "a stone house", "--model", str(f / "xl.safetensors"), *GEN, "--controlnet",
                   str(f / "plain-cn"), "--control-image", str(f / "map.png"), "--lllite-batch", "cond-only")
    assert rc != 0 and "and no unit here is one" in cap.err and len(cap.err.strip().splitlines()) == 1, cap.err


def _b64(path) -> str:
    buf = io.BytesIO()
    Image.open(path).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_a1111_union_unit_with_per_map_values_equals_the_cli(pipe, saved, capsys, tmp_path):  # noqa: F811
    """ldmkit's unit fields images + union_control_type "Depth+OpenPose" + weight/guidance_start lists give the
    image of `--control-weight 0.8+0.5 --control-start 0+0.25` pixel for pixel, with the same infotext values;
    malformed values are 422s naming the field."""
    from fastapi.testclient import TestClient

    from ldmkit.infotext import parse_infotext, read_parameters
    from ldmkit.server.app import create_app

    folder = pipe[0]
    m0, m1 = folder / "map0.png", folder / "map1.png"
    (tmp_path / "cn").mkdir()
    shutil.copytree(saved[0] / "union", tmp_path / "cn" / "union-tiny")
    out = tmp_path / "cli.png"
    rc, cap = _run(capsys, "generate", "a stone house", "--model", str(folder / "model"), "--steps", "4", "--sampler",
                   "Euler", "--seed", "5", "--width", "24", "--height", "16", "--cfg-scale", "5", "--controlnet",
                   str(tmp_path / "cn" / "union-tiny"), "--control-type", "depth+openpose", "--control-image",
                   f"{m0}+{m1}", "--control-weight", "0.8+0.5", "--control-start", "0+0.25", "-o", str(out))
    assert rc == 0, cap.err
    cli_line = parse_infotext(read_parameters(out))["ControlNet 0"]
    app = create_app(folder / "model", controlnet_dir=tmp_path / "cn", preview_interval=None, device="cpu")
    client = TestClient(app, raise_server_exceptions=False)
    common = {"prompt": "a stone house", "steps": 4, "seed": 5, "width": 24, "height": 16, "cfg_scale": 5,
              "sampler_name": "Euler"}
    good = {"module": "none", "model": "union-tiny", "images": [_b64(m0), _b64(m1)], "resize_mode": "Just Resize",
            "union_control_type": "Depth+OpenPose", "weight": [0.8, 0.5], "guidance_start": [0, 0.25]}

    def post(unit):
        return client.post("/sdapi/v1/txt2img", json={**common, "alwayson_scripts": {"controlnet": {"args": [unit]}}})

    try:
        for unit in (good, {**good, "union_control_type": ["Depth", "OpenPose"], "weight": "0.8+0.5"}):
            r = post(unit)
            assert r.status_code == 200, r.text
            got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
            assert np.array_equal(np.asarray(got.convert("RGB")), _image(out))
            line = parse_infotext(json.loads(r.json()["info"])["infotexts"][0])["ControlNet 0"]
            for field in ("Weight: 0.8+0.5", "Guidance Start: 0+0.25", "Guidance End: 1+1",
                          "Union Control Type: Depth+OpenPose"):
                assert field in line and field in cli_line, (field, line, cli_line)
        r = client.post("/explain", json={**common, "steps": 2, "alwayson_scripts": {"controlnet": {"args": [good]}}},
                        follow_redirects=True)  # the explain page of such a unit names its per-map values
        assert r.status_code == 200 and "per map: weight 0.8 in 0–1 + weight 0.5 in 0.25–1" in r.text, r.text[:300]
        bad = [({"weight": [0.8, 0.5, 0.1]}, "weight", "weight gives 3 values for 2 maps"),
               ({"weight": [0.8, float("nan")]}, "weight.1", "weight[1] nan: give a number"),
               ({"weight": [0.8, 3]}, "weight.1", "weight[1] 3: give a number from 0 to 2"),
               ({"weight": [0.8, "x"]}, "weight.1", "give a number from 0 to 2"),
               ({"weight": []}, "weight", "weight is an empty list"),
               ({"weight": "0.8+lots"}, "weight", "is not a number"),
               ({"guidance_start": [0, 0.9], "guidance_end": [1, 0.5]}, "guidance_start.1",
                "map 1: guidance_start 0.9 must be below guidance_end 0.5"),
               ({"union_control_type": "Depth"}, "union_control_type", "names 1 control type(s) for 2 map(s)"),
               ({"union_control_type": "Depth+Sparkles"}, "union_control_type", "unknown ControlNet Union control"),
               ({"union_control_type": "Unknown+Depth"}, "union_control_type", "reads one map alone"),
               ({"image": _b64(m0)}, "images", "give image (one map) or images"),
               ({"images": ["", 3]}, "images", "images is a list of 1 to 8 base64 images"),
               ({"images": "abc"}, "images", "images is a list of 1 to 8 base64 images"),
               ({"images": [_b64(m0), "not base64!"]}, "images.1", ""),
               ({"images": None, "image": _b64(m0)}, "weight", "needs the maps in images"),
               ({"lllite_batch": "cond-only"}, "lllite_batch", "is for ControlNet-LLLite models, and union-tiny")]
        for change, field, msg in bad:
            r = post({**good, **change}) if "nan" not in repr(change) else client.post(
                "/sdapi/v1/txt2img", content=json.dumps({**common, "alwayson_scripts": {"controlnet": {"args": [
                    {**good, **change}]}}}), headers={"Content-Type": "application/json"})
            assert r.status_code == 422, (change, r.status_code, r.text)
            detail = r.json()["detail"][0]
            assert ".".join(map(str, detail["loc"])).endswith(f"args.0.{field}"), (change, detail)
            assert msg in detail["msg"], (change, detail)
    finally:
        app.state.worker.stop()


@pytest.fixture(scope="module")
def server_dir(tmp_path_factory):
    """A tiny SD model and a --controlnet-dir with a good ControlNet folder and damaged ones."""
    from test_controlnet import diffusers_controlnet
    from test_controlnet_cli import save_diffusers_pipeline

    from ldmkit.config import TINY

    d = tmp_path_factory.mktemp("cn-dir")
    save_diffusers_pipeline(TINY, d / "sd")
    cn = d / "cns"
    diffusers_controlnet(TINY.unet, hint=(8, 16), seed=3).save_pretrained(cn / "good")
    for name, text in (("not-json", "{ this is not json"), ("a-list", "[1, 2]"), ("no-class", '{"in_channels": 4}'),
                       ("broken-both", "{")):
        shutil.copytree(cn / "good", cn / name)
        (cn / name / "config.json").write_text(text)
    (cn / "broken-both" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"{")
    (cn / "truncated.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": ")
    (cn / "notes.txt").write_text("not a model\n")
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(d / "map.png")
    return d


def test_damaged_models_in_the_controlnet_dir_are_named_with_the_reason(server_dir, caplog):
    """A folder whose config.json is broken is listed by its name when its weights are a ControlNet's (ldmkit reads
    the network from the weights, as --controlnet FOLDER does), with the reason in the log; one whose weights cannot
    be read either, and a damaged .safetensors, are named in model_list's "unreadable" (ldmkit's key) and the log,
    and a unit naming them is a 422 with the reason. Before, the first were listed as "diffusion_pytorch_model
    [hash]" and the others vanished."""
    from fastapi.testclient import TestClient

    from ldmkit import controlnet_a1111 as A
    from ldmkit.server.app import create_app

    d = server_dir
    app = create_app(d / "sd", controlnet_dir=d / "cns", preview_interval=None, device="cpu")
    client = TestClient(app, raise_server_exceptions=False)
    try:
        with caplog.at_level("WARNING", logger="ldmkit.server"):
            r = client.get("/controlnet/model_list")
        assert r.status_code == 200, r.text
        listed = {t.split(" [")[0] for t in r.json()["model_list"]}
        assert listed == {"good", "not-json", "a-list", "no-class"}, listed
        bad = r.json()["unreadable"]
        assert set(bad) == {"broken-both", "truncated.safetensors"}, bad
        assert bad["broken-both"].startswith("config.json is not valid JSON (")
        assert bad["truncated.safetensors"] == "not a readable .safetensors file (its header cannot be read)"
        log = caplog.text
        for name, why in (("not-json", "config.json is not valid JSON ("),
                          ("a-list", "config.json is not a JSON object"),
                          ("no-class", 'config.json has no "_class_name"'), ("broken-both", "left out: config.json")):
            assert f"ControlNet {name}" in log and why in log, (name, log)
        assert "the network is read from its weights" in log
        b64 = _b64(d / "map.png")
        common = {"prompt": "a house", "steps": 2, "seed": 5, "width": 24, "height": 16, "sampler_name": "Euler"}

        def post(name):
            unit = {"module": "none", "model": name, "image": b64}
            return client.post("/sdapi/v1/txt2img", json={**common, "alwayson_scripts": {"controlnet": {"args": [
                unit]}}})

        for name, msg in (("broken-both", "ControlNet broken-both in --controlnet-dir cannot be read: config.json"),
                          ("truncated.safetensors", "not a readable .safetensors file")):
            r = post(name)
            assert r.status_code == 422, (name, r.status_code, r.text)
            detail = r.json()["detail"][0]
            assert detail["loc"][-1] == "model" and msg in detail["msg"], (name, detail)
        good, fixed = post(A.model_title(d / "cns" / "good")), post("not-json")
        assert good.status_code == 200 and fixed.status_code == 200, (good.text, fixed.text)
        pixels = [np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
                  for r in (good, fixed)]
        assert np.array_equal(*pixels)  # the same weights
    finally:
        app.state.worker.stop()


@pytest.mark.parametrize("flags, says", [
    (["--control-weight", "-1"], "--control-weight -1: give a weight from 0 to 10"),
    (["--control-weight", "1e9"], "--control-weight 1e9: give a weight from 0 to 10"),
    (["--control-start", "-0.5"], "--control-start -0.5: give a fraction of the steps from 0 to 1"),
    (["--control-end", "2"], "--control-end 2: give a fraction of the steps from 0 to 1"),
    (["--control-start", "0.8", "--control-end", "0.2"], "control start 0.8 and end 0.2 must satisfy 0 <= start"),
    (["--control-start", "0.5", "--control-end", "0.5"], "control start 0.5 and end 0.5 must satisfy"),
    (["--processor-res", "0", "--preprocessor", "canny"], "--processor-res 0: give the preprocessor's resolution"),
    (["--processor-res", "-5", "--preprocessor", "canny"], "--processor-res -5: give"),
    (["--width", "100000", "--height", "100000"], "100000x100000 needs about"),
], ids=["weight-negative", "weight-huge", "start-negative", "end-2", "start-after-end", "start-is-end", "res-0",
        "res-negative", "huge-size"])
def test_bad_unit_values_are_one_line(server_dir, capsys, flags, says):
    """Each was accepted (a negative or 1e9 weight drew a garbage image, processor resolution 0 or -5 ran at the
    image's size) or said late (windows after the model and the map were loaded), or a traceback (a 100000x100000
    output: OpenCV asked for 30 GB to resize the map)."""
    d = server_dir
    rc, cap = _run(capsys, "generate", "a house", "--model", str(d / "sd"), "--steps", "1", "--width", "24",
                   "--height", "16", "--controlnet", str(d / "cns" / "good"), "--control-image", str(d / "map.png"),
                   *flags)
    assert rc == 2 and says in cap.err and "Traceback" not in cap.err, cap.err
    assert len(cap.err.strip().splitlines()) == 1, cap.err  # also: no map was made first (no resize note)


def test_pydantic_union_tags_are_not_in_the_field_name(server_dir):
    from fastapi.testclient import TestClient

    from ldmkit.server.app import create_app

    app = create_app(server_dir / "sd", controlnet_dir=server_dir / "cns", preview_interval=None, device="cpu")
    client = TestClient(app, raise_server_exceptions=False)
    try:
        for field, value in (("control_mode", [1]), ("union_control_type", {"a": 1})):
            unit = {"module": "none", "model": "good", "image": _b64(server_dir / "map.png"), field: value}
            r = client.post("/sdapi/v1/txt2img", json={"prompt": "a", "steps": 1, "width": 24, "height": 16,
                                                       "alwayson_scripts": {"controlnet": {"args": [unit]}}})
            assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == field, r.text
    finally:
        app.state.worker.stop()


def test_maps_joined_with_plus_need_a_type_per_map(pipe, saved, capsys):  # noqa: F811
    """a.png+b.png without one control type per map said "no such image file a.png+b.png"; a.png+ said ": no such
    image file". Both are one line before the model is loaded."""
    folder = pipe[0]
    m0, m1 = folder / "map0.png", folder / "map1.png"
    base = ["generate", "a house", "--model", str(folder / "nowhere"), "--steps", "1", "--width", "24", "--height",
            "16", "--controlnet", str(saved[0] / "union")]
    for extra, says in (([f"{m0}+{m1}"], "maps joined with + are several maps of one ControlNet Union unit: name "
                                          "one control type per map with --control-type"),
                        ([f"{m0}+{m1}", "--control-type", "auto"], "name one control type per map"),
                        ([f"{m0}+", "--control-type", "depth+openpose"], "an empty name between the + signs")):
        rc, cap = _run(capsys, *base, "--control-image", *extra)
        assert rc == 2 and says in cap.err and len(cap.err.strip().splitlines()) == 1, cap.err


def test_info_on_a_folder_with_a_broken_config(server_dir, capsys):
    """`ldmkit info` said "not a diffusers Stable Diffusion folder (no unet/ inside)" of a ControlNet folder whose
    config.json is broken; now it describes the ControlNet from its weights (as --controlnet reads it) and names
    the problem, or says what is wrong when the weights cannot be read either."""
    cns = server_dir / "cns"
    rc, cap = _run(capsys, "info", str(cns / "good"))
    assert rc == 0
    good = cap.out.strip()
    rc, cap = _run(capsys, "info", str(cns / "not-json"))
    assert rc == 0 and cap.out.strip().startswith(good + " (config.json is not valid JSON (")
    assert cap.out.strip().endswith("; ldmkit reads the network from diffusion_pytorch_model.safetensors)"), cap.out
    rc, cap = _run(capsys, "info", str(cns / "broken-both"))
    assert rc != 0 and "broken-both: config.json is not valid JSON (" in cap.err and "fix or replace config.json" \
        in cap.err and len(cap.err.strip().splitlines()) == 1, cap.err
