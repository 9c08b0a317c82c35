"""ControlNet Union (xinsir's ControlNetPlus, "controlnet-union-sdxl-1.0" and ProMax): one SDXL ControlNet for
several kinds of map, told which kind by a control-type vector, and able to read several maps at once.

On top of :class:`~ldmkit.models.controlnet.ControlNet` it has
- ``control_add_embedding`` (linear_1, linear_2): the 0/1 control-type vector, each entry embedded as a 256-wide
  timestep, flattened and mapped to the time embedding, which it is added to;
- a task embedding per control type (``task_embedding``, (types, C)) added to the mean of each encoded map;
- a small transformer (``transformer_layes``: the original's spelling, kept so the names are the files') over the
  tokens [map 1, ..., map k, latent], whose output per map (``spatial_ch_projs``) is a per-channel offset: the
  first block's output becomes h + sum_i (map_i + offset_i).

As in the original and in diffusers, the transformer's ``nn.MultiheadAttention`` is not batch-first while its
input is (B, k + 1, C): attention runs across the batch rows, per token. Kept, so the residuals are the files'
(an image's result depends on what else is in its batch, e.g. the negative prompt's half under CFG).

"auto" (:data:`AUTO`): no control type, as ComfyUI's SetUnionControlNetType "auto" and the A1111 extension's
union_control_type "Unknown" run it (``control_type=[]`` in their cldm.py): the all-zero type vector is still
embedded and added to the time embedding, and the one map takes the plain ControlNet path (hint encoder output
added to the first block's), with no task embedding and no transformer.

Weights: diffusers' names for these extras, cldm.py names for the rest (see ``controlnet_files``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ldmkit.models.clip import quick_gelu
from ldmkit.models.controlnet import ControlNet, ControlNetConfig, Residuals
from ldmkit.models.unet import timestep_embedding

# the control types as the model card and diffusers number them (ProMax: all 8; the first release: 0-5)
UNION_TYPES = ("openpose", "depth", "hed/pidi/scribble/ted", "canny/lineart/anime_lineart/mlsd", "normal",
               "segment", "tile", "repaint")
AUTO = -1  # types=(AUTO,): no control type (ComfyUI's "auto", the A1111 extension's "Unknown"); one map


@dataclass(frozen=True)
class UnionConfig(ControlNetConfig):
    """A ControlNet plus the union's extras (diffusers' num_control_type, num_trans_channel, ...)."""

    num_types: int = 6
    trans_channels: int = 320
    trans_heads: int = 8  # not in the weights: xinsir's (and diffusers' default) 8
    trans_layers: int = 1
    proj_channels: int = 320
    type_embed_dim: int = 256  # each control-type entry's sinusoidal width (diffusers' addition_time_embed_dim)


class _Mlp(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(quick_gelu(self.c_fc(x)))


class _Block(nn.Module):
    """CLIP-style pre-norm transformer block (attn, ln_1, mlp, ln_2)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads)  # not batch_first: see the module docstring
        self.ln_1, self.mlp, self.ln_2 = nn.LayerNorm(d), _Mlp(d), nn.LayerNorm(d)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _Embedding(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear_1, self.act, self.linear_2 = nn.Linear(d_in, d_out), nn.SiLU(), nn.Linear(d_out, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class UnionControlNet(ControlNet):
    def __init__(self, cfg: UnionConfig):
        super().__init__(cfg)
        self.task_embedding = nn.Parameter(torch.zeros(cfg.num_types, cfg.trans_channels))
        self.transformer_layes = nn.ModuleList(_Block(cfg.trans_channels, cfg.trans_heads)
                                               for _ in range(cfg.trans_layers))
        self.spatial_ch_projs = nn.Linear(cfg.trans_channels, cfg.proj_channels)
        self.control_add_embedding = _Embedding(cfg.type_embed_dim * cfg.num_types, cfg.unet.model_channels * 4)

    def forward(self, x: Tensor, hint: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None,
                types: Sequence[int] = (), weight: float | Sequence[float] = 1.0) -> Residuals:
        """Residuals for the maps in ``hint`` (B, 3k, H, W): k maps side by side in the channels, the i-th of
        control type ``types[i]`` (``(AUTO,)``: one map, no type). With several maps ``weight`` scales each map's
        contribution inside (diffusers' ``conditioning_scale`` for one union model given several maps: one number
        for all, or one per map; the residuals are then not scaled); with one map the caller scales the residuals
        (``weight`` is ignored here)."""
        cfg = self.cfg
        assert isinstance(cfg, UnionConfig)
        k = len(types)
        auto = tuple(types) == (AUTO,)
        if k == 0 or hint.shape[1] != k * cfg.hint_in_channels:
            raise ValueError(f"a ControlNet Union needs one control type per map: {k} type(s) for "
                             f"{hint.shape[1] // cfg.hint_in_channels} map(s)" + (" (auto reads one map)" if
                                                                                  AUTO in types else ""))
        if not auto and (bad := [t for t in types if not 0 <= t < cfg.num_types]):
            raise ValueError(f"control type {bad[0]} is not one of this ControlNet Union's {cfg.num_types}"
                             + (": auto reads one map alone" if bad[0] == AUTO else ""))
        weights = [float(w) for w in weight] if isinstance(weight, Sequence) else [float(weight)] * k
        if len(weights) != k:
            raise ValueError(f"{len(weights)} weights for {k} map(s): give one weight per map, or one for all")
        onehot = torch.zeros(x.shape[0], cfg.num_types, device=x.device)
        if not auto:
            onehot[:, list(types)] = 1.0  # (B, types)
        typ = timestep_embedding(onehot.flatten(), cfg.type_embed_dim).reshape(x.shape[0], -1)  # (B, types*256)
        emb = self.embed(x, timesteps, y) + self.control_add_embedding(typ.to(x.dtype))
        inner = weights if k > 1 else [1.0]
        maps = [self.input_hint_block(m.to(x.dtype)) for m in hint.split(cfg.hint_in_channels, dim=1)]  # (B, C, h, w)
        self._check_size(maps[0], hint, x)
        if auto:  # ComfyUI / the extension with control_type []: the plain ControlNet path
            return self.encode(x, emb, context, lambda h: h + maps[0])

        def fuse(h: Tensor) -> Tensor:
            tokens = [(r.mean(dim=(2, 3)) + self.task_embedding[t]) * w
                      for r, t, w in zip(maps, types, inner, strict=True)]
            seq = torch.stack([*tokens, h.mean(dim=(2, 3))], dim=1)  # (B, k + 1, C)
            for layer in self.transformer_layes:
                seq = layer(seq)
            out = h * 0.0
            for i, (m, w) in enumerate(zip(maps, inner, strict=True)):
                out = out + (m + self.spatial_ch_projs(seq[:, i])[..., None, None]) * w
            return h + out

        return self.encode(x, emb, context, fuse)


__all__ = ["AUTO", "UNION_TYPES", "UnionConfig", "UnionControlNet"]
