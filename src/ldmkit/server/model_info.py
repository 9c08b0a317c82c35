"""``GET /ldmkit/model``: what the web page needs to know about the loaded model (not part of A1111's API).

The page sets its width/height to the model's native size when the model changes (SDXL 1024², SDXL-Turbo and
SD1 512², SD2-v 768²) and offers a refiner (A1111's ``refiner_checkpoint``) only with an SDXL base model: the
catalogue's SDXL models, told apart by their keys and two shapes (``checkpoint_sdxl.sdxl_kind``, no weights read).
"""

from __future__ import annotations

from typing import Any


def register(app: Any, worker: Any, catalogue: Any) -> None:
    from ldmkit.checkpoint_sdxl import sdxl_kind

    @app.get("/ldmkit/model", tags=["ldmkit"])
    def model_info() -> dict:
        """The loaded model: title, family, native size, and the models that may refine it (SDXL base only)."""
        model, current = worker.model, worker.checkpoint
        refiners: list[str] = []
        if model.cfg.family == "sdxl" and not model.cfg.is_inpainting:
            kinds = {info.title: sdxl_kind(info.filename) for info in catalogue.scan()
                     if info.filename != current.filename}
            # the refiner first: the usual choice; another SDXL base can refine too (A1111 allows it)
            refiners = sorted((t for t, k in kinds.items() if k in ("SDXL refiner", "SDXL base")),
                              key=lambda t: (kinds[t] != "SDXL refiner", t))
        return {"title": current.title, "family": model.cfg.family, "native_size": model.cfg.native_size,
                "refiners": refiners}
