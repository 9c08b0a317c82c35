"""WebDataset-format tar shards: written from an image-caption folder, read back as a resumable stream.

A shard is a plain tar whose members are grouped by key, WebDataset's naming: ``KEY.png`` (or ``.jpg``,
``.webp``) with ``KEY.txt`` (the caption) and ``KEY.json`` (the folder's metadata for it). The key ends at
the first dot of a member's base name. Shard lists are written as WebDataset writes them
(``"shards/{00000..00099}.tar"``, brace-expanded) or as a folder of ``.tar`` files.

The stream is deterministic and positioned (Aizman et al., "High Performance I/O For Large Scale Deep
Learning", 2019, is the format; the resumable order is ours):

* every epoch the shard list is permuted by (seed, epoch) and dealt to the readers, reader r of N taking
  shards r, r + N, ... (readers = ranks x DataLoader workers, so no sample is read twice); with fewer shards
  than readers every reader scans all shards and keeps the samples whose running index is r mod N;
* a reader fills a buffer of ``buffer`` samples (raw bytes, not decoded) and emits it in a permutation
  drawn from (seed, reader, epoch, block), then fills the next: memory holds one buffer, whatever the
  dataset's size;
* each sample carries its position (reader, epoch, k): the k-th sample that reader emitted in that epoch.
  A reader started at (epoch, k) skips k // buffer buffers by reading tar headers only (no image data, no
  decoding), refills that buffer and continues at k % buffer: exactly the samples an uninterrupted
  reader would have emitted next.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import re
import tarfile
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from ldmkit.atomic import replacing
from ldmkit.data.datasets import TEXT_FIELDS, ImageCaptionDataset, load_image, read_holdout

log = logging.getLogger(__name__)

SHARD_IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
_DECODE_ERRORS = (OSError, ValueError, SyntaxError)
_BRACE = re.compile(r"\{([^{}]*)\}")


# ---------------------------------------------------------------- shard lists


def expand_braces(pattern: str) -> list[str]:
    """WebDataset's brace expansion: ``{00000..00099}`` (zero-padded ranges) and ``{a,b}``, left to right."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        width = len(lo) if lo.startswith("0") else 0
        parts = [f"{i:0{width}d}" for i in range(int(lo), int(hi) + 1)]
    else:
        parts = body.split(",")
    return [x for p in parts for x in expand_braces(head + p + tail)]


def is_shard_source(data: str) -> bool:
    """Whether ``--data`` names tar shards (a pattern or ``.tar`` path, or a folder holding only ``.tar``
    files) rather than an image folder."""
    p = Path(data)
    if p.is_dir():
        return any(p.glob("*.tar")) and not (p / "metadata.jsonl").exists() and not (p / "images").is_dir()
    return data.endswith(".tar") or ("{" in data and ".tar" in data)


def list_shards(spec: str | Path) -> list[Path]:
    """The shards ``spec`` names: a folder (its ``*.tar``, sorted), a brace pattern, a glob or a path."""
    p = Path(spec)
    if p.is_dir():
        shards = sorted(p.glob("*.tar"))
    else:
        names = [f for name in expand_braces(str(spec))
                 for f in (sorted(glob.glob(name)) if glob.has_magic(name) else [name])]
        missing = [f for f in names if not Path(f).is_file()]
        if missing:
            raise ValueError(f"{missing[0]}: shard not found ({len(missing)} of the {len(names)} shards {spec} "
                             "names are missing); write shards with `ldmkit data shards FOLDER --out DIR` or fix "
                             "the pattern")
        shards = [Path(f) for f in names]
    if not shards:
        raise ValueError(f"{spec}: no .tar shards found; expected a folder of WebDataset shards, or a pattern "
                         "like 'shards/{00000..00009}.tar' (write them with `ldmkit data shards`)")
    return shards


# ---------------------------------------------------------------- writing


@dataclass(frozen=True)
class ShardsWritten:
    out: Path
    samples: int
    shards: int
    held_out: int

    @property
    def pattern(self) -> str:
        last = self.shards - 1
        return str(self.out / (f"{{00000..{last:05d}}}.tar" if last else "00000.tar"))


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644  # no clock or owner: the same folder gives the same bytes
    return info


def _metadata_by_file(root: Path) -> dict[Path, dict]:
    """metadata.jsonl's records by resolved image path (their extra fields go to KEY.json)."""
    meta = root / "metadata.jsonl"
    out: dict[Path, dict] = {}
    if meta.is_file():
        for line in meta.read_text(encoding="utf-8-sig", errors="replace").splitlines():
            if line.strip():
                rec = json.loads(line)  # the dataset reader has validated every line already
                out[(root / rec["file_name"]).resolve()] = rec
    return out


def write_shards(folder: str | Path, out: str | Path, shard_size: int = 1000, *, size: int | None = None,
                 include_holdout: bool = False) -> ShardsWritten:
    """Pack an image-caption folder (any layout ``ImageCaptionDataset`` reads) into ``out/00000.tar``, ...

    Samples go in the folder's order, ``shard_size`` per shard, each shard written under a temporary name
    and renamed. Images are copied byte for byte, or with ``size`` resized and centre-cropped to PNG. Keys
    listed in ``holdout.json`` are left out unless ``include_holdout``.
    """
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {shard_size}")
    root, out = Path(folder), Path(out)
    ds = ImageCaptionDataset(root, size or 1)
    held = set() if include_holdout else read_holdout(root)
    records = [r for r in ds.records if r.key not in held]
    if not records:
        raise ValueError(f"{root}: every image is held out (holdout.json); pass --include-holdout")
    meta = _metadata_by_file(root)
    out.mkdir(parents=True, exist_ok=True)
    shards = 0
    for start in range(0, len(records), shard_size):
        with replacing(out / f"{shards:05d}.tar") as tmp, tarfile.open(tmp, "w") as tar:
            for r in records[start: start + shard_size]:
                key = re.sub(r"[^\w/-]", "_", r.key)  # a dot would end the key early
                if size:
                    buf = io.BytesIO()
                    Image.fromarray(load_image(r.path, size).permute(1, 2, 0).numpy()).save(buf, format="PNG")
                    data, ext = buf.getvalue(), "png"
                else:
                    data, ext = r.path.read_bytes(), r.path.suffix.lower().lstrip(".")
                files = [(f"{key}.{ext}", data), (f"{key}.txt", r.caption.encode())]
                extra = {k: v for k, v in meta.get(r.path.resolve(), {}).items() if k != "file_name"}
                if extra:
                    files.append((f"{key}.json", json.dumps({"key": r.key, **extra}, ensure_ascii=False).encode()))
                for name, blob in files:
                    tar.addfile(_tarinfo(name, len(blob)), io.BytesIO(blob))
        shards += 1
    return ShardsWritten(out, len(records), shards, len(ds.records) - len(records))


# ---------------------------------------------------------------- reading


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset naming: 'dir/abc.0001.png' -> ('dir/abc', '0001.png'): the key ends at the first
    dot of the last path component."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def tar_samples(shard: Path, skip: int = 0) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample that has an image, members grouped by consecutive key.

    The first ``skip`` such samples are passed over by their headers (their data is seeked over, not
    read) and not yielded; the generator's return value is how many it passed over."""
    key: str | None = None
    members: list[tarfile.TarInfo] = []
    passed = 0

    def image(ms: list[tarfile.TarInfo]) -> bool:
        return any(_split_member(m.name)[1] in SHARD_IMAGE_EXTS for m in ms)

    try:
        with tarfile.open(shard, "r:") as tar:
            def flush() -> Iterator[tuple[str, dict[str, bytes]]]:
                nonlocal passed
                if key is None or not image(members):
                    return
                if passed < skip:
                    passed += 1
                    return
                yield key, {_split_member(m.name)[1]: tar.extractfile(m).read() for m in members}

            for m in tar:
                tar.members.clear()  # tarfile keeps every header it has read; a stream must not
                if not m.isfile():
                    continue
                k = _split_member(m.name)[0]
                if k != key:
                    yield from flush()
                    key, members = k, []
                members.append(m)
            yield from flush()
    except (tarfile.TarError, OSError, EOFError) as e:
        log.warning("%s: unreadable tar shard (%s); the rest of this shard is skipped", shard, e)
    return passed


def tar_caption(shard: Path, key: str, files: dict[str, bytes]) -> str:
    """KEY.txt, else the text field of KEY.json, else the empty caption."""
    if "txt" in files:
        try:
            return files["txt"].decode("utf-8-sig").strip()
        except UnicodeDecodeError:
            log.warning("%s: %s.txt is not valid UTF-8; undecodable bytes replaced", shard, key)
            return files["txt"].decode("utf-8", errors="replace").strip()
    if "json" in files:
        try:
            meta = json.loads(files["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            log.warning("%s: %s.json is not valid JSON (%s); empty caption", shard, key, e)
            return ""
        if isinstance(meta, dict):
            return str(next((meta[f] for f in TEXT_FIELDS if f in meta), "")).strip()
    return ""


class ShardStream(IterableDataset):
    """An endless, positioned stream of ``{"image": (3, size, size) uint8, "caption", "key", "pos"}``.

    ``pos`` is (reader, epoch, k); see the module docstring. ``rank``/``world_size`` are the data-parallel
    process; DataLoader workers split a rank further (worker i reads as reader slot (i + phase) mod workers,
    so a resumed loader starts with the reader an uninterrupted one would have used next). ``start`` maps
    a reader to the (epoch, k) it begins at; ``epochs`` ends the stream (for tests; None: endless).
    """

    def __init__(self, shards: list[Path], size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 workers: int = 0, buffer: int = 1000, start: dict[int, tuple[int, int]] | None = None,
                 phase: int = 0, epochs: int | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if buffer < 1:
            raise ValueError(f"the shuffle buffer holds at least 1 sample, got {buffer}")
        self.shards, self.size, self.seed, self.buffer = list(shards), size, seed, buffer
        self.rank, self.world_size, self.workers = rank, world_size, max(workers, 1)
        self.start, self.phase, self.epochs = dict(start or {}), phase, epochs

    @property
    def readers(self) -> int:
        return self.world_size * self.workers

    def reader_ids(self) -> list[int]:
        """The readers this rank's workers play, in the order a DataLoader visits them."""
        base = self.rank * self.workers
        return [base + (i + self.phase) % self.workers for i in range(self.workers)]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if (info.num_workers if info is not None else 1) != self.workers:
            raise ValueError(f"ShardStream made for {self.workers} workers, read by "
                             f"{info.num_workers if info else 1}")
        reader = self.reader_ids()[worker]
        epoch, k = self.start.get(reader, (0, 0))
        while self.epochs is None or epoch < self.epochs:
            read = yield from self._epoch(reader, epoch, k)
            if not read and not k:  # else an endless stream would spin on nothing
                raise ValueError(f"reader {reader} of {self.readers} (ranks x data workers) found no samples in "
                                 f"epoch {epoch}: shards missing or unreadable, or fewer samples than readers")
            epoch, k = epoch + 1, 0

    def _raw(self, reader: int, epoch: int, skip: int) -> Iterator[tuple[Path, str, dict[str, bytes]]]:
        """This reader's samples of ``epoch`` in shard order (before the buffer's shuffle), the first
        ``skip`` passed over by their headers."""
        n = self.readers
        order = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch, 7]).permutation(len(self.shards)).tolist()
        if len(order) >= n:  # by shard
            for s in order[reader::n]:
                samples = tar_samples(self.shards[s], skip)
                while True:
                    try:
                        k, f = next(samples)
                    except StopIteration as done:  # its value: how many samples it passed over
                        skip -= done.value or 0
                        break
                    yield self.shards[s], k, f
            return
        running = 0  # fewer shards than readers: by running sample index
        for s in order:
            for k, f in tar_samples(self.shards[s]):  # reads every sample: only small datasets get here
                running += 1
                if (running - 1) % n == reader:
                    if skip:
                        skip -= 1
                    else:
                        yield self.shards[s], k, f

    def _epoch(self, reader: int, epoch: int, k0: int) -> Generator[dict, None, int]:
        """The samples from position ``k0`` of ``epoch`` on; returns how many samples it read."""
        block = k0 // self.buffer
        raw = self._raw(reader, epoch, block * self.buffer)
        read = 0
        while True:
            items = [x for _, x in zip(range(self.buffer), raw, strict=False)]
            read += len(items)
            if not items:
                return read
            perm = np.random.default_rng([self.seed & 0xFFFFFFFF, reader, epoch, block]).permutation(len(items))
            for j in range(max(0, k0 - block * self.buffer), len(items)):
                item = self._decode(*items[perm[j]])
                if item is not None:
                    item["pos"] = (reader, epoch, block * self.buffer + j)
                    yield item
            if len(items) < self.buffer:
                return read
            k0, block = 0, block + 1

    def _decode(self, shard: Path, key: str, files: dict[str, bytes]) -> dict | None:
        ext = next(e for e in SHARD_IMAGE_EXTS if e in files)
        try:
            image: Tensor = load_image(io.BytesIO(files[ext]), self.size)
        except _DECODE_ERRORS as e:
            log.warning("%s: %s.%s cannot be decoded (%s); skipped", shard, key, ext, e)
            return None
        return {"image": image, "caption": tar_caption(shard, key, files), "key": key}

