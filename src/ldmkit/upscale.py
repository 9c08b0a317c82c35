"""Image upscalers as A1111 has them: ESRGAN-family files (:mod:`ldmkit.models.esrgan`) and the built-in
"Lanczos", "Nearest" and "None"; tiled inference with overlap so large images need bounded memory.

``upscale(image, load_upscaler("RealESRGAN_x4plus.pth"))``; ``ldmkit upscale`` on the command line.
A1111's rules (``modules/upscaler.py``) decide the size: the target is the image size times ``scale``
rounded down to ``multiple_of`` (A1111: 8); a network runs up to three times until the image is at
least that large, and a Lanczos resize makes up the difference.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ldmkit import file_kind
from ldmkit.checkpoint import CheckpointError, build_strict, read_safetensors
from ldmkit.images import to_8bit
from ldmkit.models.esrgan import UpscalerArch, UpscalerFormatError, detect

BUILTIN_UPSCALERS = ("None", "Lanczos", "Nearest")
UPSCALER_SUFFIXES = (".pth", ".pt", ".safetensors", ".ckpt", ".bin")
# A1111 lists the Real-ESRGAN release files under these names (modules/realesrgan_model.py); requests and
# infotexts use them ("Hires upscaler: R-ESRGAN 4x+"), so a folder holding the file answers to both
A1111_REALESRGAN_NAMES = {
    "R-ESRGAN General 4xV3": "realesr-general-x4v3", "R-ESRGAN General WDN 4xV3": "realesr-general-wdn-x4v3",
    "R-ESRGAN AnimeVideo": "realesr-animevideov3", "R-ESRGAN 4x+": "RealESRGAN_x4plus",
    "R-ESRGAN 4x+ Anime6B": "RealESRGAN_x4plus_anime_6B", "R-ESRGAN 2x+": "RealESRGAN_x2plus",
}
DEFAULT_TILE, DEFAULT_OVERLAP = 256, 32  # input pixels; A1111's ESRGAN_tile/overlap are 192/8
_RESAMPLE = {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}


@dataclass
class Upscaler:
    """A loaded upscaler: a network (``module``) or a built-in resampler (``module`` None)."""

    name: str
    scale: float  # what one pass does; 4 for the built-ins, as A1111 lists them
    path: str | None = None
    arch: UpscalerArch | None = None
    module: nn.Module | None = None

    def describe(self) -> str:
        return self.arch.describe() if self.arch else f"{self.name} (built-in resampling)"


# ---------------------------------------------------------------- files


def read_upscaler_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Tensors of a ``.pth``/``.safetensors`` upscaler (``params_ema``/``params`` wrappers unwrapped); pickles
    are read with ``weights_only=True``, so a file carrying code is refused, never run."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such upscaler file (built-in ones: {', '.join(BUILTIN_UPSCALERS)})")
    if p.suffix.lower() == ".safetensors":
        sd: object = read_safetensors(p)[0]
    elif p.suffix.lower() in UPSCALER_SUFFIXES:
        try:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            if "weights_only" in str(e) or "Unsupported global" in str(e):
                raise CheckpointError(f"{p}: the file holds pickled Python objects besides tensors, which ldmkit "
                                      "refuses to run (weights_only=True); convert it to .safetensors with a tool "
                                      "you trust") from None
            raise CheckpointError(f"{p}: not a readable .pth file ({first}); it may be truncated or corrupt: "
                                  "download it again") from None
    else:
        raise CheckpointError(f"{p}: unknown upscaler extension {p.suffix!r}; expected .pth or .safetensors")
    # BasicSR/Real-ESRGAN save {"params_ema": ...} or {"params": ...}; Lightning-style {"state_dict": ...}
    for wrapper in ("params_ema", "params", "state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
            break
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, Tensor) for v in sd.values()):
        raise CheckpointError(f"{p}: holds no state dict of tensors; is it an upscaler model file?")
    # models saved from nn.DataParallel prefix every key with "module."
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def builtin_upscaler(name: str) -> Upscaler | None:
    """"None", "Lanczos" or "Nearest" (any case); None for other names."""
    match = next((b for b in BUILTIN_UPSCALERS if b.lower() == name.lower()), None)
    return Upscaler(match, 4.0) if match else None


def load_upscaler(path: str | os.PathLike, device: str | torch.device | None = None,
                  name: str | None = None) -> Upscaler:
    """An upscaler file (architecture, scale, width and depth read from its keys) or a built-in name."""
    builtin = builtin_upscaler(str(path))
    if builtin is not None and not Path(path).is_file():
        return builtin
    p = Path(path)
    sd = read_upscaler_file(p)
    try:
        arch, sd = detect(sd)
    except UpscalerFormatError as e:
        raise CheckpointError(f"{p}: {e}") from None
    try:
        module = build_strict(arch.build, sd, f"upscaler {p.name} ({arch.describe()})")
    except CheckpointError as e:  # load_strict's hint is about SD checkpoints
        raise CheckpointError(str(e).replace("; pass the right --model-type.", "; ldmkit does not read this "
                                             "variant.")) from None
    module = module.eval().requires_grad_(False).to(device or "cpu")
    return Upscaler(name or p.stem, float(arch.scale), str(p), arch, module)


def describe_file(path: str | os.PathLike | file_kind.Header) -> str | None:
    """One line on an upscaler file (``ldmkit info``); None when the file is not one (keys checked first,
    from the header alone for .safetensors, so a large checkpoint is not read)."""
    from ldmkit.models.esrgan import layout_of

    header = file_kind.read_header(path)
    p = header.path
    if p.suffix.lower() == ".safetensors":
        if not file_kind.UPSCALER_KEYS & set(header.keys or ()):
            return None
    elif p.suffix.lower() not in (".pth", ".pt"):
        return None
    try:
        sd = read_upscaler_file(p)
    except CheckpointError:
        return None
    if layout_of(sd) is None:
        return None
    arch, _ = detect(sd)
    n = sum(t.numel() for t in sd.values())
    return f"upscaler: {arch.describe()}; {n / 1e6:.1f}M parameters"


# ---------------------------------------------------------------- running a network


def _run_padded(module: nn.Module, x: Tensor, multiple: int) -> Tensor:
    """``module(x)`` with ``x`` reflect-padded (bottom/right) to a multiple of ``multiple``, cropped back."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    y = module(x)
    s = y.shape[-1] // x.shape[-1]
    return y[..., : h * s, : w * s]


def _tiles(length: int, tile: int, overlap: int, align: int) -> list[tuple[int, int]]:
    """(start, end) of evenly spread tiles covering ``length`` with at least ``overlap``; starts are multiples
    of ``align`` (the last tile grows by up to ``align - 1`` to reach the end)."""
    if length <= tile:
        return [(0, length)]
    n = math.ceil((length - overlap) / (tile - overlap))
    starts = sorted({round(i * (length - tile) / (n - 1)) // align * align for i in range(n)})
    return [(s, length if s == starts[-1] else s + tile) for s in starts]


def _ramp(n: int, overlap: int, at_start: bool, at_end: bool) -> Tensor:
    """Blending weight along one axis of a tile. Towards an edge that borders another tile, the outer quarter of
    the overlap is context only (weight ~0: the network saw too little around those pixels), the middle half
    cross-fades linearly, the rest is 1. Never exactly 0, so every pixel has some weight."""
    d = torch.arange(n, dtype=torch.float64) + 0.5  # distance from the start edge
    w = torch.ones(n, dtype=torch.float64)
    q = overlap / 4
    if q > 0:
        if at_start:
            w = torch.minimum(w, (d - q) / (2 * q))
        if at_end:
            w = torch.minimum(w, (n - d - q) / (2 * q))
    return w.clamp(1e-6, 1).float()


@torch.inference_mode()
def run_network(module: nn.Module, x: Tensor, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP,
                progress: Callable[[int, int], None] | None = None) -> Tensor:
    """``module`` on ``x`` (B, C, H, W) in [0, 1], in overlapping tiles of ``tile`` input pixels (0: whole).

    Overlaps are cross-faded (see :func:`_ramp`), and pixels covered by one tile only are that tile's output as
    is, so the result equals the untiled one wherever ``overlap / 4`` exceeds the network's receptive field.
    """
    param = next(module.parameters())
    align = getattr(module, "unshuffle", 1)  # Real-ESRGAN x2/x1 group 2x2/4x4 pixels: keep the grouping
    h, w = x.shape[-2:]
    if tile <= 0 or (h <= tile and w <= tile):
        return _run_padded(module, x.to(param), align).float().cpu()
    tile = max(tile // align * align, align)
    overlap = min(max(overlap, 0), tile // 2)
    ys, xs = _tiles(h, tile, overlap, align), _tiles(w, tile, overlap, align)
    out = acc = None
    done = 0
    for y0, y1 in ys:
        for x0, x1 in xs:
            part = _run_padded(module, x[..., y0:y1, x0:x1].to(param), align).float().cpu()
            s = part.shape[-1] // (x1 - x0)
            if out is None:
                out = torch.zeros(*x.shape[:-3], part.shape[-3], h * s, w * s)
                acc = torch.zeros(h * s, w * s)
            wy = _ramp(part.shape[-2], overlap * s, y0 > 0, y1 < h)
            wx = _ramp(part.shape[-1], overlap * s, x0 > 0, x1 < w)
            weight = wy[:, None] * wx[None, :]  # (h_tile, w_tile)
            out[..., y0 * s:y1 * s, x0 * s:x1 * s] += part * weight
            acc[y0 * s:y1 * s, x0 * s:x1 * s] += weight
            done += 1
            if progress:
                progress(done, len(ys) * len(xs))
    return out / acc


# ---------------------------------------------------------------- images


def _network_pass(image: Image.Image, up: Upscaler, tile: int, overlap: int,
                  progress: Callable[[int, int], None] | None) -> Image.Image:
    assert up.module is not None and up.arch is not None
    alpha = image.getchannel("A") if "A" in image.getbands() else None
    mode = "L" if up.arch.in_ch == 1 else "RGB"
    if up.arch.in_ch not in (1, 3):
        raise CheckpointError(f"{up.name}: a {up.arch.in_ch}-channel upscaler; ldmkit runs 1- and 3-channel ones")
    arr = np.asarray(image.convert(mode), dtype=np.float32) / 255.0
    x = torch.from_numpy(arr.reshape(arr.shape[0], arr.shape[1], -1)).permute(2, 0, 1)[None]  # (1, C, H, W)
    y = run_network(up.module, x, tile, overlap, progress)[0]
    out = (y.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()
    result = Image.fromarray(out[..., 0] if out.shape[-1] == 1 else out, "L" if out.shape[-1] == 1 else "RGB")
    if alpha is not None:  # the network sees colour only; transparency follows by Lanczos
        result = result.convert("RGBA")
        result.putalpha(alpha.convert("L").resize(result.size, Image.Resampling.LANCZOS))
    return result


def target_size(size: tuple[int, int], scale: float, multiple_of: int = 1) -> tuple[int, int]:
    """A1111's destination size: each side times ``scale``, rounded down to ``multiple_of`` (at least that)."""
    return tuple(max(int(side * scale // multiple_of * multiple_of), multiple_of) for side in size)  # type: ignore[return-value]


def upscale(image: Image.Image, upscaler: Upscaler, scale: float | None = None, *, tile: int = DEFAULT_TILE,
            overlap: int = DEFAULT_OVERLAP, multiple_of: int = 1, size: tuple[int, int] | None = None,
            progress: Callable[[int, int], None] | None = None) -> Image.Image:
    """``image`` enlarged by ``scale`` (default: the upscaler's own) or to ``size`` (width, height), as A1111's
    ``Upscaler.upscale`` does it: up to three passes of the network, then Lanczos to the exact size."""
    image = to_8bit(image)  # 16-bit greyscale by range (PIL would clip it to white)
    if image.mode == "P" or (image.mode not in ("RGB", "RGBA", "L", "LA")):
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if scale is not None and not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"upscale scale must be a positive number, got {scale}")
    scale = scale or upscaler.scale
    dest = size or target_size(image.size, scale, multiple_of)
    if upscaler.module is None and upscaler.name in _RESAMPLE:
        image = image.resize((int(image.width * scale), int(image.height * scale)), _RESAMPLE[upscaler.name])
    elif upscaler.module is not None:
        for _ in range(3):
            image = _network_pass(image, upscaler, tile, overlap, progress)
            if image.width >= dest[0] and image.height >= dest[1]:
                break
    if image.size != tuple(dest):
        image = image.resize(tuple(dest), Image.Resampling.LANCZOS)
    return image


def postprocess_infotext(upscaler: Upscaler, scale: float | None = None, size: tuple[int, int] | None = None) -> str:
    """A1111's extras infotext (the ``postprocessing`` PNG text chunk)."""
    how = f"Postprocess upscale to: {size[0]}x{size[1]}" if size else f"Postprocess upscale by: {scale:g}"
    return f"{how}, Postprocess upscaler: {upscaler.name}"


# ---------------------------------------------------------------- ldmkit upscale

EXAMPLES = """examples:
  ldmkit upscale small.png --upscaler RealESRGAN_x4plus.pth -o big.png
  ldmkit upscale small.png --upscaler 4x-UltraSharp.pth --scale 2 -o big.png   # network x4, Lanczos to x2
  ldmkit upscale small.png --upscaler Lanczos --scale 2 -o big.png
  ldmkit upscale shots/*.png --upscaler RealESRGAN_x4plus.pth -o big/         # several: -o is a folder
  (ESRGAN/RRDBNet in old and new layouts, Real-ESRGAN x4plus/x2plus, realesr-general-x4v3 and other
  compact nets; .pth read with weights_only=True, or .safetensors)"""


def register(add: Callable[..., argparse.ArgumentParser]) -> None:
    p = add("upscale", "enlarge an image with an ESRGAN-family upscaler file or Lanczos/Nearest", EXAMPLES)
    p.add_argument("images", nargs="+", metavar="image",
                   help="input image(s) (PNG, JPEG, WebP); with several, -o is a folder")
    p.add_argument("--upscaler", required=True,
                   help="upscaler file (.pth/.safetensors: ESRGAN, Real-ESRGAN, compact) or Lanczos / Nearest")
    p.add_argument("-o", "--output", default=None, help="output PNG (default: <image>_x<scale>.png beside it)")
    p.add_argument("--scale", type=float, default=None, help="enlargement factor (default: the upscaler's own)")
    p.add_argument("--tile", type=int, default=DEFAULT_TILE,
                   help=f"tile size in input pixels for bounded memory (0: whole image; default {DEFAULT_TILE})")
    p.add_argument("--tile-overlap", type=int, default=DEFAULT_OVERLAP,
                   help=f"pixels tiles overlap and cross-fade over (default {DEFAULT_OVERLAP})")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.set_defaults(func=cmd_upscale)


def cmd_upscale(args: argparse.Namespace) -> None:
    import sys

    from PIL import PngImagePlugin

    from ldmkit.infotext import read_parameters
    from ldmkit.pipeline import open_image

    if args.scale is not None and not 0 < args.scale <= 16:
        raise ValueError(f"--scale must be in (0, 16], got {args.scale:g}")
    if args.tile < 0 or args.tile_overlap < 0:
        raise ValueError("--tile and --tile-overlap must be >= 0")
    sources = [Path(s) for s in args.images]
    folder = None
    if len(sources) > 1 and args.output:
        folder = Path(args.output)
        if folder.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp") and not folder.is_dir():
            raise ValueError(f"-o {folder}: with several images, -o names a folder for the results")
    for src in sources:
        if not src.is_file():
            raise FileNotFoundError(f"{src}: no such image")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    up = load_upscaler(args.upscaler, device=device)
    if up.module is None and args.scale is None:
        raise ValueError(f"--upscaler {up.name} is a plain resize: give --scale")
    print(f"{up.name}: {up.describe()}", file=sys.stderr)
    scale = args.scale or up.scale
    bars: list = []

    def progress(done: int, total: int) -> None:  # a bar per network pass, over its tiles
        from tqdm import tqdm

        if done == 1:
            bars.append(tqdm(total=total, desc="upscale", unit="tile", file=sys.stderr, dynamic_ncols=True))
        bars[-1].update(1)
        if done == total:
            bars[-1].close()

    for src in sources:
        out = upscale(open_image(src), up, scale, tile=args.tile, overlap=args.tile_overlap, progress=progress)
        name = f"{src.stem}_x{scale:g}.png"
        if folder is not None:
            dest = folder / name
        else:
            dest = Path(args.output) if args.output else src.with_name(name)
        meta = PngImagePlugin.PngInfo()
        params = read_parameters(src) if src.suffix.lower() == ".png" else None
        if params:
            meta.add_text("parameters", params)  # the generation parameters stay with the image, as in A1111
        meta.add_text("postprocessing", postprocess_infotext(up, scale))
        dest.parent.mkdir(parents=True, exist_ok=True)
        out.save(dest, pnginfo=meta if dest.suffix.lower() == ".png" else None)
        print(f"{dest} ({out.width}x{out.height})")
