"""/docs works offline: the Swagger UI page loads its JavaScript and CSS from this server, never a CDN."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("fastapi", reason="server extra not installed: pip install 'ldmkit[server]'")

from fastapi.testclient import TestClient  # noqa: E402

from ldmkit import checkpoint  # noqa: E402
from ldmkit.config import TINY  # noqa: E402
from ldmkit.model import StableDiffusion  # noqa: E402
from ldmkit.server import docs_offline  # noqa: E402
from ldmkit.server.app import create_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    checkpoint.save_single_file(StableDiffusion(TINY), path)
    app = create_app(path, device="cpu", preview_interval=None)
    yield app
    app.state.worker.stop()


def _urls(page: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', page) + re.findall(r'url: "([^"]+)"', page)


def test_docs_page_references_only_local_assets(app):
    pytest.importorskip("swagger_ui_bundle")
    c = TestClient(app)
    r = c.get("/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    urls = _urls(r.text)
    assert {u.rsplit("/", 1)[-1] for u in urls} >= {"swagger-ui-bundle.js", "swagger-ui.css", "openapi.json"}
    for u in urls:
        assert u.startswith("/") and not u.startswith("//"), f"/docs loads {u} from elsewhere"
        got = c.get(u)
        assert got.status_code == 200, u
        if u.endswith(".js"):
            assert "javascript" in got.headers["content-type"] and "SwaggerUIBundle" in got.text
        elif u.endswith(".css"):
            assert got.headers["content-type"].startswith("text/css") and ".swagger-ui" in got.text
        elif u.endswith(".json"):
            assert got.json()["info"]["title"] == "ldmkit"
    assert "http://" not in r.text and "https://" not in r.text


def test_redoc_goes_to_the_local_docs(app):
    r = TestClient(app).get("/redoc", follow_redirects=False)
    assert r.status_code in (302, 307) and r.headers["location"] == "/docs"


def test_without_the_package_docs_names_it(app, monkeypatch):
    from fastapi import FastAPI

    monkeypatch.setattr(docs_offline, "_swagger_ui_dir", lambda: None)
    bare = FastAPI(docs_url=None, redoc_url=None)
    docs_offline.add_offline_docs(bare)
    r = TestClient(bare).get("/docs")
    assert r.status_code == 200 and "swagger-ui-bundle" in r.text
    assert "http://" not in r.text and "https://" not in r.text
    assert _urls(r.text) == ["/openapi.json"]
