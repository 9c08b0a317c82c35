"""T2I-Adapter (Mou et al. 2023, "T2I-Adapter: Learning Adapters to Dig out More Controllable Ability for
Text-to-Image Diffusion Models").

A small convolutional network that turns a control map (sketch, depth, pose, colour palette...) into one
feature map per U-Net encoder level. Unlike a ControlNet it does not read the noisy latent, the timestep or
the text, so it runs once per image, and its features are added inside the U-Net's down path
(``UNetModel.forward(adapter=...)``), at the end of each level.

Three variants, named as diffusers' ``T2IAdapter(adapter_type=...)``:

* ``full_adapter`` (SD1/SD2): pixel-unshuffle by 8, conv_in, then per level a block of residual blocks
  (conv3x3, ReLU, conv1x1 + skip); every level after the first halves the size (average pool) and changes
  the width with a 1x1 ``in_conv``.
* ``light_adapter`` (the colour adapter): no conv_in; per level 1x1 in_conv to a quarter of the width,
  residual blocks of two 3x3 convs, 1x1 out_conv; one more halving level after the last width.
* ``full_adapter_xl`` (SDXL): pixel-unshuffle by 16; the first two levels at 1/16, then one halving.

Attribute names are diffusers' without its ``adapter.`` wrapper (``conv_in``, ``body.1.in_conv``,
``body.1.resnets.0.block1``); the original TencentARC layout (``body.2.block1``...) is renamed on loading
(``ldmkit.t2i_adapter``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

AdapterType = Literal["full_adapter", "light_adapter", "full_adapter_xl"]
ADAPTER_TYPES: tuple[str, ...] = ("full_adapter", "light_adapter", "full_adapter_xl")


@dataclass(frozen=True)
class AdapterConfig:
    """diffusers' T2IAdapter config.json fields (same names and defaults)."""

    in_channels: int = 3  # 1 for the sketch/canny adapters (greyscale map)
    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    num_res_blocks: int = 2
    downscale_factor: int = 8  # the pixel-unshuffle factor (SDXL: 16)
    adapter_type: AdapterType = "full_adapter"

    @property
    def total_downscale_factor(self) -> int:
        """Image size / the smallest feature map's size: what an input's sides must be multiples of."""
        if self.adapter_type == "full_adapter_xl":
            return self.downscale_factor * 2
        extra = 1 if self.adapter_type == "light_adapter" else 0
        return self.downscale_factor * 2 ** (len(self.channels) - 1 + extra)


class ResnetBlock(nn.Module):
    """x + conv(ReLU(conv3x3(x))); the second conv is 1x1 (full) or 3x3 (light)."""

    def __init__(self, channels: int, second_kernel: int):
        super().__init__()
        self.block1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(channels, channels, second_kernel, padding=second_kernel // 2)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block2(self.act(self.block1(x)))


class AdapterBlock(nn.Module):
    """One level of the full adapter: [average pool], [1x1 in_conv to the new width], residual blocks."""

    def __init__(self, c_in: int, c_out: int, num_res_blocks: int, down: bool = False):
        super().__init__()
        # ceil_mode: an odd side rounds up (diffusers); the original AvgPool2d(2) rounds down
        self.downsample = nn.AvgPool2d(2, 2, ceil_mode=True) if down else None
        self.in_conv = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None
        self.resnets = nn.Sequential(*(ResnetBlock(c_out, 1) for _ in range(num_res_blocks)))

    def forward(self, x: Tensor) -> Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return self.resnets(x)


class LightAdapterBlock(nn.Module):
    """One level of the light adapter: [average pool], 1x1 to width/4, residual blocks, 1x1 to the width."""

    def __init__(self, c_in: int, c_out: int, num_res_blocks: int, down: bool = False):
        super().__init__()
        mid = c_out // 4
        self.downsample = nn.AvgPool2d(2, 2, ceil_mode=True) if down else None
        self.in_conv = nn.Conv2d(c_in, mid, 1)
        self.resnets = nn.Sequential(*(ResnetBlock(mid, 3) for _ in range(num_res_blocks)))
        self.out_conv = nn.Conv2d(mid, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        return self.out_conv(self.resnets(self.in_conv(x)))


class T2IAdapter(nn.Module):
    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        if cfg.adapter_type not in ADAPTER_TYPES:
            raise ValueError(f"unknown adapter_type {cfg.adapter_type!r}: expected one of {', '.join(ADAPTER_TYPES)}")
        self.cfg = cfg
        ch, n = cfg.channels, cfg.num_res_blocks
        c_in = cfg.in_channels * cfg.downscale_factor**2
        self.unshuffle = nn.PixelUnshuffle(cfg.downscale_factor)
        blocks: list[nn.Module]
        if cfg.adapter_type == "light_adapter":
            self.conv_in = None
            blocks = [LightAdapterBlock(c_in, ch[0], n)]
            blocks += [LightAdapterBlock(a, b, n, down=True) for a, b in zip(ch[:-1], ch[1:], strict=True)]
            blocks.append(LightAdapterBlock(ch[-1], ch[-1], n, down=True))
        else:
            self.conv_in = nn.Conv2d(c_in, ch[0], 3, padding=1)
            if cfg.adapter_type == "full_adapter":
                blocks = [AdapterBlock(ch[0], ch[0], n)]
                blocks += [AdapterBlock(a, b, n, down=True) for a, b in zip(ch[:-1], ch[1:], strict=True)]
            else:  # full_adapter_xl: widths change at levels 1 and 2, only level 2 halves the size
                blocks = [AdapterBlock(ch[i - 1] if i in (1, 2) else ch[i], ch[i], n, down=i == 2)
                          for i in range(len(ch))]
        self.body = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Control map (B, in_channels, H, W) in [0, 1] -> one feature map per level, largest first."""
        f = self.cfg.downscale_factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"T2I-Adapter input {tuple(x.shape[-2:])} is not a multiple of {f} (its pixel "
                             f"unshuffle): use an image size that is a multiple of {f}")
        h = self.unshuffle(x)  # (B, in * d^2, H / d, W / d)
        if self.conv_in is not None:
            h = self.conv_in(h)
        features = []
        for block in self.body:
            h = block(h)
            features.append(h)
        return features


__all__ = ["ADAPTER_TYPES", "AdapterConfig", "T2IAdapter"]
