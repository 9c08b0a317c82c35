"""Hardening item 10 (issue 15), server side: a queued job whose client disconnected is skipped; /explain's
temporary pages are bounded."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
requests = pytest.importorskip("requests")

from ldmkit import pipeline as P  # noqa: E402
from ldmkit.config import TINY  # noqa: E402
from ldmkit.model import StableDiffusion  # noqa: E402
from ldmkit.server.app import BackgroundServer, create_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TIMEOUT = 60
BODY = {"prompt": "x", "steps": 1, "width": 16, "height": 16, "seed": 1}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return StableDiffusion(TINY).eval()


def _post_and_hang_up(url: str, body: dict) -> None:
    """Send a complete txt2img request over a raw socket, then close it without reading the answer."""
    u = urlparse(url)
    data = json.dumps(body).encode()
    s = socket.create_connection((u.hostname, u.port), timeout=TIMEOUT)
    s.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % (u.hostname.encode(), u.port, len(data)) + data)
    s.close()


def test_queued_job_of_a_disconnected_client_is_skipped(model, monkeypatch):
    started, release = threading.Event(), threading.Event()
    prompts: list[str] = []
    real = P.txt2img

    def blocked_txt2img(model, params, callback=None):
        prompts.append(params.prompt)
        if params.prompt == "first":
            started.set()
            release.wait(TIMEOUT)
        return real(model, params, callback)

    monkeypatch.setattr(P, "txt2img", blocked_txt2img)
    app = create_app(model, queue_size=4)
    worker = app.state.worker
    with BackgroundServer(app) as url:
        first = threading.Thread(target=lambda: requests.post(f"{url}/sdapi/v1/txt2img",
                                                              json={**BODY, "prompt": "first"}, timeout=TIMEOUT))
        first.start()
        assert started.wait(TIMEOUT)
        _post_and_hang_up(url, {**BODY, "prompt": "gone"})
        deadline = time.monotonic() + TIMEOUT
        while worker.waiting() < 1:  # the second job is queued behind the first
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(1.5)  # time for the server to notice the hang-up
        release.set()
        first.join(TIMEOUT)
        r = requests.post(f"{url}/sdapi/v1/txt2img", json={**BODY, "prompt": "third"}, timeout=TIMEOUT)
        assert r.status_code == 200
    assert prompts == ["first", "third"]  # "gone" never ran


def test_explain_pages_in_the_temporary_folder_are_bounded(model, monkeypatch):
    """Each distinct /explain request wrote ~2.7 MB into a temporary folder kept until shutdown; now the folder
    keeps the most recently used pages only (count and bytes bounded), and a kept page still serves."""
    import importlib

    from fastapi.testclient import TestClient

    from ldmkit.server import explain_cache

    explain = importlib.import_module("ldmkit.explain")

    built: list[Path] = []

    def fake_build(model, prompt, out_dir, **kw):
        built.append(Path(out_dir))
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "index.html").write_text(f"<p>{prompt}</p>")
        (out_dir / "attention.bin").write_bytes(b"\0" * 100_000)
        return out_dir / "index.html"

    monkeypatch.setattr(explain, "build_explain_page", fake_build)
    monkeypatch.setattr(explain_cache, "MAX_PAGES", 5)
    app = create_app(model)
    c = TestClient(app)
    try:
        locations = []
        for i in range(12):
            r = c.get("/explain", params={"prompt": f"cat {i}", "width": 16, "height": 16, "steps": 1},
                      follow_redirects=False)
            assert r.status_code == 303, r.text
            locations.append(r.headers["location"])
            assert c.get(locations[-1]).text == f"<p>cat {i}</p>"
        root = built[0].parent
        assert {b.parent for b in built} == {root} and root.name.startswith("ldmkit-explain-")
        assert len([d for d in root.iterdir() if d.is_dir()]) <= 5
        assert c.get(locations[-1]).status_code == 200
    finally:
        app.state.worker.stop()
