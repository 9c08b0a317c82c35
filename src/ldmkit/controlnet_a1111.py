"""The A1111 ControlNet extension's (Mikubill/sd-webui-controlnet) unit settings, as it defines them.

* Control modes (``scripts/enums.py`` ControlMode, applied in ``scripts/hook.py``):
  "Balanced" scales every residual by the weight; "My prompt is more important" ("soft injection") scales
  the k-th of K skip residuals by weight x 0.825^(K - k) (SD1/SD2: K = 12, so 0.825^12 ~ 0.099 for the first
  skip .. 0.825 for the last) and the middle by the weight; "ControlNet is more important" is the soft
  injection plus "CFG injection": the residuals are multiplied by the conditional-row mark, so the
  unconditional half of a CFG batch gets none.
* Resize modes (``Script.detectmap_proc``): "Just Resize" stretches the map to the output size; "Crop and
  Resize" scales it by max(h/H, w/W) and crops the centre; "Resize and Fill" scales it by min(h/H, w/W) and
  centres it on the median colour of its border. Ints 0, 1, 2 (3, A1111's latent "Just Resize", is 0).
  Interpolation as the extension's ``high_quality_resize`` picks it (OpenCV, as it): nearest for maps of 3..199
  colours, area when shrinking, bicubic when growing; two-colour (black/white) maps are thresholded again at
  Otsu's level, and one-pixel edge maps are first thinned back to one pixel (its ``nake_nms`` and
  ``lvmin_thin``: hit-or-miss thinning, spurs pruned when growing).
* Hires fix (``ControlParams.disabled_by_hr_option``, hook.py): hr_option "Low res only" / "High res only"
  turns a unit off in the second / first pass; in the second pass canny and mlsd units get the soft
  injection scales whatever their control mode.
* Pixel perfect (``external_code.pixel_perfect_resolution``): the preprocessor resolution is
  round(k x min(H, W)) of the input image, k = min(h/H, w/W) for "Resize and Fill", else max.
* Preprocessor resolution (``resize_image_with_pad``): the input is scaled so its short side is the
  resolution (bicubic when growing, area when shrinking) and edge-padded to multiples of 64 before the
  preprocessor runs; the map is cropped back.
* Infotext (``scripts/infotext.py``): ``ControlNet N: "Module: canny, Model: name [hash], Weight: 1.0, ..."``;
  model names are ``stem [hash]`` with A1111's old 8-digit file hash (``sd_models.model_hash``).
  ControlNet Union units add ``Union Control Type: Hard Edge``: the unit's ``union_control_type`` field named as
  the extension names fields (``field_to_displaytext``) and valued as its ``ControlNetUnionControlType`` enum.
  The extension's own code (2024-07) leaves that field out of its infotext; its ``ControlNetUnit.parse`` reads such
  a line (and ignores the field on paste). Several maps in one unit (not in the extension) join types with "+".
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

BALANCED, PROMPT, CONTROL = "Balanced", "My prompt is more important", "ControlNet is more important"
CONTROL_MODES = (BALANCED, PROMPT, CONTROL)
JUST_RESIZE, CROP_AND_RESIZE, RESIZE_AND_FILL = "Just Resize", "Crop and Resize", "Resize and Fill"
RESIZE_MODES = (JUST_RESIZE, CROP_AND_RESIZE, RESIZE_AND_FILL)
SOFT_BASE = 0.825  # the extension's soft-injection base
# the extension's ControlNetUnionControlType values, by control type number (the union model's order)
UNION_CONTROL_TYPES = ("OpenPose", "Depth", "Soft Edge", "Hard Edge", "Normal Map", "Segmentation", "Tile", "Inpaint")
HR_OPTIONS = ("Both", "Low res only", "High res only")  # the extension's HiResFixOption

_CONTROL_ALIASES = {"balanced": BALANCED, "prompt": PROMPT, "controlnet": CONTROL, "control": CONTROL}
_RESIZE_ALIASES = {  # the extension's resize_mode_aliases, and short names for the command line
    "inner fit (scale to fit)": CROP_AND_RESIZE, "outer fit (shrink to fit)": RESIZE_AND_FILL,
    "scale to fit (inner fit)": CROP_AND_RESIZE, "envelope (outer fit)": RESIZE_AND_FILL,
    "just resize (latent upscale)": JUST_RESIZE, "just-resize": JUST_RESIZE, "resize": JUST_RESIZE,
    "crop-and-resize": CROP_AND_RESIZE, "crop": CROP_AND_RESIZE, "resize-and-fill": RESIZE_AND_FILL,
    "fill": RESIZE_AND_FILL,
}
# preprocessors that do not look at a resolution (the extension's "none" and "invert" do not resize)
RESOLUTION_FREE = frozenset({"none", "invert"})
# the extension's slider defaults (threshold_a, threshold_b) per module, and the ldmkit argument each sets
SLIDERS: dict[str, tuple[tuple[str, float], ...]] = {
    "canny": (("low", 100.0), ("high", 200.0)),
    "threshold": (("level", 127.0),),
    "binary": (("level", 0.0),),  # 0: Otsu's level
    "blur": (("radius", 9.0),),  # blur_gaussian's sigma
    "tile_resample": (("rate", 1.0),),  # the extension's "Down Sampling Rate" (threshold_a was ignored)
    "scribble_xdog": (("level", 32.0),),  # its "XDoG Threshold"
}
MAX_SLIDER = 10000.0  # a preprocessor slider's largest value (the extension's sliders stop at 255, sigma at 64)
MAX_MAP_PIXELS = 4096 * 4096  # an intermediate control map's largest size (the server's largest upload)
# the extension's module names (and UI labels) for ldmkit's preprocessors
MODULE_ALIASES = {"blur_gaussian": "blur", "tile_resample": "blur", "invert (from white bg & black line)": "invert",
                  "canny": "canny", "threshold": "threshold", "binary": "binary", "none": "none"}
MODULE_LABELS = {"none": "none", "invert": "invert (from white bg & black line)", "blur": "blur_gaussian"}


def _choice(value: object, by_int: Sequence[str], aliases: Mapping[str, str]) -> str | None:
    """The name ``value`` gives: an int indexing ``by_int`` (also as text), a name in any case, an alias."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool):
        return by_int[value] if 0 <= value < len(by_int) else None
    if isinstance(value, str):
        key = value.strip().lower()
        return next((n for n in by_int if n.lower() == key), None) or aliases.get(key)
    return None


def control_mode_name(value: object) -> str:
    """The extension's control mode name for a name, an alias (balanced, prompt, controlnet) or 0/1/2."""
    name = _choice(value, CONTROL_MODES, _CONTROL_ALIASES)
    if name is None:
        raise ValueError(f"unknown control mode {value!r}: use 0 {BALANCED!r}, 1 {PROMPT!r} or 2 {CONTROL!r} "
                         "(or balanced, prompt, controlnet)")
    return name


def resize_mode_name(value: object) -> str:
    """The extension's resize mode name for a name, one of its aliases or 0/1/2 (3: its latent Just Resize)."""
    name = _choice(value, (*RESIZE_MODES, JUST_RESIZE), _RESIZE_ALIASES)
    if name is None:
        raise ValueError(f"unknown resize mode {value!r}: use 0 {JUST_RESIZE!r}, 1 {CROP_AND_RESIZE!r} or 2 "
                         f"{RESIZE_AND_FILL!r}")
    return name


def hr_option_name(value: object) -> str:
    """The extension's hires-fix option for a name (or both / low / high)."""
    name = _choice(value, HR_OPTIONS, {n.split()[0].lower(): n for n in HR_OPTIONS}) if isinstance(value, str) else None
    if name is None:
        raise ValueError(f"unknown hires-fix option {value!r}: use 'Both', 'Low res only' or 'High res only' "
                         "(or both, low, high)")
    return name


def forced_soft(settings: Mapping[str, object] | None) -> bool:
    """The extension forces soft injection in the hires fix's second pass for canny and mlsd modules."""
    module = str((settings or {}).get("module", ""))
    return "canny" in module or "mlsd" in module


def module_name(value: str) -> str:
    """ldmkit's preprocessor for a module name (the extension's, e.g. blur_gaussian, or ldmkit's own)."""
    from ldmkit.preprocess import PREPROCESSORS, check_name

    key = value.strip()
    name = key if key in PREPROCESSORS else MODULE_ALIASES.get(key.lower(), key)
    check_name(name)
    return name


# ---------------------------------------------------------------- residual scales


def soft_scales(n_down: int) -> list[float]:
    """Soft injection: weight factors for the n_down skip residuals and the middle (last): 0.825^(n_down - k)."""
    return [SOFT_BASE ** float(n_down - k) for k in range(n_down + 1)]


# ---------------------------------------------------------------- sizes: pixel perfect, resize modes


def pixel_perfect_resolution(size: tuple[int, int], width: int, height: int, resize_mode: str) -> int:
    """The preprocessor resolution for an input image of ``size`` (W, H) and an output of width x height."""
    raw_w, raw_h = size
    k0, k1 = height / raw_h, width / raw_w
    k = min(k0, k1) if resize_mode == RESIZE_AND_FILL else max(k0, k1)
    return int(np.round(k * min(raw_h, raw_w)))


# hit-or-miss kernels of the extension's edge thinning (lvmin_thin: 1 = set, -1 = clear, 0 = either), each also
# turned by 90, 180 and 270 degrees; removal runs kernel by kernel in that order
_THIN = (((-1, -1, -1), (0, 1, 0), (1, 1, 1)), ((0, -1, -1), (1, 1, -1), (0, 1, 0)))
_PRUNE = (((-1, -1, -1), (-1, 1, -1), (0, 0, -1)), ((-1, -1, -1), (-1, 1, -1), (-1, 0, 0)))


def _turned(raw: tuple) -> list[np.ndarray]:
    return [np.rot90(np.array(k, dtype=np.int32), r) for r in range(4) for k in raw]


def _remove_hits(y: np.ndarray, kernels: list[np.ndarray]) -> bool:
    import cv2

    changed = False
    for k in kernels:
        hits = cv2.morphologyEx(y, cv2.MORPH_HITMISS, k) > 127
        if hits.any():
            y[hits] = 0
            changed = True
    return changed


def thin_edges(y: np.ndarray, prune: bool) -> np.ndarray:
    """A binary (H, W) uint8 edge map thinned to one pixel (up to 32 rounds), then spurs pruned once."""
    y = y.copy()
    for _ in range(32):
        if not _remove_hits(y, _turned(_THIN)):
            break
    if prune:
        _remove_hits(y, _turned(_PRUNE))
    return y


def edge_nms(x: np.ndarray) -> np.ndarray:
    """Keep a pixel where it is the largest along one of the four line directions through it (3 pixels)."""
    import cv2

    lines = (((0, 0, 0), (1, 1, 1), (0, 0, 0)), ((0, 1, 0), (0, 1, 0), (0, 1, 0)),
             ((1, 0, 0), (0, 1, 0), (0, 0, 1)), ((0, 0, 1), (0, 1, 0), (1, 0, 0)))
    y = np.zeros_like(x)
    for f in lines:
        keep = cv2.dilate(x, np.array(f, dtype=np.uint8)) == x
        y[keep] = x[keep]
    return y


def colour_count(a: np.ndarray) -> int:
    """The number of distinct colours of an (H, W, 3) uint8 map, as ``len(np.unique(pixels, axis=0))`` but
    marked in a 2^24 bitmap: 1 s instead of 80 for a 16 MP photo (the extension's count, run on every map)."""
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        return len(np.unique(a.reshape(-1, a.shape[-1]), axis=0))
    seen = np.zeros(1 << 24, dtype=bool)
    step = max(1, (1 << 22) // max(1, a.shape[1]))  # rows per block: temporaries of ~4 MP, whatever the map's size
    for r in range(0, a.shape[0], step):
        b = a[r:r + step]
        seen[(b[..., 0].astype(np.uint32) << 16) | (b[..., 1].astype(np.uint32) << 8) | b[..., 2]] = True
    return int(np.count_nonzero(seen))


def high_quality_resize(a: np.ndarray, width: int, height: int) -> np.ndarray:
    """An (H, W, 3) uint8 map resized as the extension's ``high_quality_resize`` does (see the module doc)."""
    import cv2

    if a.shape[:2] == (height, width):
        return a
    smaller = width * height < a.shape[0] * a.shape[1]
    bigger = width * height > a.shape[0] * a.shape[1]
    colours = colour_count(a)
    binary = colours == 2 and a.min() < 16 and a.max() > 240
    one_pixel_edge = False
    if binary:  # edges one pixel wide vanish under an opening: most of the white goes
        box = np.ones((3, 3), dtype=np.uint8)
        opened = cv2.dilate(cv2.erode(a, box, iterations=1), box, iterations=1)
        one_pixel_edge = int((opened < a).sum()) * 2 > int((a > 127).sum())
    if 2 < colours < 200:
        interpolation = cv2.INTER_NEAREST
    else:
        interpolation = cv2.INTER_AREA if smaller else cv2.INTER_CUBIC
    y = cv2.resize(np.ascontiguousarray(a), (width, height), interpolation=interpolation)
    if binary:
        grey = np.mean(y.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
        if one_pixel_edge:
            grey = edge_nms(grey)
            _, grey = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
            grey = thin_edges(grey, prune=bigger)
        else:
            _, grey = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        y = np.stack([grey] * 3, axis=2)
    return y


def fit_map(a: np.ndarray, width: int, height: int, resize_mode: str) -> np.ndarray:
    """The extension's ``detectmap_proc``: an (H, W, 3) uint8 map brought to height x width by ``resize_mode``."""
    if resize_mode == JUST_RESIZE:
        return high_quality_resize(a, width, height)
    old_h, old_w = float(a.shape[0]), float(a.shape[1])
    k0, k1 = height / old_h, width / old_w
    if resize_mode == RESIZE_AND_FILL:
        k = min(k0, k1)
        borders = np.concatenate([a[0, :, :], a[-1, :, :], a[:, 0, :], a[:, -1, :]], axis=0)
        background = np.tile(np.median(borders, axis=0).astype(a.dtype)[None, None], [height, width, 1])
        m = high_quality_resize(a, int(np.round(old_w * k)), int(np.round(old_h * k)))
        new_h, new_w = m.shape[:2]
        pad_h, pad_w = max(0, (height - new_h) // 2), max(0, (width - new_w) // 2)
        background[pad_h:pad_h + new_h, pad_w:pad_w + new_w] = m
        return background
    k = max(k0, k1)  # Crop and Resize
    check_work_size(int(np.round(old_w * k)), int(np.round(old_h * k)),
                    f"the {int(old_w)}x{int(old_h)} map scaled to cover {width}x{height} (crop and resize)")
    m = high_quality_resize(a, int(np.round(old_w * k)), int(np.round(old_h * k)))
    new_h, new_w = m.shape[:2]
    pad_h, pad_w = max(0, (new_h - height) // 2), max(0, (new_w - width) // 2)
    return m[pad_h:pad_h + height, pad_w:pad_w + width]


# ---------------------------------------------------------------- preprocessing at a resolution


def slider_values(module: str, threshold_a: float | None = None, threshold_b: float | None = None) -> dict:
    """The preprocessor's keyword arguments for the extension's threshold_a/b (None or negative: its default)."""
    out = {}
    for (arg, default), v, field in zip(SLIDERS.get(module, ()), (threshold_a, threshold_b), "ab", strict=False):
        if v is not None and not (abs(float(v)) <= MAX_SLIDER):  # NaN too: it overflowed blur's radius (a 500)
            raise ValueError(f"threshold_{field} (--control-threshold-{field}) {v} is not a {module} {arg}: give a "
                             f"number from 0 to {MAX_SLIDER:g}, or -1 for the default {default:g}")
        out[arg] = default if v is None or v < 0 else float(v)
    if module in ("threshold", "binary"):
        out["level"] = int(out["level"])
    return out


def run_preprocessor(module: str, image: Image.Image, processor_res: int | None = None,
                     threshold_a: float | None = None, threshold_b: float | None = None) -> Image.Image:
    """The map ``module`` makes from ``image``: the input first scaled so its short side is ``processor_res``
    (None or < 1: as it is), the extension's sliders applied (defaults where not given)."""
    from ldmkit.preprocess import PREPROCESSORS, as_rgb, binary, preprocess

    name = module_name(module)
    rgb = as_rgb(image)  # 16-bit by range, transparency over white, as the extension's HWC3
    kwargs = slider_values(name, threshold_a, threshold_b)  # checked before any work
    crop = None
    if processor_res is not None and processor_res > 0 and name not in RESOLUTION_FREE:
        rgb, crop = _scaled_padded(rgb, processor_res)
    if not kwargs:
        out = preprocess(name, rgb)
    elif name == "binary":
        out = binary(rgb) if kwargs["level"] <= 0 else PREPROCESSORS["threshold"](rgb, kwargs["level"])
    else:
        out = PREPROCESSORS[name](rgb, **kwargs)
    return out if crop is None else out.crop((0, 0, *crop))


def check_work_size(w: int, h: int, what: str) -> None:
    """A ValueError when an intermediate map of w x h would pass :data:`MAX_MAP_PIXELS`: a long thin control
    image (1 x 300) scaled so its short side is the preprocessor resolution, or to cover the output, grows
    without bound (the extension allocates it; a tiny upload asked for gigabytes and minutes of CPU)."""
    if w * h > MAX_MAP_PIXELS:
        raise ValueError(f"{what} would be {w}x{h} ({w * h / 1e6:.0f} MP), beyond {MAX_MAP_PIXELS / 1e6:.1f} MP: "
                         "use a lower preprocessor resolution, another resize mode, or crop the control image "
                         "closer to the output's shape")


def _scaled_padded(rgb: Image.Image, resolution: int) -> tuple[Image.Image, tuple[int, int]]:
    """The extension's ``resize_image_with_pad``: short side to ``resolution`` (cubic growing, area shrinking),
    then edge-padded to multiples of 64; returns it and the (W, H) to crop the map back to."""
    import cv2

    a = np.asarray(rgb)
    k = resolution / min(a.shape[:2])
    h, w = int(np.round(a.shape[0] * k)), int(np.round(a.shape[1] * k))
    check_work_size(w, h, f"the control image {a.shape[1]}x{a.shape[0]} at preprocessor resolution {resolution}")
    a = cv2.resize(a, (w, h), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    a = np.pad(a, [[0, -h % 64], [0, -w % 64], [0, 0]], mode="edge")
    return Image.fromarray(a), (w, h)


def control_image(image: Image.Image, width: int, height: int, module: str = "none",
                  resize_mode: str = JUST_RESIZE, pixel_perfect: bool = False, processor_res: int | None = None,
                  threshold_a: float | None = None, threshold_b: float | None = None,
                  log: Callable[[str], None] | None = None) -> tuple[Image.Image, int | None]:
    """The control map for an output of width x height, made as the extension makes it: pixel-perfect
    resolution, preprocessor, resize mode. Returns (map, the preprocessor resolution used)."""
    resize_mode = resize_mode_name(resize_mode)
    if pixel_perfect:
        processor_res = pixel_perfect_resolution(image.size, width, height, resize_mode)
    detected = run_preprocessor(module, image, processor_res, threshold_a, threshold_b)
    if (detected.size != (width, height) or image.size != (width, height)) and log is not None:
        ran = f"; {module} ran at {detected.size[0]}x{detected.size[1]}" if detected.size != image.size else ""
        log(f"control image {image.size[0]}x{image.size[1]} resized to {width}x{height} "
            f"({resize_mode.lower()}{ran})")
    a = np.asarray(detected.convert("RGB"))
    return Image.fromarray(fit_map(a, width, height, resize_mode)), processor_res


# ---------------------------------------------------------------- names, hashes, infotext


def a1111_model_hash(path: str | os.PathLike) -> str:
    """A1111's old short hash (``sd_models.model_hash``), which the extension shows after ControlNet names:
    SHA-256 of the 64 KiB at offset 1 MiB, 8 hex digits. A diffusers folder: that of its weights file."""
    p = Path(path)
    if p.is_dir():
        for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                     "diffusion_pytorch_model.fp16.safetensors"):
            if (p / name).exists():
                p = p / name
                break
        else:
            return "NOFILE"
    h = hashlib.sha256()
    with open(p, "rb") as f:
        f.seek(0x100000)
        h.update(f.read(0x10000))
    return h.hexdigest()[:8]


def model_title(path: str | os.PathLike) -> str:
    """The extension's name for a ControlNet file: ``stem [hash]``."""
    p = Path(path)
    stem = p.name if p.is_dir() else p.stem
    return f"{stem} [{a1111_model_hash(p)}]"


def unit_infotext(settings: Mapping[str, object]) -> str:
    """One unit's infotext value as the extension serialises it (``ControlNetUnit.serialize``), quoted."""
    order = (("Module", "module"), ("Model", "model"), ("Weight", "weight"), ("Resize Mode", "resize_mode"),
             ("Processor Res", "processor_res"), ("Threshold A", "threshold_a"), ("Threshold B", "threshold_b"),
             ("Guidance Start", "guidance_start"), ("Guidance End", "guidance_end"),
             ("Pixel Perfect", "pixel_perfect"), ("Control Mode", "control_mode"))
    if settings.get("union_control_type"):  # ControlNet Union units only: plain units' lines stay as they were
        order += (("Union Control Type", "union_control_type"),)
    if settings.get("lllite_batch"):  # ldmkit's: a ControlNet-LLLite unit's CFG rows other than both
        order += (("LLLite Batch", "lllite_batch"),)
    text = ", ".join(f"{label}: {settings.get(key)}" for label, key in order)
    return json.dumps(text)  # A1111 quotes values holding commas or colons


def union_control_type(types: Sequence[int]) -> str:
    """A Union unit's control types as the extension's ``union_control_type`` values: (3,) -> "Hard Edge"; several
    maps in one unit (which the extension cannot express) -> "Depth+OpenPose", as ``--control-type`` reads them."""
    return "+".join("Unknown" if t < 0 else UNION_CONTROL_TYPES[t] for t in types)  # auto: the extension's Unknown


def infotext_fields(units: Sequence[object]) -> dict[str, str]:
    """``{"ControlNet 0": "...", ...}`` for units that carry their settings (``ControlUnit.settings``)."""
    out = {}
    for i, unit in enumerate(units):
        settings = getattr(unit, "settings", None)
        if settings:
            out[f"ControlNet {i}"] = unit_infotext(settings)
    return out


__all__ = ["BALANCED", "CONTROL", "CONTROL_MODES", "CROP_AND_RESIZE", "JUST_RESIZE", "PROMPT", "RESIZE_AND_FILL",
           "RESIZE_MODES", "a1111_model_hash", "control_image", "control_mode_name", "fit_map",
           "UNION_CONTROL_TYPES", "high_quality_resize", "infotext_fields", "model_title", "module_name",
           "pixel_perfect_resolution", "resize_mode_name", "run_preprocessor", "soft_scales", "union_control_type"]
