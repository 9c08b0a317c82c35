"""Image-caption folders for training, their held-out split, and the latent cache (tar shards: ``ldmkit.data.shards``).

Folder layouts (Hugging Face ``imagefolder`` and kohya conventions):

* ``root/metadata.jsonl`` with one ``{"file_name": ..., "text": ...}`` object per line, file names
  relative to ``root`` (``caption``/``prompt`` are accepted for ``text``);
* otherwise every image under ``root`` (recursively), captioned by a sidecar ``name.txt`` or
  ``name.caption`` beside it (missing: the empty caption).

An optional ``root/holdout.json`` (``{"keys": [...]}``, as ``ldmkit data emoji`` writes) lists keys
held out of training; ``split="train" | "holdout"`` selects a side.

Augmentation (random crop, horizontal flip, caption dropout for classifier-free guidance) is a pure
function of ``(seed, epoch, index)``: a resumed run that calls ``set_epoch`` sees exactly the same
samples, whatever the worker count or the order items are read in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

from ldmkit.images import to_8bit

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_EXTS = (".txt", ".caption")
TEXT_FIELDS = ("text", "caption", "prompt")
# mirroring turns "left" into "right": such captions are never flipped (nor arrows pointing leftwards)
NO_FLIP_RE = re.compile(r"\b(left|right)(wards?)?\b", re.IGNORECASE)
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

Crop = Literal["center", "random"]


# ---------------------------------------------------------------- transforms


@dataclass(frozen=True)
class Augment:
    """The random choices for one sample: crop position in [0, 1) per axis, flip, caption dropped."""

    crop_x: float
    crop_y: float
    flip: bool
    drop_caption: bool


@dataclass(frozen=True)
class Transform:
    """Resize + crop + flip + caption dropout settings shared by every dataset class here."""

    size: int
    crop: Crop = "center"
    flip: bool = False
    caption_dropout: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"size must be a positive number of pixels, got {self.size}")
        if self.crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {self.crop!r}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout is a probability in [0, 1], got {self.caption_dropout}")

    def augment(self, epoch: int, index: int, caption: str) -> Augment:
        """The choices for sample ``index`` in ``epoch``: the same four draws always, so switching one
        option on or off does not change the others."""
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self.seed >> 32 & 0xFFFFFFFF, epoch, index])
        u_drop, u_flip, cx, cy = rng.random(4)
        return Augment(
            crop_x=float(cx) if self.crop == "random" else 0.5,
            crop_y=float(cy) if self.crop == "random" else 0.5,
            flip=self.flip and u_flip < 0.5 and flip_allowed(caption),
            drop_caption=bool(u_drop < self.caption_dropout),
        )

    def image(self, img: Image.Image, aug: Augment) -> Tensor:
        """(3, size, size) float in [-1, 1]: shorter side resized to ``size``, cropped, maybe flipped."""
        img = resize_crop(img, self.size, aug.crop_x, aug.crop_y)
        if aug.flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_tensor(img)

    def caption(self, caption: str, aug: Augment) -> str:
        return "" if aug.drop_caption else caption


def outside_folder(root: Path, name: str) -> bool:
    """Whether a file name from a dataset's metadata is absolute or climbs out of ``root`` (``../``): a
    dataset that reads any file on the machine is a way to leak it (into a cache, a sample, a model)."""
    if os.path.isabs(name) or os.path.splitdrive(name)[0]:
        return True
    base = os.path.normpath(root)
    return os.path.commonpath([base, os.path.normpath(os.path.join(base, name))]) != base


def flip_allowed(caption: str) -> bool:
    """False when mirroring would contradict the caption ("left", "right", "leftwards", ...)."""
    return NO_FLIP_RE.search(caption) is None


def open_rgb(source: str | Path | io.BytesIO, size: int | None = None) -> Image.Image:
    """Decoded RGB image, EXIF rotation applied, transparency composited on white. ``size`` lets
    JPEG decode at a reduced scale that still keeps the shorter side >= size."""
    img = Image.open(source)
    if size is not None and img.format == "JPEG":
        img.draft("RGB", (size, size))
    img = to_8bit(ImageOps.exif_transpose(img))  # 16-bit greyscale by range, not clipped
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    return img.convert("RGB")


def resize_crop(img: Image.Image, size: int, fx: float = 0.5, fy: float = 0.5) -> Image.Image:
    """Shorter side to ``size`` (Lanczos), then a size x size crop at fraction (fx, fy) of the slack."""
    w, h = img.size
    if min(w, h) != size:
        s = size / min(w, h)
        w, h = max(size, round(w * s)), max(size, round(h * s))
        img = img.resize((w, h), Image.Resampling.LANCZOS)
    # centre: (slack + 1) // 2 would bias odd slack right; match the usual (slack) // 2
    left = (w - size) // 2 if fx == 0.5 else min(int(fx * (w - size + 1)), w - size)
    top = (h - size) // 2 if fy == 0.5 else min(int(fy * (h - size + 1)), h - size)
    return img.crop((left, top, left + size, top + size)) if (w, h) != (size, size) else img


def to_tensor(img: Image.Image) -> Tensor:
    """PIL RGB -> (3, H, W) float32 in [-1, 1]."""
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W)
    return x.float() / 127.5 - 1.0


def load_image(source: str | Path | io.BytesIO, size: int) -> Tensor:
    """(3, size, size) uint8: decoded as ``open_rgb``, shorter side resized, centre-cropped (how the trainers
    keep images in memory: a 64-px image is 12 kB)."""
    img = resize_crop(open_rgb(source, size), size)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def read_text(path: Path) -> str:
    """A caption file as text: UTF-8 (BOM allowed); anything else is decoded with replacement
    characters and a warning naming the file."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig").strip()
    except UnicodeDecodeError as e:
        log.warning("%s: not valid UTF-8 (%s); undecodable bytes replaced by U+FFFD. Re-save it as UTF-8.",
                    path, e.reason)
        return data.decode("utf-8-sig", errors="replace").strip()


# ---------------------------------------------------------------- holdout


def read_holdout(root: str | Path) -> set[str]:
    """Entries of ``root/holdout.json``: a list, or an object with one under ``keys`` (as ``ldmkit data emoji``
    writes), ``files``, ``images`` or ``holdout``; empty if there is no such file."""
    path = Path(root) / "holdout.json"
    if not path.exists():
        return set()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); expected {{\"keys\": [...]}}") from None
    if isinstance(data, dict):
        data = next((data[k] for k in ("keys", "files", "images", "holdout") if k in data), None)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of keys or {{\"keys\": [...]}}")
    return {str(k) for k in data}


def split_holdout(keys: Sequence[str], holdout: Iterable[str]) -> tuple[list[int], list[int]]:
    """Indices of ``keys`` (train, held out) for the keys in ``holdout``."""
    held = set(holdout)
    return [i for i, k in enumerate(keys) if k not in held], [i for i, k in enumerate(keys) if k in held]


def choose_holdout(keys: Sequence[str], root: str | Path, count: int) -> tuple[list[int], list[int]]:
    """(train, held out) indices: the keys ``root/holdout.json`` lists (or file names, matched by stem),
    else ``count`` keys picked by hashing them (stable when images are added), at most a tenth."""
    names = read_holdout(root)
    held = {i for i, k in enumerate(keys) if k in names}
    if names and not held:  # entries given as file names rather than keys
        stems = {Path(n).stem for n in names}
        held = {i for i, k in enumerate(keys) if k in stems}
    if names and not held:
        log.warning("%s: none of its entries name an image of the dataset; holding out by hash instead",
                    Path(root) / "holdout.json")
    if not held:
        count = min(count, len(keys) // 10)
        held = set(sorted(range(len(keys)), key=lambda i: hashlib.sha1(keys[i].encode()).hexdigest())[:count])
    return [i for i in range(len(keys)) if i not in held], sorted(held)


# ---------------------------------------------------------------- image folder


@dataclass(frozen=True)
class Record:
    path: Path
    caption: str
    key: str
    captions: tuple[str, ...] = ()  # metadata.jsonl's "captions" list (other phrasings), if any
    weight: float | None = None  # metadata.jsonl's sampling "weight", if any


def _extras(rec: dict, meta: Path, n: int) -> tuple[tuple[str, ...], float | None]:
    """A metadata line's optional ``captions`` (a list of strings) and ``weight`` (a number >= 0)."""
    caps = rec.get("captions", [])
    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
        raise ValueError(f'{meta}, line {n}: "captions" must be a list of strings, got {caps!r:.80}')
    weight = rec.get("weight")
    if weight is not None:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
            raise ValueError(f'{meta}, line {n}: "weight" must be a finite number >= 0, got {weight!r}')
        weight = float(weight)
    return tuple(c.strip() for c in caps), weight


def _records_from_metadata(root: Path, meta: Path) -> list[Record]:
    out = []
    raw = meta.read_bytes()
    for n, line_bytes in enumerate(raw.splitlines(), 1):
        try:
            line = line_bytes.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError:
            log.warning("%s:%d: not valid UTF-8; undecodable bytes replaced by U+FFFD", meta, n)
            line = line_bytes.decode("utf-8", errors="replace")
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta}, line {n}: not valid JSON ({e.msg}); "
                             'expected {"file_name": "...", "text": "..."}') from None
        if not isinstance(rec, dict) or not isinstance(rec.get("file_name"), str):
            raise ValueError(f'{meta}, line {n}: expected an object with a "file_name" string, got {line[:80]!r}')
        if outside_folder(root, rec["file_name"]):
            raise ValueError(f"{meta}, line {n}: {rec['file_name']!r} is outside the dataset folder {root}; "
                             "metadata.jsonl may only name files inside it (move or link them in)")
        path = root / rec["file_name"]
        if not path.is_file():
            raise ValueError(f"{meta}, line {n}: image {rec['file_name']!r} not found in {root}")
        caption = next((rec[f] for f in TEXT_FIELDS if f in rec), "")
        out.append(Record(path, str(caption).strip(), "", *_extras(rec, meta, n)))
    return out


def _records_from_folder(root: Path) -> list[Record]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    out, missing = [], 0
    for p in files:
        side = next((p.with_suffix(ext) for ext in CAPTION_EXTS if p.with_suffix(ext).is_file()), None)
        missing += side is None
        out.append(Record(p, read_text(side) if side else "", ""))
    if missing:
        log.warning("%s: %d of %d images have no caption file (name.txt); they get the empty caption",
                    root, missing, len(files))
    return out


def _with_keys(root: Path, records: list[Record]) -> list[Record]:
    """Key = file stem ("0001"), or the path relative to ``root`` without suffix when stems collide."""
    stems = [r.path.stem for r in records]
    if len(set(stems)) == len(stems):
        keys = stems
    else:
        keys = [r.path.relative_to(root).with_suffix("").as_posix() for r in records]
        if len(set(keys)) != len(keys):
            dup = next(k for k in keys if keys.count(k) > 1)
            raise ValueError(f"{root}: two images map to the key {dup!r} (same name, different extension); "
                             "rename one")
    return [dataclasses.replace(r, key=k) for r, k in zip(records, keys, strict=True)]


def _decodes(path: Path, size: int) -> bool:
    try:
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft("RGB", (size, size))
            img.load()
        return True
    except _DECODE_ERRORS as e:
        log.warning("%s: cannot decode image (%s); skipped", path, e)
        return False


class ImageCaptionDataset(Dataset):
    """A folder of images with captions. Items: ``{"image": (3, size, size) float in [-1, 1],
    "caption": str, "key": str}``.

    ``verify=True`` decodes every image once at construction and skips (with a logged warning) those
    that fail, so the index is fixed before training. With ``verify=False`` a file that fails later
    is replaced, with a warning, by the next one that decodes.
    ``split`` chooses by ``root/holdout.json``; ``exclude`` drops further keys.
    """

    def __init__(self, root: str | Path, size: int, *, crop: Crop = "center", flip: bool = False,
                 caption_dropout: float = 0.0, seed: int = 0, split: Literal["all", "train", "holdout"] = "all",
                 exclude: Iterable[str] = (), verify: bool = True):
        self.root = Path(root)
        self.transform = Transform(size, crop, flip, caption_dropout, seed)
        self.epoch = 0
        if not self.root.is_dir():
            raise ValueError(f"{self.root}: dataset folder not found")
        meta = self.root / "metadata.jsonl"
        records = _records_from_metadata(self.root, meta) if meta.is_file() else _records_from_folder(self.root)
        if not records:
            raise ValueError(
                f"{self.root}: no training images. Expected image files ({', '.join(IMAGE_EXTS)}) with a caption "
                f"file name.txt beside each, or a metadata.jsonl with one "
                '{"file_name": ..., "text": ...} per line.')
        records = _with_keys(self.root, records)
        if split not in ("all", "train", "holdout"):
            raise ValueError(f"split must be 'all', 'train' or 'holdout', got {split!r}")
        if split != "all":
            held = read_holdout(self.root)
            if not held:
                raise ValueError(f"{self.root}: split={split!r} needs a holdout.json listing held-out keys")
            records = [r for r in records if (r.key in held) == (split == "holdout")]
        excluded = set(exclude)
        records = [r for r in records if r.key not in excluded]
        if verify:
            records = [r for r in records if _decodes(r.path, size)]
        if not records:
            raise ValueError(f"{self.root}: no usable images left (split={split!r}, {len(excluded)} excluded)")
        self.records = records

    @property
    def keys(self) -> list[str]:
        return [r.key for r in self.records]

    @property
    def captions(self) -> list[str]:
        return [r.caption for r in self.records]

    @property
    def caption_lists(self) -> list[list[str]] | None:
        """Every image's captions (metadata.jsonl's "captions", else its one caption); None when no line has
        a "captions" list."""
        if not any(r.captions for r in self.records):
            return None
        return [list(r.captions) or [r.caption] for r in self.records]

    @property
    def weights(self) -> list[float] | None:
        """metadata.jsonl's per-image sampling "weight"s; None when no line has one."""
        given = [r.weight for r in self.records]
        if all(w is None for w in given):
            return None
        missing = [r.key for r, w in zip(self.records, given, strict=True) if w is None]
        if missing:
            raise ValueError(f'{self.root}: {len(missing)} images have no "weight" in metadata.jsonl (e.g. '
                             f'{missing[0]!r}) while others do; give every line one')
        return [float(w) for w in given]  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def _open(self, index: int) -> tuple[Record, Image.Image]:
        for k in range(len(self.records)):
            r = self.records[(index + k) % len(self.records)]
            try:
                return r, open_rgb(r.path, self.transform.size)
            except _DECODE_ERRORS as e:
                log.warning("%s: cannot decode image (%s); using the next image instead", r.path, e)
        raise ValueError(f"{self.root}: none of the {len(self.records)} images can be decoded")

    def __getitem__(self, index: int) -> dict:
        r, img = self._open(index)
        aug = self.transform.augment(self.epoch, index, r.caption)
        return {"image": self.transform.image(img, aug), "caption": self.transform.caption(r.caption, aug),
                "key": r.key}

    def plain(self, index: int) -> dict:
        """Item ``index`` without augmentation: centre crop, no flip, full caption."""
        r, img = self._open(index)
        return {"image": to_tensor(resize_crop(img, self.transform.size)), "caption": r.caption, "key": r.key}

    def fingerprint(self) -> str:
        """Changes when any image file, the key list or the image size changes."""
        h = hashlib.sha256(f"size={self.transform.size}\n".encode())
        for r in self.records:
            st = r.path.stat()
            h.update(f"{r.key}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        return h.hexdigest()


# ---------------------------------------------------------------- latent cache


@torch.no_grad()
def encode_in_batches(images: Callable[[int, int], Tensor], n: int,
                      encode: Callable[[Tensor], Tensor | dict[str, Tensor]], *, flip: bool = False,
                      batch_size: int = 32) -> dict[str, Tensor]:
    """Encode ``n`` images once, ``batch_size`` at a time: the latent cache the trainers keep.

    ``images(start, stop)`` gives (B, 3, H, W) floats in [-1, 1]; ``encode`` returns a tensor (stored
    as ``latents``) or named tensors (a VAE posterior: ``mean``, ``std``). With ``flip`` the mirror
    image of each is encoded too (``NAME_flip``): exact, where flipping a latent's width axis is only
    an approximation for a VAE. Everything is returned float32 on the CPU.
    """
    out: dict[str, list[Tensor]] = {}
    for start in range(0, n, batch_size):
        x = images(start, min(start + batch_size, n))
        for suffix, xs in [("", x)] + ([("_flip", x.flip(-1))] if flip else []):
            enc = encode(xs)
            for name, t in (enc if isinstance(enc, dict) else {"latents": enc}).items():
                out.setdefault(name + suffix, []).append(t.float().cpu())
    return {k: torch.cat(v) for k, v in out.items()}
