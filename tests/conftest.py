"""Shared test fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference.py


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models only pay for thread synchronisation, and on a busy 2-core machine two threads
    contend (~10x slower): run such modules single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def open_page():
    """``open_page(url, ready=None, timeout_ms=30_000)``: the web page at ``url`` in a headless chromium
    (tests/browser.py; one browser per module), once the JavaScript ``ready`` is true. Page errors, console
    errors and dialogs (dismissed) go to ``page.errors``; the module fails at teardown if any page has some."""
    from browser import launch, require_browser

    sync_api = require_browser()
    pages = []
    with sync_api.sync_playwright() as pw:
        browser = launch(pw)

        def open_(url: str, ready: str | None = None, timeout_ms: int = 30_000):
            page = browser.new_page()
            page.set_default_timeout(timeout_ms)
            page.errors = []
            page.on("pageerror", lambda e: page.errors.append(str(e)))
            page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
            page.on("dialog", lambda d: (page.errors.append(f"dialog: {d.message}"), d.dismiss()))
            page.goto(url)
            if ready:
                page.wait_for_function(ready)
            pages.append(page)
            return page

        yield open_
        browser.close()
    assert [e for p in pages for e in p.errors] == []


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny SD1 model (config.TINY, seed 0) as one .safetensors file: what the trainers start from."""
    from train_runs import tiny_model_file

    return tiny_model_file(tmp_path_factory.mktemp("models") / "tiny.safetensors")


@pytest.fixture(scope="module")
def sd2_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny SD2 model (config.TINY_SD2, seed 1) as one .safetensors file."""
    from train_runs import tiny_model_file

    from ldmkit.config import TINY_SD2

    return tiny_model_file(tmp_path_factory.mktemp("models") / "tiny-sd2.safetensors", TINY_SD2, 1)
