"""The HTTP server: A1111's ``/sdapi/v1`` API and a web page, over one queued worker.

``create_app(model)`` builds the FastAPI app; use it with ``fastapi.testclient.TestClient`` or
uvicorn (``ldmkit serve``, or :class:`BackgroundServer` for tests and notebooks).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import importlib
import inspect
import logging
import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import Body, FastAPI, HTTPException
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError

from ldmkit import __version__
from ldmkit import pipeline as P
from ldmkit.checkpoint import CheckpointError
from ldmkit.model import StableDiffusion
from ldmkit.samplers import _ALIASES, SAMPLER_DISPLAY_NAMES, SCHEDULE_DISPLAY_NAMES, sampler_names
from ldmkit.server import generation as G
from ldmkit.server import schemas as S
from ldmkit.server.checkpoints import Catalogue, CheckpointInfo
from ldmkit.server.extras import UpscalerCatalogue, add_extras_routes
from ldmkit.server.generation import Limits
from ldmkit.server.vaes import VAECatalogue, check_name
from ldmkit.server.worker import PREVIEW_FORMATS, JobContext, QueueFullError, Worker

log = logging.getLogger("ldmkit.server")
STATIC = Path(str(resources.files("ldmkit.server") / "static"))


# ---------------------------------------------------------------- the app


class _Guard:
    """ASGI middleware: HTTP basic auth (constant-time compare) and a request body size limit."""

    def __init__(self, app: Any, auth: tuple[str, str] | None, max_body: int):
        self.app, self.auth, self.max_body = app, auth, max_body

    @staticmethod
    def _authorized(header: bytes | None, auth: tuple[str, str]) -> bool:
        if not header or not header[:6].lower() == b"basic ":
            return False
        try:
            user, _, password = base64.b64decode(header[6:].strip()).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return False
        # both compared, always: the time taken says nothing about which part was wrong
        ok_user = secrets.compare_digest(user.encode(), auth[0].encode())
        ok_password = secrets.compare_digest(password.encode(), auth[1].encode())
        return ok_user & ok_password

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.auth is not None and not self._authorized(headers.get(b"authorization"), self.auth):
            response = JSONResponse({"detail": "Not authenticated: this server needs HTTP basic auth (--api-auth)"},
                                    401, headers={"WWW-Authenticate": 'Basic realm="ldmkit"'})
            return await response(scope, receive, send)
        length = headers.get(b"content-length")
        too_big = f"request body larger than this server's limit of {self.max_body / 1e6:.0f} MB"
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await JSONResponse({"detail": too_big}, 413)(scope, receive, send)
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise HTTPException(413, too_big)
            return message

        await self.app(scope, limited_receive, send)


def _parse_auth(api_auth: str | None) -> tuple[str, str] | None:
    if api_auth is None:
        return None
    user, sep, password = api_auth.partition(":")
    if not sep or not user or not password:
        raise ValueError("--api-auth must be USER:PASSWORD")
    return user, password


def create_app(model: StableDiffusion | str | os.PathLike | None = None, *, models_dir: str | os.PathLike | None = None,
               api_auth: str | None = None, queue_size: int = 16, limits: Limits | None = None,
               device: str | None = None, preview_interval: float | None = 1.0,
               output_dir: str | os.PathLike | None = None, explain_dir: str | os.PathLike | None = None,
               preview_vae: str | os.PathLike | None = None, vae_dir: str | os.PathLike | None = None,
               low_memory: bool = False, vae_tiling: bool = False,
               upscaler_dir: str | os.PathLike | None = None) -> FastAPI:
    """The server for ``model`` (an object, a path, a built-in name, or None for the default model).

    ``preview_interval``: seconds between live previews (0: every step, None: never);
    ``output_dir``: where ``save_images`` requests write their PNGs;
    ``preview_vae``: a tiny autoencoder for the "TAESD" live preview (the default preview when given);
    ``vae_dir``: VAE files (KL or tiny) that the ``sd_vae`` option can switch to;
    ``upscaler_dir``: ESRGAN-family upscaler files for the extras routes (``/sdapi/v1/upscalers``);
    ``low_memory``, ``vae_tiling``: load every model as ``api.load`` does with them (fp16-stored weights
    computed in fp32, networks paged out when idle; tiled decoding).
    """
    from ldmkit import api
    from ldmkit import previews as PV

    limits = limits or Limits()
    auth = _parse_auth(api_auth)
    catalogue = Catalogue(models_dir)
    resident: dict[str, StableDiffusion] = {}  # models given as objects can't be reloaded from a file

    def load(info: CheckpointInfo) -> StableDiffusion:
        if info.filename in resident:
            return resident[info.filename]
        return api.load(info.filename, device=device, low_memory=low_memory, vae_tiling=vae_tiling).model

    if isinstance(model, StableDiffusion):
        first = catalogue.add_model(model)
        resident[first.filename] = model
        loaded = model
    else:
        first = catalogue.info_for_path(api.resolve_model_path(model))
        catalogue.add(first)
        loaded = load(first)
    vaes = VAECatalogue(vae_dir)
    preview_vae = preview_vae or _builtin_preview_vae(loaded)
    tiny_preview = PV.tiny_decoder(preview_vae, loaded) if preview_vae else None
    options: dict[str, Any] = {"CLIP_stop_at_last_layers": 1, "samples_format": "png", "eta_ddim": 0.0,
                               "eta_ancestral": 1.0, "sd_vae": "Automatic",
                               # A1111's live preview options and defaults. Approx NN: the tiny decoder if
                               # there is one, else Approx cheap; never Full by default, which at 512² on a
                               # CPU costs more than a sampling step (docs/benchmarks.md)
                               "live_previews_enable": True, "show_progress_every_n_steps": 1,
                               "show_progress_type": "Approx NN",
                               "live_previews_image_format": "png", **G.DEEPCACHE_OPTIONS}
    worker = Worker(loaded, first, queue_size=queue_size, preview_interval=preview_interval, options=options,
                    tiny_preview=tiny_preview)
    explain_dirs: list[Path] = [Path(explain_dir)] if explain_dir else []  # a temporary one, made when needed

    def explain_root() -> Path:
        if not explain_dirs:
            explain_dirs.append(Path(tempfile.mkdtemp(prefix="ldmkit-explain-")))
        return explain_dirs[0]

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.stop()
        if explain_dirs and not explain_dir:
            shutil.rmtree(explain_dirs[0], ignore_errors=True)

    app = FastAPI(title="ldmkit", version=__version__, lifespan=lifespan,
                  description="Stable Diffusion from the model up: an AUTOMATIC1111-compatible API (/sdapi/v1) "
                              "and a web page at /.")
    app.state.worker, app.state.catalogue, app.state.limits, app.state.options = worker, catalogue, limits, options
    app.add_middleware(_Guard, auth=auth, max_body=limits.max_body_bytes)

    @app.exception_handler(QueueFullError)
    async def _queue_full(request: Any, exc: QueueFullError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 503, headers={"Retry-After": "5"})

    @app.exception_handler(P.GenerationError)
    @app.exception_handler(CheckpointError)
    async def _bad_settings(request: Any, exc: ValueError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 400)

    async def run_job(fn: Any, kind: str, task_id: str | None = None) -> Any:
        future = worker.submit(fn, kind, task_id)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()  # the client went away: drop the job if it has not started
            raise
        except (P.GenerationError, CheckpointError, QueueFullError, HTTPException):
            raise
        except Exception as e:
            log.exception("%s failed", kind)
            raise HTTPException(500, f"{kind} failed: {type(e).__name__}: {e}") from e

    def checkpoint_override(req: S.GenerationRequest) -> CheckpointInfo | None:
        name = (req.override_settings or {}).get("sd_model_checkpoint")
        if name is None:
            return None
        info = catalogue.find(str(name))
        if info is None:
            titles = ", ".join(i.title for i in catalogue.scan())
            raise G.field_error(("override_settings", "sd_model_checkpoint"),
                              f"no model {name!r}; available: {titles}", name)
        return info

    def prepare(req: S.GenerationRequest, kind: str) -> G.Generation:
        return G.prepare(req, kind, worker.model, options, limits, checkpoint_override(req), output_dir is not None)

    def vae_choice(req: S.GenerationRequest) -> str | None:
        """The sd_vae of this request (its override_settings, else the option); None: the model's own."""
        overrides = req.override_settings or {}
        loc = ("override_settings", "sd_vae") if "sd_vae" in overrides else ("sd_vae",)
        name = overrides.get("sd_vae", options["sd_vae"])
        try:
            info = check_name(vaes, name)
        except ValueError as e:
            raise G.field_error(loc, str(e), name) from None
        return None if info is None else info.model_name

    async def generate(req: S.GenerationRequest, kind: str) -> dict:
        gen = await run_in_threadpool(prepare, req, kind)
        vae_name = await run_in_threadpool(vae_choice, req)

        def vae_for(model: StableDiffusion) -> Any:
            return None if vae_name is None else vaes.decoder(check_name(vaes, vae_name), model)

        images, model = await run_job(lambda ctx: G.run_generation(ctx, gen, load, output_dir, vae_for), gen.kind,
                                       req.force_task_id)
        return await run_in_threadpool(G.response_body, req, gen, images, model, vae_name)

    # ------------------------------------------------------------ A1111 API

    @app.post("/sdapi/v1/txt2img", response_model=S.ImageResponse, tags=["sdapi"])
    async def txt2img(req: S.Txt2ImgRequest) -> dict:
        """Text to image; queued behind other requests."""
        return await generate(req, "txt2img")

    @app.post("/sdapi/v1/img2img", response_model=S.ImageResponse, tags=["sdapi"])
    async def img2img(req: S.Img2ImgRequest) -> dict:
        """Image to image; with `mask`, inpainting (white is repainted)."""
        return await generate(req, "img2img")

    @app.get("/sdapi/v1/progress", response_model=S.ProgressResponse, tags=["sdapi"])
    async def progress(skip_current_image: bool = False) -> dict:
        """The running request: progress 0..1, step, and a preview of the current image."""
        return worker.progress(skip_current_image)

    @app.post("/sdapi/v1/interrupt", tags=["sdapi"])
    async def interrupt() -> None:
        """Stop the running request; it returns the images it has so far."""
        worker.interrupt()

    @app.get("/sdapi/v1/samplers", response_model=list[S.SamplerItem], tags=["sdapi"])
    async def samplers() -> list[dict]:
        aliases: dict[str, list[str]] = {k: [k] for k in sampler_names()}
        for alias, short in _ALIASES.items():
            aliases[short].append(alias)
        return [{"name": SAMPLER_DISPLAY_NAMES[k], "aliases": aliases[k], "options": {}} for k in sampler_names()]

    @app.get("/sdapi/v1/schedulers", response_model=list[S.SchedulerItem], tags=["sdapi"])
    async def schedulers() -> list[dict]:
        items = [{"name": "automatic", "label": "Automatic"}]
        items += [{"name": k, "label": v, "default_rho": 7.0 if k == "karras" else None,
                   "need_inner_model": False} for k, v in SCHEDULE_DISPLAY_NAMES.items()]
        return items

    @app.get("/sdapi/v1/sd-models", response_model=list[S.SDModelItem], tags=["sdapi"])
    def sd_models() -> list[dict]:
        return [info.as_item() for info in catalogue.scan()]

    @app.post("/sdapi/v1/refresh-checkpoints", tags=["sdapi"])
    def refresh_checkpoints() -> None:
        catalogue.scan()

    @app.get("/sdapi/v1/options", tags=["sdapi"])
    async def get_options() -> dict:
        info = worker.checkpoint
        return {**options, "sd_model_checkpoint": info.title, "sd_checkpoint_hash": info.sha256}

    @app.post("/sdapi/v1/options", tags=["sdapi"])
    async def set_options(req: dict[str, Any] = Body(...)) -> None:  # noqa: B008 - FastAPI's idiom
        """Set options; `sd_model_checkpoint` (a title from /sdapi/v1/sd-models) switches the model."""
        clip = req.get("CLIP_stop_at_last_layers", 1)
        if not isinstance(clip, int) or not 1 <= clip <= 12:
            raise G.field_error(("CLIP_stop_at_last_layers",), "must be an integer from 1 to 12", clip)
        check_preview_options(req)
        for key in [k for k in G.DEEPCACHE_OPTIONS if k in req]:
            G.check_deepcache_option(key, req[key], (key,))
        if "sd_vae" in req:
            try:
                vae_info = await run_in_threadpool(check_name, vaes, req["sd_vae"])
            except ValueError as e:
                raise G.field_error(("sd_vae",), str(e), req["sd_vae"]) from None
            if vae_info is not None:  # load it now, so a file that does not fit this model fails here
                await run_job(lambda ctx: vaes.decoder(vae_info, ctx.model), "load VAE")
        name = req.get("sd_model_checkpoint")
        if name is not None:
            info = await run_in_threadpool(catalogue.find, str(name))
            if info is None:
                titles = ", ".join(i.title for i in await run_in_threadpool(catalogue.scan))
                raise G.field_error(("sd_model_checkpoint",), f"no model {name!r}; available: {titles}", name)

            def switch(ctx: JobContext) -> None:
                if info.filename != ctx.worker.checkpoint.filename:
                    ctx.set_model(load(info), info)

            await run_job(switch, "load model")
        options.update({k: v for k, v in req.items() if k not in ("sd_model_checkpoint", "sd_checkpoint_hash")})

    @app.post("/sdapi/v1/png-info", response_model=S.PNGInfoResponse, tags=["sdapi"])
    def png_info_route(req: S.PNGInfoRequest) -> dict:
        """The generation parameters a PNG carries."""
        return G.png_info(G.decode_image(req.image, ("image",), limits))

    @app.get("/sdapi/v1/scripts", tags=["sdapi"])
    async def scripts() -> dict:
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/sd-vae", tags=["sdapi"])
    def sd_vae() -> list[dict]:
        """VAE files in --vae-dir; set the option `sd_vae` to a `model_name` to decode with it."""
        return [info.as_item() for info in vaes.scan()]

    @app.post("/sdapi/v1/refresh-vae", tags=["sdapi"])
    def refresh_vae() -> None:
        vaes.scan()

    @app.get("/sdapi/v1/loras", tags=["sdapi"])
    async def loras() -> list:
        return []

    add_extras_routes(app, upscalers=UpscalerCatalogue(upscaler_dir, device), limits=limits, options=options,
                      run_job=run_job)

    # ------------------------------------------------------------ explain view, web page

    @app.get("/explain", tags=["ldmkit"])
    async def explain(prompt: str, seed: int = 42, negative_prompt: str = "", steps: int = 20,
                      sampler: str = "Euler", cfg_scale: float = 7.0, width: int | None = None,
                      height: int | None = None) -> Response:
        """What the model did for this prompt and seed (``ldmkit explain``): redirects to an HTML page."""
        try:
            build = importlib.import_module("ldmkit.explain").build_explain_page
        except (ImportError, AttributeError) as e:
            raise HTTPException(501, f"the explain view is not available in this installation ({e}); it needs "
                                     "the ldmkit.explain module with build_explain_page()") from None
        from ldmkit.cli import native_size

        native = native_size(worker.model.cfg)
        try:
            req = S.Txt2ImgRequest(prompt=prompt, negative_prompt=negative_prompt, seed=seed, steps=steps,
                                   sampler_name=sampler, cfg_scale=cfg_scale, width=width or native,
                                   height=height or native)
        except ValidationError as e:
            raise RequestValidationError(e.errors(include_url=False)) from None
        params = G.build_params(req, worker.model, options, limits)
        info = worker.checkpoint
        key = hashlib.sha256(f"{info.filename}\0{info.sha256}\0{params!r}".encode()).hexdigest()[:16]
        out_dir = explain_root() / key
        page = _explain_page(out_dir)
        if page is None:
            accepted = inspect.signature(build).parameters
            values = {"seed": params.seed, "out_dir": out_dir, "steps": params.steps, "sampler": params.sampler,
                      "cfg_scale": params.cfg_scale, "width": params.width, "height": params.height,
                      "negative_prompt": params.negative_prompt}

            def build_page(ctx: JobContext) -> Any:
                kwargs = {k: v for k, v in values.items() if k in accepted}
                if "callback" in accepted:
                    kwargs["callback"] = ctx.step_callback(0, 1, params.steps)
                return build(ctx.model, params.prompt, **kwargs)

            result = await run_job(build_page, "explain")
            page = _explain_page(out_dir, result)
            if page is None:
                raise HTTPException(500, f"build_explain_page wrote no HTML page in {out_dir}")
        return RedirectResponse(f"/explain/files/{key}/{page.relative_to(out_dir.resolve()).as_posix()}", 303)

    @app.get("/explain/files/{key}/{path:path}", include_in_schema=False)
    async def explain_files(key: str, path: str) -> FileResponse:
        root = (explain_root() / key).resolve()
        target = (root / path).resolve()
        if not key.isalnum() or not target.is_relative_to(root) or not target.is_file():
            raise HTTPException(404, "no such explain file")
        return FileResponse(target)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _builtin_preview_vae(model: StableDiffusion) -> str | None:
    """The tiny autoencoder shipped for a built-in model (emoji-taesd for emoji), if installed."""
    from ldmkit import api

    for name, fname in api.BUILTIN_MODELS.items():
        path = api.builtin_model_path(name)
        if path is not None and model.source_path and Path(model.source_path).resolve() == path.resolve():
            tiny = f"{Path(fname).stem}-taesd"
            return tiny if api.builtin_vae_path(tiny) is not None else None
    return None


def check_preview_options(req: dict[str, Any]) -> None:
    """A1111's live preview options, checked before they are stored (a 422 naming the valid values)."""
    from ldmkit.previews import PREVIEW_TYPES

    checks = {
        "live_previews_enable": (lambda v: isinstance(v, bool), "must be true or false"),
        "show_progress_every_n_steps": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= -1,
                                        "must be an integer: steps between previews (-1: none while sampling)"),
        "show_progress_type": (lambda v: v in PREVIEW_TYPES, f"must be one of: {', '.join(PREVIEW_TYPES)}"),
        "live_previews_image_format": (lambda v: v in PREVIEW_FORMATS, f"must be one of: {', '.join(PREVIEW_FORMATS)}"),
    }
    for key, (ok, msg) in checks.items():
        if key in req and not ok(req[key]):
            raise G.field_error((key,), f"{key} {msg}; got {req[key]!r}", req[key])


def _explain_page(out_dir: Path, result: Any = None) -> Path | None:
    """The HTML file build_explain_page made: the path it returned, index.html, or any .html."""
    if isinstance(result, str | os.PathLike) and Path(result).is_file() and str(result).endswith(".html"):
        p = Path(result).resolve()
        return p if p.is_relative_to(out_dir.resolve()) else None
    if not out_dir.is_dir():
        return None
    if (out_dir / "index.html").is_file():
        return (out_dir / "index.html").resolve()
    return next((p.resolve() for p in sorted(out_dir.rglob("*.html"))), None)


# ---------------------------------------------------------------- running under uvicorn


class BackgroundServer:
    """uvicorn in a thread on a free localhost port: ``with BackgroundServer(app) as url: ...``."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
