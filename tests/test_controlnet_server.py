"""The A1111 ControlNet extension's API (issue 16, part 5), driven by the ``webuiapi`` client over HTTP on tiny
random models: ``webuiapi.ControlNetUnit`` in txt2img gives the CLI's image with the same settings; the
extension's routes (/controlnet/version, model_list, module_list, detect, settings); its infotext lines; bad
units are 422s naming the field.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="server extra not installed: pip install 'ldmkit[server]'")
pytest.importorskip("uvicorn", reason="server extra not installed: pip install 'ldmkit[server]'")
webuiapi = pytest.importorskip("webuiapi", reason="A1111 client missing: pip install webuiapi")
requests = pytest.importorskip("requests")

from reference import save_diffusers_pipeline  # noqa: E402
from test_controlnet import diffusers_controlnet  # noqa: E402

from ldmkit import checkpoint  # noqa: E402
from ldmkit import controlnet_a1111 as A  # noqa: E402
from ldmkit.cli import main  # noqa: E402
from ldmkit.config import TINY  # noqa: E402
from ldmkit.server.app import BackgroundServer, create_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cn-server")
    save_diffusers_pipeline(TINY, d / "sd")  # random weights, norms perturbed: every input matters
    checkpoint.save_single_file(checkpoint.load(d / "sd"), d / "sd.safetensors")
    (d / "cn").mkdir()
    diffusers_controlnet(TINY.unet, hint=(8, 16), seed=3).save_pretrained(d / "cn" / "control_tiny_canny")
    other = TINY.unet.__class__(**{**TINY.unet.__dict__, "context_dim": 48})
    diffusers_controlnet(other, hint=(8, 16)).save_pretrained(d / "cn" / "control_other_family")
    a = np.zeros((40, 60, 3), dtype=np.uint8)  # 60x40: another size than the output
    a[8:32, 14:44] = (230, 120, 40)
    a[16:24, 24:34] = (20, 200, 220)
    Image.fromarray(a).save(d / "shape.png")
    return d


@pytest.fixture(scope="module")
def server(files):
    app = create_app(files / "sd.safetensors", controlnet_dir=files / "cn", preview_interval=None, device="cpu")
    with BackgroundServer(app) as url:
        yield url


@pytest.fixture
def api(server):
    return webuiapi.WebUIApi(baseurl=f"{server}/sdapi/v1", sampler="Euler", steps=4)


def _title(files, name="control_tiny_canny"):
    return A.model_title(files / "cn" / name)


def test_model_and_module_lists(server, files, api):
    assert api.controlnet_version() == 3
    models = api.controlnet_model_list()
    assert sorted(models) == sorted([_title(files), _title(files, "control_other_family")])
    assert all(m.endswith("]") and len(m.rsplit("[", 1)[1]) == 9 for m in models)  # "stem [8 hex]"
    modules = api.controlnet_module_list()
    assert {"none", "canny", "invert", "threshold", "binary", "blur"} <= set(modules)
    r = requests.get(f"{server}/controlnet/module_list", params={"alias_names": True}).json()
    assert "blur_gaussian" in r["module_list"] and "invert (from white bg & black line)" in r["module_list"]
    assert r["module_detail"]["blur_gaussian"]["sliders"]
    assert requests.get(f"{server}/controlnet/settings").json()["control_net_unit_count"] >= 3


def test_detect_runs_the_preprocessor(files, api):
    img = Image.open(files / "shape.png")
    r = api.controlnet_detect(images=[img], module="canny", processor_res=80, threshold_a=50, threshold_b=150)
    got = r.image  # webuiapi decodes the base64 PNGs
    want = A.run_preprocessor("canny", img, 80, 50, 150)
    assert got.size == (120, 80) and np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want))


def test_webuiapi_unit_gives_the_cli_image(files, api, capsys, tmp_path):
    img = Image.open(files / "shape.png")
    unit = webuiapi.ControlNetUnit(image=img, module="canny", model=_title(files), weight=0.8,
                                   resize_mode="Crop and Resize", guidance_start=0.25, guidance_end=1.0,
                                   control_mode=1, pixel_perfect=True, threshold_a=50, threshold_b=150)
    r = api.txt2img(prompt="a stone house", seed=5, steps=4, width=24, height=16, cfg_scale=5,
                    controlnet_units=[unit], alwayson_scripts={})
    out = tmp_path / "cli.png"
    rc = main(["generate", "a stone house", "--model", str(files / "sd.safetensors"), "--steps", "4", "--sampler",
               "Euler", "--seed", "5", "--width", "24", "--height", "16", "--cfg-scale", "5",
               "--controlnet", str(files / "cn" / "control_tiny_canny"), "--control-image", str(files / "shape.png"),
               "--preprocessor", "canny", "--control-weight", "0.8", "--control-start", "0.25",
               "--control-mode", "prompt", "--resize-mode", "crop-and-resize", "--pixel-perfect",
               "--control-threshold-a", "50", "--control-threshold-b", "150", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    cli = Image.open(out)
    assert np.array_equal(np.asarray(r.image.convert("RGB")), np.asarray(cli.convert("RGB")))
    line = ('ControlNet 0: "Module: canny, Model: ' + _title(files) + ', Weight: 0.8, Resize Mode: Crop and '
            'Resize, Processor Res: 16, Threshold A: 50.0, Threshold B: 150.0, Guidance Start: 0.25, Guidance '
            'End: 1.0, Pixel Perfect: True, Control Mode: My prompt is more important"')
    assert line in r.image.info["parameters"] and line in cli.info["parameters"]
    assert r.info["extra_generation_params"]["ControlNet 0"] == json.loads(line.split(": ", 1)[1])
    # (a fresh alwayson_scripts: webuiapi writes the units into its default argument, which later calls share)
    plain = api.txt2img(prompt="a stone house", seed=5, steps=4, width=24, height=16, cfg_scale=5,
                        alwayson_scripts={})
    assert not np.array_equal(np.asarray(plain.image), np.asarray(r.image))  # the unit acted
    off = webuiapi.ControlNetUnit(image=img, module="canny", model=_title(files), enabled=False)
    r_off = api.txt2img(prompt="a stone house", seed=5, steps=4, width=24, height=16, cfg_scale=5,
                        controlnet_units=[off], alwayson_scripts={})
    assert np.array_equal(np.asarray(plain.image), np.asarray(r_off.image))  # a disabled unit does nothing


def test_img2img_unit_without_image_uses_the_init_image(server, files):
    init = Image.open(files / "shape.png").resize((24, 16))
    buf = io.BytesIO()
    init.save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    body = {"prompt": "a house", "init_images": [b64], "steps": 4, "seed": 3, "width": 24, "height": 16,
            "sampler_name": "Euler", "denoising_strength": 0.6}
    plain = requests.post(f"{server}/sdapi/v1/img2img", json=body).json()
    unit = {"module": "none", "model": "control_tiny_canny", "control_mode": "ControlNet is more important"}
    r = requests.post(f"{server}/sdapi/v1/img2img", json={**body, "alwayson_scripts": {"controlnet": {
        "args": [unit]}}})
    assert r.status_code == 200, r.text
    assert r.json()["images"][0] != plain["images"][0]
    assert "Control Mode: ControlNet is more important" in json.loads(r.json()["info"])["infotexts"][0]
    # the same map given explicitly, {"image": ..., "mask": ...} form: the same image
    unit2 = {**unit, "image": {"image": b64, "mask": None}, "resize_mode": 0}
    r2 = requests.post(f"{server}/sdapi/v1/img2img", json={**body, "alwayson_scripts": {"ControlNet": {
        "args": [unit2]}}})
    assert r2.json()["images"][0] == r.json()["images"][0]


def test_explain_page_with_a_unit(server, files):
    """POST /explain takes a txt2img request with its units: the page shows the map and residuals per block."""
    buf = io.BytesIO()
    Image.open(files / "shape.png").save(buf, format="PNG")
    unit = {"module": "canny", "model": _title(files), "image": base64.b64encode(buf.getvalue()).decode(),
            "guidance_start": 0.5}
    r = requests.post(f"{server}/explain", json={"prompt": "a house", "steps": 2, "seed": 1, "width": 24,
                                                 "height": 16, "sampler_name": "Euler",
                                                 "alwayson_scripts": {"controlnet": {"args": [unit]}}})
    assert r.status_code == 200 and "/explain/files/" in r.url, r.text
    assert 'id="controlnet"' in r.text and "ControlNet 0" in r.text and ">off<" in r.text
    bad = requests.post(f"{server}/explain", json={"prompt": "a house", "steps": 2, "width": 24, "height": 16,
                                                   "alwayson_scripts": {"controlnet": {"args": [{**unit,
                                                                                                  "model": "x"}]}}})
    assert bad.status_code == 422 and "model" in bad.text


@pytest.mark.parametrize("change,field,words", [
    ({"model": "nope"}, "model", "no ControlNet 'nope'"),
    ({"model": "None"}, "model", "no ControlNet model"),
    ({"model": "control_other_family"}, "model", "context 48"),
    ({"module": "hed"}, "module", "unknown preprocessor 'hed'"),
    ({"control_mode": 7}, "control_mode", "unknown control mode"),
    ({"resize_mode": "Stretch"}, "resize_mode", "unknown resize mode"),
    ({"weight": 3}, "weight", "less than or equal to 2"),
    ({"image": None}, "image", "no control image"),
    ({"image": "%%%"}, "image", "base64"),
    ({"guidance_start": 0.9, "guidance_end": 0.5}, "guidance_start", "below guidance_end"),
])
def test_bad_units_are_422_naming_the_field(server, files, change, field, words):
    buf = io.BytesIO()
    Image.open(files / "shape.png").save(buf, format="PNG")
    unit = {"module": "canny", "model": _title(files), "image": base64.b64encode(buf.getvalue()).decode(), **change}
    r = requests.post(f"{server}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 24, "height": 16,
                                                          "alwayson_scripts": {"controlnet": {"args": [unit]}}})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"][0]
    assert detail["loc"][:5] == ["body", "alwayson_scripts", "controlnet", "args", 0] and field in detail["loc"]
    assert words in detail["msg"]


def test_hr_option(server, files):
    """hr_option counts only with the hires fix (as the extension); a bad one there is a 422."""
    buf = io.BytesIO()
    Image.open(files / "shape.png").save(buf, format="PNG")
    unit = {"module": "none", "model": _title(files), "image": base64.b64encode(buf.getvalue()).decode()}
    body = {"prompt": "x", "steps": 2, "seed": 4, "width": 24, "height": 16, "sampler_name": "Euler"}
    images = [requests.post(f"{server}/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"controlnet": {
        "args": [{**unit, "hr_option": o}]}}}).json()["images"][0] for o in ("Both", "High res only")]
    assert images[0] == images[1]
    r = requests.post(f"{server}/sdapi/v1/txt2img", json={**body, "enable_hr": True, "hr_scale": 2,
                                                          "alwayson_scripts": {"controlnet": {"args": [{
                                                              **unit, "hr_option": "Sometimes"}]}}})
    assert r.status_code == 422 and "hr_option" in r.text and "Low res only" in r.text


def test_bad_detect_requests(server):
    r = requests.post(f"{server}/controlnet/detect", json={"controlnet_module": "hed",
                                                           "controlnet_input_images": ["x"]})
    assert r.status_code == 422 and "unknown preprocessor 'hed'" in r.text
    r = requests.post(f"{server}/controlnet/detect", json={"controlnet_module": "canny"})
    assert r.status_code == 422 and "no image" in r.text
