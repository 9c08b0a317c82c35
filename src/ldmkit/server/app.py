"""The HTTP server: A1111's ``/sdapi/v1`` API and a web page, over one queued worker.

``create_app(model)`` builds the FastAPI app; use it with ``fastapi.testclient.TestClient`` or
uvicorn (``ldmkit serve``, or :class:`BackgroundServer` for tests and notebooks).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hashlib
import importlib
import inspect
import ipaddress
import logging
import math
import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterable
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import Body, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError

from ldmkit import __version__
from ldmkit import pipeline as P
from ldmkit.checkpoint import CheckpointError
from ldmkit.model import StableDiffusion
from ldmkit.samplers import _ALIASES, SAMPLER_DISPLAY_NAMES, SCHEDULE_DISPLAY_NAMES, sampler_names, sampler_spec
from ldmkit.server import controlnet_api as CN
from ldmkit.server import explain_cache, model_info
from ldmkit.server import generation as G
from ldmkit.server import options as OPT
from ldmkit.server import schemas as S
from ldmkit.server.checkpoints import Catalogue, CheckpointInfo
from ldmkit.server.docs_offline import add_offline_docs
from ldmkit.server.extras import UpscalerCatalogue, add_extras_routes
from ldmkit.server.generation import Limits
from ldmkit.server.networks_routes import NetworkFolders, add_network_routes
from ldmkit.server.routes_misc import add_misc_routes, scripts_to_overrides
from ldmkit.server.styles import StyleDatabase
from ldmkit.server.vaes import VAECatalogue, check_name
from ldmkit.server.worker import ClientGone, JobContext, QueueFullError, Worker, await_job

log = logging.getLogger("ldmkit.server")
STATIC = Path(str(resources.files("ldmkit.server") / "static"))
MAX_PNG_TEXT = 4 << 20  # /png-info: text chunks of an image, all together (a prompt is a few KB)


# ---------------------------------------------------------------- the app


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_ANY_ADDRESS = ("0.0.0.0", "::", "")


def allowed_host_names(host: str, extra: Iterable[str] = ()) -> frozenset[str] | None:
    """The Host header names a server bound to ``host`` answers to (None: any, when ``extra`` has ``*``).

    A page on another site can make a browser send requests to a local server under the site's own name
    (DNS rebinding); refusing Host names the user never chose stops that. Loopback names always work;
    a server bound to every interface also answers to this machine's names and to bare IP addresses
    (those cannot be rebound: a page's origin is then the address itself)."""
    names = {n.strip().lower().strip("[]").rstrip(".") for n in (*LOOPBACK_NAMES, host, *extra)}
    if "*" in names:
        return None
    if host.strip("[]") in _ANY_ADDRESS:
        names |= {socket.gethostname().lower(), socket.getfqdn().lower(), "*ip"}
    return frozenset(names - {""})


def _host_name(header: bytes) -> str:
    """The name in a Host header: without its port, IPv6 brackets, case or trailing dot."""
    host = header.decode("latin-1").strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostGuard:
    """ASGI middleware: HTTP 400 for a Host header not in ``allowed_hosts`` (see :func:`allowed_host_names`)."""

    def __init__(self, app: Any, allowed_hosts: Iterable[str]):
        self.app, self.allowed_hosts = app, frozenset(allowed_hosts)

    def _host_ok(self, header: bytes | None) -> bool:
        name = _host_name(header or b"")
        return name in self.allowed_hosts or ("*ip" in self.allowed_hosts and _is_ip(name))

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        host = dict(scope["headers"]).get(b"host") if scope["type"] == "http" else None
        if scope["type"] == "http" and not self._host_ok(host):
            name = _host_name(host or b"")[:100] or "(none)"
            response = JSONResponse({"detail": f"Host {name!r} is not a name this server answers to (a guard "
                                               f"against DNS rebinding); to allow it, start the server with "
                                               f"--allowed-hosts {name}"}, 400)
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


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
               low_memory: bool = False, vae_tiling: bool = False, allowed_hosts: Iterable[str] | None = None,
               styles_file: str | os.PathLike | None = None, cmd_flags: dict[str, Any] | None = None,
               upscaler_dir: str | os.PathLike | None = None, lora_dir: str | os.PathLike | None = None,
               embeddings_dir: str | os.PathLike | None = None,
               controlnet_dir: str | os.PathLike | None = None) -> FastAPI:
    """The server for ``model`` (an object, a path, a built-in name, or None for the default model).

    ``preview_interval``: seconds between live previews (0: every step, None: never);
    ``output_dir``: where ``save_images`` requests write their PNGs;
    ``preview_vae``: a tiny autoencoder for the "TAESD" live preview (the default preview when given);
    ``vae_dir``: VAE files (KL or tiny) that the ``sd_vae`` option can switch to;
    ``upscaler_dir``: ESRGAN-family upscaler files for the extras routes (``/sdapi/v1/upscalers``);
    ``low_memory``, ``vae_tiling``: load every model as ``api.load`` does with them (fp16-stored weights
    computed in fp32, networks paged out when idle; tiled decoding);
    ``allowed_hosts``: the Host header names requests must carry (see :func:`allowed_host_names`; ``ldmkit
    serve`` passes those of the address it binds); None: no Host check, for callers that serve it otherwise;
    ``styles_file``: A1111's ``styles.csv`` (``/sdapi/v1/prompt-styles``, a request's ``styles``);
    ``cmd_flags``: how the server was started, for ``/sdapi/v1/cmd-flags``;
    ``lora_dir``/``embeddings_dir``: where ``<lora:NAME:W>`` and embedding words are looked up (every model);
    ``controlnet_dir``: the ControlNets of the A1111 extension's API (``/controlnet/*``, ``alwayson_scripts``).
    """
    from ldmkit import api
    from ldmkit import previews as PV

    limits = limits or Limits()
    auth = _parse_auth(api_auth)
    catalogue = Catalogue(models_dir)
    resident: dict[str, StableDiffusion] = {}  # models given as objects can't be reloaded from a file
    folders = NetworkFolders(lora_dir, embeddings_dir)
    controlnets = CN.ControlNetFolder(controlnet_dir)

    def load(info: CheckpointInfo) -> StableDiffusion:
        if info.filename in resident:
            return folders.attach(resident[info.filename])
        return folders.attach(api.load(info.filename, device=device, low_memory=low_memory,
                                       vae_tiling=vae_tiling).model)

    if isinstance(model, StableDiffusion):
        first = catalogue.add_model(model)
        resident[first.filename] = model
        loaded = folders.attach(model)
    else:
        first = catalogue.info_for_path(api.resolve_model_path(model))
        catalogue.add(first)
        loaded = load(first)
    vaes = VAECatalogue(vae_dir)
    preview_vae = preview_vae or _builtin_preview_vae(loaded)
    tiny_preview = PV.tiny_decoder(preview_vae, loaded) if preview_vae else None
    styles = StyleDatabase(styles_file)
    # A1111's options (ldmkit.server.options). Live previews default to Approx NN: the tiny decoder if there is
    # one, else Approx cheap; never Full, which at 512² on a CPU costs more than a sampling step
    options: dict[str, Any] = OPT.defaults()
    worker = Worker(loaded, first, queue_size=queue_size, preview_interval=preview_interval, options=options,
                    tiny_preview=tiny_preview)
    worker.loader = load
    flags = {"api": True, "nowebui": False, "ckpt": first.filename, "ckpt_dir": str(models_dir or "") or None,
             "vae_dir": str(vae_dir or "") or None, "styles_file": str(styles_file or "") or None,
             "api_auth": "(set)" if auth else None, "lowvram": low_memory, "medvram": False,
             "device": device, "queue_size": queue_size, "output_dir": str(output_dir or "") or None,
             "preview_vae": str(preview_vae or "") or None, "vae_tiling": vae_tiling,
             "max_side": limits.max_side, "max_pixels": limits.max_pixels, "max_steps": limits.max_steps,
             "allowed_hosts": sorted(allowed_hosts) if allowed_hosts is not None else None, **(cmd_flags or {})}
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

    app = FastAPI(title="ldmkit", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Stable Diffusion from the model up: an AUTOMATIC1111-compatible API (/sdapi/v1) "
                              "and a web page at /.")
    app.state.worker, app.state.catalogue, app.state.limits, app.state.options = worker, catalogue, limits, options
    app.add_middleware(_Guard, auth=auth, max_body=limits.max_body_bytes)
    if allowed_hosts is not None:  # added last: it runs first
        app.add_middleware(HostGuard, allowed_hosts=allowed_hosts)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Any, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes the input as it came, which JSON cannot always hold (NaN, a lone
        # surrogate) and which may be megabytes: echo a safe, short copy
        return JSONResponse({"detail": json_safe(exc.errors())}, 422)

    @app.exception_handler(Exception)
    async def _internal(request: Any, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": json_safe(f"internal error: {type(exc).__name__}: {exc}")}, 500)

    @app.exception_handler(QueueFullError)
    async def _queue_full(request: Any, exc: QueueFullError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 503, headers={"Retry-After": "5"})

    @app.exception_handler(P.GenerationError)
    @app.exception_handler(CheckpointError)
    async def _bad_settings(request: Any, exc: ValueError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 400)

    async def run_job(fn: Any, kind: str, task_id: str | None = None, request: Request | None = None) -> Any:
        future = worker.submit(fn, kind, task_id)
        try:  # with the request: a job whose client hung up while it was queued is dropped (hardening 10)
            return await await_job(future, request.is_disconnected if request is not None else None)
        except ClientGone as e:
            raise HTTPException(499, str(e)) from None  # nginx's "client closed request"; nobody reads it
        except asyncio.CancelledError:
            future.cancel()  # the client went away: drop the job if it has not started
            raise
        except (P.GenerationError, CheckpointError, QueueFullError, HTTPException, RequestValidationError):
            raise
        except Exception as e:
            log.exception("%s failed", kind)
            raise HTTPException(500, f"{kind} failed: {type(e).__name__}: {e}") from e

    def checkpoint_override(req: S.GenerationRequest) -> CheckpointInfo | None:
        name = (req.override_settings or {}).get("sd_model_checkpoint")
        if name is None:
            return None
        return find_model(str(name), ("override_settings", "sd_model_checkpoint"))

    def find_model(name: str, loc: tuple) -> CheckpointInfo:
        info = catalogue.find(name)
        if info is None:
            titles = ", ".join(i.title for i in catalogue.scan())
            raise G.field_error(loc, f"no model {name!r}; available: {titles}", name)
        return info

    def refiner_choice(req: S.GenerationRequest) -> CheckpointInfo | None:
        """refiner_checkpoint, named as sd_model_checkpoint is; None, "" or "None": no refiner (A1111)."""
        name = req.refiner_checkpoint
        if name is None or name.strip() in ("", "None", "none"):
            return None
        return find_model(name.strip(), ("refiner_checkpoint",))

    refiners: dict[str, StableDiffusion] = {}  # the last refiner used: at most one kept loaded

    def load_refiner(info: CheckpointInfo) -> StableDiffusion:  # in the worker, one job at a time
        if info.filename not in refiners:
            refiners.clear()  # the old one freed before the new one loads
            refiners[info.filename] = load(info)
        return refiners[info.filename]

    def prepare(req: S.GenerationRequest, kind: str) -> G.Generation:
        can_save = output_dir is not None and bool(options["samples_save"])
        gen = G.prepare(req, kind, worker.model, options, limits, checkpoint_override(req), can_save,
                        upscalers=upscalers, refiner=refiner_choice(req))
        units = CN.units_from_request(req, worker.model, controlnets, limits, gen.params.width, gen.params.height,
                                      gen.init, log=lambda m: log.info("ControlNet: %s", m))  # alwayson_scripts
        return dataclasses.replace(gen, params=gen.params.replace(controlnets=units)) if units else gen

    def as_run(req: S.GenerationRequest) -> S.GenerationRequest:
        """The request as it is generated: scripts as settings, styles applied, eta from the options."""
        req = scripts_to_overrides(req)
        OPT.check_overrides(req.override_settings or {})
        update: dict[str, Any] = {}
        if req.styles:
            try:
                update["prompt"], update["negative_prompt"] = styles.apply(req.styles, req.prompt,
                                                                           req.negative_prompt)
            except KeyError as e:
                raise G.field_error(("styles",), e.args[0], req.styles) from None
            except ValueError as e:
                raise HTTPException(500, str(e)) from None
        if req.eta is None:
            update["eta"] = default_eta(req.sampler_name or req.sampler_index,
                                        {**options, **(req.override_settings or {})})
        return req.model_copy(update=update) if update else req

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

    async def generate(req: S.GenerationRequest, kind: str, request: Request | None = None) -> dict:
        gen = await run_in_threadpool(lambda: prepare(as_run(req), kind))
        vae_name = await run_in_threadpool(vae_choice, req)

        def vae_for(model: StableDiffusion) -> Any:
            return None if vae_name is None else vaes.decoder(check_name(vaes, vae_name), model)

        def job(ctx: JobContext) -> Any:
            return G.run_generation(ctx, gen, load, output_dir, vae_for, load_refiner)

        images, model = await run_job(job, gen.kind, req.force_task_id, request)
        return await run_in_threadpool(G.response_body, req, gen, images, model, vae_name)

    # ------------------------------------------------------------ A1111 API

    @app.post("/sdapi/v1/txt2img", response_model=S.ImageResponse, tags=["sdapi"])
    async def txt2img(req: S.Txt2ImgRequest, request: Request) -> dict:
        """Text to image; queued behind other requests."""
        return await generate(req, "txt2img", request)

    @app.post("/sdapi/v1/img2img", response_model=S.ImageResponse, tags=["sdapi"])
    async def img2img(req: S.Img2ImgRequest, request: Request) -> dict:
        """Image to image; with `mask`, inpainting (white is repainted)."""
        return await generate(req, "img2img", request)

    @app.get("/sdapi/v1/progress", response_model=S.ProgressResponse, tags=["sdapi"])
    async def progress(skip_current_image: bool = False) -> dict:
        """The running request: progress 0..1, step, and a preview of the current image."""
        return worker.progress(skip_current_image)

    @app.post("/sdapi/v1/interrupt", tags=["sdapi"])
    async def interrupt() -> dict:
        """Stop the running request; it returns the images it has so far."""
        worker.interrupt()
        return {}  # as A1111 answers

    @app.get("/sdapi/v1/samplers", response_model=list[S.SamplerItem], tags=["sdapi"])
    async def samplers() -> list[dict]:
        aliases: dict[str, list[str]] = {k: [k] for k in sampler_names()}
        for alias, short in _ALIASES.items():
            aliases[short].append(alias)
        return [{"name": SAMPLER_DISPLAY_NAMES[k], "aliases": aliases[k], "options": {}} for k in sampler_names()]

    @app.get("/sdapi/v1/schedulers", response_model=list[S.SchedulerItem], tags=["sdapi"])
    async def schedulers() -> list[dict]:
        items = [{"name": "automatic", "label": "Automatic"}]
        items += [{"name": k, "label": v, "default_rho": {"karras": 7.0, "polyexponential": 1.0}.get(k),
                   "need_inner_model": False} for k, v in SCHEDULE_DISPLAY_NAMES.items()]
        return items

    @app.get("/sdapi/v1/sd-models", response_model=list[S.SDModelItem], tags=["sdapi"])
    def sd_models() -> list[dict]:
        return [info.as_item() for info in catalogue.scan()]

    @app.post("/sdapi/v1/refresh-checkpoints", tags=["sdapi"])
    def refresh_checkpoints() -> None:
        catalogue.scan()

    def read_only() -> dict[str, Any]:
        return OPT.read_only_values(None if output_dir is None else str(output_dir), worker.checkpoint.sha256)

    @app.get("/sdapi/v1/options", tags=["sdapi"])
    async def get_options() -> dict:
        """A1111's options that ldmkit has (ldmkit.server.options lists what each does here)."""
        return {**options, "sd_model_checkpoint": worker.checkpoint.title, **read_only()}

    @app.post("/sdapi/v1/options", tags=["sdapi"])
    async def set_options(req: dict[str, Any] = Body(...)) -> None:  # noqa: B008 - FastAPI's idiom
        """Set options; `sd_model_checkpoint` (a title from /sdapi/v1/sd-models) switches the model.

        Every value is checked before any is stored; an unknown key is refused."""
        checked = OPT.check_update(req, read_only())
        clip_loc = ("CLIP_stop_at_last_layers",)
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
                same = info.filename == ctx.worker.checkpoint.filename
                new = ctx.model if same else load(info)
                # the clip skip in force after this request must fit the new model's text encoder
                OPT.check_clip_skip(req.get("CLIP_stop_at_last_layers", options["CLIP_stop_at_last_layers"]),
                                    new, clip_loc)
                if not same:
                    ctx.set_model(new, info)

            await run_job(switch, "load model")
        elif "CLIP_stop_at_last_layers" in req:
            OPT.check_clip_skip(req["CLIP_stop_at_last_layers"], worker.model, clip_loc)
        options.update(checked)
        options.update({k: req[k] for k in ("CLIP_stop_at_last_layers", "sd_vae") if k in req})

    @app.post("/sdapi/v1/png-info", response_model=S.PNGInfoResponse, tags=["sdapi"])
    def png_info_route(req: S.PNGInfoRequest) -> dict:
        """The generation parameters a PNG carries."""
        img = G.decode_image(req.image, ("image",), limits)
        text = sum(len(v) for v in img.info.values() if isinstance(v, str | bytes))
        if text > MAX_PNG_TEXT:  # PIL lets each chunk inflate to 1 MB and all to 64 MB: far beyond parameters
            raise HTTPException(413, f"image: its text chunks hold {text / 1e6:.1f} MB; /png-info reads up to "
                                     f"{MAX_PNG_TEXT / 1e6:.0f} MB of metadata")
        return G.png_info(img)

    @app.get("/sdapi/v1/sd-vae", tags=["sdapi"])
    def sd_vae() -> list[dict]:
        """VAE files in --vae-dir; set the option `sd_vae` to a `model_name` to decode with it."""
        return [info.as_item() for info in vaes.scan()]

    @app.post("/sdapi/v1/refresh-vae", tags=["sdapi"])
    def refresh_vae() -> None:
        vaes.scan()

    add_network_routes(app, folders=folders, current_model=lambda: worker.model)
    CN.add_controlnet_routes(app, controlnets, limits)

    upscalers = UpscalerCatalogue(upscaler_dir, device)  # also hires fix's hr_upscaler names
    add_extras_routes(app, upscalers=upscalers, limits=limits, options=options, run_job=run_job)

    def can_unload() -> str | None:
        if worker.checkpoint.filename in resident:
            return "it was given to the server as an object, not a file it could be reloaded from"
        return None

    add_misc_routes(app, worker=worker, styles=styles, flags=flags, run_job=run_job, can_unload=can_unload)

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
        native = worker.model.cfg.native_size
        try:
            req = S.Txt2ImgRequest(prompt=prompt, negative_prompt=negative_prompt, seed=seed, steps=steps,
                                   sampler_name=sampler, cfg_scale=cfg_scale, width=width or native,
                                   height=height or native)
        except ValidationError as e:
            raise RequestValidationError(e.errors(include_url=False)) from None
        return await explain_page(req, build)

    @app.post("/explain", tags=["ldmkit"])
    async def explain_post(req: S.Txt2ImgRequest) -> Response:
        """The explain page for a txt2img request's settings, its ControlNet units (alwayson_scripts) included:
        the page then also shows each map and its residuals per block; redirects to the page."""
        build = importlib.import_module("ldmkit.explain").build_explain_page
        return await explain_page(req, build)

    async def explain_page(req: S.Txt2ImgRequest, build: Any) -> Response:
        params = G.build_params(req, worker.model, options, limits)
        units = await run_in_threadpool(CN.units_from_request, req, worker.model, controlnets, limits, params.width,
                                        params.height)
        info = worker.checkpoint
        key = hashlib.sha256(f"{info.filename}\0{info.sha256}\0{params!r}\0{CN.units_key(units)}".encode()
                             ).hexdigest()[:16]
        out_dir = explain_root() / key
        page = _explain_page(out_dir)
        if page is not None:
            explain_cache.touch(out_dir)  # recently used: pruned last
        if page is None:
            accepted = inspect.signature(build).parameters
            values = {"seed": params.seed, "out_dir": out_dir, "steps": params.steps, "sampler": params.sampler,
                      "cfg_scale": params.cfg_scale, "width": params.width, "height": params.height,
                      "negative_prompt": params.negative_prompt}
            if units:
                values["controlnets"] = units

            def build_page(ctx: JobContext) -> Any:
                kwargs = {k: v for k, v in values.items() if k in accepted}
                if "callback" in accepted:
                    kwargs["callback"] = ctx.step_callback(0, 1, params.steps)
                return build(ctx.model, params.prompt, **kwargs)

            result = await run_job(build_page, "explain")
            page = _explain_page(out_dir, result)
            if page is None:
                raise HTTPException(500, f"build_explain_page wrote no HTML page in {out_dir}")
            if not explain_dir:  # the temporary folder keeps the most recently used pages only (hardening 10)
                explain_cache.prune(explain_root(), keep=out_dir)
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
    model_info.register(app, worker, catalogue)  # GET /ldmkit/model: native size, refiners (the web page)
    add_offline_docs(app)  # /docs from the installed swagger-ui-bundle, not a CDN
    return app


def _builtin_preview_vae(model: StableDiffusion) -> str | None:
    """The tiny autoencoder shipped for a built-in model (emoji-taesd for emoji), if installed."""
    from ldmkit import api

    for name, tiny in api.BUILTIN_PREVIEW_VAES.items():
        path = api.builtin_model_path(name)
        if path is not None and model.source_path and Path(model.source_path).resolve() == path.resolve():
            return tiny if api.builtin_vae_path(tiny) is not None else None
    return None


def default_eta(sampler: str, options: dict[str, Any]) -> float | None:
    """A1111's eta when a request gives none: eta_ddim for DDIM, eta_ancestral for the other samplers that
    take an eta (ancestral and SDE); None (the sampler's own) for the rest and for unknown names."""
    try:
        spec = sampler_spec(sampler)
    except ValueError:
        return None  # build_params names the bad sampler
    if spec.name == "ddim":
        return float(options["eta_ddim"])
    if spec.name != "tcd" and spec.takes_eta:  # TCD's eta is its gamma
        return float(options["eta_ancestral"])
    return None


def json_safe(value: Any, depth: int = 0) -> Any:
    """``value`` made JSON-safe and short for an error body: non-finite floats and lone surrogates as text,
    long strings and containers cut."""
    if isinstance(value, bool | int) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if depth > 6:
        return "..."
    if isinstance(value, dict):
        items = list(value.items())
        out = {str(json_safe(str(k), depth + 1)): json_safe(v, depth + 1) for k, v in items[:50]}
        if len(items) > 50:
            out["..."] = f"{len(items) - 50} more"
        return out
    if isinstance(value, list | tuple):
        return [json_safe(v, depth + 1) for v in value[:50]] + ([f"... {len(value) - 50} more"]
                                                                  if len(value) > 50 else [])
    text = value if isinstance(value, str) else str(value)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= 500 else f"{text[:500]}... ({len(text)} characters)"


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
    """uvicorn in a thread on a free localhost port: ``with BackgroundServer(app) as url: ...``.

    Requests must name the bound address (or localhost) as their Host, as under ``ldmkit serve``."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        guarded = HostGuard(app, allowed_host_names(host) or ())
        self.server = uvicorn.Server(uvicorn.Config(guarded, log_level="warning", timeout_graceful_shutdown=2))
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
