"""ldmkit: Stable Diffusion from the model up."""

__version__ = "0.1.0"

from ldmkit.api import Pipeline, load  # noqa: E402

__all__ = ["Pipeline", "load", "__version__"]
