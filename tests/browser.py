"""Debian's chromium through Playwright for the web-page tests (no ``playwright install``: the system chromium).

CI needs ``apt-get install -y chromium`` and ``pip install playwright``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def require_browser():
    """Skip the calling test module unless chromium, the server extra and Playwright are installed; returns
    ``playwright.sync_api``. Call it at module level, before importing the server."""
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium: apt-get install -y chromium", allow_module_level=True)
    pytest.importorskip("fastapi", reason="server extra not installed: pip install 'ldmkit[server]'")
    return pytest.importorskip("playwright.sync_api", reason="pip install playwright")


def launch(pw):
    """A headless chromium for ``pw`` (a running ``sync_playwright()``)."""
    return pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
