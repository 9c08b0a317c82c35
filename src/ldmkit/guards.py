"""Non-finite numbers stopped at the edge (issue 15, hardening 9).

``float("nan")`` parses, and NaN passes every range check written as ``not lo <= x <= hi`` the wrong
way round; a NaN guidance scale then turns every latent into NaN, which the decoder renders as a
black image and the CLI reported as success. Arguments are refused when parsed, generation settings
when validated, and the sampler's output is watched step by step so a model or setting that still
produces NaN/inf fails with a message instead of a black picture.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports this module before torch is needed
    from torch import Tensor


def finite_float(text: str) -> float:
    """argparse ``type=``: a float that is neither NaN nor infinite."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return v


def non_finite_setting(values: dict[str, float | None]) -> str | None:
    """A message naming the first of ``values`` that is NaN or infinite, or None."""
    for name, v in values.items():
        if v is not None and isinstance(v, int | float) and not math.isfinite(v):
            return f"{name} must be a finite number, got {v}"
    return None


class NonFiniteError(ValueError):
    """The sampler produced NaN or infinite values."""


class FiniteDenoiser:
    """Wraps a denoiser ``(x, sigma) -> denoised``; raises ``error`` on the first call whose output holds NaN
    or inf, naming the call and the noise level. The check is one reduction over a latent."""

    def __init__(self, inner: Callable[[Tensor, Tensor], Tensor], cfg_scale: float | None = None,
                 error: type[Exception] = NonFiniteError):
        self.inner, self.cfg_scale, self.error, self.calls = inner, cfg_scale, error, 0

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        import torch

        out = self.inner(x, sigma)
        self.calls += 1
        lo, hi = torch.aminmax(out.detach().flatten())
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            s = float(sigma.flatten()[0])
            where = "the input latent" if not torch.isfinite(x).all() else "the model's output"
            scale = f" (CFG scale {self.cfg_scale:g})" if self.cfg_scale is not None else ""
            raise self.error(f"sampling produced NaN or infinite values at model call {self.calls} (sigma {s:.4g}) "
                                 f"in {where}{scale}: the model's weights or the settings overflow; try a lower CFG "
                                 "scale, float32 instead of float16, or another model file")
        return out
