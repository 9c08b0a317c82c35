"""The A1111 ControlNet extension's API (Mikubill/sd-webui-controlnet ``scripts/api.py``,
``internal_controlnet/args.py``): units in ``alwayson_scripts: {"controlnet": {"args": [unit, ...]}}`` of
txt2img and img2img, and ``/controlnet/version``, ``/model_list``, ``/module_list``, ``/detect``,
``/settings``.

Models are the ControlNet files and diffusers ``ControlNetModel`` folders in the server's ``--controlnet-dir``,
and the T2I-Adapters there (TencentARC files, diffusers ``T2IAdapter`` folders), named as the extension names
them (``stem [hash]``, A1111's 8-digit short hash); a unit may give that title, or the stem alone. A unit whose
model is an adapter runs it (``ldmkit.t2i_adapter``), as ``--adapter`` does. A bad unit is a 422 naming its
field (``alwayson_scripts.controlnet.args.N.field``).
"""

from __future__ import annotations

import base64
import io
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ldmkit import controlnet_a1111 as A
from ldmkit import file_kind
from ldmkit.server.generation import Limits, decode_image, field_error

SCRIPT = "controlnet"
API_VERSION = 3  # external_code.get_api_version() of the extension's current release
MAX_UNITS = 8  # units per request (/controlnet/settings: control_net_unit_count)
_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")


class UnitArgs(BaseModel):
    """One unit, with the extension's field names and defaults (``low_vram``, ``hr_option``, ... accepted and
    ignored)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    enabled: bool = True  # the extension's older API default; clients such as webuiapi send it anyway
    module: str = "none"
    model: str = "None"
    weight: float = Field(1.0, ge=0.0, le=2.0)
    image: Any = None  # base64, {"image": b64, "mask": b64}, or [image, mask]
    mask: Any = None
    resize_mode: str | int = "Crop and Resize"
    low_vram: bool = False
    processor_res: int = -1
    threshold_a: float = -1
    threshold_b: float = -1
    guidance_start: float = Field(0.0, ge=0.0, le=1.0)
    guidance_end: float = Field(1.0, ge=0.0, le=1.0)
    control_mode: str | int = "Balanced"
    pixel_perfect: bool = False
    hr_option: str = "Both"  # with the hires fix: "Both", "Low res only", "High res only"
    union_control_type: str | int | list[str | int] = "Unknown"  # a ControlNet Union's map type ("Depth", ...;
    # Unknown: auto, no type); ldmkit's: one per map of ``images`` ("Depth+OpenPose" or a list)
    lllite_batch: str = "both"  # ldmkit's: a ControlNet-LLLite's CFG rows (both, cond-only, zeros-uncond)
    images: Any = None  # ldmkit's: a ControlNet Union unit's several maps (base64 strings), instead of image


MAX_MAPS = 8  # maps of one Union unit (the released Unions know 8 control types)
_PER_MAP = (("weight", 2.0), ("guidance_start", 1.0), ("guidance_end", 1.0))


def _per_map_values(raw: dict, loc: tuple) -> dict[str, tuple[float, ...]]:
    """ldmkit's per-map values of a Union unit: ``weight``, ``guidance_start``, ``guidance_end`` given as a list (or
    the infotext's "0.8+0.5"), one per map of ``images``. Each is checked here (422 naming the field and index) and
    replaced in ``raw`` by the unit's overall value (largest weight and end, smallest start), which UnitArgs checks."""
    import math

    out = {}
    for name, top in _PER_MAP:
        v = raw.get(name)
        if isinstance(v, str) and "+" in v.strip()[1:]:
            from ldmkit.controlnet import per_map_number

            try:
                v = per_map_number(v, name)
            except ValueError as e:
                raise field_error((*loc, name), str(e), v) from None
            if not isinstance(v, tuple):
                continue  # 1e+2: one number, left to UnitArgs
        if not isinstance(v, list | tuple):
            continue
        if not v:
            raise field_error((*loc, name), f"{name} is an empty list: give one number, or one per map of images",
                              v)
        for j, x in enumerate(v):
            if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x) or not 0 <= x <= top:
                raise field_error((*loc, name, j), f"{name}[{j}] {x!r}: give a number from 0 to {top:g}", x)
        out[name] = tuple(float(x) for x in v)
        raw[name] = min(v) if name == "guidance_start" else max(v)
    return out


class ControlNetFolder:
    """The ControlNets of a folder (files and diffusers folders, searched recursively), by the extension's
    titles; the last few loaded are kept (per model configuration and dtype)."""

    def __init__(self, folder: str | os.PathLike | None):
        self.folder = Path(folder) if folder else None
        if self.folder is not None and not self.folder.is_dir():
            raise ValueError(f"--controlnet-dir {folder}: not a folder")
        self._titles: dict[str, Path] = {}
        self._scanned: tuple | None = None
        self._broken: dict[Path, str] = {}  # found in the last scan but unreadable: the reason
        self._noted: dict[Path, str] = {}  # found and listed, with a broken config.json: the reason
        self.unreadable: dict[str, str] = {}  # {name in the folder: reason}, for /controlnet/model_list and 422s
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        self._kinds: dict[tuple, str | None] = {}
        self._lock = threading.Lock()

    def kind(self, path: Path) -> str | None:
        """"controlnet", "adapter" (a T2I-Adapter) or None, kept per file version: folders and .safetensors by
        their names (config.json, header); a .pth/.pt file is an adapter when its name says "adapter"
        (TencentARC's t2iadapter_*.pth) and ``t2i_adapter.describe_file`` reads it as one (reading the weights
        of every .pth would load each ControlNet .pth in the folder)."""
        from ldmkit import t2i_adapter

        config = path / "config.json"
        key = (str(path), path.stat().st_mtime_ns, config.stat().st_mtime_ns if config.is_file() else 0)
        if key in self._kinds:
            return self._kinds[key]
        if path.is_dir() or path.suffix.lower() == ".safetensors":
            found = file_kind.kind_of(path)
            if found is None and path.is_dir() and self._why(path, file_kind.config_problem):  # its weights say
                found = (file_kind.weights_kind(path) or (None, None))[1]  # what it is, as ldmkit reads them
            kind = {file_kind.ADAPTER: "adapter", file_kind.CONTROLNET: "controlnet",
                    file_kind.LLLITE: "controlnet"}.get(found)  # an LLLite: a ControlNet's unit
        elif "adapter" in path.name.lower():
            kind = "adapter" if t2i_adapter.describe_file(path) is not None else None
        else:
            kind = "controlnet" if file_kind.may_be(path, file_kind.CONTROLNET) else None
        self._kinds[key] = kind
        return kind

    def _candidates(self) -> list[Path]:
        self._broken, self._noted = {}, {}
        if self.folder is None:
            return []
        found = []
        for root, dirs, files in os.walk(self.folder):
            here = Path(root)
            if (here / "config.json").exists():
                reason = self._why(here, file_kind.config_problem)
                if self.kind(here):
                    found.append(here)
                    if reason is not None:  # listed: ldmkit reads the network from its weights
                        self._noted[here] = f"{reason}; the network is read from its weights"
                    dirs[:] = []
                    continue
                if reason is not None:  # a model folder whose config.json cannot be read: named, not its weights
                    self._broken[here] = f"{reason}, and its weights are not a ControlNet's or T2I-Adapter's " \
                                         "readable .safetensors"
                    dirs[:] = []
                    continue
            for f in files:
                if f.lower().endswith(_SUFFIXES) and self.kind(here / f):
                    found.append(here / f)
                elif f.lower().endswith(".safetensors") and self._why(here / f, _broken_safetensors):
                    self._broken[here / f] = "not a readable .safetensors file (its header cannot be read)"
        return sorted(found)

    def _why(self, path: Path, check: Any) -> str | None:
        """``check(path)``, kept per version of the path (a folder: of its config.json)."""
        try:
            key = (str(path), check.__name__, path.stat().st_mtime_ns,
                   (path / "config.json").stat().st_mtime_ns if path.is_dir() else 0)
        except OSError:
            return None
        if key not in self._kinds:
            self._kinds[key] = check(path)
        return self._kinds[key]

    def models(self) -> dict[str, Path]:
        """{"stem [hash]": path}, rescanned when the folder's listing changed."""
        with self._lock:
            paths = self._candidates()
            key = (tuple((str(p), p.stat().st_mtime_ns) for p in paths), tuple(sorted(self._broken.items())),
                   tuple(sorted(self._noted.items())))
            if key != self._scanned:
                self._titles = {A.model_title(p): p for p in paths}
                self.unreadable = {str(p.relative_to(self.folder)): why for p, why in self._broken.items()}
                for name, why in self.unreadable.items():
                    logging.getLogger("ldmkit.server").warning("ControlNet %s left out: %s", name, why)
                for p, why in self._noted.items():
                    logging.getLogger("ldmkit.server").warning("ControlNet %s: %s", A.model_title(p), why)
                self._scanned = key
            return dict(self._titles)

    def find(self, name: str) -> Path | None:
        models = self.models()
        if name in models:
            return models[name]
        stem = name.rsplit(" [", 1)[0].strip() if name.endswith("]") else name.strip()
        for title, path in models.items():
            if title.rsplit(" [", 1)[0] == stem:
                return path
        return None

    def load(self, path: Path, model: Any) -> Any:
        """The ControlNet (or T2I-Adapter) at ``path`` for ``model``."""
        from ldmkit.controlnet import load_controlnet
        from ldmkit.t2i_adapter import load_adapter

        dtype = getattr(model, "compute_dtype", None) or getattr(model, "dtype", None)
        from ldmkit.controlnet_files import header_kind

        header = file_kind.read_header(path)  # read once per request: Control-LoRA? LLLite?
        # a Control-LoRA is built over this model's U-Net weights: another checkpoint of the same shape needs its own
        own = id(model.unet) if header_kind(header) == "control-lora" else None
        key = (str(path), path.stat().st_mtime_ns, model.cfg.unet, str(dtype), str(model.device), own)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        kwargs = {"dtype": dtype} if dtype is not None else {}
        from ldmkit import controlnet_lllite

        if self.kind(path) == "adapter":
            net = load_adapter(path, model.cfg, device=model.device, **kwargs)
        elif controlnet_lllite.is_lllite_path(header):  # kohya's ControlNet-LLLite: modules for the model's U-Net
            net = controlnet_lllite.load_lllite(path, model, device=model.device, **kwargs)
        else:
            from ldmkit.controlnet import LazyStateDict

            net = load_controlnet(path, model.cfg.unet, device=model.device, base_weights=LazyStateDict(model.unet),
                                  **kwargs)  # a Control-LoRA is built over the model's U-Net
        with self._lock:
            self._cache[key] = net
            while len(self._cache) > 2:
                self._cache.popitem(last=False)
        return net


# ---------------------------------------------------------------- units of a request


def _broken_safetensors(path: Path) -> str | None:
    return "unreadable" if file_kind.read_header(path).keys is None else None


def script_args(req: Any) -> tuple[str, list] | None:
    """(the key as sent, its args) of the request's ControlNet always-on script, or None."""
    for name, value in (getattr(req, "alwayson_scripts", None) or {}).items():
        if name.strip().lower() == SCRIPT:
            args = value.get("args") if isinstance(value, dict) else None
            if not isinstance(args, list):
                raise field_error(("alwayson_scripts", name), 'ControlNet takes {"args": [unit, ...]} (a list of '
                                                             "units with the extension's fields)", None)
            return name, args
    return None


def _image_parts(value: Any, mask: Any) -> tuple[Any, Any]:
    if isinstance(value, dict):
        return value.get("image"), value.get("mask", mask)
    if isinstance(value, list | tuple) and len(value) == 2 and not isinstance(value[0], dict):
        return value[0], value[1]
    return value, mask


def units_from_request(req: Any, model: Any, folder: ControlNetFolder, limits: Limits, width: int, height: int,
                       init_image: Any = None, log: Any = None) -> tuple:
    """The enabled units of a request as :class:`~ldmkit.controlnet.ControlUnit`; 422 naming the bad field."""
    import dataclasses

    from ldmkit import t2i_adapter
    from ldmkit.checkpoint import CheckpointError
    from ldmkit.controlnet import make_unit

    found = script_args(req)
    if found is None:
        return ()
    key, args = found
    if len(args) > MAX_UNITS:
        raise field_error(("alwayson_scripts", key, "args"), f"{len(args)} ControlNet units: this server takes up "
                                                             f"to {MAX_UNITS}", None)
    units = []
    for i, raw in enumerate(args):
        loc = ("alwayson_scripts", key, "args", i)
        if not isinstance(raw, dict):
            raise field_error(loc, "a ControlNet unit is an object with the extension's fields (module, model, "
                                   "weight, image, ...)", None)
        raw = dict(raw)
        for old, new in (("input_image", "image"), ("guidance", "guidance_end"), ("lowvram", "low_vram"),
                         ("guessmode", "control_mode")):  # the extension's legacy names
            if old in raw and new not in raw:
                raw[new] = raw.pop(old)
        per_map = _per_map_values(raw, loc)  # ldmkit's: one value per map of a Union unit
        try:
            unit = UnitArgs(**raw)
        except ValidationError as e:
            err = e.errors()[0]  # the field and list indexes, without pydantic's union branch tags ("str")
            where = [p for i, p in enumerate(err["loc"]) if i == 0 or isinstance(p, int)]
            raise field_error((*loc, *where), err["msg"], None) from None
        if not unit.enabled:
            continue
        try:
            control_mode = A.control_mode_name(unit.control_mode)
        except ValueError as e:
            raise field_error((*loc, "control_mode"), str(e), unit.control_mode) from None
        try:
            resize_mode = A.resize_mode_name(unit.resize_mode)
        except ValueError as e:
            raise field_error((*loc, "resize_mode"), str(e), unit.resize_mode) from None
        try:  # the extension applies it only with the hires fix
            hr_option = A.hr_option_name(unit.hr_option) if getattr(req, "enable_hr", False) else "Both"
        except ValueError as e:
            raise field_error((*loc, "hr_option"), str(e), unit.hr_option) from None
        try:
            module = A.module_name(unit.module)
        except ValueError as e:
            raise field_error((*loc, "module"), f"{e} (/controlnet/module_list)", unit.module) from None
        if unit.guidance_start >= unit.guidance_end:
            raise field_error((*loc, "guidance_start"), f"guidance_start {unit.guidance_start:g} must be below "
                                                       f"guidance_end {unit.guidance_end:g}", unit.guidance_start)
        if unit.processor_res > max(limits.max_side, 2048):
            raise field_error((*loc, "processor_res"), f"processor_res {unit.processor_res} is beyond this "
                                                       f"server's limit of {max(limits.max_side, 2048)}", None)
        if unit.model in ("", "None", "none", None):
            raise field_error((*loc, "model"), "no ControlNet model given: name one of /controlnet/model_list",
                              unit.model)
        path = folder.find(unit.model)
        if path is None and unit.model.rsplit(" [", 1)[0].strip() in folder.unreadable:
            name = unit.model.rsplit(" [", 1)[0].strip()
            raise field_error((*loc, "model"), f"ControlNet {name} in --controlnet-dir cannot be read: "
                                               f"{folder.unreadable[name]}", unit.model)
        if path is None:
            titles = ", ".join(folder.models()) or "none (start the server with --controlnet-dir DIR)"
            raise field_error((*loc, "model"), f"no ControlNet {unit.model!r}; available: {titles}", unit.model)
        data, _mask = _image_parts(unit.image, unit.mask)  # the mask serves inpainting modules, which ldmkit lacks
        maps = _unit_maps(unit, data, per_map, loc, limits)  # ldmkit's images: a Union unit's several maps
        if maps is not None:
            image = maps if len(maps) > 1 else maps[0]
        elif data in (None, ""):
            if init_image is None:
                raise field_error((*loc, "image"), "this unit has no control image: give image (base64)", None)
            image = init_image  # img2img: the extension uses the init image
            resize_mode = A.resize_mode_name(int(getattr(req, "resize_mode", 0) or 0))
        elif isinstance(data, str):
            image = decode_image(data, (*loc, "image"), limits)
        else:
            raise field_error((*loc, "image"), 'image is a base64 string or {"image": base64, "mask": base64}', None)
        adapter = folder.kind(path) == "adapter"
        from ldmkit.controlnet_lllite import batch_mode

        try:
            lllite_batch = batch_mode(unit.lllite_batch)
        except ValueError as e:
            raise field_error((*loc, "lllite_batch"), str(e), unit.lllite_batch) from None
        if adapter and control_mode != A.BALANCED:
            raise field_error((*loc, "control_mode"), f"{A.model_title(path)} is a T2I-Adapter, which ldmkit runs "
                                                      "in the Balanced control mode only", unit.control_mode)
        if adapter and maps is not None and len(maps) > 1:
            raise field_error((*loc, "images"), f"{A.model_title(path)} is a T2I-Adapter, which reads one map: give "
                                                "image", None)
        if adapter and hr_option != "Both":
            raise field_error((*loc, "hr_option"), f"{A.model_title(path)} is a T2I-Adapter, which ldmkit runs in "
                                                   "both hires-fix passes only (hr_option Both)", unit.hr_option)
        try:
            net = folder.load(path, model)
            from ldmkit.controlnet_lllite import LLLite

            if lllite_batch != "both" and not isinstance(net, LLLite):  # an adapter ignored it, a ControlNet failed
                raise field_error((*loc, "lllite_batch"), f"lllite_batch {unit.lllite_batch} is for ControlNet-LLLite "
                                                          f"models, and {A.model_title(path)} is not one: leave it out "
                                                          "(or give both)", unit.lllite_batch)
            res = None if unit.processor_res < 1 else unit.processor_res
            if res is None and module not in A.RESOLUTION_FREE:
                res = 512  # the extension's default preprocessor resolution
            ta = None if unit.threshold_a < 0 else unit.threshold_a
            tb = None if unit.threshold_b < 0 else unit.threshold_b
            if adapter:  # the map made as for a ControlNet (module, pixel perfect, resize mode), then the adapter's
                hint, res = A.control_image(image, width, height, module, resize_mode, unit.pixel_perfect, res,
                                            ta, tb, log)
                made = t2i_adapter.make_unit(model, net, hint, width, height, unit.weight, unit.guidance_start,
                                             unit.guidance_end)
                sliders = [*A.slider_values(module, ta, tb).values(), -1, -1]
                made = dataclasses.replace(made, settings={
                    "module": module, "weight": float(unit.weight), "resize_mode": resize_mode,
                    "processor_res": res if res is not None else -1, "threshold_a": float(sliders[0]),
                    "threshold_b": float(sliders[1]), "guidance_start": float(unit.guidance_start),
                    "guidance_end": float(unit.guidance_end), "pixel_perfect": bool(unit.pixel_perfect),
                    "control_mode": control_mode})
            else:
                n_maps = len(maps) if maps is not None else 1
                ctype = _union_type(net, unit.union_control_type, (*loc, "union_control_type"), A.model_title(path),
                                    log, n_maps)
                if n_maps > 1 and ctype is None:
                    raise field_error((*loc, "images"), f"{A.model_title(path)} is not a ControlNet Union: it reads "
                                                        "one map, give image", None)
                if n_maps == 1:  # images with one map: its values
                    per_map = {k: v[0] for k, v in per_map.items()}
                made = make_unit(model, net, image, width, height, per_map.get("weight", unit.weight),
                                 per_map.get("guidance_start", unit.guidance_start),
                                 per_map.get("guidance_end", unit.guidance_end), module, log,
                                 control_mode=control_mode, resize_mode=resize_mode,
                                 pixel_perfect=unit.pixel_perfect, processor_res=res, threshold_a=ta,
                                 threshold_b=tb, hr_option=hr_option, control_type=ctype,
                                 lllite_batch=lllite_batch)
        except CheckpointError as e:  # ControlNetError, AdapterError: a file for another model, unreadable
            raise field_error((*loc, "model"), str(e), unit.model) from None
        except ValueError as e:
            raise field_error(loc, str(e), None) from None
        units.append(dataclasses.replace(made, settings={**(made.settings or {}), "model": A.model_title(path)}))
    return tuple(units)


def _union_type(net: Any, value: Any, loc: tuple, title: str, log: Any = None, n_maps: int = 1
                ) -> int | tuple[int, ...] | None:
    """A ControlNet Union unit's control type (the extension's union_control_type, or ldmkit's names), or one per map
    of ``n_maps`` (ldmkit's "Depth+OpenPose" or a list); None for other ControlNets, where the field is ignored as
    the extension does. "Unknown" (the extension's default) or none: auto, no control type, as the extension then
    runs the Union (``control_type=[]``)."""
    from ldmkit.controlnet_files import control_type
    from ldmkit.models.controlnet_union import AUTO, UnionConfig

    if not isinstance(getattr(net, "cfg", None), UnionConfig):
        return None
    names = list(value) if isinstance(value, list) else [value] if isinstance(value, int) else str(value).split("+")
    if n_maps == 1 and len(names) == 1 and str(names[0]).strip().lower() in ("", "unknown", "none", "auto"):
        if log is not None:
            log(f"{title}: no union_control_type, so no control type (auto), as the A1111 extension runs it")
        return AUTO
    if len(names) != n_maps:
        raise field_error(loc, f"union_control_type {value!r} names {len(names)} control type(s) for {n_maps} "
                               "map(s): give one per map of images (\"Depth+OpenPose\" or a list)", value)
    try:
        types = tuple(control_type(v, net.cfg.num_types) for v in names)
    except ValueError as e:
        raise field_error(loc, str(e), value) from None
    if AUTO in types and n_maps > 1:
        raise field_error(loc, f"union_control_type {value!r}: Unknown (auto, no type) reads one map alone; name "
                               "each map's type", value)
    return types[0] if n_maps == 1 else types


def _unit_maps(unit: UnitArgs, data: Any, per_map: dict, loc: tuple, limits: Limits) -> list | None:
    """ldmkit's ``images`` (a Union unit's maps, decoded), checked against image and the per-map values; None when
    the unit has no ``images``."""
    if unit.images is None:
        if per_map:
            name = next(iter(per_map))
            raise field_error((*loc, name), f"{name} as a list (one per map) needs the maps in images (ldmkit's "
                                            "field for a ControlNet Union unit's several maps): give one number",
                              per_map[name])
        return None
    if not isinstance(unit.images, list) or not unit.images or len(unit.images) > MAX_MAPS or \
            not all(isinstance(x, str) and x for x in unit.images):
        raise field_error((*loc, "images"), f"images is a list of 1 to {MAX_MAPS} base64 images, one per map of "
                                            "a ControlNet Union unit", None)
    if data not in (None, ""):
        raise field_error((*loc, "images"), "give image (one map) or images (a Union unit's maps), not both", None)
    for name, values in per_map.items():
        if len(values) != len(unit.images):
            raise field_error((*loc, name), f"{name} gives {len(values)} values for {len(unit.images)} maps in "
                                            "images: one per map, or one number for all", list(values))
    starts = per_map.get("guidance_start", (unit.guidance_start,) * len(unit.images))
    ends = per_map.get("guidance_end", (unit.guidance_end,) * len(unit.images))
    for j, (s, e) in enumerate(zip(starts, ends, strict=True)):
        if s >= e:
            raise field_error((*loc, "guidance_start", j), f"map {j}: guidance_start {s:g} must be below "
                                                           f"guidance_end {e:g}", s)
    return [decode_image(x, (*loc, "images", j), limits) for j, x in enumerate(unit.images)]


def units_key(units: tuple) -> str:
    """A digest of units' maps and settings (the server's explain-page cache key)."""
    import hashlib

    h = hashlib.sha256()
    for u in units:
        h.update(repr(sorted((u.settings or {}).items())).encode())
        h.update(u.image.float().cpu().numpy().tobytes())
    return h.hexdigest()[:16] if units else ""


# ---------------------------------------------------------------- routes


def _b64_png(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def module_detail(name: str) -> dict:
    """The extension's module_detail entry: model_free and its sliders (resolution, threshold_a/b)."""
    sliders = []
    if name not in A.RESOLUTION_FREE:
        sliders.append({"name": "Preprocessor Resolution", "value": 512, "min": 64, "max": 2048, "step": 8})
    for (arg, default), label in zip(A.SLIDERS.get(name, ()), ("threshold_a", "threshold_b"), strict=False):
        sliders.append({"name": arg, "value": default, "min": 0, "max": 255, "step": 1, "field": label})
    return {"model_free": False, "sliders": sliders}


class DetectRequest(BaseModel):
    """/controlnet/detect's body, the extension's field names."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    controlnet_module: str = "none"
    controlnet_input_images: list[str] = Field(default_factory=list)
    controlnet_images: list[str] = Field(default_factory=list, description="older name of controlnet_input_images")
    controlnet_processor_res: int = -1
    controlnet_threshold_a: float = -1
    controlnet_threshold_b: float = -1
    controlnet_masks: list[str] = Field(default_factory=list, description="ignored: no ldmkit module reads a mask")
    low_vram: bool = False


def add_controlnet_routes(app: FastAPI, folder: ControlNetFolder, limits: Limits) -> None:
    @app.get("/controlnet/version", tags=["controlnet"])
    async def version() -> dict:
        """The A1111 ControlNet extension's API version that these routes follow."""
        return {"version": API_VERSION}

    @app.get("/controlnet/model_list", tags=["controlnet"])
    def model_list(update: bool = True) -> dict:
        """ControlNets and T2I-Adapters in --controlnet-dir, as the extension names them: "stem [hash]"; ldmkit's
        "unreadable": {name: reason} for model files and folders there that cannot be read."""
        names = list(folder.models())
        return {"model_list": names, "unreadable": dict(folder.unreadable)} if folder.unreadable else \
            {"model_list": names}

    @app.get("/controlnet/module_list", tags=["controlnet"])
    async def module_list(alias_names: bool = False) -> dict:
        """Preprocessors (modules) a unit may name; alias_names: the extension's UI labels."""
        from ldmkit.preprocess import PREPROCESSORS

        names = list(PREPROCESSORS)
        shown = [A.MODULE_LABELS.get(n, n) if alias_names else n for n in names]
        return {"module_list": shown, "module_detail": {s: module_detail(n) for s, n in zip(shown, names,
                                                                                            strict=True)}}

    @app.get("/controlnet/settings", tags=["controlnet"])
    async def settings() -> dict:
        return {"control_net_unit_count": MAX_UNITS}

    @app.post("/controlnet/detect", tags=["controlnet"])
    def detect(body: DetectRequest) -> dict:
        """Run a preprocessor on base64 images: the maps, base64 PNGs (at the preprocessor's resolution)."""
        controlnet_module, controlnet_processor_res = body.controlnet_module, body.controlnet_processor_res
        controlnet_threshold_a, controlnet_threshold_b = body.controlnet_threshold_a, body.controlnet_threshold_b
        controlnet_input_images, controlnet_images = body.controlnet_input_images, body.controlnet_images
        try:
            module = A.module_name(controlnet_module)
        except ValueError as e:
            raise field_error(("controlnet_module",), f"{e} (/controlnet/module_list)", controlnet_module) from None
        images = controlnet_input_images or controlnet_images
        field = "controlnet_input_images" if controlnet_input_images else "controlnet_images"
        if not images:
            raise field_error(("controlnet_input_images",), "no image given: send base64 images in "
                                                            "controlnet_input_images", None)
        if len(images) > 16:
            raise field_error((field,), f"{len(images)} images: this server detects up to 16 at once", None)
        top = max(limits.max_side, 2048)
        if controlnet_processor_res > top:
            raise field_error(("controlnet_processor_res",), f"controlnet_processor_res {controlnet_processor_res}"
                                                             f" is beyond this server's limit of {top}", None)
        res = controlnet_processor_res if controlnet_processor_res > 0 else 512
        out = []
        for i, data in enumerate(images):
            img = decode_image(data, (field, i), limits)
            try:
                out.append(_b64_png(A.run_preprocessor(
                    module, img, res, None if controlnet_threshold_a < 0 else controlnet_threshold_a,
                    None if controlnet_threshold_b < 0 else controlnet_threshold_b)))
            except ValueError as e:  # a slider out of range, a map too large at this resolution: a 422, not a 500
                raise field_error((field, i), str(e), None) from None
        return {"images": out, "info": "Success"}


__all__ = ["ControlNetFolder", "UnitArgs", "add_controlnet_routes", "script_args", "units_from_request"]
