"""ldmkit: Stable Diffusion from the model up."""

__version__ = "0.1.0"
