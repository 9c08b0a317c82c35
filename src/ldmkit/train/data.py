"""Training data as the trainers see it: images in memory, a held-out split, and a deterministic
sharded sample order that a checkpoint can record as (epoch, index).

Images are read once through ``ldmkit.data.ImageCaptionDataset`` (centre crop, no augmentation)
when that package is installed, else by the small folder reader below, which understands the
same layout (``images/*.png`` + ``metadata.jsonl`` + optional ``holdout.json``). They are kept as
uint8, so 10k 64-px images take 120 MB. Augmentation (flips) is applied by the trainers with
per-step random generators, which is what makes ``--resume`` exact.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ldmkit.data.datasets import outside_folder
from ldmkit.images import to_8bit
from ldmkit.train.config import TrainError

try:
    from ldmkit.data import flip_allowed
except ImportError:  # the data package is optional here; the same rule
    _NO_FLIP = re.compile(r"\b(left|right)(wards?)?\b", re.IGNORECASE)

    def flip_allowed(caption: str) -> bool:
        """Mirroring turns "left" into "right": images whose caption says either are never flipped."""
        return not _NO_FLIP.search(caption)


IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_FILE_KEYS = ("file_name", "file", "image", "path", "filename")
_TEXT_KEYS = ("text", "caption", "prompt")


@dataclass
class ImageSet:
    """Images (N, 3, H, W) uint8 with their captions and keys (file stems)."""

    images: Tensor
    captions: list[str]
    keys: list[str]

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, idx: list[int]) -> ImageSet:
        return ImageSet(self.images[idx], [self.captions[i] for i in idx], [self.keys[i] for i in idx])

    def as_float(self, idx: Tensor | list[int] | None = None) -> Tensor:
        """Images in [-1, 1] as float32."""
        x = self.images if idx is None else self.images[idx]
        return x.float() / 127.5 - 1.0


def load_image(path: Path, size: int) -> Tensor:
    """(3, size, size) uint8: transparent pixels on white, shorter side resized, centre-cropped."""
    img = to_8bit(Image.open(path))  # 16-bit greyscale by range, not clipped
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    img = img.convert("RGB")
    w, h = img.size
    if (w, h) != (size, size):
        s = size / min(w, h)
        img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.Resampling.LANCZOS)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def _records(root: Path) -> list[tuple[Path, str]]:
    meta = root / "metadata.jsonl"
    if meta.exists():
        out = []
        for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise TrainError(f"{meta}:{n}: invalid JSON ({e})") from None
            name = next((rec[k] for k in _FILE_KEYS if k in rec), None)
            if name is None:
                raise TrainError(f"{meta}:{n}: no image file field (expected one of {', '.join(_FILE_KEYS)})")
            if not isinstance(name, str) or outside_folder(root, name):
                raise TrainError(f"{meta}:{n}: {name!r} is outside the dataset folder {root}; metadata.jsonl may "
                                 "only name files inside it (move or link them in)")
            path = next((p for p in (root / name, root / "images" / name) if p.exists()), None)
            if path is None:
                raise TrainError(f"{meta}:{n}: image {name!r} not found in {root} or {root / 'images'}")
            out.append((path, str(next((rec[k] for k in _TEXT_KEYS if k in rec), ""))))
        return out
    folder = root / "images" if (root / "images").is_dir() else root
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    # a caption per image in a .txt file beside it, else the empty caption
    return [(p, p.with_suffix(".txt").read_text().strip() if p.with_suffix(".txt").exists() else "") for p in files]


def _read_folder(root: Path, size: int) -> ImageSet:
    records = _records(root)
    if not records:
        raise TrainError(
            f"{root}: no training images (looked for metadata.jsonl and {'/'.join(IMAGE_EXTS)} files in "
            f"{root} and {root / 'images'}). Make a dataset with `ldmkit data emoji --out {root}`."
        )
    images = torch.stack([load_image(p, size) for p, _ in records])
    return ImageSet(images, [c for _, c in records], [p.stem for p, _ in records])


def _read_with_data_package(root: Path, size: int) -> ImageSet | None:
    try:
        from ldmkit.data import ImageCaptionDataset  # written alongside; optional here
    except ImportError:
        return None
    try:
        ds = ImageCaptionDataset(root, size, crop="center", flip=False, caption_dropout=0.0, seed=0)
    except TypeError:  # a different constructor than the one this adapter was written against
        return None
    except ValueError as e:
        hint = f" To make a dataset: `ldmkit data emoji --out {root}`." if "no training images" in str(e) else ""
        raise TrainError(f"{e}{hint}") from None
    items = [ds[i] for i in range(len(ds))]
    if not items:
        return None
    images = torch.stack([((it["image"].float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8) for it in items])
    return ImageSet(images, [it["caption"] for it in items], [str(it["key"]) for it in items])


def load_dataset(root: str | Path, size: int) -> ImageSet:
    """All images of a dataset folder at ``size`` x ``size``; a clear error when there are none."""
    p = Path(root)
    if not str(root):
        raise TrainError("no dataset given: pass --data DIR (e.g. one written by `ldmkit data emoji --out DIR`)")
    if not p.is_dir():
        raise TrainError(f"{p}: dataset folder not found; pass --data DIR")
    return _read_with_data_package(p, size) or _read_folder(p, size)


def split_holdout(ds: ImageSet, root: str | Path, count: int) -> tuple[ImageSet, ImageSet]:
    """(train, held out): the keys in ``holdout.json`` if the dataset has one, else ``count`` images
    picked by hashing their keys (stable when images are added), at most a tenth of the data."""
    path = Path(root) / "holdout.json"
    held: set[int] = set()
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise TrainError(f"{path}: invalid JSON ({e})") from None
        if isinstance(data, dict):
            data = next((data[k] for k in ("keys", "files", "images", "holdout") if k in data), [])
        names = {str(x) for x in data} if isinstance(data, list) else set()
        held = {i for i, k in enumerate(ds.keys) if k in names}
        if names and not held:  # entries given as file names rather than keys
            stems = {Path(n).stem for n in names}
            held = {i for i, k in enumerate(ds.keys) if k in stems}
        if names and not held:
            warnings.warn(f"{path}: none of its entries name an image of the dataset; holding out by hash instead",
                          stacklevel=2)
    if not held:
        count = min(count, len(ds) // 10)
        order = sorted(range(len(ds)), key=lambda i: hashlib.sha1(ds.keys[i].encode()).hexdigest())
        held = set(order[:count])
    train = [i for i in range(len(ds)) if i not in held]
    if not train:
        raise TrainError(f"{root}: every image is held out; nothing left to train on")
    return ds.subset(train), ds.subset(sorted(held))


class ShardedOrder:
    """An endless stream of sample indices: a fresh permutation per epoch (a pure function of
    seed and epoch), split across ranks as ``DistributedSampler`` does (padded by wrapping around,
    rank r takes every world-th index from r). Batches may span an epoch boundary, so no data is
    dropped and any batch size works with any dataset size. The position is (epoch, index)."""

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if n < 1:
            raise TrainError("the training set is empty")
        self.n, self.seed, self.rank, self.world_size, self.shuffle = n, seed, rank, world_size, shuffle
        self.epoch, self.index = 0, 0
        self._cache: tuple[int, Tensor] | None = None

    @property
    def per_rank(self) -> int:
        return -(-self.n // self.world_size)

    def epoch_indices(self, epoch: int) -> Tensor:
        """This rank's indices for ``epoch``, in order."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        if self.shuffle:
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        else:
            perm = torch.arange(self.n)
        total = self.per_rank * self.world_size
        perm = torch.cat([perm, perm[: total - self.n]]) if total > self.n else perm
        while perm.numel() < total:  # fewer samples than ranks
            perm = torch.cat([perm, perm])[:total]
        shard = perm[self.rank:total:self.world_size]
        self._cache = (epoch, shard)
        return shard

    def take(self, k: int) -> Tensor:
        out = []
        while k > 0:
            shard = self.epoch_indices(self.epoch)
            part = shard[self.index: self.index + k]
            out.append(part)
            k -= part.numel()
            self.index += part.numel()
            if self.index >= shard.numel():
                self.epoch, self.index = self.epoch + 1, 0
        return torch.cat(out)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "n": self.n, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["n"] != self.n or state["world_size"] != self.world_size:
            warnings.warn(
                f"the checkpoint's data order was for {state['n']} samples on {state['world_size']} ranks, now "
                f"{self.n} on {self.world_size}: continuing from epoch {state['epoch'] + 1} with a fresh order",
                stacklevel=2)
            self.epoch, self.index = state["epoch"] + 1, 0
            return
        self.epoch, self.index = state["epoch"], state["index"]


def save_grid(images: list[Image.Image], cols: int, path: str | Path) -> Path:
    """Tile equally sized images into rows of ``cols`` and save as PNG."""
    w, h = images[0].size
    rows = -(-len(images) // cols)
    grid = Image.new("RGB", (w * cols, h * rows), (0, 0, 0))
    for i, img in enumerate(images):
        grid.paste(img.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def to_pil(x: Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> RGB image."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(x.permute(1, 2, 0).cpu().numpy())
