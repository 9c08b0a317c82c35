"""Textual-inversion embeddings (Gal et al. 2022): a folder of files whose names are new words.

The file name (stem) is the word, as in A1111. A word of the prompt that spells an embedding's name
becomes its vectors in place of its tokens (:func:`ldmkit.prompt.tokenize_chunks`), counted against the
75-token chunks as A1111 counts them: an embedding that no longer fits the current chunk starts the next.

File kinds, told apart by their contents:

- A1111 ``.pt``: ``{"string_to_param": {"*": (n, D)}, "name": ..., ...}`` read with ``weights_only=True``
  (no pickled code runs); A1111 ``.safetensors``: ``emb_params`` (n, D).
- diffusers ``learned_embeds.bin`` / ``.safetensors``: ``{"<token>": (D,) or (n, D)}``, one entry.
- SDXL: ``clip_l`` (n, 768) and ``clip_g`` (n, 1280), one per text encoder.

An embedding whose width fits none of the model's encoders is skipped (the word stays text), as A1111 does.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ldmkit.checkpoint import CheckpointError, read_safetensors
from ldmkit.models.tokenizer import CLIPTokenizer
from ldmkit.networks import NetworkFolder

EMBEDDING_EXTENSIONS = (".pt", ".safetensors", ".bin")


@dataclass(frozen=True)
class Embedding:
    name: str
    vectors: dict[str, Tensor]  # "" (one encoder), or "clip_l" / "clip_g" (SDXL): (n, D) each
    path: str = ""

    @property
    def n_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    def for_width(self, width: int, prefer: str = "") -> Tensor | None:
        """The vectors for an encoder of ``width`` (``prefer``: the SDXL key of that encoder), or None."""
        for key in (prefer, "", "clip_l", "clip_g"):
            v = self.vectors.get(key)
            if v is not None and v.shape[-1] == width:
                return v
        return None


def _as_matrix(t: object, what: str) -> Tensor:
    if not isinstance(t, Tensor) or not t.is_floating_point() or t.ndim not in (1, 2) or t.numel() == 0:
        raise CheckpointError(f"{what} is not a vector or an (n, width) matrix of floats")
    return t.detach().float().reshape(-1, t.shape[-1])


def embedding_from_data(data: object, name: str, path: str = "") -> Embedding:
    """An embedding from a file's contents (any of the kinds above); CheckpointError naming what is wrong."""
    where = path or name
    if not isinstance(data, dict) or not data:
        raise CheckpointError(f"{where}: not a textual-inversion embedding (no tensors)")
    if "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise CheckpointError(f"{where}: string_to_param must hold exactly one tensor")
        return Embedding(name, {"": _as_matrix(next(iter(params.values())), f"{where}: string_to_param")}, path)
    if "emb_params" in data:  # A1111 .safetensors
        return Embedding(name, {"": _as_matrix(data["emb_params"], f"{where}: emb_params")}, path)
    if "clip_l" in data or "clip_g" in data:  # SDXL
        vectors = {k: _as_matrix(data[k], f"{where}: {k}") for k in ("clip_l", "clip_g") if k in data}
        if len({v.shape[0] for v in vectors.values()}) != 1:
            raise CheckpointError(f"{where}: clip_l and clip_g hold different numbers of vectors")
        return Embedding(name, vectors, path)
    tensors = {k: v for k, v in data.items() if isinstance(v, Tensor)}
    if len(tensors) == 1:  # diffusers learned_embeds: {"<token>": vector}
        key, t = next(iter(tensors.items()))
        return Embedding(name, {"": _as_matrix(t, f"{where}: {key}")}, path)
    keys = ", ".join(list(map(str, data))[:4])
    raise CheckpointError(f"{where}: not a textual-inversion embedding (keys {keys}; expected string_to_param, "
                          "emb_params, clip_l/clip_g or one learned vector)")


def load_embedding(path: str | os.PathLike) -> Embedding:
    """Read one embedding file; its word is the file name without extension."""
    p = Path(path)
    if p.suffix.lower() == ".safetensors":
        data: object = read_safetensors(p)[0]
    else:
        try:
            data = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad or unsafe file
            raise CheckpointError(f"{p}: not a readable embedding ({type(e).__name__}: {str(e).splitlines()[0][:200]});"
                                  " it may be corrupt or hold pickled code, which ldmkit does not run") from None
    return embedding_from_data(data, p.stem, str(p))


class EmbeddingMatcher:
    """Finds embedding names in a token stream for one tokenizer and encoder width."""

    def __init__(self, embeddings: list[Embedding], tok: CLIPTokenizer, width: int, prefer: str = ""):
        self.by_first: dict[int, list[tuple[tuple[int, ...], Tensor, str]]] = {}
        self.skipped: list[str] = []
        for emb in embeddings:
            vec = emb.for_width(width, prefer)
            ids = tuple(tok.encode(emb.name))
            if vec is None or not ids:
                self.skipped.append(emb.name)
                continue
            self.by_first.setdefault(ids[0], []).append((ids, vec, emb.name))
        for v in self.by_first.values():
            v.sort(key=lambda e: -len(e[0]))  # the longest name that matches wins

    def match(self, tokens: list[int], pos: int) -> tuple[Tensor, int, str] | None:
        """(vectors, number of prompt tokens the name spans, name) of the embedding named at ``pos``."""
        for ids, vec, name in self.by_first.get(tokens[pos], ()):
            if tuple(tokens[pos:pos + len(ids)]) == ids:
                return vec, len(ids), name
        return None


class EmbeddingTable:
    """The embeddings of a folder, loaded on first use; files that fail to load are listed in ``errors``."""

    def __init__(self, folder: str | os.PathLike | NetworkFolder):
        self.folder = folder if isinstance(folder, NetworkFolder) else \
            NetworkFolder(folder, EMBEDDING_EXTENSIONS, "embedding")
        self._lock = threading.Lock()
        self._loaded: list[Embedding] | None = None
        self.errors: dict[str, str] = {}
        self._matchers: dict[tuple, EmbeddingMatcher] = {}
        self._hashes: dict[str, str] = {}

    def refresh(self) -> None:
        self.folder.refresh()
        loaded, errors = [], {}
        for path in self.folder.files():
            try:
                loaded.append(load_embedding(path))
            except (CheckpointError, OSError) as e:
                errors[path.stem] = str(e)
        with self._lock:
            self._loaded, self.errors, self._matchers, self._hashes = loaded, errors, {}, {}

    @property
    def embeddings(self) -> list[Embedding]:
        if self._loaded is None:
            self.refresh()
        assert self._loaded is not None
        return self._loaded

    def used_in(self, tok: CLIPTokenizer, width: int, prompt: str) -> tuple[list[Embedding], list[str]]:
        """(embeddings for an encoder of ``width`` whose word the prompt has, warnings for its words whose file
        failed to load)."""
        ids = tok.encode(prompt)
        used = []
        for emb in self.embeddings:
            name = tok.encode(emb.name) if emb.for_width(width) is not None else []
            if name and any(ids[i:i + len(name)] == name for i in range(len(ids) - len(name) + 1)):
                used.append(emb)
        words = set(re.findall(r"[\w.-]+", prompt.lower()))
        warnings = [f"embedding {name!r} not used: {err}" for name, err in self.errors.items() if name.lower() in words]
        return used, warnings

    def file_hash(self, emb: Embedding) -> str:
        """A1111's ``TI hashes`` entry: the first 12 hex digits of the file's SHA-256 (cached)."""
        if emb.path not in self._hashes:
            h = hashlib.sha256()
            with open(emb.path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            self._hashes[emb.path] = h.hexdigest()[:12]
        return self._hashes[emb.path]

    def matcher(self, tok: CLIPTokenizer, width: int, prefer: str = "") -> EmbeddingMatcher:
        embeddings = self.embeddings
        key = (id(tok), width, prefer)
        with self._lock:
            if key not in self._matchers:
                self._matchers[key] = EmbeddingMatcher(embeddings, tok, width, prefer)
            return self._matchers[key]
