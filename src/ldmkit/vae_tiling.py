"""Tiled VAE decoding: the KL decoder run tile by tile, equal to the untiled decode up to float rounding.

Where the memory goes: the decoder's full-resolution layers (128-256 channels at the image's
size: 128-256 MiB per tensor at 512², four times that at 1024²), several of them alive at once
inside every ResNet block, plus the 2x-upsampled tensor before each upsampling conv.

Why tiles usually show seams, and why these don't: a decoder run on each tile separately (the
common approach, e.g. diffusers' ``tiled_decode``) normalises every GroupNorm with that tile's own
mean and variance, and sees zero padding at tile edges; neighbouring tiles then differ in
brightness and colour, which blending the overlaps only hides. Here every GroupNorm uses the
statistics of the whole image, and every 3x3 conv reads a one-pixel halo from its neighbours
(the tiles overlap by exactly the conv's reach), so each tile computes the very numbers the
untiled decoder computes; there is nothing left to blend. Only the order of float additions in
the statistics differs (about 1e-6).

The cost of exact statistics: a GroupNorm needs its whole input before any tile can be
normalised, so the decoder goes layer by layer, keeping one full-size activation (two inside a
ResNet block: its input for the residual and the first conv's output) instead of four or five,
and never materialising the upsampled tensor. The mid block (with its global attention) runs
untiled at latent resolution, where it is small. The encoder is tiled the same way (its stride-2
downsampling convs read their halo, and LDM's right/bottom-only padding, per tile).

``decode``/``encode`` tile automatically once the largest full-resolution activation would pass
``AUTO_TILE_BYTES`` (issue 15, hardening 1: a 2048^2 image on the built-in model), so large images
stay in bounded memory without ``--vae-tiling``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmkit.models.vae import AutoencoderKL, Downsample, ResnetBlock, Upsample

DEFAULT_TILE = 128  # pixels per tile side at each layer's own resolution
# untiled above this size of the largest full-resolution activation (SD's 256 channels at 512^2 = 256 MiB
# stays untiled; the built-in model's 32 channels at 2048^2 = 512 MiB is tiled)
AUTO_TILE_BYTES = 256 << 20


def should_tile(vae: nn.Module, width: int, height: int, itemsize: int = 4) -> bool:
    """Whether an image of this size is decoded/encoded in tiles by default (KL autoencoders only)."""
    if not isinstance(vae, AutoencoderKL):
        return False
    cfg = vae.cfg
    channels = cfg.ch * max(cfg.ch_mult[:2])  # full resolution, and the upsampled tensor of the level below
    return channels * width * height * itemsize > AUTO_TILE_BYTES


def _tile_now(vae: nn.Module, width: int, height: int, itemsize: int) -> bool:
    """``should_tile``, or memory is short: the untiled decoder's ~8 full-size activations would take more
    than half of what the machine has available (tiled, it needs about half as many)."""
    if not isinstance(vae, AutoencoderKL):
        return False
    if should_tile(vae, width, height, itemsize):
        return True
    from ldmkit.memory import available_bytes  # here: ldmkit.memory imports this module

    cfg = vae.cfg
    return 8 * cfg.ch * max(cfg.ch_mult[:2]) * width * height * itemsize > available_bytes() // 2


def decode(vae: nn.Module, z: Tensor, tiling: bool = False) -> Tensor:
    """``vae.decode(z)``, in tiles when ``tiling``, when the image is large or when memory is short."""
    f = 2 ** (len(vae.cfg.ch_mult) - 1) if isinstance(vae, AutoencoderKL) else 8
    if tiling or _tile_now(vae, z.shape[-1] * f, z.shape[-2] * f, z.element_size()):
        return tiled_decode(vae, z)
    return vae.decode(z)


def encode(vae: nn.Module, x: Tensor, tiling: bool = False):
    """``vae.encode(x)``, in tiles when ``tiling``, when the image is large or when memory is short."""
    if isinstance(vae, AutoencoderKL) and (tiling or _tile_now(vae, x.shape[-1], x.shape[-2], x.element_size())):
        return tiled_encode(vae, x)
    return vae.encode(x)


def tiled_decode(vae: nn.Module, z: Tensor, tile: int = DEFAULT_TILE) -> Tensor:
    """Unscaled latent (B, z, h, w) -> image (B, 3, H, W), as ``vae.decode`` computes it, tile by tile.

    Other autoencoders (a tiny one) and decoders with attention in their upsampling levels are
    decoded whole.
    """
    dec = getattr(vae, "decoder", None)
    if not isinstance(vae, AutoencoderKL) or any(len(level.attn) for level in dec.up):
        return vae.decode(z)
    h = dec.mid(dec.conv_in(vae.post_quant_conv(z)))
    for level in reversed(dec.up):
        for block in level.block:
            h = _resnet(block, h, tile)
        if hasattr(level, "upsample"):
            h = _upsample(level.upsample, h, tile)
    return _norm_conv(dec.norm_out, dec.conv_out, h, tile)


def tiled_encode(vae: AutoencoderKL, x: Tensor, tile: int = DEFAULT_TILE) -> tuple[Tensor, Tensor]:
    """Image (B, 3, H, W) -> posterior (mean, logvar), as ``vae.encode`` computes them, tile by tile."""
    enc = vae.encoder
    if any(len(level.attn) for level in enc.down):
        return vae.encode(x)
    h = _conv(enc.conv_in, x, tile, None)
    for level in enc.down:
        for block in level.block:
            h = _resnet(block, h, tile)
        if hasattr(level, "downsample"):
            h = _downsample(level.downsample, h, tile)
    h = _norm_conv(enc.norm_out, enc.conv_out, enc.mid(h), tile)
    mean, logvar = vae.quant_conv(h).chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)


# ---------------------------------------------------------------- layers


def _resnet(block: ResnetBlock, x: Tensor, tile: int) -> Tensor:
    """``x + conv2(silu(norm2(conv1(silu(norm1(x))))))`` with whole-image norm statistics."""
    h = _norm_conv(block.norm1, block.conv1, x, tile)
    if hasattr(block, "nin_shortcut"):
        x = block.nin_shortcut(x)  # 1x1: no halo; done once, it needs x whole anyway
    # the residual sum goes into x in place: each tile of x is read by its own tile of the output only
    return _norm_conv(block.norm2, block.conv2, h, tile, out=x)


def _norm_conv(norm: nn.GroupNorm, conv: nn.Conv2d, x: Tensor, tile: int, out: Tensor | None = None) -> Tensor:
    """``conv(silu(norm(x)))`` (+ ``out`` when given, written into it), one tile at a time."""
    scale, shift = _group_norm_affine(norm, x)
    return _conv(conv, x, tile, lambda t: F.silu(t * scale + shift), out)


def _conv(conv: nn.Conv2d, x: Tensor, tile: int, pre: Callable[[Tensor], Tensor] | None,
          out: Tensor | None = None) -> Tensor:
    """``conv(pre(x))`` (+ ``out`` when given, written into it) for an elementwise ``pre``, one tile at a time."""
    w, b = _conv_params(conv, x.dtype)
    H, W = x.shape[-2:]
    if out is None:
        out = x.new_empty(x.shape[0], conv.out_channels, H, W)
        add = False
    else:
        add = True
    for r0, r1, c0, c1 in _tiles(H, W, tile):
        if conv.padding_mode == "circular":  # tiling (ldmkit.tiling): the halo wraps around the image
            t = _wrapped(x, r0, r1, c0, c1, H, W)
            y = F.conv2d(t if pre is None else pre(t), w, b)
        else:
            (a0, a1, pt, pb), (b0, b1, pl, pr) = _halo(r0, r1, H), _halo(c0, c1, W)
            t = x[..., a0:a1, b0:b1]
            y = F.conv2d(F.pad(t if pre is None else pre(t), (pl, pr, pt, pb)), w, b)
        if add:
            out[..., r0:r1, c0:c1] += y
        else:
            out[..., r0:r1, c0:c1] = y
    return out


def _downsample(down: Downsample, x: Tensor, tile: int) -> Tensor:
    """LDM's stride-2 3x3 conv (zero padding on the right and bottom only) per output tile: output row i
    reads input rows 2i..2i+2, the last of which is the padding row at the bottom edge."""
    conv = down.conv
    w, b = conv.weight.to(x.dtype), None if conv.bias is None else conv.bias.to(x.dtype)
    H, W = x.shape[-2:]
    Ho, Wo = (H - 2) // 2 + 1, (W - 2) // 2 + 1
    out = x.new_empty(x.shape[0], conv.out_channels, Ho, Wo)
    for r0, r1, c0, c1 in _tiles(Ho, Wo, tile):
        a1, b1 = min(2 * r1 + 1, H), min(2 * c1 + 1, W)
        t = F.pad(x[..., 2 * r0:a1, 2 * c0:b1], (0, 2 * c1 + 1 - b1, 0, 2 * r1 + 1 - a1))
        out[..., r0:r1, c0:c1] = F.conv2d(t, w, b, stride=2)
    return out


def _upsample(up: Upsample, x: Tensor, tile: int) -> Tensor:
    """``conv(nearest_2x(x))`` per output tile, reading only the input rows and columns it needs."""
    w, b = _conv_params(up.conv, x.dtype)
    H, W = x.shape[-2] * 2, x.shape[-1] * 2
    out = x.new_empty(x.shape[0], up.conv.out_channels, H, W)
    for r0, r1, c0, c1 in _tiles(H, W, tile):
        if up.conv.padding_mode == "circular":  # tiling: the upsampled tensor's halo wraps around
            out[..., r0:r1, c0:c1] = F.conv2d(_wrapped(x, r0, r1, c0, c1, H, W, 2), w, b)
            continue
        (a0, a1, pt, pb), (b0, b1, pl, pr) = _halo(r0, r1, H), _halo(c0, c1, W)
        # upsampled rows a0..a1 come from input rows a0//2 .. (a1-1)//2; cut the odd extra row or column
        src = x[..., a0 // 2:(a1 - 1) // 2 + 1, b0 // 2:(b1 - 1) // 2 + 1]
        u = F.interpolate(src, scale_factor=2.0, mode="nearest")[..., a0 % 2:a0 % 2 + a1 - a0, b0 % 2:b0 % 2 + b1 - b0]
        out[..., r0:r1, c0:c1] = F.conv2d(F.pad(u, (pl, pr, pt, pb)), w, b)
    return out


# ---------------------------------------------------------------- helpers


def _group_norm_affine(norm: nn.GroupNorm, x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(image, channel) scale and shift that apply ``norm`` with statistics of the whole of ``x``."""
    B, C = x.shape[:2]
    g = norm.num_groups
    var, mean = torch.var_mean(x.reshape(B, g, -1), dim=2, unbiased=False)  # (B, g)
    rstd = (var + norm.eps).rsqrt()
    weight = norm.weight.to(x.dtype).reshape(g, C // g) if norm.weight is not None else x.new_ones(g, C // g)
    bias = norm.bias.to(x.dtype).reshape(g, C // g) if norm.bias is not None else x.new_zeros(g, C // g)
    scale = rstd[:, :, None] * weight  # (B, g, C/g)
    shift = bias - mean[:, :, None] * scale
    return scale.reshape(B, C, 1, 1), shift.reshape(B, C, 1, 1)


def _conv_params(conv: nn.Conv2d, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """A 3x3 same-padding conv's weights in the compute dtype, upcast once for all tiles (low-memory mode)."""
    if conv.kernel_size != (3, 3) or conv.padding != (1, 1) or conv.stride != (1, 1):
        raise ValueError(f"tiled decoding expects 3x3 convs with padding 1, got {conv}")
    return conv.weight.to(dtype), None if conv.bias is None else conv.bias.to(dtype)


def _tiles(H: int, W: int, tile: int) -> Iterator[tuple[int, int, int, int]]:
    for r0 in range(0, H, tile):
        for c0 in range(0, W, tile):
            yield r0, min(r0 + tile, H), c0, min(c0 + tile, W)


def _wrapped(x: Tensor, r0: int, r1: int, c0: int, c1: int, H: int, W: int, up: int = 1) -> Tensor:
    """Rows [r0-1, r1+1) and columns [c0-1, c1+1) of an H x W image, wrapping around its borders (circular
    padding); the image is ``x`` upsampled ``up`` times (nearest), read from ``x`` without materialising it."""
    rows = (torch.arange(r0 - 1, r1 + 1, device=x.device) % H) // up
    cols = (torch.arange(c0 - 1, c1 + 1, device=x.device) % W) // up
    return x.index_select(-2, rows).index_select(-1, cols)


def _halo(lo: int, hi: int, size: int) -> tuple[int, int, int, int]:
    """Rows [lo-1, hi+1) clipped to the image, and the zero padding that stands in at its borders."""
    return max(lo - 1, 0), min(hi + 1, size), int(lo == 0), int(hi == size)

