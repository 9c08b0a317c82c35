"""Bad input to the server (issue 15, hardening items 2-6 and 12): each is a clear 4xx with a JSON body, never
a 500, a poisoned setting or a file written where it should not be."""

from __future__ import annotations

import argparse
import base64
import io
import json
import struct
import zlib

import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="server extra not installed: pip install 'ldmkit[server]'")

from fastapi.testclient import TestClient  # noqa: E402

from ldmkit import checkpoint  # noqa: E402
from ldmkit import pipeline as P  # noqa: E402
from ldmkit.config import TINY  # noqa: E402
from ldmkit.model import StableDiffusion  # noqa: E402
from ldmkit.server.app import create_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = {"steps": 1, "width": 16, "height": 16, "seed": 1}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    checkpoint.save_single_file(StableDiffusion(TINY), path)
    return path


@pytest.fixture(scope="module")
def client(model_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs")
    app = create_app(model_file, device="cpu", preview_interval=None, output_dir=out)
    c = TestClient(app, raise_server_exceptions=False)
    c.out = out
    yield c
    app.state.worker.stop()


def raw_post(c: TestClient, path: str, text: str):
    return c.post(path, content=text.encode("utf-8"), headers={"Content-Type": "application/json"})


def errors(r) -> dict[str, str]:
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == "application/json"
    return {".".join(str(p) for p in e["loc"][1:]): e["msg"] for e in r.json()["detail"]}


def test_options_keep_no_arbitrary_keys(client):
    """Item 2: 15 x 20 MB of made-up keys grew the server by 341 MB and GET /options to 315 MB."""
    size = len(client.get("/sdapi/v1/options").content)
    junk = "x" * 2_000_000
    for i in range(3):
        r = client.post("/sdapi/v1/options", json={f"junk{i}": junk})
        assert r.status_code == 422 and f"junk{i}" in r.text and len(r.content) < 2000
    assert len(client.get("/sdapi/v1/options").content) == size


def test_clip_skip_beyond_the_model_is_refused_not_poisoning(client):
    """Item 3: CLIP_stop_at_last_layers 12 was stored, then every generation answered 500."""
    r = client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 12})
    assert "from 1 to 2" in errors(r)["CLIP_stop_at_last_layers"]  # the tiny text encoder has 2 layers
    assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 1
    for bad in (3, 12, 0, "2"):
        r = client.post("/sdapi/v1/txt2img", json={**SMALL, "override_settings": {"CLIP_stop_at_last_layers": bad}})
        assert "from 1 to 2" in errors(r)["override_settings.CLIP_stop_at_last_layers"]
    r = client.post("/sdapi/v1/txt2img", json={**SMALL, "override_settings": {"CLIP_stop_at_last_layers": 2}})
    assert r.status_code == 200 and "Clip skip: 2" in json.loads(r.json()["info"])["infotexts"][0]
    assert client.post("/sdapi/v1/txt2img", json=SMALL).status_code == 200


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
@pytest.mark.parametrize("field", ["cfg_scale", "eta", "denoising_strength"])
def test_non_finite_numbers_are_422_with_a_json_body(client, literal, field):
    """Item 4: NaN, Infinity and 1e999 (which JSON parsers read as infinity) gave a plain-text 500."""
    r = raw_post(client, "/sdapi/v1/txt2img", f'{{"steps": 1, "width": 16, "height": 16, "{field}": {literal}}}')
    msg = errors(r)[field]
    assert "finite" in msg
    assert r.json()["detail"][0]["input"] in ("nan", "inf", "-inf")  # the input echoed as text


def test_non_finite_option_values_are_422(client):
    r = raw_post(client, "/sdapi/v1/options", '{"eta_ddim": NaN}')
    assert "from 0 to 10" in errors(r)["eta_ddim"] and r.json()["detail"][0]["input"] == "nan"


@pytest.mark.parametrize("body", [
    r'{"prompt": "a \ud800 cat"}',
    r'{"negative_prompt": "\udfff"}',
    r'{"prompt": "ok", "override_settings": {"\ud83d": 1}}',
    r'{"prompt": "ok", "styles": ["\udc00"]}',
])
def test_lone_surrogates_are_422_with_a_json_body(client, body):
    """Item 4: a lone UTF-16 surrogate reached the response encoder and gave a plain-text 500."""
    r = raw_post(client, "/sdapi/v1/txt2img", body[:-1] + ', "steps": 1, "width": 16, "height": 16}')
    (msg,) = errors(r).values()
    assert "lone UTF-16 surrogate" in msg
    r.content.decode("utf-8")  # the body itself is valid UTF-8 JSON
    r = raw_post(client, "/sdapi/v1/options", r'{"\ud800": 1}')
    assert r.status_code == 422 and "\\ud800" in r.json()["detail"][0]["msg"]


def test_error_echo_is_short(client):
    r = client.post("/sdapi/v1/txt2img", json={"width": "w" * 1_000_000})
    assert "width" in errors(r) and len(r.content) < 5000


def png_with_text_bomb(inflated: int = 50_000_000) -> bytes:
    """A small PNG whose zTXt chunk inflates to ``inflated`` bytes (the PNG spec's chunk layout, by hand)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    png = buf.getvalue()
    data = b"parameters\0\0" + zlib.compress(b"a" * inflated, 9)
    chunk = struct.pack(">I", len(data)) + b"zTXt" + data + struct.pack(">I", zlib.crc32(b"zTXt" + data))
    iend = png.rfind(b"IEND") - 4
    return png[:iend] + chunk + png[iend:]


def test_png_text_bomb_is_4xx(client):
    """Item 5: a 51 KB PNG whose text chunk inflates to 50 MB gave 500 at /png-info and as an init image."""
    bomb = png_with_text_bomb()
    assert len(bomb) < 100_000
    b64 = base64.b64encode(bomb).decode()
    assert "too large" in errors(client.post("/sdapi/v1/png-info", json={"image": b64}))["image"]
    r = client.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [b64]})
    assert "too large" in errors(r)["init_images.0"]
    r = client.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [base64.b64encode(
        png_with_text_bomb(1000)).decode()], "mask": b64})
    assert "too large" in errors(r)["mask"]


def test_force_task_id_never_shapes_file_names(client, monkeypatch):
    """Item 6: force_task_id reached saved file names (subfolders made; a NUL gave 500 after the work)."""
    calls = []
    real = P.txt2img
    monkeypatch.setattr(P, "txt2img", lambda *a, **k: calls.append(1) or real(*a, **k))
    body = {**SMALL, "save_images": True, "seed": 123}
    r = client.post("/sdapi/v1/txt2img", json={**body, "force_task_id": "../../x\0y"})
    assert "force_task_id" in errors(r) and calls == []  # refused before any work
    r = client.post("/sdapi/v1/txt2img", json={**body, "force_task_id": "../../sub/dir/task(ab/cd)"})
    assert r.status_code == 200
    saved = [p for p in client.out.rglob("*") if "123" in p.name]
    assert len(saved) == 1 and saved[0].parent == client.out  # no folders made, nothing outside
    assert set(saved[0].name) <= set("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_.")


def serve_app(model_file, *argv: str):
    """The app ``ldmkit serve ARGV`` would run."""
    from ldmkit.server.cli import build_app, register

    sub = argparse.ArgumentParser(prog="ldmkit").add_subparsers()
    parsers = []
    register(lambda name, help, examples=None: parsers.append(sub.add_parser(name, help=help)) or parsers[-1])
    return build_app(parsers[0].parse_args(["--model", str(model_file), "--device", "cpu", *argv]))


def test_host_header_guards_against_dns_rebinding(model_file):
    """Item 12: with no Host check, a page on another site could reach the server through DNS rebinding."""
    app = serve_app(model_file, "--allowed-hosts", "studio.lan,Box.Local")
    try:
        def status(host: str) -> int:
            return TestClient(app, base_url=f"http://{host}").get("/sdapi/v1/samplers").status_code

        for ok in ("127.0.0.1:7860", "localhost:7860", "[::1]:7860", "LOCALHOST", "studio.lan:7860", "box.local"):
            assert status(ok) == 200, ok
        for bad in ("evil.example:7860", "127.0.0.1.evil.example", "192.168.1.20:7860", "studio.lan.evil.example"):
            assert status(bad) == 400, bad
        r = TestClient(app, base_url="http://evil.example:7860").get("/")
        assert r.status_code == 400 and "--allowed-hosts evil.example" in r.json()["detail"]
        assert TestClient(app).get("/sdapi/v1/cmd-flags", headers={"Host": "127.0.0.1"}).json()["port"] == 7860
    finally:
        app.state.worker.stop()
    app = serve_app(model_file, "--host", "0.0.0.0")  # every interface: bare addresses too, never other names
    try:
        assert TestClient(app, base_url="http://192.168.1.20:7860").get("/sdapi/v1/samplers").status_code == 200
        assert TestClient(app, base_url="http://[fe80::1]:7860").get("/sdapi/v1/samplers").status_code == 200
        assert TestClient(app, base_url="http://evil.example").get("/sdapi/v1/samplers").status_code == 400
    finally:
        app.state.worker.stop()
    app = serve_app(model_file, "--allowed-hosts", "*")  # the check off, by choice
    try:
        assert TestClient(app, base_url="http://anything.example").get("/sdapi/v1/samplers").status_code == 200
    finally:
        app.state.worker.stop()


def test_png_info_bounds_all_text_chunks_together(client):
    """Each chunk within PIL's 1 MB, ten of them: /png-info would echo 10 MB of metadata."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    png = buf.getvalue()
    chunks = b""
    for i in range(10):
        data = f"k{i}".encode() + b"\0\0" + zlib.compress(b"a" * 1_000_000, 9)
        chunks += struct.pack(">I", len(data)) + b"zTXt" + data + struct.pack(">I", zlib.crc32(b"zTXt" + data))
    iend = png.rfind(b"IEND") - 4
    b64 = base64.b64encode(png[:iend] + chunks + png[iend:]).decode()
    r = client.post("/sdapi/v1/png-info", json={"image": b64})
    assert r.status_code == 413 and "10.0 MB" in r.json()["detail"] and len(r.content) < 1000


def test_background_server_checks_the_host_too(model_file):
    requests = pytest.importorskip("requests")
    from ldmkit.server.app import BackgroundServer

    app = create_app(model_file, device="cpu")
    with BackgroundServer(app) as url:
        assert requests.get(f"{url}/sdapi/v1/samplers", timeout=30).status_code == 200
        port = url.rsplit(":", 1)[1]
        for host, code in ((f"localhost:{port}", 200), (f"evil.example:{port}", 400), ("", 400)):
            assert requests.get(f"{url}/sdapi/v1/samplers", headers={"Host": host}, timeout=30).status_code == code
