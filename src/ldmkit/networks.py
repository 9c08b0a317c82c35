"""LoRAs named in the prompt (``<lora:NAME:W>``), applied per generation and taken off again.

A :class:`NetworkFolder` maps names to files (the file stem, as A1111 names them; subfolders included).
Folders are untrusted: a name from a prompt is only ever looked up in the folder's listing, so a name
with a path separator or ``..`` resolves to nothing, and a file that fails to load becomes a warning.

:func:`apply_networks` puts a generation's LoRAs on the model: the weights of every module a LoRA touches
are backed up the first time, the parsed files (and their resolution against the model) are cached, and
a request with a different set (or none) first copies the backups back, so weights return bit for bit
and switching LoRAs never reloads the model. A request with the same set as the last one changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ldmkit.checkpoint import CheckpointError
from ldmkit.lora import merge_into, resolve_lora
from ldmkit.lora_formats import LoRAFile, read_lora_file
from ldmkit.prompt import NetworkTag, extract_network_tags

LORA_EXTENSIONS = (".safetensors", ".pt", ".ckpt", ".bin")
CACHE_FILES = 4  # parsed LoRA files kept in memory per model (an SD1 LoRA is 10-150 MB)


class NetworkNameError(ValueError):
    """A name from a prompt that cannot be looked up (path separators, ``..``, or no such file)."""


def check_name(name: str, what: str = "LoRA") -> str:
    """``name`` if it can only name a file of the folder itself; NetworkNameError otherwise."""
    if not name or any(c in name for c in "/\\\0") or name in (".", "..") or ".." in name or ":" in name:
        raise NetworkNameError(f"{what} name {name!r} is refused: a name is a file name in the folder, without "
                               "path separators or '..'")
    return name


class NetworkFolder:
    """Files of a LoRA or embeddings folder by name (file stem, case-insensitive); rescanned by :meth:`refresh`."""

    def __init__(self, path: str | os.PathLike, extensions: tuple[str, ...] = LORA_EXTENSIONS, what: str = "LoRA"):
        self.path = Path(path)
        self.extensions, self.what = extensions, what
        if not self.path.is_dir():
            raise NotADirectoryError(f"{self.path}: no such {what} folder")
        self._index: dict[str, Path] | None = None
        self._aliases: dict[str, Path] | None = None
        self._lock = threading.Lock()

    def refresh(self) -> None:
        index: dict[str, Path] = {}
        for root, dirs, files in os.walk(self.path, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for f in sorted(files):
                p = Path(root) / f
                if p.suffix.lower() in self.extensions and not f.startswith("."):
                    index.setdefault(p.stem.lower(), p)  # the first by path order wins a clash
        with self._lock:
            self._index, self._aliases = index, None

    @property
    def index(self) -> dict[str, Path]:
        if self._index is None:
            self.refresh()
        assert self._index is not None
        return self._index

    def names(self) -> list[str]:
        return sorted((p.stem for p in self.index.values()), key=str.lower)

    def find(self, name: str) -> Path:
        check_name(name, self.what)
        path = self.index.get(name.lower()) or self.aliases().get(name.lower())
        if path is None:
            raise NetworkNameError(f"{self.what} not found: {name!r} (no such file in {self.path})")
        return path

    def aliases(self) -> dict[str, Path]:
        """A1111's second name of a LoRA: the ``ss_output_name`` its trainer wrote into the file's header
        (an alias two files share names neither)."""
        if self._aliases is None:
            seen: dict[str, list[Path]] = {}
            for path in self.index.values():
                alias = read_metadata(path).get("ss_output_name", "").strip().lower()
                if alias and alias not in self.index:
                    seen.setdefault(alias, []).append(path)
            self._aliases = {a: ps[0] for a, ps in seen.items() if len(ps) == 1}
        return self._aliases

    def files(self) -> list[Path]:
        return sorted(self.index.values(), key=lambda p: p.stem.lower())


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a .safetensors header ({} for other files or a header that does not parse)."""
    if not str(path).endswith(".safetensors"):
        return {}
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= 100_000_000:
                return {}
            meta = json.loads(f.read(n)).get("__metadata__") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def short_hash(path: str | os.PathLike) -> str:
    """A1111's LoRA hash (``Lora hashes`` infotext): SHA-256 of a .safetensors file's tensor data (the
    "addnet" hash, header excluded, so metadata edits keep it), of the whole file otherwise; 12 digits."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if str(path).lower().endswith(".safetensors"):
            n = int.from_bytes(f.read(8), "little")
            f.seek(n + 8)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


@dataclass
class NetworkReport:
    """What a generation's LoRA tags did: the infotext's ``Lora hashes`` and warnings for the response."""

    hashes: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    ti_hashes: dict[str, str] = field(default_factory=dict)  # textual-inversion embeddings the prompts use

    def infotext_fields(self) -> dict[str, str]:
        out = {}
        if self.hashes:
            out["Lora hashes"] = json.dumps(", ".join(f"{k}: {v}" for k, v in self.hashes.items()), ensure_ascii=False)
        if self.ti_hashes:
            out["TI hashes"] = json.dumps(", ".join(f"{k}: {v}" for k, v in self.ti_hashes.items()),
                                          ensure_ascii=False)
        if self.warnings:
            out["Prompt warnings"] = json.dumps("; ".join(self.warnings), ensure_ascii=False)
        return out


@dataclass
class _Loaded:
    key: tuple  # (resolved path, mtime, size): a changed file is read again
    lora: LoRAFile
    hash: str
    pairs: list | None = None  # resolve_lora's (target, update) pairs on this model


class AppliedNetworks:
    """Per model: the LoRAs on its weights now, backups of the weights they changed, and parsed files."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.applied: tuple = ()
        self.backups: dict[int, tuple[nn.Module, Tensor, Tensor | None]] = {}
        self.cache: OrderedDict[tuple, _Loaded] = OrderedDict()
        self.report = NetworkReport()

    def load(self, path: Path) -> _Loaded:
        st = path.stat()
        key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        loaded = _Loaded(key, read_lora_file(path), short_hash(path))
        self.cache[key] = loaded
        while len(self.cache) > CACHE_FILES:
            self.cache.popitem(last=False)
        return loaded

    def restore(self) -> None:
        with torch.no_grad():
            for mod, weight, bias in self.backups.values():
                mod.weight.copy_(weight)
                if bias is not None:
                    mod.bias.copy_(bias)
        self.backups.clear()
        self.applied = ()

    def set(self, model: nn.Module, loaded: list[tuple[_Loaded, float, float]]) -> None:
        key = tuple((lo.key, te, unet) for lo, te, unet in loaded)
        if key == self.applied:
            return
        self.restore()
        with torch.no_grad():
            for lo, te, unet in loaded:
                for target, update in self.resolve(model, lo):
                    mod = target.module
                    if id(mod) not in self.backups:  # back up what the merge will change
                        bias = mod.bias.detach().clone() if getattr(mod, "bias", None) is not None else None
                        self.backups[id(mod)] = (mod, mod.weight.detach().clone(), bias)
                    merge_into(mod, update, unet if target.where.startswith("unet.") else te)
        self.applied = key

    @staticmethod
    def resolve(model: nn.Module, lo: _Loaded) -> list:
        if lo.pairs is None:
            lo.pairs = resolve_lora(model, lo.lora)
        return lo.pairs


def state(model: nn.Module) -> AppliedNetworks:
    st = model.__dict__.get("_applied_networks")
    if st is None:
        st = AppliedNetworks()
        model.__dict__["_applied_networks"] = st
    return st


def apply_networks(model: nn.Module, tags: list[NetworkTag], folder: NetworkFolder | None,
                   strict: bool = False) -> NetworkReport:
    """Put exactly the LoRAs ``tags`` name on ``model`` (none: restore its own weights).

    A name that is refused, missing or fails to load is a warning in the report (A1111 goes on without
    it); with ``strict`` it is a NetworkNameError / CheckpointError instead.
    """
    report = NetworkReport()
    st = state(model)
    with st.lock:
        loaded = []
        for tag in tags:
            try:
                if folder is None:
                    raise NetworkNameError(f"<lora:{tag.name}> names a LoRA but no LoRA folder is set (--lora-dir)")
                lo = st.load(folder.find(tag.name))
                st.resolve(model, lo)  # a LoRA for another model family is a warning, not a crash
            except (NetworkNameError, CheckpointError, OSError) as e:
                if strict:
                    raise
                report.warnings.append(str(e))
                continue
            loaded.append((lo, tag.te, tag.unet if tag.unet is not None else tag.te))
            report.hashes[tag.name] = lo.hash
        st.set(model, loaded)
    return report


def apply_prompt_networks(model: nn.Module, prompts: list[str], negatives: list[str],
                          strict: bool = False) -> tuple[list[str], list[str], NetworkReport]:
    """The generation hook: the LoRA tags of the first prompt applied (A1111 takes a batch's networks
    from its first prompt), the tags removed from every prompt and negative prompt; ``model.lora_folder``
    (set by ``ldmkit.api.load(lora_dir=...)``) is where names are looked up."""
    clean, tags, bad = [], [], []
    for i, p in enumerate(prompts):
        text, found, warnings = extract_network_tags(p)
        clean.append(text)
        if i == 0:
            tags, bad = found, warnings
    clean_neg = [extract_network_tags(n)[0] for n in negatives]
    folder = getattr(model, "lora_folder", None)
    if not tags and not has_networks(model):
        report = NetworkReport(warnings=bad)
    else:
        report = apply_networks(model, tags, folder, strict or getattr(model, "lora_strict", False))
        report.warnings[:0] = bad
    table = getattr(model, "embedding_table", None)
    if hasattr(table, "used_in"):  # A1111's "TI hashes" of the embeddings used, and words whose file failed to load
        tok = model.tokenizers[0] if hasattr(model, "tokenizers") else model.tokenizer
        for text in dict.fromkeys(clean[:1] + clean_neg[:1]):
            used, warnings = table.used_in(tok, model.text_encoder.cfg.width, text)
            report.ti_hashes.update({e.name: table.file_hash(e) for e in used})
            report.warnings += [w for w in warnings if w not in report.warnings]
    state(model).report = report
    return clean, clean_neg, report


def last_report(model: nn.Module) -> NetworkReport:
    """The report of the model's latest prompt encoding (what the infotext and the CLI/server show)."""
    st = model.__dict__.get("_applied_networks")
    return st.report if st is not None else NetworkReport()


def has_networks(model: nn.Module) -> bool:
    st = model.__dict__.get("_applied_networks")
    return st is not None and bool(st.applied)
