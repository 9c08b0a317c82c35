"""The rest of A1111's API surface (issue 15, part 1 and 2), driven by the ``webuiapi`` client over HTTP.

Routes that answered 404 (flags, styles, memory, skip, unload/reload, scripts, lists of things ldmkit does
not have) and /sdapi/v1/options as a fixed, checked table whose settings change what the server does.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="server extra not installed: pip install 'ldmkit[server]'")
pytest.importorskip("uvicorn", reason="server extra not installed: pip install 'ldmkit[server]'")
webuiapi = pytest.importorskip("webuiapi", reason="A1111 client missing: pip install webuiapi")
requests = pytest.importorskip("requests")

from ldmkit import checkpoint  # noqa: E402
from ldmkit import pipeline as P  # noqa: E402
from ldmkit.config import TINY  # noqa: E402
from ldmkit.model import StableDiffusion  # noqa: E402
from ldmkit.server.app import BackgroundServer, create_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TIMEOUT = 60
STYLES = ('name,prompt,negative_prompt\n'
          '"frame","a photo of {prompt}, framed","blurry"\n'
          'vivid,"vivid colours, high contrast",\n'
          'neg only,,"lowres, {prompt}"\n')


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    checkpoint.save_single_file(StableDiffusion(TINY), d / "tiny.safetensors")
    return d / "tiny.safetensors"


@pytest.fixture(scope="module")
def model(model_file):
    return checkpoint.load(model_file)


@pytest.fixture(scope="module")
def server(model_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs")
    styles = tmp_path_factory.mktemp("styles") / "styles.csv"
    styles.write_text(STYLES, encoding="utf-8")
    app = create_app(model_file, preview_interval=None, device="cpu", output_dir=out, styles_file=styles)
    with BackgroundServer(app) as url:
        yield app, url, out


@pytest.fixture
def api(server):
    app, url, _ = server
    defaults = requests.get(f"{url}/sdapi/v1/options", timeout=TIMEOUT).json()
    yield webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1", sampler="Euler a", steps=2)
    # every test leaves the options as it found them
    r = requests.post(f"{url}/sdapi/v1/options", json=defaults, timeout=TIMEOUT)
    assert r.ok, r.text


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def test_lists_ldmkit_does_not_have_are_empty(api, server):
    _, url, _ = server
    assert api.get_hypernetworks() == []
    assert api.get_face_restorers() == []
    assert api.get_realesrgan_models() == []
    assert requests.get(f"{url}/sdapi/v1/extensions", timeout=TIMEOUT).json() == []


def test_cmd_flags_memory_and_scripts(api, server, model_file):
    flags = api.get_cmd_flags()
    assert flags["ckpt"] == str(model_file.resolve()) and flags["api"] is True and flags["api_auth"] is None
    assert flags["styles_file"].endswith("styles.csv") and flags["lowvram"] is False
    mem = api.get_memory()
    import psutil

    assert 0 < mem["ram"]["used"] < mem["ram"]["total"] == psutil.virtual_memory().total
    assert mem["cuda"] == {"error": "unavailable"} or "system" in mem["cuda"]
    scripts = api.get_scripts()
    assert scripts == {"txt2img": ["deepcache"], "img2img": ["deepcache"]}
    _, url, _ = server
    info = requests.get(f"{url}/sdapi/v1/script-info", timeout=TIMEOUT).json()
    assert [(i["name"], i["is_alwayson"], i["is_img2img"]) for i in info] == [("deepcache", True, False),
                                                                            ("deepcache", True, True)]
    assert [a["minimum"] for a in info[0]["args"]] == [1, 0]
    # A1111's shared.latent_upscale_modes, in its order: the hires fix's latent upscalers
    assert [m["name"] for m in api.get_latent_upscale_modes()] == [
        "Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)", "Latent (nearest)",
        "Latent (nearest-exact)"]
    assert api.interrupt() == {} and api.skip() == {}  # A1111's answers; idle, they change nothing


def test_alwayson_deepcache_script_runs_and_unknown_scripts_are_refused(api, server, model):
    kw = dict(prompt="a cat", seed=3, steps=4, width=16, height=16, sampler_name="Euler")
    r = api.txt2img(alwayson_scripts={"DeepCache": {"args": [2, 0]}}, **kw)
    want = P.txt2img(model, P.GenerationParams(prompt="a cat", seed=3, steps=4, width=16, height=16,
                                               sampler="Euler", cfg_scale=7.0, deepcache=2))[0]
    np.testing.assert_array_equal(pixels(r.image), pixels(want))
    assert r.info["extra_generation_params"]["DeepCache"] == 2
    _, url, _ = server
    body = {**kw, "sampler_name": "Euler"}
    bad = requests.post(f"{url}/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"Regional Prompter": {
        "args": []}}}, timeout=TIMEOUT)  # (ControlNet is a script ldmkit has: test_controlnet_server.py)
    assert bad.status_code == 422 and "Regional Prompter" in bad.text
    bad = requests.post(f"{url}/sdapi/v1/txt2img", json={**body, "script_name": "x/y/z plot"}, timeout=TIMEOUT)
    assert bad.status_code == 422 and "x/y/z plot" in bad.text


def test_interrogate_names_what_is_missing(api, server):
    img = Image.new("RGB", (16, 16), "red")
    with pytest.raises(RuntimeError) as e:
        api.interrogate(img)
    code, text = e.value.args
    assert code == 501 and "CLIP" in text and "BLIP" in text
    _, url, _ = server
    r = requests.post(f"{url}/sdapi/v1/interrogate", json={"image": "x", "model": "nope"}, timeout=TIMEOUT)
    assert r.status_code == 422 and "deepdanbooru" in r.text


def test_prompt_styles_list_and_apply(api, model):
    styles = api.get_prompt_styles()
    assert styles == [
        {"name": "frame", "prompt": "a photo of {prompt}, framed", "negative_prompt": "blurry"},
        {"name": "vivid", "prompt": "vivid colours, high contrast", "negative_prompt": ""},
        {"name": "neg only", "prompt": "", "negative_prompt": "lowres, {prompt}"},
    ]
    r = api.txt2img(prompt="a cat", negative_prompt="ugly", styles=["frame", "vivid", "neg only"], seed=7,
                    width=16, height=16, sampler_name="Euler")
    # A1111's merge (modules/styles.py): into {prompt}, else ", "-joined after; styles applied in order
    prompt = "a photo of a cat, framed, vivid colours, high contrast"
    negative = "lowres, ugly, blurry"
    assert (r.info["prompt"], r.info["negative_prompt"]) == (prompt, negative)
    assert r.info["styles"] == ["frame", "vivid", "neg only"]
    assert r.parameters["prompt"] == "a cat"  # the request echoed as sent, as A1111 does
    want = P.txt2img(model, P.GenerationParams(prompt=prompt, negative_prompt=negative, seed=7, steps=2, width=16,
                                               height=16, sampler="Euler", cfg_scale=7.0))[0]
    np.testing.assert_array_equal(pixels(r.image), pixels(want))
    with pytest.raises(RuntimeError) as e:
        api.txt2img(prompt="a cat", styles=["nope"], width=16, height=16)
    assert e.value.args[0] == 422 and "'nope'" in e.value.args[1] and "'frame'" in e.value.args[1]


def test_skip_ends_the_batch_and_the_next_runs(api, server, monkeypatch):
    real = P.txt2img
    seen: list[int] = []

    def slow_txt2img(model, params, callback=None):
        def cb(d):
            seen.append(params.seed)
            time.sleep(0.02)
            callback(d)

        return real(model, params, cb)

    monkeypatch.setattr(P, "txt2img", slow_txt2img)
    out = {}
    t = threading.Thread(target=lambda: out.update(r=api.txt2img(prompt="long", seed=10, steps=60, n_iter=2,
                                                                 width=16, height=16)))
    t.start()
    deadline = time.monotonic() + TIMEOUT
    while api.get_progress()["state"]["sampling_step"] < 3:
        assert time.monotonic() < deadline and t.is_alive()
        time.sleep(0.02)
    assert api.skip() == {}
    t.join(TIMEOUT)
    first, second = seen.count(10), seen.count(11)
    assert 3 <= first < 60 and second == 60  # batch 1 cut short, batch 2 ran in full
    assert [im.size for im in out["r"].images] == [(16, 16), (16, 16)]
    assert out["r"].info["all_seeds"] == [10, 11]


def test_unload_and_reload_checkpoint(api, server):
    app, url, _ = server
    kw = dict(prompt="a dog", seed=2, width=16, height=16)
    before = api.txt2img(**kw).image
    assert requests.post(f"{url}/sdapi/v1/unload-checkpoint", timeout=TIMEOUT).json() == {}
    w = app.state.worker
    assert w.unloaded and next(w.model.parameters()).device.type == "meta"  # the weights are gone
    after = api.txt2img(**kw).image  # reloaded for the request
    assert not w.unloaded
    np.testing.assert_array_equal(pixels(before), pixels(after))
    assert requests.post(f"{url}/sdapi/v1/unload-checkpoint", timeout=TIMEOUT).ok
    assert requests.post(f"{url}/sdapi/v1/reload-checkpoint", timeout=TIMEOUT).json() == {}
    assert not w.unloaded and next(w.model.parameters()).device.type == "cpu"


def test_unload_refused_for_a_model_given_as_object(model):
    from fastapi.testclient import TestClient

    app = create_app(model)
    try:
        r = TestClient(app).post("/sdapi/v1/unload-checkpoint")
        assert r.status_code == 409 and "object" in r.json()["detail"]
    finally:
        app.state.worker.stop()


# ---------------------------------------------------------------- options


def test_options_report_a1111_keys_with_real_values(api, server, model_file):
    _, _, out = server
    o = api.get_options()
    sha = hashlib.sha256(model_file.read_bytes()).hexdigest()
    assert o["sd_model_checkpoint"] == f"tiny.safetensors [{sha[:10]}]" and o["sd_checkpoint_hash"] == sha
    assert (o["sd_vae"], o["CLIP_stop_at_last_layers"], o["samples_format"], o["samples_save"]) == (
        "Automatic", 1, "png", True)
    assert o["outdir_txt2img_samples"] == o["outdir_img2img_samples"] == o["outdir_samples"] == str(out)
    assert (o["send_seed"], o["send_size"], o["eta_noise_seed_delta"]) == (True, True, 0)
    assert (o["live_previews_enable"], o["show_progress_every_n_steps"]) == (True, 1)
    assert len(json.dumps(o)) < 4000
    assert api.set_options(o) is None  # what GET returns can be posted back unchanged


def test_unknown_and_bad_options_are_refused_and_never_stored(api, server):
    _, url, _ = server
    post = lambda body: requests.post(f"{url}/sdapi/v1/options", json=body, timeout=TIMEOUT)  # noqa: E731
    r = post({"samples_format": "jpg", "junk": "x" * 1000, "more_junk": 1})
    assert r.status_code == 422 and "'junk'" in r.text and "'more_junk'" in r.text
    o = api.get_options()
    assert "junk" not in o and o["samples_format"] == "png"  # nothing of a refused request is stored
    for key, value, words in [("samples_format", "gif", "one of: png, jpg"),
                              ("CLIP_stop_at_last_layers", 3, "from 1 to 2"),
                              ("CLIP_stop_at_last_layers", True, "from 1 to 2"),
                              ("eta_ancestral", -1, "from 0 to 10"),
                              ("jpeg_quality", 101, "1 to 100"),
                              ("eta_noise_seed_delta", 31337, "does not offset"),
                              ("outdir_txt2img_samples", "/etc", "read-only")]:
        r = post({key: value})
        assert r.status_code == 422, (key, r.text)
        assert r.json()["detail"][0]["loc"] == ["body", key] and words in r.json()["detail"][0]["msg"], r.text
    assert api.get_options()["CLIP_stop_at_last_layers"] == 1
    assert len(api.txt2img(prompt="still fine", width=16, height=16).images) == 1


def test_options_change_behaviour(api, server, model):
    _, url, out = server
    kw = dict(prompt="a red apple", seed=4, width=16, height=16)
    # CLIP_stop_at_last_layers: the penultimate layer, as the pipeline's clip_skip=2
    api.set_options({"CLIP_stop_at_last_layers": 2})
    r = api.txt2img(sampler_name="Euler", **kw)
    want = P.txt2img(model, P.GenerationParams(**kw, steps=2, sampler="Euler", cfg_scale=7.0, clip_skip=2))[0]
    np.testing.assert_array_equal(pixels(r.image), pixels(want))
    assert "Clip skip: 2" in r.image.info["parameters"]
    api.set_options({"CLIP_stop_at_last_layers": 1})
    # eta_ancestral: used when the request gives no eta (webuiapi always sends one, so post directly).
    # Euler a with eta 0 adds no noise: it is Euler, step for step
    api.set_options({"eta_ancestral": 0.0})
    body = {**kw, "steps": 4, "sampler_name": "Euler a"}
    got = requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=TIMEOUT).json()
    image = pixels(Image.open(io.BytesIO(base64.b64decode(got["images"][0]))))
    euler = P.txt2img(model, P.GenerationParams(**kw, steps=4, sampler="Euler", cfg_scale=7.0))[0]
    ancestral = P.txt2img(model, P.GenerationParams(**kw, steps=4, sampler="Euler a", cfg_scale=7.0, eta=1.0))[0]
    np.testing.assert_array_equal(image, pixels(euler))
    assert np.abs(image.astype(int) - pixels(ancestral)).max() > 5
    # samples_format: saved files in that format, the parameters in EXIF UserComment (as A1111 writes them)
    from ldmkit.server.samples import read_user_comment

    for fmt, pil in (("jpg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")):
        api.set_options({"samples_format": fmt})
        r = api.txt2img(save_images=True, sampler_name="Euler", **{**kw, "seed": 40 + len(fmt)})
        (saved,) = out.glob(f"*-{40 + len(fmt)}.{fmt}")
        with Image.open(saved) as im:
            assert im.format == pil and im.size == (16, 16)
            text = im.info.get("parameters") if pil == "PNG" else read_user_comment(im)
            assert text == r.info["infotexts"][0]
    # jpeg_quality: smaller files at lower quality; enable_pnginfo false: no parameters in the file
    sizes = []
    for q in (95, 10):
        api.set_options({"samples_format": "jpg", "jpeg_quality": q})
        api.txt2img(save_images=True, sampler_name="Euler", **{**kw, "seed": 50 + q})
        (saved,) = out.glob(f"*-{50 + q}.jpg")
        sizes.append(saved.stat().st_size)
    assert sizes[1] < sizes[0]
    api.set_options({"samples_format": "png", "enable_pnginfo": False})
    api.txt2img(save_images=True, **{**kw, "seed": 66})
    (saved,) = out.glob("*-66.png")
    assert "parameters" not in Image.open(saved).info
    # samples_save false: save_images saves nothing
    api.set_options({"samples_save": False, "samples_format": "png"})
    api.txt2img(save_images=True, **{**kw, "seed": 77})
    assert not list(out.glob("*-77.*"))


def test_exif_user_comment_is_the_exif_spec_encoding(tmp_path):
    """The EXIF 2.3 UserComment layout, decoded by hand: 8-byte character code, then UTF-16 text."""
    from ldmkit.server.samples import save_sample

    img = Image.new("RGB", (8, 8))
    img.info.update(parameters="a cat ✓\nSteps: 2", seed=1)
    path = save_sample(img, tmp_path, "task(1)", {"samples_format": "jpg"})
    raw = Image.open(path).getexif().get_ifd(0x8769)[0x9286]
    assert raw[:8] == b"UNICODE\0" and raw[8:].decode("utf-16-be") == "a cat ✓\nSteps: 2"


def test_override_settings_are_applied_or_refused(api, server, model):
    _, url, _ = server
    kw = dict(prompt="a red apple", seed=4, width=16, height=16)
    body = {**kw, "steps": 4, "sampler_name": "Euler a", "override_settings": {"eta_ancestral": 0}}
    got = requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=TIMEOUT).json()
    euler = P.txt2img(model, P.GenerationParams(**kw, steps=4, sampler="Euler", cfg_scale=7.0))[0]
    np.testing.assert_array_equal(pixels(Image.open(io.BytesIO(base64.b64decode(got["images"][0])))),
                                  pixels(euler))
    assert api.get_options()["eta_ancestral"] == 1.0  # per request only
    for override, words in [({"sd_lora": "x"}, "unknown option 'sd_lora'"),
                            ({"samples_format": "jpg"}, "server-wide only"),
                            ({"eta_ddim": "high"}, "from 0 to 10")]:
        r = requests.post(f"{url}/sdapi/v1/txt2img", json={**kw, "steps": 1, "override_settings": override},
                          timeout=TIMEOUT)
        assert r.status_code == 422 and words in r.json()["detail"][0]["msg"], r.text
        assert r.json()["detail"][0]["loc"] == ["body", "override_settings", next(iter(override))]


def test_styles_file_reread_when_changed_and_a1111_legacy_column(tmp_path):
    import os

    from ldmkit.server.styles import StyleDatabase, merge_prompts

    path = tmp_path / "styles.csv"
    path.write_text("\ufeffname,text,negative_prompt\nold,\"{prompt}, oil\",\n", encoding="utf-8")  # BOM, "text"
    db = StyleDatabase(path)
    assert db.apply(["old"], "a cat", "") == ("a cat, oil", "")
    path.write_text("name,prompt,negative_prompt\nnew,sketch,\n", encoding="utf-8")
    os.utime(path, ns=(1, 2))  # a different stamp even within the file system's time resolution
    assert list(db.styles()) == ["new"]
    # A1111's merge rule: an empty prompt gives the style alone; whitespace is trimmed before joining
    assert merge_prompts("sketch", "") == "sketch" and merge_prompts(" sketch ", " a cat ") == "a cat, sketch"
    with pytest.raises(FileNotFoundError, match="--styles-file"):
        StyleDatabase(tmp_path / "missing.csv")
