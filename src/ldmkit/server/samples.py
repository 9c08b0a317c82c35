"""Images a request saves (``save_images``) in the format of the option ``samples_format``, as A1111 does.

PNGs carry the generation parameters in a ``parameters`` text chunk; JPEG and WebP in the EXIF
UserComment tag (character code ``UNICODE``, UTF-16), where A1111 writes and reads them.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from ldmkit.atomic import replacing

# A1111's samples_format values -> PIL's format
SAMPLE_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}

EXIF_IFD, USER_COMMENT = 0x8769, 0x9286  # EXIF 2.3: the Exif sub-IFD pointer, UserComment
UNICODE_PREFIX = b"UNICODE\0"  # UserComment's 8-byte character code for UCS-2/UTF-16 text


def file_tag(task_id: str, n: int = 6) -> str:
    """A short piece of a client's task id that is safe in a file name (letters, digits, - and _ only)."""
    return re.sub(r"[^A-Za-z0-9_-]", "", task_id)[-n:] or "task"


def user_comment(text: str) -> bytes:
    return UNICODE_PREFIX + text.encode("utf-16-be")


def sample_path(out_dir: Path, image: Image.Image, task_id: str, fmt: str) -> Path:
    ext = "jpg" if fmt == "jpeg" else fmt
    return out_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{file_tag(task_id)}-{image.info.get('seed', 0)}.{ext}"


def save_sample(image: Image.Image, out_dir: Path, task_id: str, options: dict[str, Any]) -> Path:
    """Write one generated image to ``out_dir`` (atomically) as the options say; returns its path."""
    fmt = str(options.get("samples_format", "png"))
    pil_format = SAMPLE_FORMATS[fmt]
    params = str(image.info.get("parameters", "")) if options.get("enable_pnginfo", True) else ""
    path = sample_path(out_dir, image, task_id, fmt)
    kwargs: dict[str, Any] = {}
    if pil_format == "PNG":
        meta = PngImagePlugin.PngInfo()
        if params:
            meta.add_text("parameters", params)
        kwargs["pnginfo"] = meta
    else:
        kwargs["quality"] = int(options.get("jpeg_quality", 80))
        if params:
            exif = Image.Exif()
            exif.get_ifd(EXIF_IFD)[USER_COMMENT] = user_comment(params)
            kwargs["exif"] = exif.tobytes()
        image = image.convert("RGB")
    with replacing(path) as tmp:
        image.save(tmp, format=pil_format, **kwargs)
    return path


def read_user_comment(image: Image.Image) -> str | None:
    """The text of a JPEG/WebP's EXIF UserComment (what :func:`save_sample` wrote), or None."""
    raw = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    if not isinstance(raw, bytes):
        return raw
    if raw.startswith(UNICODE_PREFIX):
        return raw[len(UNICODE_PREFIX):].decode("utf-16-be", errors="replace")
    return raw[8:].decode("ascii", errors="replace")
