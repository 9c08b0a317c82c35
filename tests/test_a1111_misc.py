"""A1111 details of issue 15, item 6: img2img at denoising strength 0, the steps an interrupted request
reports, and scripts ldmkit does not have (a 422 naming the script, never a silent 200)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit import checkpoint
from ldmkit import pipeline as P
from ldmkit.config import TINY
from ldmkit.core import latent_shape
from ldmkit.model import StableDiffusion

pytestmark = pytest.mark.usefixtures("one_thread")
W = H = 16


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return StableDiffusion(TINY).eval()


def _init() -> Image.Image:
    y, x = np.mgrid[0:H, 0:W]
    rgb = np.stack([x * 255 // (W - 1), y * 255 // (H - 1), (x + y) * 255 // (W + H - 2)], -1).astype(np.uint8)
    return Image.fromarray(rgb)


def _png(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_strength_zero_is_one_step_at_the_lowest_noise(model, monkeypatch):
    """A1111 (setup_img2img_steps): t_enc = int(0 * steps) = 0, sigma_sched = sigmas[steps - 1:]: one step from
    the smallest non-zero noise level. With a U-Net that predicts the noise perfectly, that step lands on the
    encoded image, so the result is the encoded-decoded image."""
    params = P.GenerationParams("a gradient", steps=20, sampler="Euler", cfg_scale=5.0, seed=2, width=W, height=H)
    seen: list[float] = []
    out = P.img2img(model, params.replace(strength=0.0), _init(), callback=lambda d: seen.append(float(d["sigma"])))[0]
    sigmas = P.plan(model, params).sigmas
    assert seen == [pytest.approx(float(sigmas[-2]))]  # one step, at A1111's sigma_sched[0]
    assert "Denoising strength: 0" in out.info["parameters"]

    back = np.asarray(P.decode_latents(model, P.encode_pixels(model, P.image_to_tensor(_init(), W, H)))[0], np.int16)
    noise = P.initial_noise([2], latent_shape(model, W, H), model.device)
    # a perfect eps-predicting U-Net for this starting noise: it always predicts that noise
    monkeypatch.setattr(model.unet, "forward", lambda x, t, context, **kw: noise.expand(x.shape[0], -1, -1, -1))
    exact = np.asarray(P.img2img(model, params.replace(strength=0.0), _init())[0], np.int16)
    assert np.abs(exact - back).max() <= 1
    assert np.abs(np.asarray(out, np.int16) - back).max() > 5  # the random U-Net's step does change it

    with pytest.raises(P.GenerationError, match=r"strength must be in \[0, 1\]"):
        P.img2img(model, params.replace(strength=-0.1), _init())


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from ldmkit.server.app import create_app

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    checkpoint.save_single_file(StableDiffusion(TINY), path)
    app = create_app(path, device="cpu", preview_interval=None)
    yield TestClient(app, raise_server_exceptions=False)
    app.state.worker.stop()


BODY = {"prompt": "a gradient", "steps": 10, "width": W, "height": H, "seed": 3, "sampler_name": "Euler"}


def test_server_img2img_strength_zero(client):
    r = client.post("/sdapi/v1/img2img", json={**BODY, "init_images": [_png(_init())], "denoising_strength": 0})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["denoising_strength"] == 0 and "Denoising strength: 0" in info["infotexts"][0]
    bad = client.post("/sdapi/v1/img2img", json={**BODY, "init_images": [_png(_init())], "denoising_strength": -1})
    assert bad.status_code == 422 and "denoising_strength" in bad.text


@pytest.mark.parametrize("kind", ["txt2img", "img2img"])
def test_interrupted_request_reports_the_steps_run(client, monkeypatch, kind):
    """Interrupted after its 3rd step: the image is the 3rd step's denoised estimate, and its infotext and the
    response's info say 3 steps, not the 10 asked for (before: "Steps: 10")."""
    from ldmkit.server.worker import JobContext

    original = JobContext.step_callback

    def interrupt_at_3(self, job_no, job_count, steps):
        cb = original(self, job_no, job_count, steps)

        def wrapped(d: dict) -> None:
            if d["i"] == 2:
                self.worker.interrupt()
            cb(d)

        return wrapped

    monkeypatch.setattr(JobContext, "step_callback", interrupt_at_3)
    body = {**BODY, "n_iter": 2}
    if kind == "img2img":
        body.update(init_images=[_png(_init())], denoising_strength=1.0)
    r = client.post(f"/sdapi/v1/{kind}", json=body)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert len(r.json()["images"]) == 1  # the interrupt ends the request: no second batch
    assert "Steps: 3," in info["infotexts"][0] and info["steps"] == 3
    monkeypatch.setattr(JobContext, "step_callback", original)
    whole = json.loads(client.post(f"/sdapi/v1/{kind}", json=body).json()["info"])
    assert "Steps: 10," in whole["infotexts"][0] and whole["steps"] == 10


def test_unknown_scripts_are_refused_by_name(client):
    """A1111 answers 422 for a script it does not have; a request asking for one never comes back as if it ran."""
    r = client.post("/sdapi/v1/txt2img", json={**BODY, "script_name": "X/Y/Z plot"})
    assert r.status_code == 422 and "X/Y/Z plot" in r.text and "script_name" in r.text
    r = client.post("/sdapi/v1/txt2img", json={**BODY, "alwayson_scripts": {"Regional Prompter": {"args": []}}})
    assert r.status_code == 422 and "Regional Prompter" in r.text and "alwayson_scripts" in r.text
    r = client.post("/sdapi/v1/img2img", json={**BODY, "init_images": [_png(_init())],
                                               "alwayson_scripts": {"ADetailer": {"args": [True]}}})
    assert r.status_code == 422 and "ADetailer" in r.text
    ok = client.post("/sdapi/v1/txt2img", json={**BODY, "steps": 2, "alwayson_scripts": {"DeepCache": {"args": [2]}}})
    assert ok.status_code == 200 and "DeepCache: 2" in json.loads(ok.json()["info"])["infotexts"][0]
