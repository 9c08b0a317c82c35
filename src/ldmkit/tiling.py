"""Seamless textures ("Tiling" in A1111): circular padding in the U-Net's and the VAE's convolutions.

A1111 (``sd_hijack.apply_circular``) sets ``padding_mode = 'circular'`` on every ``torch.nn.Conv2d`` of the
model for the generation; each 3x3 conv then reads the opposite edge where it would read zeros, so the
latent, and the decoded image, continue across the left/right and top/bottom borders: the image tiles.

Here the change lasts exactly one generation: :func:`circular` remembers every conv's padding mode and
puts it back on the way out, also when the generation fails or is interrupted, and it nests (an inner
``circular(model, False)`` inside a tiled generation leaves the convs as they are). The server runs one
generation at a time on its single worker thread, so no other request sees the changed model.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from torch import nn

F = TypeVar("F", bound=Callable[..., Any])


def _convs(model: Any) -> list[nn.Conv2d]:
    """The U-Net's and the VAE's Conv2d layers (A1111: every Conv2d of the model; the text encoders have none)."""
    nets = [getattr(model, name, None) for name in ("unet", "vae")]
    seen: dict[int, nn.Conv2d] = {}
    for net in nets:
        if isinstance(net, nn.Module):
            for m in net.modules():
                if isinstance(m, nn.Conv2d):
                    seen.setdefault(id(m), m)
    return list(seen.values())


@contextlib.contextmanager
def circular(model: Any, enable: bool = True) -> Iterator[None]:
    """Within the block, ``model``'s U-Net and VAE convolutions pad circularly (``enable``); restored after."""
    if not enable:
        yield
        return
    convs = _convs(model)
    before = [c.padding_mode for c in convs]
    try:
        for c in convs:
            c.padding_mode = "circular"
        yield
    finally:
        for c, mode in zip(convs, before, strict=True):
            c.padding_mode = mode


def per_generation(fn: F) -> F:
    """Run ``fn(model, params, ...)`` with circular padding when ``params.tiling`` is set."""

    @functools.wraps(fn)
    def wrapper(model: Any, params: Any, *args: Any, **kwargs: Any) -> Any:
        with circular(model, bool(getattr(params, "tiling", False))):
            return fn(model, params, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
