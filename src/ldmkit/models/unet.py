"""The Stable Diffusion noise predictor: a U-Net with timestep embedding, ResNet blocks and
spatial transformers whose cross-attention reads the text embeddings.

Attribute names are the original LDM checkpoint keys (``input_blocks.1.1.proj_in``), so a
real ``model.diffusion_model.*`` state dict loads with only its prefix stripped.
Reference: Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmkit.config import SDXL_ID_DIM, UNetConfig


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, cos half first as in LDM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def guidance_embedding(w: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of guidance scales w (B,) for guidance-distilled U-Nets, sin half first.

    VDM's (Kingma et al. 2021) embedding of 1000 w with frequencies 10000^(-j / (dim/2 - 1)), as the
    LCM distillation scripts and diffusers' ``get_guidance_scale_embedding`` compute it.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) / (half - 1) * torch.arange(half, dtype=torch.float32, device=w.device))
    args = (w.float() * 1000.0)[:, None] * freqs[None]
    return F.pad(torch.cat([torch.sin(args), torch.cos(args)], dim=-1), (0, dim % 2))  # (B, dim)


def sdxl_vector(pooled: Tensor, ids: Tensor) -> Tensor:
    """SDXL's vector conditioning ``y``: the pooled text embedding (B, P) followed by each id of ``ids``
    (B, n) -- original size, crop top-left, target size (base) or aesthetic score (refiner) -- as a
    256-wide timestep-style embedding (sgm's ConcatTimestepEmbedderND): (B, P + 256 n)."""
    b, n = ids.shape
    fourier = timestep_embedding(ids.reshape(-1), SDXL_ID_DIM).reshape(b, n * SDXL_ID_DIM)
    return torch.cat([pooled.float(), fourier], dim=1)


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(groups, out_channels),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = (
            nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Attention(nn.Module):
    """Multi-head attention; self-attention when ``context`` is None."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * head_dim
        context_dim = context_dim or dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        b, n, _ = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        # (B, N, heads*hd) -> (B, heads, N, hd)
        q, k, v = (t.view(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    """Gated GELU feed-forward input (Shazeer 2020)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        self.attn1 = Attention(dim, heads, head_dim)
        self.ff = FeedForward(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Image features as a token sequence: self-attention, cross-attention to text, feed-forward."""

    def __init__(self, channels: int, heads: int, head_dim: int, depth: int, context_dim: int,
                 use_linear: bool, groups: int):
        super().__init__()
        inner = heads * head_dim
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, head_dim, context_dim) for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        # ``size``: the skip connection's size, when the latent side was odd at this level (e.g. 520 px)
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class TimestepBlock(nn.ModuleList):
    """A sequence of layers, each given what it needs: the time embedding or the text context."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor,  # type: ignore[override]
                up_size: tuple[int, int] | None = None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, up_size)
            else:
                x = layer(x)
        return x


def up_size(h: Tensor, skips: list[Tensor]) -> tuple[int, int] | None:
    """Where an output block's upsampler must land: the next skip's size when a side was odd when halved
    (it doesn't double back exactly), else None (plain 2x)."""
    skip = tuple(skips[-1].shape[-2:]) if skips else None
    return skip if skip and skip != (2 * h.shape[-2], 2 * h.shape[-1]) else None


def spatial_transformer(cfg: UNetConfig, ch: int, depth: int) -> SpatialTransformer:
    heads, hd = cfg.heads_at(ch)
    return SpatialTransformer(ch, heads, hd, depth, cfg.context_dim, cfg.use_linear_in_transformer, cfg.norm_groups)


def encoder(cfg: UNetConfig) -> tuple[nn.ModuleList, TimestepBlock, list[int]]:
    """The U-Net's down path and middle: (input_blocks, middle_block, channels of each skip connection).

    Shared by :class:`UNetModel` and the ControlNet (models/controlnet.py), a trainable copy of exactly this.
    """
    mc, groups, emb_dim = cfg.model_channels, cfg.norm_groups, cfg.model_channels * 4
    input_blocks = nn.ModuleList([TimestepBlock([nn.Conv2d(cfg.in_channels, mc, 3, padding=1)])])
    skip_chans, ch = [mc], mc
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * mc, groups)]
            ch = mult * mc
            if cfg.attention_levels[level]:
                layers.append(spatial_transformer(cfg, ch, cfg.depth_at(level)))
            input_blocks.append(TimestepBlock(layers))
            skip_chans.append(ch)
        if level != len(cfg.channel_mult) - 1:
            input_blocks.append(TimestepBlock([Downsample(ch)]))
            skip_chans.append(ch)
    middle_block = TimestepBlock([ResBlock(ch, emb_dim, ch, groups), spatial_transformer(cfg, ch, cfg.middle_depth),
                                  ResBlock(ch, emb_dim, ch, groups)])
    return input_blocks, middle_block, skip_chans


class UNetModel(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc, groups = cfg.model_channels, cfg.norm_groups
        emb_dim = mc * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.time_cond_proj_dim:
            # LDM has no name for it; community single files keep diffusers' key under model.diffusion_model.
            self.time_embedding = nn.ModuleDict({"cond_proj": nn.Linear(cfg.time_cond_proj_dim, mc, bias=False)})

        if cfg.adm_in_channels:
            # SDXL's vector conditioning (pooled text + size/crop ids, see sdxl_vector); nested as in the
            # LDM/sgm checkpoints: label_emb.0.0 / label_emb.0.2
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)))

        self.input_blocks, self.middle_block, skip_chans = encoder(cfg)
        ch = skip_chans[-1]

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_chans.pop(), emb_dim, mult * mc, groups)]
                ch = mult * mc
                if cfg.attention_levels[level]:
                    layers.append(spatial_transformer(cfg, ch, cfg.depth_at(level)))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepBlock(layers))

        self.out = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))
        self.gradient_checkpointing = False

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, guidance_emb: Tensor | None = None,
                y: Tensor | None = None, control: tuple[Sequence[Tensor], Tensor] | None = None,
                adapter: Sequence[Tensor] | None = None) -> Tensor:
        """Predict the noise (or v) in ``x`` (B, C, H, W) at ``timesteps`` (B,), given ``context`` (B, 77, D).

        ``guidance_emb`` (B, time_cond_proj_dim): :func:`guidance_embedding` of a guidance-embedded U-Net.
        ``y`` (B, adm_in_channels): SDXL's vector conditioning, :func:`sdxl_vector`.
        ``control``: ControlNet residuals (one per skip connection, middle), added to the skips once the
        down path is done and to the middle block's output (diffusers' down/mid_block_additional_residual).
        ``adapter``: T2I-Adapter features, one per level, added inside the down path (see :meth:`adapter_points`).
        """
        emb = self.embed(x, timesteps, guidance_emb, y)
        hs = []
        h = x
        feats, points = list(adapter or ()), self.adapter_points() if adapter else ()
        for i, block in enumerate(self.input_blocks):
            h = self._run(block, h, emb, context)
            if feats and i in points:
                h = h + feats.pop(0).to(h.dtype)  # the skip connection carries it too
            hs.append(h)
        h = self._run(self.middle_block, h, emb, context)
        if feats and feats[0].shape[1:] == h.shape[1:]:  # SDXL's adapter has one feature more than levels: the middle
            h = h + feats.pop(0).to(h.dtype)
        if control is not None:
            hs = [s + r.to(s.dtype) for s, r in zip(hs, control[0], strict=True)]
            h = h + control[1].to(h.dtype)
        for block in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)
            h = self._run(block, h, emb, context, up_size(h, hs))
        return self.out(h)

    def adapter_points(self) -> tuple[int, ...]:
        """The input blocks after which T2I-Adapter features are added, one per level (diffusers'
        down_intrablock_additional_residuals): a level with attention, or the last level, after its last
        ResBlock/transformer (inside diffusers' CrossAttnDownBlock2D); any other level after its downsampler
        (after diffusers' whole DownBlock2D: SDXL's first level). For SD1/SD2 that is input blocks 2, 5, 8, 11,
        the ``(id + 1) % 3 == 0`` of TencentARC's code."""
        c, points = self.cfg, []
        for level in range(len(c.channel_mult)):
            last_res = level * (c.num_res_blocks + 1) + c.num_res_blocks
            last = level == len(c.channel_mult) - 1
            points.append(last_res if c.attention_levels[level] or last else last_res + 1)
        return tuple(points)

    def embed(self, x: Tensor, timesteps: Tensor, guidance_emb: Tensor | None = None,
              y: Tensor | None = None) -> Tensor:
        """The time (and guidance, and SDXL vector) embedding every ResBlock reads, (B, 4 * model_channels)."""
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        t_emb = timestep_embedding(timesteps, self.cfg.model_channels).to(x.dtype)
        if guidance_emb is not None:
            if not self.cfg.time_cond_proj_dim:
                raise ValueError("guidance_emb given, but this U-Net has no guidance embedding (time_cond_proj_dim)")
            t_emb = t_emb + self.time_embedding.cond_proj(guidance_emb.to(x.dtype))
        emb = self.time_embed(t_emb)
        if (y is None) != (self.cfg.adm_in_channels is None):
            raise ValueError("this U-Net needs the vector conditioning y (SDXL: pooled text + size ids)"
                             if y is None else "y given, but this U-Net has no label_emb (not an SDXL U-Net)")
        if y is not None:
            emb = emb + self.label_emb(y.to(x.dtype))
        return emb

    def _run(self, block: TimestepBlock, h: Tensor, emb: Tensor, context: Tensor,
             up_size: tuple[int, int] | None = None) -> Tensor:
        if self.gradient_checkpointing and self.training:
            return torch.utils.checkpoint.checkpoint(block, h, emb, context, up_size, use_reentrant=False)
        return block(h, emb, context, up_size)
