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
    # > 0: a ``text_projection`` (width -> projection_dim, no bias) of the pooled output, as
    # transformers' CLIPTextModelWithProjection (SDXL's OpenCLIP bigG conditions on it)
    projection_dim: int = 0


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
    # per-channel latent statistics (diffusers' AutoencoderKL latents_mean / latents_std, the Playground v2.5
    # convention): the U-Net sees (z - mean) * scale_factor / std; None: z * scale_factor (SD1/SD2/SDXL).
    # ldmkit.latent_norm maps between the two spaces.
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        from ldmkit.latent_norm import checked_stats

        mean, std = checked_stats(self.latents_mean, self.latents_std, self.z_channels)
        object.__setattr__(self, "latents_mean", mean)
        object.__setattr__(self, "latents_std", std)

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
    # transformer blocks per spatial transformer: one for all levels (SD1/SD2), or one per level (SDXL:
    # (0, 2, 10), 0 where the level has no attention); the middle block's is transformer_depth_middle,
    # None meaning the largest level's
    transformer_depth: int | tuple[int, ...] = 1
    transformer_depth_middle: int | None = None
    use_linear_in_transformer: bool = False  # SD2 uses nn.Linear for proj_in/proj_out
    norm_groups: int = 32
    # full LCM models (e.g. LCM_Dreamshaper_v7): width of the guidance-scale embedding added to the
    # timestep embedding (diffusers' time_cond_proj_dim, 256); None for ordinary U-Nets
    time_cond_proj_dim: int | None = None
    # SDXL: width of the vector conditioning ``y`` that ``label_emb`` adds to the time embedding (base:
    # pooled text 1280 + 6 Fourier-embedded 256-wide size/crop ids = 2816; refiner: 1280 + 5 * 256 = 2560)
    adm_in_channels: int | None = None

    def depth_at(self, level: int) -> int:
        """Transformer blocks of the spatial transformers at ``level``."""
        d = self.transformer_depth
        return d if isinstance(d, int) else d[level]

    @property
    def middle_depth(self) -> int:
        if self.transformer_depth_middle is not None:
            return self.transformer_depth_middle
        d = self.transformer_depth
        return d if isinstance(d, int) else max(d)

    def heads_at(self, channels: int) -> tuple[int, int]:
        """(number of heads, head width) for a block of ``channels`` channels."""
        if self.head_dim is not None:
            return channels // self.head_dim, self.head_dim
        assert self.num_heads is not None
        return self.num_heads, channels // self.num_heads


Family = Literal["sd1", "sd2", "sdxl", "sdxl-refiner", "custom"]
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
    # SDXL: the second text encoder (conditioner.embedders.1, OpenCLIP bigG with projection); None for SD1/SD2
    # and the refiner, whose only encoder (``text``) is the bigG one
    text2: TextEncoderConfig | None = None
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

    @property
    def is_sdxl(self) -> bool:
        return self.family in ("sdxl", "sdxl-refiner")

    @property
    def text_layers(self) -> int:
        """The largest clip skip (A1111's CLIP_stop_at_last_layers) every text encoder has layers for."""
        return min(c.layers for c in (self.text, self.text2) if c is not None)

    @property
    def native_size(self) -> int:
        """The resolution the model was trained at: stored by ldmkit's export (``extra["image_size"]``), else
        the family's (SDXL 1024, SD2 768-v 768, otherwise 512)."""
        if "image_size" in self.extra:
            return int(self.extra["image_size"])
        if self.is_sdxl:
            return 1024
        return 768 if self.family == "sd2" and self.prediction == "v" else 512

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
            text2=TextEncoderConfig(**d["text2"]) if d.get("text2") else None,
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

# SDXL (Podell et al. 2023): CLIP-L and OpenCLIP bigG, both read at the penultimate layer without the final
# norm, concatenated to 2048 channels; no attention at the highest resolution. Values: Stability's
# sd_xl_base.yaml / sd_xl_refiner.yaml and diffusers' unet/config.json of the same models.
BIGG_TEXT = TextEncoderConfig(width=1280, layers=32, heads=20, intermediate=5120, act="gelu", projection_dim=1280)
SDXL_VAE = VAEConfig(scale_factor=0.13025)
_SDXL_UNET = UNetConfig(
    channel_mult=(1, 2, 4), attention_levels=(False, True, True), num_heads=None, head_dim=64,
    context_dim=2048, transformer_depth=(0, 2, 10), use_linear_in_transformer=True, adm_in_channels=2816,
)
SDXL_BASE = ModelConfig(name="sdxl-base", family="sdxl", unet=_SDXL_UNET, vae=SDXL_VAE, text=SD1_TEXT,
                        text2=BIGG_TEXT, clip_skip=2, pad_with_eos=True)
SDXL_REFINER = ModelConfig(
    name="sdxl-refiner", family="sdxl-refiner", vae=SDXL_VAE, text=BIGG_TEXT, clip_skip=2, pad_with_eos=False,
    unet=dataclasses.replace(_SDXL_UNET, model_channels=384, channel_mult=(1, 2, 4, 4),
                             attention_levels=(False, True, True, False), transformer_depth=4,
                             context_dim=1280, adm_in_channels=2560),
)
SDXL_INPAINT = SDXL_BASE.replace(name="sdxl-inpainting", unet=dataclasses.replace(_SDXL_UNET, in_channels=9))
SDXL_ID_DIM = 256  # Fourier width of each size/crop/aesthetic id in the vector conditioning

# Tiny SDXL: same structure (two encoders, level 0 without attention, per-level depth, label_emb).
# widths differ from TINY_TEXT as CLIP-L's and bigG's do: diffusers' single-file loader tells them apart by width
TINY_BIGG = TextEncoderConfig(width=48, layers=10, heads=4, intermediate=64, act="gelu", projection_dim=24)
TINY_SDXL = ModelConfig(
    name="tiny-sdxl", family="sdxl", text=TINY_TEXT, text2=TINY_BIGG, clip_skip=2, pad_with_eos=True,
    unet=UNetConfig(
        model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(False, True, True),
        num_heads=None, head_dim=8, context_dim=80, transformer_depth=(0, 1, 2), use_linear_in_transformer=True,
        norm_groups=8, adm_in_channels=24 + 6 * SDXL_ID_DIM,
    ),
    vae=VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8, scale_factor=0.13025),
)
TINY_SDXL_REFINER = TINY_SDXL.replace(
    name="tiny-sdxl-refiner", family="sdxl-refiner", text=TINY_BIGG, text2=None, pad_with_eos=False,
    unet=dataclasses.replace(TINY_SDXL.unet, channel_mult=(1, 2, 2, 2), attention_levels=(False, True, True, False),
                             transformer_depth=2, context_dim=48, adm_in_channels=24 + 5 * SDXL_ID_DIM),
)

PRESETS: dict[str, ModelConfig] = {
    c.name: c for c in (SD15, SD15_INPAINT, SD21_BASE, SD21, SD2_INPAINT, TINY, TINY_SD2,
                        SDXL_BASE, SDXL_REFINER, SDXL_INPAINT, TINY_SDXL, TINY_SDXL_REFINER)
}
