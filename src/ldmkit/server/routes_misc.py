"""A1111's informational and housekeeping routes: flags, styles, memory, skip, unload/reload, scripts, and the
lists of things ldmkit does not have (hypernetworks, face restorers, ...), which answer ``[]`` as A1111 does
when it has none, so clients that list them before a request keep working.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import Field

from ldmkit.server import schemas as S
from ldmkit.server.generation import DEEPCACHE_OPTIONS, field_error
from ldmkit.server.styles import StyleDatabase
from ldmkit.server.worker import JobContext, Worker

# The scripts ldmkit has, as A1111's /sdapi/v1/script-info describes them. DeepCache is always on (its interval
# 1 means off); a request turns it on with alwayson_scripts {"DeepCache": {"args": [interval, branch]}}.
DEEPCACHE_SCRIPT = "deepcache"
_DEEPCACHE_ARGS = [
    {"label": "Interval (the full U-Net every N-th call; 1 = off)", "value": DEEPCACHE_OPTIONS["deepcache_interval"],
     "minimum": 1, "maximum": None, "step": 1, "choices": None},
    {"label": "Branch (skip levels the calls between recompute)", "value": DEEPCACHE_OPTIONS["deepcache_branch"],
     "minimum": 0, "maximum": None, "step": 1, "choices": None},
]
INTERROGATE_MODELS = ("clip", "deepdanbooru")


def script_info() -> list[dict]:
    return [{"name": DEEPCACHE_SCRIPT, "is_alwayson": True, "is_img2img": is_img2img, "args": _DEEPCACHE_ARGS}
            for is_img2img in (False, True)]


def scripts_to_overrides(req: S.GenerationRequest) -> S.GenerationRequest:
    """The request with the scripts it names turned into the settings that do their work.

    A script ldmkit does not have is refused (422 naming it), as A1111 refuses an unknown script_name: a
    request that asks for a script must never come back as if it had run."""
    if req.script_name:
        raise field_error(("script_name",), f"no script {req.script_name!r}: ldmkit has no selectable scripts "
                                            "(/sdapi/v1/scripts lists what it has)", req.script_name)
    overrides = dict(req.override_settings or {})
    for name, value in req.alwayson_scripts.items():
        if name.strip().lower() == "controlnet":  # its units: ldmkit.server.controlnet_api
            continue
        if name.strip().lower() != DEEPCACHE_SCRIPT:
            raise field_error(("alwayson_scripts", name), f"no always-on script {name!r} in ldmkit; it has: "
                                                          f"{DEEPCACHE_SCRIPT}, controlnet (see /sdapi/v1/script-info)",
                              None)
        args = value.get("args", []) if isinstance(value, dict) else None
        if not isinstance(args, list) or len(args) > len(_DEEPCACHE_ARGS):
            raise field_error(("alwayson_scripts", name, "args"), f"{name} takes args [interval, branch], "
                                                                  f"got {value!r}", None)
        for key, arg in zip(DEEPCACHE_OPTIONS, args, strict=False):
            overrides[key] = arg
    if not req.alwayson_scripts:
        return req
    return req.model_copy(update={"override_settings": overrides})


class InterrogateRequest(S._Request):
    image: str = Field(description="base64 image")
    model: str = Field("clip", description="clip or deepdanbooru")


def memory() -> dict:
    """A1111's /sdapi/v1/memory: this process's RAM and, with CUDA, the GPU's."""
    import psutil
    import torch

    vm = psutil.virtual_memory()
    rss = psutil.Process(os.getpid()).memory_info().rss
    ram = {"free": vm.available, "used": rss, "total": vm.total}
    if not torch.cuda.is_available():
        return {"ram": ram, "cuda": {"error": "unavailable"}}
    free, total = torch.cuda.mem_get_info()
    s = torch.cuda.memory_stats()

    def pair(key: str) -> dict:
        return {"current": s.get(f"{key}.all.current", 0), "peak": s.get(f"{key}.all.peak", 0)}

    cuda = {"system": {"free": free, "used": total - free, "total": total}, "active": pair("active_bytes"),
            "allocated": pair("allocated_bytes"), "reserved": pair("reserved_bytes"),
            "inactive": pair("inactive_split_bytes"),
            "events": {"retries": s.get("num_alloc_retries", 0), "oom": s.get("num_ooms", 0)}}
    return {"ram": ram, "cuda": cuda}


def add_misc_routes(app: FastAPI, *, worker: Worker, styles: StyleDatabase, flags: dict[str, Any],
                    run_job: Callable[..., Awaitable[Any]], can_unload: Callable[[], str | None]) -> None:
    """``can_unload()``: None when the current model can be unloaded and reloaded, else why not."""

    @app.get("/sdapi/v1/cmd-flags", tags=["sdapi"])
    async def cmd_flags() -> dict:
        """How this server was started (A1111's flag names where it has one)."""
        return flags

    for path, what in (("hypernetworks", "hypernetworks"), ("face-restorers", "face restoration models"),
                       ("realesrgan-models", "bundled RealESRGAN models (upscaler files: /sdapi/v1/upscalers)"),
                       ("extensions", "A1111 extensions")):
        app.add_api_route(f"/sdapi/v1/{path}", _empty_list, methods=["GET"], tags=["sdapi"],
                          description=f"[]: ldmkit has no {what}", response_model=list[dict])

    @app.get("/sdapi/v1/latent-upscale-modes", tags=["sdapi"])
    async def latent_upscale_modes() -> list[dict]:
        """The latent upscalers of the hires fix (txt2img's hr_upscaler)."""
        from ldmkit.hires import LATENT_UPSCALE_MODES

        return [{"name": name} for name in LATENT_UPSCALE_MODES]

    @app.get("/sdapi/v1/prompt-styles", tags=["sdapi"])
    def prompt_styles() -> list[dict]:
        """The styles of --styles-file (A1111's styles.csv); a request's `styles` applies them by name."""
        try:
            return [s.as_item() for s in styles.styles().values()]
        except ValueError as e:
            raise HTTPException(500, str(e)) from None

    @app.get("/sdapi/v1/memory", tags=["sdapi"])
    def memory_route() -> dict:
        return memory()

    @app.post("/sdapi/v1/skip", tags=["sdapi"])
    async def skip() -> dict:
        """End the running batch of the running request (its image so far is kept); its next batch runs."""
        worker.skip()
        return {}

    @app.post("/sdapi/v1/unload-checkpoint", tags=["sdapi"])
    async def unload_checkpoint() -> dict:
        """Free the model's weights; the next request (or /reload-checkpoint) loads them again."""
        why = can_unload()
        if why:
            raise HTTPException(409, f"cannot unload the model: {why}")

        def unload(ctx: JobContext) -> None:
            if not ctx.worker.unloaded:
                ctx.worker.model.to("meta")  # keeps the modules (requests are still checked), frees the tensors
                ctx.worker.unloaded = True

        await run_job(unload, "unload checkpoint")
        return {}

    @app.post("/sdapi/v1/reload-checkpoint", tags=["sdapi"])
    async def reload_checkpoint() -> dict:
        """Load the weights /unload-checkpoint freed (nothing to do when they are loaded)."""
        await run_job(lambda ctx: None, "reload checkpoint")  # the worker reloads before any model job
        return {}

    @app.get("/sdapi/v1/scripts", tags=["sdapi"])
    async def scripts() -> dict:
        return {"txt2img": [DEEPCACHE_SCRIPT], "img2img": [DEEPCACHE_SCRIPT]}

    @app.get("/sdapi/v1/script-info", tags=["sdapi"])
    async def script_info_route() -> list[dict]:
        return script_info()

    @app.post("/sdapi/v1/interrogate", tags=["sdapi"])
    async def interrogate(req: InterrogateRequest) -> dict:
        """Image captioning: ldmkit has no captioning models, so this answers 501 saying what is missing."""
        if req.model not in INTERROGATE_MODELS:
            raise field_error(("model",), f"model must be one of {', '.join(INTERROGATE_MODELS)}; got "
                                          f"{req.model!r}", req.model)
        need = ("a BLIP caption model and a CLIP ViT-L/14 image encoder" if req.model == "clip"
                else "the DeepDanbooru tagger")
        raise HTTPException(501, f"interrogate with {req.model!r} needs {need}, and ldmkit has no image "
                                 "captioning models; write the prompt yourself, or use /sdapi/v1/png-info "
                                 "for images that carry their parameters")


async def _empty_list() -> list:
    return []
