"""Architecture configs as frozen dataclasses, with named presets.

Field names follow the original LDM/CompVis configs (``model_channels``, ``channel_mult``,
``num_res_blocks``) because the checkpoints people own were written by that code.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class TextEncoderConfig:
    """CLIP text transformer (SD1: OpenAI CLIP ViT-L/14; SD2: OpenCLIP ViT-H/14)."""

    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    act: Literal["quick_gelu", "gelu"] = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # 0: one embedding row per token id (every released model). N > 0: a compact vocabulary of N rows,
    # token ids mapped to rows by the ``embeddings.token_map`` buffer (small models trained on few words)
    token_rows: int = 0


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL (LDM ``ddconfig``): f = 2 ** (len(ch_mult) - 1)."""

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    norm_groups: int = 32
    scale_factor: float = 0.18215

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class UNetConfig:
    """LDM ``UNetModel`` with spatial transformers (cross-attention on the text embeddings).

    Exactly one of ``num_heads`` (SD1: 8 heads at every level) and ``head_dim``
    (SD2: 64-wide heads, so the head count grows with the width) is set.
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    num_heads: int | None = 8
    head_dim: int | None = None
    context_dim: int = 768
    transformer_depth: int = 1
    use_linear_in_transformer: bool = False  # SD2 uses nn.Linear for proj_in/proj_out
    norm_groups: int = 32
    # full LCM models (e.g. LCM_Dreamshaper_v7): width of the guidance-scale embedding added to the
    # timestep embedding (diffusers' time_cond_proj_dim, 256); None for ordinary U-Nets
    time_cond_proj_dim: int | None = None

    def heads_at(self, channels: int) -> tuple[int, int]:
        """(number of heads, head width) for a block of ``channels`` channels."""
        if self.head_dim is not None:
            return channels // self.head_dim, self.head_dim
        assert self.num_heads is not None
        return self.num_heads, channels // self.num_heads


Family = Literal["sd1", "sd2", "custom"]
Prediction = Literal["eps", "v"]


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a full Stable Diffusion model."""

    name: str
    family: Family
    unet: UNetConfig
    vae: VAEConfig
    text: TextEncoderConfig
    prediction: Prediction = "eps"
    # which hidden layer feeds the U-Net: 1 = last layer (SD1), 2 = penultimate (SD2)
    clip_skip: int = 1
    # SD1 pads prompts with the end token; OpenCLIP (SD2) pads with id 0
    pad_with_eos: bool = True
    # noise schedule the model was trained on
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def is_inpainting(self) -> bool:
        return self.unet.in_channels == 9

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> ModelConfig:
        d = json.loads(text)
        for key in ("unet", "vae"):
            for k, v in d[key].items():
                if isinstance(v, list):
                    d[key][k] = tuple(v)
        return ModelConfig(
            name=d["name"],
            family=d["family"],
            unet=UNetConfig(**d["unet"]),
            vae=VAEConfig(**d["vae"]),
            text=TextEncoderConfig(**d["text"]),
            prediction=d.get("prediction", "eps"),
            clip_skip=d.get("clip_skip", 1),
            pad_with_eos=d.get("pad_with_eos", True),
            beta_start=d.get("beta_start", 0.00085),
            beta_end=d.get("beta_end", 0.012),
            num_train_timesteps=d.get("num_train_timesteps", 1000),
            extra=d.get("extra", {}),
        )


SD1_TEXT = TextEncoderConfig()
SD2_TEXT = TextEncoderConfig(width=1024, layers=24, heads=16, intermediate=4096, act="gelu")

SD15 = ModelConfig(name="sd15", family="sd1", unet=UNetConfig(), vae=VAEConfig(), text=SD1_TEXT)
SD15_INPAINT = SD15.replace(name="sd15-inpainting", unet=UNetConfig(in_channels=9))

_SD2_UNET = UNetConfig(num_heads=None, head_dim=64, context_dim=1024, use_linear_in_transformer=True)
SD21_BASE = ModelConfig(
    name="sd21-base", family="sd2", unet=_SD2_UNET, vae=VAEConfig(), text=SD2_TEXT,
    clip_skip=2, pad_with_eos=False,
)
SD21 = SD21_BASE.replace(name="sd21", prediction="v")  # the 768-v model
SD2_INPAINT = SD21_BASE.replace(name="sd2-inpainting", unet=dataclasses.replace(_SD2_UNET, in_channels=9))

# Tiny configs keep tests fast; the same code paths as the full models.
TINY_TEXT = TextEncoderConfig(width=32, layers=2, heads=4, intermediate=64)
TINY = ModelConfig(
    name="tiny",
    family="sd1",
    unet=UNetConfig(
        model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(True, True),
        num_heads=2, context_dim=32, norm_groups=8,
    ),
    vae=VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8),
    text=TINY_TEXT,
)
TINY_SD2 = TINY.replace(
    name="tiny-sd2", family="sd2", clip_skip=2, pad_with_eos=False, prediction="v",
    text=dataclasses.replace(TINY_TEXT, act="gelu"),
    unet=dataclasses.replace(TINY.unet, num_heads=None, head_dim=8, use_linear_in_transformer=True),
)

PRESETS: dict[str, ModelConfig] = {
    c.name: c for c in (SD15, SD15_INPAINT, SD21_BASE, SD21, SD2_INPAINT, TINY, TINY_SD2)
}
