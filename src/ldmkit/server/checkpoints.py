"""The models a server can switch between, named as A1111 names them: ``"file.safetensors [shorthash]"``."""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from ldmkit.model import StableDiffusion

_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class CheckpointInfo:
    """One model file (or diffusers folder) with A1111's names for it."""

    name: str  # path relative to the models folder, e.g. "sd/v1-5.safetensors"
    filename: str  # absolute path
    sha256: str | None  # None for diffusers folders and in-memory models

    @property
    def shorthash(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None

    @property
    def title(self) -> str:
        return f"{self.name} [{self.shorthash}]" if self.shorthash else self.name

    @property
    def model_name(self) -> str:
        return os.path.splitext(self.name)[0].replace("/", "_").replace("\\", "_")

    def aliases(self) -> set[str]:
        names = {self.title, self.name, self.model_name, os.path.splitext(self.name)[0], self.filename}
        if self.sha256:
            names |= {self.sha256, self.shorthash or ""}
        return names

    def as_item(self) -> dict:
        return {"title": self.title, "model_name": self.model_name, "hash": self.shorthash,
                "sha256": self.sha256, "filename": self.filename, "config": None}


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Catalogue:
    """Model files in ``models_dir`` plus any model given directly; SHA-256 cached by (path, size, mtime)."""

    def __init__(self, models_dir: str | os.PathLike | None = None):
        self.models_dir = Path(models_dir) if models_dir else None
        if self.models_dir is not None and not self.models_dir.is_dir():
            raise FileNotFoundError(f"--models-dir {self.models_dir}: no such folder")
        self._extra: dict[str, CheckpointInfo] = {}
        self._hashes: dict[tuple[str, int, int], str] = {}
        self._lock = threading.Lock()

    def _hash(self, path: Path) -> str:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            if key not in self._hashes:
                self._hashes[key] = file_sha256(path)
            return self._hashes[key]

    def info_for_path(self, path: str | os.PathLike) -> CheckpointInfo:
        p = Path(path).resolve()
        name = p.name
        if self.models_dir is not None and p.is_relative_to(self.models_dir.resolve()):
            name = p.relative_to(self.models_dir.resolve()).as_posix()
        return CheckpointInfo(name, str(p), None if p.is_dir() else self._hash(p))

    def add(self, info: CheckpointInfo) -> None:
        self._extra[info.filename] = info

    def add_model(self, model: StableDiffusion) -> CheckpointInfo:
        """A model given as an object: its file if it came from one, else its name."""
        if model.source_path and Path(model.source_path).exists():
            info = self.info_for_path(model.source_path)
        else:
            info = CheckpointInfo(model.source_name, f"<in memory: {model.source_name}>", None)
        self.add(info)
        return info

    def scan(self) -> list[CheckpointInfo]:
        found: dict[str, CheckpointInfo] = dict(self._extra)
        if self.models_dir is not None:
            for p in sorted(self.models_dir.rglob("*")):
                is_diffusers = p.is_dir() and (p / "unet").is_dir() and (p / "vae").is_dir()
                if (p.is_file() and p.suffix.lower() in _SUFFIXES) or is_diffusers:
                    info = self.info_for_path(p)
                    found.setdefault(info.filename, info)
        return sorted(found.values(), key=lambda i: i.title.lower())

    def find(self, name: str) -> CheckpointInfo | None:
        """A1111 accepts a title, file name, model name or hash; so do we."""
        infos = self.scan()
        for info in infos:
            if name in info.aliases():
                return info
        bare = name.rsplit(" [", 1)[0]  # a title whose hash is stale
        return next((i for i in infos if bare in i.aliases()), None)
