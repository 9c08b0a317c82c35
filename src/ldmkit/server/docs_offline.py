"""``/docs`` without the internet: the Swagger UI page with its JavaScript and CSS served by this server.

FastAPI's own ``/docs`` and ``/redoc`` load their assets from a CDN, so on a machine without internet
access the page stays blank. Here the assets come from the ``swagger-ui-bundle`` package (Swagger UI
4.15.5, Apache-2.0; part of the ``server`` extra), mounted at ``/swagger-ui``. ReDoc has no such
package: ``/redoc`` redirects to ``/docs``. Without the package, ``/docs`` still answers, with a page
that links the OpenAPI schema and names the package to install, never a CDN.
"""

from __future__ import annotations

import html
import json

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/swagger-ui"  # where the Swagger UI files are served

_PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>{title}</title>
<link rel="stylesheet" type="text/css" href="{assets}/swagger-ui.css">
<link rel="icon" type="image/png" href="{assets}/favicon-32x32.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{assets}/swagger-ui-bundle.js"></script>
<script>
window.ui = SwaggerUIBundle({{
  url: {openapi},
  dom_id: "#swagger-ui",
  deepLinking: true,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
}});
</script>
</body>
</html>
"""

_NO_PACKAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title></head>
<body><h1>{title}</h1>
<p>The interactive API page needs the <code>swagger-ui-bundle</code> package, which serves Swagger UI from
this machine: <code>pip install 'ldmkit[server]'</code> (or <code>pip install swagger-ui-bundle</code>).</p>
<p>The API description itself: <a href="{openapi_href}">{openapi_href}</a>.</p>
</body></html>
"""


def _swagger_ui_dir() -> str | None:
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return None
    return str(swagger_ui_path)


def add_offline_docs(app: FastAPI) -> None:
    """Serve ``/docs`` (and redirect ``/redoc``) from local assets; create ``app`` with ``docs_url=None,
    redoc_url=None`` so FastAPI's CDN pages are not registered."""
    folder = _swagger_ui_dir()
    if folder is not None:
        app.mount(ASSETS, StaticFiles(directory=folder), name="swagger-ui")

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")  # behind a proxy that strips a prefix
        openapi = f"{root}{app.openapi_url}"
        title = html.escape(f"{app.title} - Swagger UI")
        if folder is None:
            return HTMLResponse(_NO_PACKAGE.format(title=title, openapi_href=html.escape(openapi)))
        return HTMLResponse(_PAGE.format(title=title, assets=html.escape(root + ASSETS),
                                         openapi=json.dumps(openapi).replace("<", "\\u003c")))

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> RedirectResponse:
        return RedirectResponse(f"{request.scope.get('root_path', '').rstrip('/')}/docs")
