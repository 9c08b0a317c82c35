"""The ``sd_vae`` option: decoders a server can switch to, from a folder of VAE files (``--vae-dir``).

A1111 lists VAE files by name (``/sdapi/v1/sd-vae``) and the option ``sd_vae`` picks one by that name;
"Automatic" and "None" mean the model's own. Both KL autoencoders (SD's VAE, e.g. ``vae-ft-mse``) and
tiny ones (TAESD) are accepted; the chosen one replaces ``model.vae`` while a job runs, so the final
decode, img2img's encode and the "Full" live preview all use it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ldmkit.model import StableDiffusion

VAE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
DEFAULT_NAMES = ("Automatic", "None")  # A1111's values for "the model's own VAE"
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


@dataclass(frozen=True)
class VAEInfo:
    model_name: str  # path relative to the folder: the value of the sd_vae option
    filename: str  # absolute path (a file, or a diffusers folder)

    def as_item(self) -> dict:
        return {"model_name": self.model_name, "filename": self.filename}


def _is_diffusers_vae(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").is_file() and any((p / f).is_file() for f in _DIFFUSERS_WEIGHTS)


class VAECatalogue:
    """VAE files and diffusers VAE folders under ``vae_dir``; loaded decoders cached per model architecture."""

    def __init__(self, vae_dir: str | os.PathLike | None = None):
        self.vae_dir = Path(vae_dir) if vae_dir else None
        if self.vae_dir is not None and not self.vae_dir.is_dir():
            raise FileNotFoundError(f"--vae-dir {self.vae_dir}: no such folder")
        self._cache: dict[tuple, nn.Module] = {}
        self._lock = threading.Lock()

    def scan(self) -> list[VAEInfo]:
        if self.vae_dir is None:
            return []
        root = self.vae_dir.resolve()
        found: list[VAEInfo] = []
        folders: list[Path] = []
        for p in sorted(root.rglob("*")):
            if any(p.is_relative_to(f) for f in folders):
                continue  # the weights inside a diffusers folder are not VAEs of their own
            if _is_diffusers_vae(p):
                folders.append(p)
            elif not (p.is_file() and p.suffix.lower() in VAE_SUFFIXES):
                continue
            found.append(VAEInfo(p.relative_to(root).as_posix(), str(p)))
        return found

    def find(self, name: str) -> VAEInfo | None:
        """By name (as listed), file name, or path; None for an unknown one."""
        for info in self.scan():
            if name in (info.model_name, Path(info.model_name).name, info.filename):
                return info
        return None

    def valid_names(self) -> str:
        return ", ".join([*DEFAULT_NAMES, *(i.model_name for i in self.scan())])

    def decoder(self, info: VAEInfo, model: StableDiffusion) -> nn.Module:
        """The VAE as a module that can stand in for ``model.vae`` (same encode/decode contract)."""
        # a decoder-only tiny file borrows this model's KL encoder, and files may be replaced on disk
        key = (info.filename, Path(info.filename).stat().st_mtime_ns, id(model), repr(model.cfg.vae))
        with self._lock:
            if key not in self._cache:
                self._cache.clear()  # one switched-to VAE at a time is enough; don't hoard memory
                self._cache[key] = load_vae_module(info.filename, model)
            return self._cache[key].to(model.device, model.dtype)


def load_vae_module(path: str | os.PathLike, model: StableDiffusion) -> nn.Module:
    """A KL VAE (LDM or diffusers layout, file or folder) or a tiny autoencoder, fitted to ``model``."""
    from ldmkit.checkpoint import load_strict, load_vae_file
    from ldmkit.models.vae import AutoencoderKL

    p = Path(path)
    tiny = _load_tiny(p, model)
    if tiny is not None:
        return tiny
    weights = next((p / f for f in _DIFFUSERS_WEIGHTS if (p / f).is_file()), p) if p.is_dir() else p
    vae = AutoencoderKL(model.cfg.vae)
    load_strict(vae, load_vae_file(weights, model.cfg.vae), f"VAE {p.name}")
    return vae.eval().requires_grad_(False)


def _load_tiny(path: Path, model: StableDiffusion) -> nn.Module | None:
    """A tiny autoencoder wrapped to look like ``model.vae``; None when ``path`` is not one."""
    try:
        from ldmkit.models import taesd
    except ImportError:
        return None
    if not taesd.is_taesd(path):
        return None
    return taesd.as_vae(taesd.load_taesd(path), model)


@contextmanager
def using_vae(model: StableDiffusion, vae: nn.Module | None) -> Iterator[None]:
    """``model.vae`` is ``vae`` inside the block (None: unchanged). Only the worker thread touches models."""
    if vae is None:
        yield
        return
    own = model.vae
    model.vae = vae
    try:
        yield
    finally:
        model.vae = own


def check_name(catalogue: VAECatalogue, name: object) -> VAEInfo | None:
    """The VAE an ``sd_vae`` value names (None for the model's own); ValueError naming the valid ones."""
    if name is None or (isinstance(name, str) and name in DEFAULT_NAMES):
        return None
    info = catalogue.find(name) if isinstance(name, str) else None
    if info is None:
        where = f"in {catalogue.vae_dir}" if catalogue.vae_dir else "(start the server with --vae-dir DIR)"
        raise ValueError(f"no VAE {name!r} {where}; valid: {catalogue.valid_names()}")
    return info
