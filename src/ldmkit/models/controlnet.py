"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models").

A trainable copy of the U-Net's down path and middle (:func:`ldmkit.models.unet.encoder`) that also reads
a control map (edges, depth, pose...) through a small convolutional hint encoder. Its output passes
through zero-initialised 1x1 convolutions and is added to the frozen U-Net's skip connections and
middle block (``UNetModel.forward(control=...)``).

Attribute names are the original checkpoint keys (lllyasviel's ``cldm.py``): ``time_embed.*``,
``input_hint_block.{0,2,...,14}``, ``input_blocks.*``, ``zero_convs.N.0``, ``middle_block.*``,
``middle_block_out.0``; real files prefix them with ``control_model.``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor, nn

from ldmkit.config import UNetConfig
from ldmkit.models.unet import encoder, timestep_embedding

# the hint encoder's widths in every released SD1/SD2 ControlNet (diffusers' conditioning_embedding_out_channels)
HINT_CHANNELS = (16, 32, 96, 256)


@dataclass(frozen=True)
class ControlNetConfig:
    """The U-Net encoder it copies, plus the hint encoder: input channels and per-stage widths (each stage
    after the first halves the resolution, so len(hint_channels) - 1 halvings = the VAE's downscale)."""

    unet: UNetConfig
    hint_in_channels: int = 3
    hint_channels: tuple[int, ...] = HINT_CHANNELS


class Residuals(NamedTuple):
    """What a ControlNet adds to the U-Net: one tensor per skip connection, and one to the middle output."""

    down: list[Tensor]
    mid: Tensor

    def scaled(self, w: float) -> Residuals:
        return Residuals([d * w for d in self.down], self.mid * w)

    def __add__(self, other: Residuals) -> Residuals:  # type: ignore[override]
        """Several ControlNets at once: their residuals summed (diffusers' MultiControlNetModel)."""
        return Residuals([a + b for a, b in zip(self.down, other.down, strict=True)], self.mid + other.mid)


def hint_block(cfg: ControlNetConfig) -> nn.Sequential:
    """Control map (B, 3, H, W) -> (B, model_channels, H / 2^k, W / 2^k); the last conv is zero at init.

    conv, SiLU, then per stage (conv c->c, SiLU, stride-2 conv c->c', SiLU), then conv -> model_channels:
    indices 0, 2, 4, ..., as in cldm.py.
    """
    ch = cfg.hint_channels
    layers: list[nn.Module] = [nn.Conv2d(cfg.hint_in_channels, ch[0], 3, padding=1), nn.SiLU()]
    for a, b in zip(ch[:-1], ch[1:], strict=True):
        layers += [nn.Conv2d(a, a, 3, padding=1), nn.SiLU(), nn.Conv2d(a, b, 3, padding=1, stride=2), nn.SiLU()]
    layers.append(nn.Conv2d(ch[-1], cfg.unet.model_channels, 3, padding=1))
    return nn.Sequential(*layers)


class ControlNet(nn.Module):
    def __init__(self, cfg: ControlNetConfig):
        super().__init__()
        self.cfg = cfg
        u = cfg.unet
        if u.time_cond_proj_dim:
            raise ValueError("ControlNets for guidance-embedded U-Nets are not supported")
        emb_dim = u.model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(u.model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if u.adm_in_channels:  # SDXL: the vector conditioning y, as in the U-Net (sgm's label_emb.0.0 / 0.2)
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(u.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)))
        self.input_hint_block = hint_block(cfg)
        self.input_blocks, self.middle_block, skip_chans = encoder(u)
        # cldm.py wraps each 1x1 conv in a TimestepEmbedSequential: hence the ".0" in zero_convs.N.0
        self.zero_convs = nn.ModuleList(nn.Sequential(nn.Conv2d(c, c, 1)) for c in skip_chans)
        self.middle_block_out = nn.Sequential(nn.Conv2d(skip_chans[-1], skip_chans[-1], 1))

    def forward(self, x: Tensor, hint: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None
                ) -> Residuals:
        """Residuals for the U-Net given its input ``x`` (B, 4, h, w), the control map ``hint`` (B, 3, H, W)
        in [0, 1] at pixel resolution, ``timesteps`` (B,) and the text ``context`` (B, T, D); an SDXL
        ControlNet also reads the U-Net's vector conditioning ``y`` (``models.unet.sdxl_vector``: diffusers'
        added_cond_kwargs text_embeds + time_ids)."""
        emb = self.embed(x, timesteps, y)
        guided = self.input_hint_block(hint.to(x.dtype))  # (B, mc, h, w)
        self._check_size(guided, hint, x)
        return self.encode(x, emb, context, lambda h: h + guided)  # the map enters after the first convolution

    def embed(self, x: Tensor, timesteps: Tensor, y: Tensor | None) -> Tensor:
        """The time embedding (plus SDXL's vector conditioning ``y``), as the U-Net's."""
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.cfg.unet.model_channels).to(x.dtype))
        if (y is None) != (self.cfg.unet.adm_in_channels is None):
            raise ValueError("an SDXL ControlNet needs the vector conditioning y (pooled text + size ids)"
                             if y is None else "y given, but this ControlNet has no label_emb (not an SDXL one)")
        if y is not None:
            emb = emb + self.label_emb(y.to(x.dtype))
        return emb

    @staticmethod
    def _check_size(guided: Tensor, hint: Tensor, x: Tensor) -> None:
        if guided.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"control map {tuple(hint.shape[-2:])} does not give the latent size "
                             f"{tuple(x.shape[-2:])}: resize it to the image size")

    def encode(self, x: Tensor, emb: Tensor, context: Tensor, fuse: Callable[[Tensor], Tensor]) -> Residuals:
        """The encoder copy and zero convolutions; ``fuse`` adds the encoded map to the first block's output."""
        outs = []
        h = x
        for i, (block, zero) in enumerate(zip(self.input_blocks, self.zero_convs, strict=True)):
            h = block(h, emb, context)
            if i == 0:
                h = fuse(h)
            outs.append(zero(h))
        h = self.middle_block(h, emb, context)
        return Residuals(outs, self.middle_block_out(h))


__all__ = ["ControlNet", "ControlNetConfig", "Residuals", "hint_block"]
