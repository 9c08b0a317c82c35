"""Reading images people hand us: bit depths PIL's ``convert`` gets wrong, sizes it refuses.

PIL's ``convert("L"/"RGB")`` from a 16-bit greyscale image (mode ``I;16``, what a 16-bit PNG or TIFF
opens as) clips every value above 255 to white instead of rescaling: a full-range 16-bit image comes
out 99.6% white (issue 15, hardening 8). ``to_8bit`` maps the mode's range onto 0..255 first.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

# integer and float greyscale modes whose values are not 0..255 (the I;16 family, 32-bit I, F)
WIDE_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}


def to_8bit(img: Image.Image) -> Image.Image:
    """An image whose mode holds wider values than 8 bits -> mode "L", rescaled by the mode's range.

    16-bit modes: 0..65535 -> 0..255. "I" (32-bit, what older PIL gives for 16-bit PNGs) and "F":
    values within 0..255 are kept, within 0..65535 treated as 16-bit; "F" within 0..1 is scaled by 255.
    Other modes are returned unchanged.
    """
    if img.mode not in WIDE_MODES:
        return img
    a = np.asarray(img).astype(np.float64)
    if img.mode.startswith("I;16"):
        top = 65535.0
    else:
        hi = float(a.max()) if a.size else 0.0
        lo = float(a.min()) if a.size else 0.0
        if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
            top = 1.0
        elif lo >= 0.0 and hi <= 255.0:
            top = 255.0
        elif lo >= 0.0 and hi <= 65535.0:
            top = 65535.0
        else:  # out of any nominal range: stretch what is there
            a, top = a - lo, max(hi - lo, 1e-12)
    out = Image.fromarray(np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8), mode="L")
    out.info.update(img.info)
    return out


def convert(img: Image.Image, mode: str) -> Image.Image:
    """``img.convert(mode)`` that rescales 16-bit and float greyscale instead of clipping it."""
    return to_8bit(img).convert(mode)


def open_checked(path: str | os.PathLike) -> Image.Image:
    """``Image.open`` whose size refusal (PIL's decompression-bomb guard) is a one-line ValueError naming the file."""
    try:
        return Image.open(path)
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path}: {e}; downscale it first") from None
