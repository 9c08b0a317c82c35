"""A1111's ``parameters`` PNG text: writing images that carry it, and reading it back."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

from PIL import Image, PngImagePlugin

from ldmkit.atomic import replacing

# "Key: value" pairs; values may be quoted and contain commas
_RE_PARAM = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> dict[str, str]:
    """``parameters`` text -> {"Prompt", "Negative prompt", "Steps", "Sampler", ...} (values as strings)."""
    lines = text.strip().split("\n")
    last = lines[-1] if lines else ""
    params: dict[str, str] = {}
    if len(_RE_PARAM.findall(last)) >= 3:
        lines = lines[:-1]
        for k, v in _RE_PARAM.findall(last):
            v = v.strip()
            if v.startswith('"') and v.endswith('"'):
                v = v[1:-1].replace('\\"', '"')
            params[k.strip()] = v
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    params["Prompt"] = "\n".join(prompt).strip()
    params["Negative prompt"] = "\n".join(negative).strip()
    return params


def read_parameters(path: str | os.PathLike) -> str:
    """The ``parameters`` text of a PNG ("" if it has none)."""
    with Image.open(path) as im:
        return str(im.info.get("parameters", ""))


def _pnginfo(image: Image.Image) -> PngImagePlugin.PngInfo:
    meta = PngImagePlugin.PngInfo()
    if "parameters" in image.info:
        meta.add_text("parameters", str(image.info["parameters"]))
    return meta


def save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write a PNG with its ``parameters`` text, atomically (never a half-written file)."""
    path = Path(path)
    with replacing(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=_pnginfo(image))
    return path


def png_bytes(image: Image.Image) -> bytes:
    """The file :func:`save_png` writes, as bytes (``ldmkit batch``: made by a worker, written by the driver)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=_pnginfo(image))
    return buf.getvalue()
