"""ldmkit: Stable Diffusion from the model up."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Pipeline", "load", "__version__"]


def __getattr__(name: str):
    # imported lazily so `import ldmkit.config` stays light (no torch model code, no PIL)
    if name in ("Pipeline", "load"):
        from ldmkit import api

        return getattr(api, name)
    raise AttributeError(f"module 'ldmkit' has no attribute {name!r}")
