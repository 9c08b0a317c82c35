"""A1111's upscaler routes: ``/sdapi/v1/upscalers``, ``/sdapi/v1/extra-single-image`` and
``/sdapi/v1/extra-batch-images`` ("Extras" tab: upscale by a factor or to a size, optionally blending a second
upscaler), over the upscaler files of ``--upscaler-dir`` and the built-in None / Lanczos / Nearest.

The folder is untrusted: a request names an upscaler only by a name the scan listed, and a file that fails to
load is left out of the list with a warning naming it.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, HTTPException
from fastapi.concurrency import run_in_threadpool
from PIL import Image, PngImagePlugin
from pydantic import BaseModel, Field

from ldmkit.checkpoint import CheckpointError
from ldmkit.server import schemas as S
from ldmkit.server.generation import Limits, decode_image, field_error
from ldmkit.upscale import (
    A1111_REALESRGAN_NAMES,
    BUILTIN_UPSCALERS,
    DEFAULT_OVERLAP,
    DEFAULT_TILE,
    UPSCALER_SUFFIXES,
    Upscaler,
    builtin_upscaler,
    load_upscaler,
    read_upscaler_file,
    target_size,
    upscale,
)

log = logging.getLogger("ldmkit.server")


# ---------------------------------------------------------------- the folder


@dataclass(frozen=True)
class UpscalerInfo:
    name: str  # file stem (A1111's name for an ESRGAN file); relative path without suffix in subfolders
    path: str | None
    scale: float
    description: str

    def as_item(self) -> dict:
        """A1111's ``UpscalerItem``."""
        model_name = None if self.path is None else self.description.split(" ", 1)[0]
        return {"name": self.name, "model_name": model_name, "model_path": self.path, "model_url": None,
                "scale": self.scale}


class UpscalerCatalogue:
    """Upscaler files under ``upscaler_dir`` (architecture read once per file version) and the built-ins;
    one loaded network kept at a time."""

    def __init__(self, upscaler_dir: str | os.PathLike | None = None, device: str | None = None):
        self.upscaler_dir = Path(upscaler_dir) if upscaler_dir else None
        if self.upscaler_dir is not None and not self.upscaler_dir.is_dir():
            raise FileNotFoundError(f"--upscaler-dir {self.upscaler_dir}: no such folder")
        self.device = device
        self._probed: dict[tuple[str, int], UpscalerInfo | None] = {}
        self._loaded: dict[tuple[str, int], Upscaler] = {}
        self._lock = threading.Lock()

    def _probe(self, path: Path, name: str) -> UpscalerInfo | None:
        from ldmkit.models.esrgan import UpscalerFormatError, detect

        try:
            key = (str(path), path.stat().st_mtime_ns)
        except OSError:  # gone since the folder was listed
            return None
        if key not in self._probed:
            try:
                arch, _ = detect(read_upscaler_file(path))
                self._probed[key] = UpscalerInfo(name, str(path), float(arch.scale), arch.describe())
            except (CheckpointError, UpscalerFormatError, OSError) as e:
                log.warning("upscaler %s left out: %s", path, e)
                self._probed[key] = None
        return self._probed[key]

    def scan(self) -> list[UpscalerInfo]:
        found = [UpscalerInfo(b, None, 4.0, f"{b} (built-in)") for b in BUILTIN_UPSCALERS]
        if self.upscaler_dir is None:
            return found
        root = self.upscaler_dir.resolve()
        taken = {b.lower() for b in BUILTIN_UPSCALERS}
        with self._lock:
            for p in sorted(root.rglob("*")):
                if not (p.is_file() and p.suffix.lower() in UPSCALER_SUFFIXES and p.resolve().is_relative_to(root)):
                    continue
                rel = p.relative_to(root)
                name = rel.with_suffix("").as_posix()
                if name.lower() in taken:  # same stem twice (x.pth, x.safetensors): keep both, distinguishable
                    name = rel.as_posix()
                info = self._probe(p, name)
                if info is not None:
                    taken.add(name.lower())
                    found.append(info)
            for alias, stem in A1111_REALESRGAN_NAMES.items():  # "R-ESRGAN 4x+" for RealESRGAN_x4plus.pth
                file = next((i for i in found if i.path and i.name == stem), None)
                if file is not None and alias.lower() not in taken:
                    found.append(dataclasses.replace(file, name=alias))
        return found

    def names(self) -> list[str]:
        return [i.name for i in self.scan()]

    def find(self, name: str) -> UpscalerInfo | None:
        return next((i for i in self.scan() if i.name == name), None)

    def get(self, info: UpscalerInfo) -> Upscaler:
        """The loaded upscaler (cached while its file is unchanged)."""
        if info.path is None:
            up = builtin_upscaler(info.name)
            assert up is not None
            return up
        try:
            key = (info.path, Path(info.path).stat().st_mtime_ns)
        except OSError as e:
            raise CheckpointError(f"upscaler {info.name}: {info.path} cannot be read ({e.strerror})") from None
        with self._lock:
            if key not in self._loaded:
                self._loaded.clear()  # one network at a time is enough; don't hoard memory
                self._loaded[key] = load_upscaler(info.path, self.device, name=info.name)
            # one network under its file name and its A1111 alias: the name the request used
            return dataclasses.replace(self._loaded[key], name=info.name)

    def resolve(self, name: object, loc: tuple) -> UpscalerInfo | None:
        """The upscaler a request names (None for "None" / no upscaler); a 422 listing the valid names."""
        if name is None or name == "None":
            return None
        info = self.find(name) if isinstance(name, str) else None
        if info is None:
            where = "" if self.upscaler_dir else " (start the server with --upscaler-dir DIR for upscaler files)"
            raise field_error(loc, f"no upscaler {name!r}{where}; valid: {', '.join(self.names())}", name)
        return info


# ---------------------------------------------------------------- A1111's request and response bodies


class ExtrasBaseRequest(S._Request):
    resize_mode: Literal[0, 1] = Field(0, description="0: scale by upscaling_resize; 1: to upscaling_resize_w x h")
    show_extras_results: bool = Field(True, description="accepted for A1111 compatibility; images always return")
    gfpgan_visibility: float = Field(0, ge=0, le=1, description="face restoration: ldmkit has none; must be 0")
    codeformer_visibility: float = Field(0, ge=0, le=1, description="face restoration: ldmkit has none; must be 0")
    codeformer_weight: float = Field(0, ge=0, le=1, description=S.IGNORED)
    upscaling_resize: float = Field(2, ge=1, le=8, description="by how much to upscale (resize_mode 0)")
    upscaling_resize_w: int = Field(512, ge=1, description="target width (resize_mode 1)")
    upscaling_resize_h: int = Field(512, ge=1, description="target height (resize_mode 1)")
    upscaling_crop: bool = Field(True, description="resize_mode 1: crop the result to exactly w x h")
    upscaler_1: str = Field("None", description="main upscaler: a name from /sdapi/v1/upscalers")
    upscaler_2: str = Field("None", description="secondary upscaler, blended over the first")
    extras_upscaler_2_visibility: float = Field(0, ge=0, le=1, description="weight of upscaler_2's result")
    upscale_first: bool = Field(False, description=S.IGNORED)


class ExtrasSingleImageRequest(ExtrasBaseRequest):
    image: str = Field("", description="base64 image")


class FileData(BaseModel):
    data: str = Field(description="base64 image")
    name: str = Field(description="file name")


class ExtrasBatchImagesRequest(ExtrasBaseRequest):
    imageList: list[FileData] = Field(description="images to work on")  # noqa: N815 - A1111's field name


class ExtrasSingleImageResponse(BaseModel):
    html_info: str
    image: str


class ExtrasBatchImagesResponse(BaseModel):
    html_info: str
    images: list[str]


class UpscalerItem(BaseModel):
    name: str
    model_name: str | None
    model_path: str | None
    model_url: str | None
    scale: float | None


# ---------------------------------------------------------------- the work


@dataclass(frozen=True)
class ExtrasJob:
    upscaler_1: UpscalerInfo | None
    upscaler_2: UpscalerInfo | None
    visibility_2: float
    resize_mode: int
    scale: float
    width: int
    height: int
    crop: bool
    tile: int
    overlap: int


def _one(image: Image.Image, job: ExtrasJob, catalogue: UpscalerCatalogue) -> tuple[Image.Image, dict[str, Any]]:
    """A1111's ``ScriptPostprocessingUpscale.process`` on one image: the result and its info fields."""
    info: dict[str, Any] = {}
    if job.upscaler_1 is None:
        return image, info

    def run(up_info: UpscalerInfo) -> Image.Image:
        if job.resize_mode == 1:
            scale = max(job.width / image.width, job.height / image.height)
            info["Postprocess upscale to"] = f"{job.width}x{job.height}"
        else:
            scale = job.scale
            info["Postprocess upscale by"] = f"{scale:g}"
        out = upscale(image, catalogue.get(up_info), scale, tile=job.tile, overlap=job.overlap, multiple_of=8)
        if job.resize_mode == 1 and job.crop:
            cropped = Image.new(out.mode if out.mode in ("RGB", "RGBA") else "RGB", (job.width, job.height))
            cropped.paste(out, (job.width // 2 - out.width // 2, job.height // 2 - out.height // 2))
            out = cropped
            info["Postprocess crop to"] = f"{out.width}x{out.height}"
        return out

    result = run(job.upscaler_1)
    info["Postprocess upscaler"] = job.upscaler_1.name
    if job.upscaler_2 is not None and job.visibility_2 > 0:
        second = run(job.upscaler_2)
        if second.mode != result.mode:
            second = second.convert(result.mode)
        result = Image.blend(result, second, job.visibility_2)
        info["Postprocess upscaler 2"] = job.upscaler_2.name
    return result, info


def _infotext(info: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in info.items())


def _encode(image: Image.Image, infotext: str) -> str:
    """PNG keeping the input's generation ``parameters`` and adding A1111's ``postprocessing`` chunk."""
    meta = PngImagePlugin.PngInfo()
    if isinstance(image.info.get("parameters"), str):
        meta.add_text("parameters", image.info["parameters"])
    if infotext:
        meta.add_text("postprocessing", infotext)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=meta)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def hires_from_request(req: Any, model: Any, limits: Limits, upscalers: UpscalerCatalogue | None
                       ) -> tuple[Any, Callable[[], Upscaler | None] | None]:
    """A txt2img request's hires fix (A1111's enable_hr, hr_scale, hr_upscaler, hr_second_pass_steps,
    denoising_strength, hr_resize_x/y), checked: (HiresParams, a loader of its image upscaler) or (None, None).
    Bad values and targets beyond the limits are 422s naming the field."""
    from ldmkit.hires import LATENT_UPSCALE_MODES, HiresParams

    if not getattr(req, "enable_hr", False):
        return None, None
    hires = HiresParams(scale=req.hr_scale, upscaler=req.hr_upscaler or "Latent", steps=req.hr_second_pass_steps,
                        denoise=0.7 if req.denoising_strength is None else req.denoising_strength,
                        resize_x=req.hr_resize_x, resize_y=req.hr_resize_y)
    resize = hires.resize_x or hires.resize_y
    if not resize and not 1.0 <= hires.scale <= 8.0:
        raise field_error(("hr_scale",), f"hr_scale must be from 1 to 8, got {hires.scale:g}", hires.scale)
    if not 0.0 < hires.denoise <= 1.0:
        raise field_error(("denoising_strength",), "denoising_strength must be in (0, 1] for hires fix",
                          hires.denoise)
    if hires.steps < 0 or hires.steps > limits.max_steps:
        raise field_error(("hr_second_pass_steps",), f"hr_second_pass_steps must be from 0 (as many as steps) to "
                                                     f"{limits.max_steps}", hires.steps)
    for field in ("hr_resize_x", "hr_resize_y"):
        if getattr(req, field) < 0:
            raise field_error((field,), f"{field} must be >= 0 (0: from hr_scale)", getattr(req, field))
    to_x, to_y, tx, ty = hires.target(req.width, req.height)
    w, h = to_x - tx, to_y - ty
    if max(w, h) > limits.max_side or w * h * req.batch_size > limits.max_pixels or min(w, h) < 8:
        loc = ("hr_resize_x",) if resize else ("hr_scale",)
        raise field_error(loc, f"the hires target {w}x{h} (x{req.batch_size} images) is beyond this server's limits: "
                               f"sides from 8 to {limits.max_side}, {limits.max_pixels} pixels per request", w)
    if hires.upscaler in LATENT_UPSCALE_MODES:
        return hires, None
    if hires.upscaler == "None":  # A1111's resize_image: a plain Lanczos resize
        return hires, lambda: builtin_upscaler("None")
    info = upscalers.find(hires.upscaler) if upscalers is not None else None
    if info is None:
        names = [*LATENT_UPSCALE_MODES, *(upscalers.names() if upscalers else BUILTIN_UPSCALERS)]
        raise field_error(("hr_upscaler",), f"no upscaler {hires.upscaler!r}; valid: {', '.join(names)}",
                          hires.upscaler)
    return hires, lambda: upscalers.get(info)


def _int_option(options: dict[str, Any], key: str, default: int) -> int:
    """A1111's tile options (``ESRGAN_tile``: 0 is untiled); a value that is no count falls back to ldmkit's."""
    value = options.get(key, default)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default


def add_extras_routes(app: FastAPI, *, upscalers: UpscalerCatalogue, limits: Limits, options: dict[str, Any],
                      run_job: Callable[..., Awaitable[Any]]) -> None:
    """The upscaler routes; the work runs on the server's worker, queued like generations."""

    def prepare(req: ExtrasBaseRequest, images: list[tuple[str, tuple]]) -> tuple[ExtrasJob, list[Image.Image]]:
        for field in ("gfpgan_visibility", "codeformer_visibility"):
            if getattr(req, field) > 0:
                raise field_error((field,), "face restoration (GFPGAN, CodeFormer) is not available in ldmkit; "
                                            "set it to 0", getattr(req, field))
        job = ExtrasJob(upscalers.resolve(req.upscaler_1, ("upscaler_1",)),
                        upscalers.resolve(req.upscaler_2, ("upscaler_2",)), req.extras_upscaler_2_visibility,
                        req.resize_mode, req.upscaling_resize, req.upscaling_resize_w, req.upscaling_resize_h,
                        req.upscaling_crop, _int_option(options, "ESRGAN_tile", DEFAULT_TILE),
                        _int_option(options, "ESRGAN_tile_overlap", DEFAULT_OVERLAP))
        decoded = [decode_image(data, loc, limits) for data, loc in images]
        most = max(limits.max_pixels, limits.max_input_pixels)
        for img, (_, loc) in zip(decoded, images, strict=True):
            if job.upscaler_1 is None:
                continue
            if job.resize_mode == 1:
                w, h = job.width, job.height
                if not job.crop:
                    w, h = target_size(img.size, max(w / img.width, h / img.height), 8)
            else:
                w, h = target_size(img.size, job.scale, 8)
            if w * h > most:
                raise HTTPException(413, f"{'.'.join(map(str, loc))}: the result would be {w}x{h} = "
                                         f"{w * h / 1e6:.1f} MP; this server makes images up to {most / 1e6:.1f} MP")
        return job, decoded

    async def run(req: ExtrasBaseRequest, images: list[tuple[str, tuple]]) -> tuple[list[str], str]:
        job, decoded = await run_in_threadpool(prepare, req, images)

        def work(ctx: Any) -> tuple[list[str], str]:
            encoded, infos = [], []
            for img in decoded:
                out, info = _one(img, job, upscalers)
                if "parameters" in img.info:
                    out.info["parameters"] = img.info["parameters"]
                infos.append(_infotext(info))
                encoded.append(_encode(out, infos[-1]))
            return encoded, infos[-1] if infos else ""

        encoded, infotext = await run_job(work, "extras")
        return encoded, f"<p>{html.escape(infotext)}</p>"

    @app.get("/sdapi/v1/upscalers", response_model=list[UpscalerItem], tags=["sdapi"])
    def list_upscalers() -> list[dict]:
        """None, Lanczos, Nearest and the upscaler files of --upscaler-dir (name = file stem), with their scale."""
        return [i.as_item() for i in upscalers.scan()]

    @app.post("/sdapi/v1/extra-single-image", response_model=ExtrasSingleImageResponse, tags=["sdapi"])
    async def extra_single_image(req: ExtrasSingleImageRequest) -> dict:
        """Upscale one image (A1111's Extras tab)."""
        encoded, info = await run(req, [(req.image, ("image",))])
        return {"image": encoded[0], "html_info": info}

    @app.post("/sdapi/v1/extra-batch-images", response_model=ExtrasBatchImagesResponse, tags=["sdapi"])
    async def extra_batch_images(req: ExtrasBatchImagesRequest) -> dict:
        """Upscale several images with the same settings."""
        encoded, info = await run(req, [(f.data, ("imageList", i, "data")) for i, f in enumerate(req.imageList)])
        return {"images": encoded, "html_info": info}
