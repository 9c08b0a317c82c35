"""``ldmkit serve`` driven by a real A1111 client (the ``webuiapi`` package) over HTTP, on tiny random models.

Images from the server must equal, pixel for pixel, a direct ``ldmkit.pipeline`` call with the same settings.
"""

from __future__ import annotations

import base64
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

from fastapi.testclient import TestClient  # noqa: E402

from ldmkit import checkpoint  # noqa: E402
from ldmkit import pipeline as P  # noqa: E402
from ldmkit.config import TINY  # noqa: E402
from ldmkit.model import StableDiffusion  # noqa: E402
from ldmkit.server.app import BackgroundServer, Limits, create_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TIMEOUT = 60




@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    for seed, name in ((0, "tiny_a"), (1, "tiny_b")):
        torch.manual_seed(seed)
        checkpoint.save_single_file(StableDiffusion(TINY), d / f"{name}.safetensors")
    return d


@pytest.fixture(scope="module")
def model_a(models_dir):
    return checkpoint.load(models_dir / "tiny_a.safetensors")


@pytest.fixture(scope="module")
def server(models_dir):
    app = create_app(models_dir / "tiny_a.safetensors", models_dir=models_dir, queue_size=8, preview_interval=0,
                     device="cpu")  # pixel-exact comparisons with CPU float32 references
    with BackgroundServer(app) as url:
        yield app, url


@pytest.fixture
def api(server):
    _, url = server
    return webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1", sampler="Euler a", steps=3)


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def webui_params(prompt: str, seed: int, sampler: str = "Euler a", **kw) -> P.GenerationParams:
    """What webuiapi's defaults mean: cfg 7, eta 1 (used only by samplers that take eta)."""
    eta = 1.0 if sampler in ("Euler a", "DDIM", "DPM++ SDE", "DPM++ 2M SDE") else None
    return P.GenerationParams(prompt=prompt, seed=seed, sampler=sampler, cfg_scale=7.0, eta=eta, **kw)


def test_txt2img_image_size_infotext_and_seeds(api, model_a):
    r = api.txt2img(prompt="a red apple", negative_prompt="blurry", seed=1234, steps=3, width=32, height=24,
                    batch_size=2)
    assert [im.size for im in r.images] == [(32, 24), (32, 24)]
    assert r.info["seed"] == 1234 and r.info["all_seeds"] == [1234, 1235]
    assert r.info["all_prompts"] == ["a red apple"] * 2 and r.info["sampler_name"] == "Euler a"
    assert r.parameters["prompt"] == "a red apple" and r.parameters["steps"] == 3  # the request echoed
    text = r.images[1].info["parameters"]  # infotext inside the PNG
    assert text == r.info["infotexts"][1]
    assert text.startswith("a red apple\nNegative prompt: blurry\nSteps: 3, Sampler: Euler a, ")
    assert "Seed: 1235, Size: 32x24" in text and "Model: tiny_a" in text
    ref = P.txt2img(model_a, webui_params("a red apple", 1234, negative_prompt="blurry", steps=3, width=32,
                                          height=24, batch_size=2))
    for got, want in zip(r.images, ref, strict=True):
        np.testing.assert_array_equal(pixels(got), pixels(want))
        assert got.info["parameters"] == want.info["parameters"]


def test_random_seed_is_reported(api):
    r = api.txt2img(prompt="x", seed=-1, steps=2, width=16, height=16, n_iter=2)
    seeds = r.info["all_seeds"]
    assert seeds[0] == r.info["seed"] >= 0 and seeds[1] == seeds[0] + 1
    assert [f"Seed: {s}," in im.info["parameters"] for im, s in zip(r.images, seeds, strict=True)] == [True, True]


def test_img2img_and_inpaint_match_the_pipeline(api, model_a):
    init = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    params = webui_params("a watercolor", 7, steps=4, width=32, height=32, strength=0.5)
    r = api.img2img(images=[init], prompt="a watercolor", seed=7, steps=4, width=32, height=32,
                    denoising_strength=0.5)
    assert r.image.size == (32, 32) and "Denoising strength: 0.5" in r.image.info["parameters"]
    assert r.parameters["init_images"] is None  # not echoed back, as A1111
    np.testing.assert_array_equal(pixels(r.image), pixels(P.img2img(model_a, params, init)[0]))

    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))  # repaint the left half
    r = api.img2img(images=[init], mask_image=mask, prompt="a watercolor", seed=7, steps=4, width=32, height=32,
                    denoising_strength=0.5, inpainting_fill=1, mask_blur=4)
    # A1111's inpainting (issue 15, item 5): webuiapi's defaults are "only masked" with padding 0
    from ldmkit.inpaint_a1111 import InpaintSettings, prepare_mask

    a1111 = InpaintSettings(mask_blur=4, fill=1, full_res=True, full_res_padding=0)
    want = P.inpaint(model_a, params.replace(inpaint=a1111), init, mask)[0]
    np.testing.assert_array_equal(pixels(r.image), pixels(want))
    keep = np.asarray(prepare_mask(mask, a1111)) == 0  # outside the blurred mask: the original pixels
    np.testing.assert_array_equal(pixels(r.image)[keep], pixels(init)[keep])
    assert not np.array_equal(pixels(r.image), pixels(P.img2img(model_a, params, init)[0]))


def test_samplers_schedulers_and_png_info(api):
    names = api.util_get_sampler_names()
    assert {"Euler", "Euler a", "DPM++ 2M", "DDIM"} <= set(names)
    euler_a = next(s for s in api.get_samplers() if s["name"] == "Euler a")
    assert "euler_a" in euler_a["aliases"]
    assert {"automatic", "karras", "exponential"} <= set(api.util_get_scheduler_names())

    img = api.txt2img(prompt="a fox", seed=99, steps=2, width=16, height=16, sampler_name="DPM++ 2M",
                      scheduler="karras").image
    r = api.png_info(img)
    assert r.info == img.info["parameters"]
    p = r.parameters
    assert (p["Prompt"], p["Seed"], p["Sampler"], p["Schedule type"], p["Size-1"]) == ("a fox", "99", "DPM++ 2M",
                                                                                       "Karras", "16")


def test_options_switch_models(api, server, models_dir):
    titles = api.util_get_model_names()
    assert len(titles) == 2 and all(t.endswith("]") for t in titles)  # "tiny_a.safetensors [0123456789]"
    title_a, title_b = sorted(titles)
    assert api.util_get_current_model() == title_a
    kw = dict(prompt="a cat", seed=5, steps=2, width=16, height=16)
    img_a = api.txt2img(**kw).image
    try:
        api.set_options({"sd_model_checkpoint": title_b})
        assert api.get_options()["sd_model_checkpoint"] == title_b
        img_b = api.txt2img(**kw).image
        assert "Model: tiny_b" in img_b.info["parameters"]
        assert not np.array_equal(pixels(img_a), pixels(img_b))
    finally:
        api.set_options({"sd_model_checkpoint": title_a})
    assert api.get_options()["sd_model_checkpoint"] == title_a
    # per request, restored afterwards
    r = api.txt2img(override_settings={"sd_model_checkpoint": "tiny_b"}, **kw)
    np.testing.assert_array_equal(pixels(r.image), pixels(img_b))
    assert api.util_get_current_model() == title_a
    _, url = server
    bad = requests.post(f"{url}/sdapi/v1/options", json={"sd_model_checkpoint": "nope"}, timeout=TIMEOUT)
    assert bad.status_code == 422 and "tiny_b.safetensors" in bad.text


def test_concurrent_clients_get_their_own_images(server, model_a):
    _, url = server
    jobs = [("a red apple", 1, 16, 16, "Euler a"), ("a blue car", 2, 32, 16, "DPM++ 2M"),
            ("a green tree", 3, 16, 32, "Euler"), ("a yellow sun", 4, 24, 24, "DDIM")]
    results: dict[int, object] = {}
    barrier = threading.Barrier(len(jobs))

    def client(i: int) -> None:
        prompt, seed, w, h, sampler = jobs[i]
        api = webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1")
        barrier.wait()
        try:
            results[i] = api.txt2img(prompt=prompt, seed=seed, steps=3, width=w, height=h, sampler_name=sampler)
        except Exception as e:  # reported below
            results[i] = e

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    for i, (prompt, seed, w, h, sampler) in enumerate(jobs):
        r = results[i]
        assert not isinstance(r, Exception), r
        want = P.txt2img(model_a, webui_params(prompt, seed, sampler, steps=3, width=w, height=h))[0]
        assert r.image.size == (w, h) and r.info["seed"] == seed
        assert r.image.info["parameters"] == want.info["parameters"]
        np.testing.assert_array_equal(pixels(r.image), pixels(want))


def test_progress_and_interrupt(api, server, monkeypatch):
    app, url = server
    real = P.txt2img
    calls = []

    def slow_txt2img(model, params, callback=None):
        def cb(d):
            calls.append(d["i"])
            time.sleep(0.03)
            callback(d)

        return real(model, params, cb)

    monkeypatch.setattr(P, "txt2img", slow_txt2img)
    out = {}
    t = threading.Thread(target=lambda: out.update(r=api.txt2img(prompt="long", seed=3, steps=100, width=16,
                                                                 height=16)))
    t.start()
    deadline = time.monotonic() + TIMEOUT
    while (p := api.get_progress())["state"]["sampling_step"] < 3:
        assert time.monotonic() < deadline and t.is_alive()
        time.sleep(0.02)
    assert 0 < p["progress"] < 1 and p["state"]["sampling_steps"] == 100 and p["state"]["job_count"] == 1
    preview = Image.open(io.BytesIO(base64.b64decode(p["current_image"])))
    assert preview.size == (8, 8)  # A1111's default Approx NN without a tiny decoder: Approx cheap, 1 pixel a latent
    api.interrupt()
    t.join(TIMEOUT)
    assert 3 <= len(calls) < 100  # stopped early
    r = out["r"]
    assert r.image.size == (16, 16) and "Seed: 3," in r.image.info["parameters"]  # the partial result
    idle = api.get_progress()
    assert idle["state"]["job_count"] == 0 and idle["state"]["interrupted"] is False
    assert len(api.txt2img(prompt="after", seed=1, steps=2, width=16, height=16).images) == 1


def test_queue_full_answers_503(model_a, monkeypatch):
    started, release = threading.Event(), threading.Event()
    real = P.txt2img

    def blocked_txt2img(model, params, callback=None):
        started.set()
        release.wait(TIMEOUT)
        return real(model, params, callback)

    monkeypatch.setattr(P, "txt2img", blocked_txt2img)
    app = create_app(model_a, queue_size=1)
    body = {"prompt": "x", "steps": 2, "width": 16, "height": 16, "seed": 1}
    with BackgroundServer(app) as url:
        codes: list[int] = []

        def post() -> None:
            codes.append(requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=TIMEOUT).status_code)

        running = threading.Thread(target=post)
        running.start()
        assert started.wait(TIMEOUT)
        waiting = threading.Thread(target=post)
        waiting.start()
        deadline = time.monotonic() + TIMEOUT
        while app.state.worker.waiting() < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        refused = requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=TIMEOUT)
        assert refused.status_code == 503 and "busy" in refused.json()["detail"]
        release.set()
        running.join(TIMEOUT)
        waiting.join(TIMEOUT)
        assert codes == [200, 200]


def test_auth(model_a):
    app = create_app(model_a, api_auth="alice:s3cret")
    with BackgroundServer(app) as url:
        r = requests.get(f"{url}/sdapi/v1/samplers", timeout=TIMEOUT)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Basic")
        for user, password in (("alice", "wrong"), ("bob", "s3cret"), ("alice", "s3cret2")):
            assert requests.get(f"{url}/", auth=(user, password), timeout=TIMEOUT).status_code == 401
        assert requests.get(f"{url}/docs", timeout=TIMEOUT).status_code == 401
        api = webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1", username="alice", password="s3cret")
        assert api.txt2img(prompt="x", steps=2, width=16, height=16).image.size == (16, 16)
        bad = webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1", username="alice", password="nope")
        with pytest.raises(RuntimeError, match="401"):
            bad.txt2img(prompt="x", steps=2, width=16, height=16)


def _field_errors(r) -> dict:
    assert r.status_code == 422, r.text
    return {".".join(str(p) for p in e["loc"][1:]): e["msg"] for e in r.json()["detail"]}


def test_bad_requests_are_refused_clearly(model_a):
    limits = Limits(max_upload_bytes=20_000, max_input_pixels=64 * 64)
    app = create_app(model_a, limits=limits)
    c = TestClient(app)
    try:
        post = lambda body: c.post("/sdapi/v1/txt2img", json=body)
        r = c.post("/sdapi/v1/txt2img", content=b'{"prompt": "x",', headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid"
        assert set(_field_errors(post({"width": "wide", "steps": [3], "prompt": 1}))) == {"width", "steps", "prompt"}
        assert "limit of 2048" in _field_errors(post({"width": 4096}))["width"]
        assert "use 30 or 32" in _field_errors(post({"width": 31, "height": 16}))["width"]  # tiny: multiple of 2
        assert "limit of 150" in _field_errors(post({"steps": 10_000}))["steps"]
        assert "greater than or equal to 1" in _field_errors(post({"batch_size": 0}))["batch_size"]
        assert "MP" in _field_errors(post({"width": 2048, "height": 2048, "batch_size": 8}))["width"]
        msg = _field_errors(post({"sampler_name": "Euler b"}))["sampler_name"]
        assert "unknown sampler 'Euler b'" in msg and "'Euler a'" in msg
        assert "karras" in _field_errors(post({"scheduler": "fancy"}))["scheduler"]
        assert "CLIP_stop" in str(_field_errors(post({"override_settings": {"CLIP_stop_at_last_layers": "2"}})))

        def png(size) -> str:
            buf = io.BytesIO()
            Image.new("RGB", size).save(buf, format="PNG")
            return base64.b64encode(buf.getvalue()).decode()

        i2i = lambda **kw: c.post("/sdapi/v1/img2img", json={"width": 16, "height": 16, "steps": 2, **kw})
        assert "init_images" in _field_errors(i2i())
        assert "denoising_strength" in _field_errors(i2i(init_images=[png((16, 16))], denoising_strength=1.5))
        assert "not valid base64" in _field_errors(i2i(init_images=["!!!"]))["init_images.0"]
        assert "not an image" in _field_errors(i2i(init_images=[base64.b64encode(b"hello").decode()]))[
            "init_images.0"]
        r = i2i(init_images=[png((100, 100))])
        assert r.status_code == 413 and "100x100" in r.json()["detail"]
        r = i2i(init_images=["A" * 40_000])
        assert r.status_code == 413 and "MB of base64" in r.json()["detail"]
        r = c.post("/sdapi/v1/img2img", content=b"x" * (limits.max_body_bytes + 1),
                   headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        ok = i2i(init_images=["data:image/png;base64," + png((16, 16))], denoising_strength=0.5, seed=1)
        assert ok.status_code == 200 and json.loads(ok.json()["info"])["seed"] == 1
    finally:
        app.state.worker.stop()


def test_explain_link(model_a, monkeypatch):
    import importlib
    import sys

    app = create_app(model_a)
    c = TestClient(app)
    try:
        monkeypatch.setitem(sys.modules, "ldmkit.explain", None)  # as if not installed
        r = c.get("/explain", params={"prompt": "a cat", "seed": 1})
        assert r.status_code == 501 and "explain" in r.json()["detail"]
        monkeypatch.delitem(sys.modules, "ldmkit.explain")
        try:
            importlib.import_module("ldmkit.explain").build_explain_page  # noqa: B018
        except (ImportError, AttributeError):
            pytest.skip("ldmkit.explain is not in this checkout")
        r = c.get("/explain", params={"prompt": "a cat", "seed": 1, "steps": 2, "width": 16, "height": 16},
                  follow_redirects=False)
        assert r.status_code == 303, r.text
        page = c.get(r.headers["location"])
        assert page.status_code == 200 and "a cat" in page.text
        assert c.get(r.headers["location"].rsplit("/", 1)[0] + "/../../x").status_code == 404
    finally:
        app.state.worker.stop()


def test_save_images_docs_and_cli(model_a, tmp_path):
    import argparse

    from ldmkit.infotext import read_parameters
    from ldmkit.server.cli import register

    app = create_app(model_a, output_dir=tmp_path)
    c = TestClient(app)
    try:
        body = {"prompt": "saved", "seed": 11, "steps": 2, "width": 16, "height": 16, "save_images": True,
                "send_images": False}
        r = c.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200 and r.json()["images"] == []
        (saved,) = tmp_path.glob("*-11.png")
        assert read_parameters(saved) == json.loads(r.json()["info"])["infotexts"][0]
        assert c.get("/docs").status_code == 200
        assert "/sdapi/v1/txt2img" in c.get("/openapi.json").json()["paths"]
        assert c.get("/").text.startswith("<!doctype html>") and c.get("/static/app.js").status_code == 200
    finally:
        app.state.worker.stop()

    sub = argparse.ArgumentParser(prog="ldmkit").add_subparsers()
    parsers = []
    register(lambda name, help, examples=None: parsers.append(sub.add_parser(name, help=help, epilog=examples))
             or parsers[-1])
    args = parsers[0].parse_args(["--model", "m.safetensors", "--queue-size", "3", "--api-auth", "a:b"])
    assert parsers[0].prog.endswith("serve") and "ldmkit serve" in parsers[0].epilog
    assert (args.host, args.port, args.queue_size, args.max_steps, args.func.__name__) == ("127.0.0.1", 7860, 3,
                                                                                          150, "serve")
