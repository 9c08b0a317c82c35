"""A1111's LoRA and embedding routes: ``/sdapi/v1/loras``, ``/refresh-loras``, ``/embeddings``,
``/refresh-embeddings``, over the folders of ``ldmkit serve --lora-dir / --embeddings-dir``.

The folders belong to the server; every model it loads gets them (:func:`ldmkit.api.attach_folders`), so
``<lora:NAME:W>`` and embedding words work after a checkpoint switch too. A file that fails to read is
listed with its error, never a 500.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from ldmkit.embeddings import EmbeddingTable
from ldmkit.networks import NetworkFolder, read_metadata


class NetworkFolders:
    """The server's LoRA folder and embeddings table (either may be None)."""

    def __init__(self, lora_dir: str | os.PathLike | None, embeddings_dir: str | os.PathLike | None):
        try:
            self.loras = NetworkFolder(lora_dir) if lora_dir is not None else None
            self.embeddings = EmbeddingTable(embeddings_dir) if embeddings_dir is not None else None
        except NotADirectoryError as e:
            raise ValueError(str(e)) from None

    def attach(self, model: Any) -> Any:
        """Give a freshly loaded model the server's folders; returns it."""
        if self.loras is not None:
            model.lora_folder = self.loras
        if self.embeddings is not None:
            model.embedding_table = self.embeddings
        return model


def lora_items(folder: NetworkFolder | None) -> list[dict[str, Any]]:
    """A1111's /sdapi/v1/loras items: name (the file stem a prompt uses), alias, path, metadata."""
    if folder is None:
        return []
    out = []
    for path in folder.files():
        meta = read_metadata(path)
        out.append({"name": path.stem, "alias": meta.get("ss_output_name", path.stem), "path": str(path),
                    "metadata": meta})
    return out


def embedding_items(table: EmbeddingTable | None, widths: list[int]) -> dict[str, dict[str, Any]]:
    """A1111's /sdapi/v1/embeddings: ``loaded`` (usable with the current model's text encoders) and
    ``skipped`` (another model's width, or a file that failed to load, with its error)."""
    loaded: dict[str, Any] = {}
    skipped: dict[str, Any] = {}
    if table is None:
        return {"loaded": loaded, "skipped": skipped}
    for emb in table.embeddings:
        first = next(iter(emb.vectors.values()))
        item = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": first.shape[-1],
                "vectors": emb.n_vectors}
        usable = any(emb.for_width(w) is not None for w in widths)
        (loaded if usable else skipped)[emb.name] = item
    for name, error in table.errors.items():
        skipped[name] = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None,
                         "vectors": 0, "error": error}
    return {"loaded": loaded, "skipped": skipped}


def text_widths(model: Any) -> list[int]:
    encoders = getattr(model, "encoders", None) or [model.text_encoder]
    return [enc.cfg.width for enc in encoders]


def add_network_routes(app: FastAPI, *, folders: NetworkFolders, current_model: Callable[[], Any]) -> None:
    @app.get("/sdapi/v1/loras", tags=["sdapi"])
    def loras() -> list[dict[str, Any]]:
        """LoRA/LyCORIS files of --lora-dir; a prompt applies one with <lora:NAME:WEIGHT>."""
        return lora_items(folders.loras)

    @app.post("/sdapi/v1/refresh-loras", tags=["sdapi"])
    def refresh_loras() -> None:
        if folders.loras is not None:
            folders.loras.refresh()

    @app.get("/sdapi/v1/embeddings", tags=["sdapi"])
    def embeddings() -> dict[str, dict[str, Any]]:
        """Textual-inversion embeddings of --embeddings-dir: their file names are words of a prompt."""
        return embedding_items(folders.embeddings, text_widths(current_model()))

    @app.post("/sdapi/v1/refresh-embeddings", tags=["sdapi"])
    def refresh_embeddings() -> None:
        if folders.embeddings is not None:
            folders.embeddings.refresh()

