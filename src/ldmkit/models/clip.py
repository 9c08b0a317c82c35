"""CLIP text transformer (Radford et al. 2021): prompt token ids -> per-token embeddings.

Parameter names follow ``transformers.CLIPTextModel`` (``text_model.encoder.layers.0.self_attn.q_proj``),
which is also how SD1 single-file checkpoints store it under ``cond_stage_model.transformer.``.
SD2's OpenCLIP weights are renamed into this layout by ``ldmkit.convert``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmkit.config import TextEncoderConfig


def quick_gelu(x: Tensor) -> Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU; the SD1 text encoder was trained with it."""
    return x * torch.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        # (B, N, D) -> (B, heads, N, D/heads)
        q, k, v = (p(x).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.act = quick_gelu if cfg.act == "quick_gelu" else F.gelu
        self.fc1 = nn.Linear(cfg.width, cfg.intermediate)
        self.fc2 = nn.Linear(cfg.intermediate, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg.width, cfg.heads)
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        rows = cfg.token_rows or cfg.vocab_size
        # passing the tables skips nn.Embedding's own init, which on the meta device (checkpoint loading)
        # goes through torch's Python reference kernels and imports torch._dynamo: ~3 s per process
        self.token_embedding = nn.Embedding(rows, cfg.width, _weight=torch.empty(rows, cfg.width))
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width,
                                               _weight=torch.empty(cfg.max_positions, cfg.width))
        for table in (self.token_embedding.weight, self.position_embedding.weight):
            if not table.is_meta:
                nn.init.normal_(table)  # nn.Embedding's default init, for training from scratch
        if cfg.token_rows:
            # compact vocabulary: token id -> embedding row (row 0 stands for every id without its own)
            self.register_buffer("token_map", torch.zeros(cfg.vocab_size, dtype=torch.long))

    def lookup(self, ids: Tensor) -> Tensor:
        """Token embeddings of ``ids`` (B, N) -> (B, N, width), without positions."""
        if hasattr(self, "token_map"):
            ids = self.token_map[ids]
        return self.token_embedding(ids)

    def full_table(self) -> Tensor:
        """The (vocab_size, width) table a CLIPTextModel checkpoint stores, expanding a compact one."""
        w = self.token_embedding.weight
        return w[self.token_map] if hasattr(self, "token_map") else w

    def forward(self, ids: Tensor) -> Tensor:
        return self.lookup(ids) + self.position_embedding.weight[: ids.shape[1]]


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)


class CLIPTextModel(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg)
        if cfg.projection_dim:  # CLIPTextModelWithProjection (SDXL's bigG): projects the pooled output
            self.text_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)
        self.gradient_checkpointing = False

    def forward(self, ids: Tensor, clip_skip: int = 1, embeddings: Tensor | None = None) -> Tensor:
        """Token ids (B, N) -> hidden states (B, N, width) of layer ``-clip_skip``, final norm applied.

        clip_skip=1 is the last layer (SD1); 2 the penultimate (SD2, and A1111's "Clip skip 2").
        ``embeddings`` (B, N, width) replaces the token lookup, for prompt weighting and textual
        inversion.
        """
        tm = self.text_model
        if not 1 <= clip_skip <= len(tm.encoder.layers):
            raise ValueError(f"clip_skip must be between 1 and {len(tm.encoder.layers)}, got {clip_skip}")
        if embeddings is None:
            x = tm.embeddings(ids)
        else:
            x = embeddings + tm.embeddings.position_embedding.weight[: embeddings.shape[1]]
        for layer in tm.encoder.layers[: len(tm.encoder.layers) - (clip_skip - 1)]:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return tm.final_layer_norm(x)

    def hidden_and_pooled(self, ids: Tensor, skip: int = 2,
                          embeddings: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """SDXL's two outputs: the hidden states of layer ``-skip`` *without* the final norm (B, N, width),
        and, with a projection, the pooled output (final norm at the end token, through text_projection)
        (B, projection_dim), else None.

        The end token is found as OpenCLIP and transformers' legacy path do: the highest id (49407) in each
        row, which is the first end token whichever id pads.
        """
        tm = self.text_model
        n_layers = len(tm.encoder.layers)
        if not 1 <= skip <= n_layers:
            raise ValueError(f"skip must be between 1 and {n_layers}, got {skip}")
        x = tm.embeddings(ids) if embeddings is None else \
            embeddings + tm.embeddings.position_embedding.weight[: embeddings.shape[1]]
        last = n_layers if self.cfg.projection_dim else n_layers - (skip - 1)
        hidden = x
        for i, layer in enumerate(tm.encoder.layers[:last]):
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
            if i == n_layers - skip:
                hidden = x
        if not self.cfg.projection_dim:
            return hidden, None
        end = tm.final_layer_norm(x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)])  # (B, width)
        return hidden, self.text_projection(end)
