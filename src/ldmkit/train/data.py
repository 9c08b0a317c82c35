"""Training data as the trainers see it, built on ``ldmkit.data`` (the one reader of folders, holdout
lists and tar shards): a folder's images in memory with a held-out split and a deterministic sharded
sample order (position: epoch, index), or tar shards as a positioned stream (``StreamOrder``).

A folder's images are read once (``ImageCaptionDataset``: centre crop, no augmentation) and kept as
uint8, so 10k 64-px images take 120 MB. Augmentation (flips) is applied by the trainers with per-step
random generators, which is what makes ``--resume`` exact.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from ldmkit.data.datasets import ImageCaptionDataset, choose_holdout, flip_allowed, load_image
from ldmkit.train.config import TrainError

__all__ = ["ImageSet", "ShardedOrder", "StreamOrder", "flip_allowed", "load_dataset", "save_grid", "split_holdout",
           "to_pil"]


@dataclass
class ImageSet:
    """Images (N, 3, H, W) uint8 with their captions and keys (file stems); where metadata.jsonl gives
    them, each image's caption list and sampling weight (``ldmkit data emoji --augment-captions --balance``)."""

    images: Tensor
    captions: list[str]
    keys: list[str]
    caption_lists: list[list[str]] | None = None
    weights: Tensor | None = None  # (N,) float64

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, idx: list[int]) -> ImageSet:
        lists = None if self.caption_lists is None else [self.caption_lists[i] for i in idx]
        weights = None if self.weights is None else self.weights[idx]
        return ImageSet(self.images[idx], [self.captions[i] for i in idx], [self.keys[i] for i in idx], lists,
                        weights)

    def as_float(self, idx: Tensor | list[int] | None = None) -> Tensor:
        """Images in [-1, 1] as float32."""
        x = self.images if idx is None else self.images[idx]
        return x.float() / 127.5 - 1.0


def load_dataset(root: str | Path, size: int) -> ImageSet:
    """All images of a dataset folder at ``size`` x ``size``; a clear error when there are none."""
    p = Path(root)
    if not str(root):
        raise TrainError("no dataset given: pass --data DIR (e.g. one written by `ldmkit data emoji --out DIR`)")
    if not p.is_dir():
        raise TrainError(f"{p}: dataset folder not found; pass --data DIR")
    try:
        ds = ImageCaptionDataset(p, size)
    except ValueError as e:
        hint = f" To make a dataset: `ldmkit data emoji --out {p}`." if "no training images" in str(e) else ""
        raise TrainError(f"{e}{hint}") from None
    images = torch.stack([load_image(r.path, size) for r in ds.records])
    try:
        weights = ds.weights
    except ValueError as e:
        raise TrainError(str(e)) from None
    return ImageSet(images, ds.captions, ds.keys, ds.caption_lists,
                    None if weights is None else torch.tensor(weights, dtype=torch.float64))


def split_holdout(ds: ImageSet, root: str | Path, count: int) -> tuple[ImageSet, ImageSet]:
    """(train, held out): the keys in ``holdout.json`` if the dataset has one, else ``count`` images
    picked by hashing their keys (stable when images are added), at most a tenth of the data."""
    try:
        train, held = choose_holdout(ds.keys, root, count)
    except ValueError as e:
        raise TrainError(str(e)) from None
    if not train:
        raise TrainError(f"{root}: every image is held out; nothing left to train on")
    return ds.subset(train), ds.subset(held)


class ShardedOrder:
    """An endless stream of sample indices: a fresh permutation per epoch (a pure function of
    seed and epoch), split across ranks as ``DistributedSampler`` does (padded by wrapping around,
    rank r takes every world-th index from r). Batches may span an epoch boundary, so no data is
    dropped and any batch size works with any dataset size. The position is (epoch, index).

    With ``weights`` (class-balanced sampling) an epoch is instead ``n`` draws with replacement, index i
    with probability weights[i] / sum (``torch.multinomial`` from the same per-epoch generator), split
    across ranks the same way: each rank takes its own places in the one shared draw, and a resumed
    run continues mid-epoch exactly as the draw is again a pure function of (seed, epoch)."""

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 weights: Tensor | None = None):
        if n < 1:
            raise TrainError("the training set is empty")
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=torch.float64)
            if weights.shape != (n,) or not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
                raise TrainError(f"sampling weights must be {n} finite numbers >= 0 (one per training image)")
            if not float(weights.sum()) > 0:
                raise TrainError("every training image has sampling weight 0; give some a positive \"weight\" "
                                 "in metadata.jsonl, or train without balanced")
        self.n, self.seed, self.rank, self.world_size, self.shuffle = n, seed, rank, world_size, shuffle
        self.weights = weights
        self.epoch, self.index = 0, 0
        self._cache: tuple[int, Tensor] | None = None

    @property
    def per_rank(self) -> int:
        return -(-self.n // self.world_size)

    def epoch_indices(self, epoch: int) -> Tensor:
        """This rank's indices for ``epoch``, in order."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        if self.weights is not None:
            perm = torch.multinomial(self.weights, self.n, replacement=True, generator=gen)
        elif self.shuffle:
            perm = torch.randperm(self.n, generator=gen)
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

    @property
    def epochs(self) -> float:
        """Epochs done, fractional."""
        return self.epoch + self.index / self.per_rank

    def close(self) -> None:
        pass

    def _weights_digest(self) -> str:
        return hashlib.sha256(self.weights.numpy().tobytes()).hexdigest()[:16] if self.weights is not None else ""

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self.epoch, "index": self.index, "n": self.n, "world_size": self.world_size}
        if self.weights is not None:  # (an unweighted order's state is what it always was)
            state["weights"] = self._weights_digest()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("weights", "") != self._weights_digest():
            warnings.warn(
                "the checkpoint's data order was drawn with other sampling weights (balanced on/off, or the "
                f"dataset's weights changed): continuing from epoch {state['epoch'] + 1} with a fresh order",
                stacklevel=2)
            self.epoch, self.index = state["epoch"] + 1, 0
            return
        if state["n"] != self.n or state["world_size"] != self.world_size:
            warnings.warn(
                f"the checkpoint's data order was for {state['n']} samples on {state['world_size']} ranks, now "
                f"{self.n} on {self.world_size}: continuing from epoch {state['epoch'] + 1} with a fresh order",
                stacklevel=2)
            self.epoch, self.index = state["epoch"] + 1, 0
            return
        self.epoch, self.index = state["epoch"], state["index"]


class StreamOrder:
    """This rank's samples from tar shards (``ldmkit.data.shards.ShardStream``), read by ``workers``
    DataLoader processes (0: in this process). ``take(k)`` returns k samples (dicts with a uint8 image).

    The position is, per reader, the (epoch, k) of the next sample, and how many samples this rank has
    taken (which worker a DataLoader visits next); restored, the stream continues with exactly the samples
    an uninterrupted run would have seen. Memory: one shuffle buffer per reader, plus the prefetch.
    """

    def __init__(self, shards: list[Path], size: int, seed: int, rank: int = 0, world_size: int = 1,
                 workers: int = 0, buffer: int = 1000):
        self.shards, self.size, self.seed, self.buffer = shards, size, seed, buffer
        self.rank, self.world_size, self.workers = rank, world_size, workers
        self.next: dict[int, tuple[int, int]] = {}
        self.consumed = 0
        self._it: Any = None
        self._loader: Any = None

    def _open(self) -> None:
        from torch.utils.data import DataLoader

        from ldmkit.data.shards import ShardStream

        slots = max(self.workers, 1)
        stream = ShardStream(self.shards, self.size, seed=self.seed, rank=self.rank, world_size=self.world_size,
                             workers=slots, buffer=self.buffer, start=self.next, phase=self.consumed % slots)
        if self.workers == 0:
            self._it = iter(stream)
        else:
            self._loader = DataLoader(stream, batch_size=None, num_workers=self.workers, prefetch_factor=2)
            self._it = iter(self._loader)

    def take(self, k: int) -> list[dict[str, Any]]:
        if self._it is None:
            self._open()
        out = []
        for _ in range(k):
            item = next(self._it)
            reader, epoch, pos = (int(x) for x in item.pop("pos"))
            self.next[reader] = (epoch, pos + 1)
            self.consumed += 1
            out.append(item)
        return out

    @property
    def epoch(self) -> int:
        return min((e for e, _ in self.next.values()), default=0)

    @property
    def epochs(self) -> float:
        return float(self.epoch)

    def close(self) -> None:
        self._it = self._loader = None  # a DataLoader's workers end with their iterator

    def state_dict(self) -> dict[str, Any]:
        return {"stream": 1, "world_size": self.world_size, "workers": self.workers, "consumed": self.consumed,
                "next": {str(r): list(p) for r, p in self.next.items()}}

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        """``states``: every rank's ``state_dict`` as the checkpoint holds them."""
        if not isinstance(states, list) or not states or "stream" not in states[0]:
            raise TrainError("the checkpoint's data position is not a tar-shard stream's; resume with the --data "
                             "the run was started with")
        mine = states[self.rank] if len(states) > self.rank else states[0]
        if len(states) == self.world_size and mine["workers"] == self.workers:
            self.next = {int(r): (int(p[0]), int(p[1])) for r, p in mine["next"].items()}
            self.consumed = int(mine["consumed"])
        else:
            epoch = 1 + max((p[0] for s in states for p in s["next"].values()), default=-1)
            warnings.warn(
                f"the checkpoint's shard stream was read by {len(states)} rank(s) x {mine['workers']} worker(s), now "
                f"{self.world_size} x {self.workers}: the readers split the shards differently, so the stream "
                f"continues from epoch {epoch} (the rest of the interrupted epoch is not seen)", stacklevel=2)
            readers = self.world_size * max(self.workers, 1)
            self.next = {r: (epoch, 0) for r in range(readers)}
            self.consumed = 0
        self.close()


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
