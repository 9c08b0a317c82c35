"""LoRA (Hu et al. 2021): merging LoRA files of any layout into a model, and training LoRA modules.

A LoRA adds ``ΔW = multiplier · (alpha / rank) · up @ down`` to a Linear or Conv2d weight (DoRA files
rescale the result per row, see :func:`merged_weight`). The file layouts (kohya/A1111, diffusers/PEFT,
old diffusers) are read by :mod:`ldmkit.lora_formats`; this module matches their names to the model's
modules. Files name targets by diffusers module paths::

    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight  (kohya)
    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight           (PEFT)
    lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight                     (kohya)
    text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight                 (PEFT)

ldmkit's U-Net uses LDM names, so the U-Net names are mapped through ``convert.unet_ldm_to_diffusers``;
kohya files that use LDM names (``lora_unet_input_blocks_1_1_proj_in``) match directly.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ldmkit import convert
from ldmkit.checkpoint import CheckpointError, read_state_dict
from ldmkit.config import ModelConfig
from ldmkit.lora_formats import Layout, LoRAFile, LoRAPair, Part, read_lora_file, write_lora
from ldmkit.lycoris import LycoModule
from ldmkit.model import StableDiffusion
from ldmkit.models.clip import CLIPTextModel
from ldmkit.models.unet import UNetModel

UNET_PREFIX, TE_PREFIX = "lora_unet_", "lora_te_"
# kohya's default targets: every Linear/1x1 conv inside the transformer blocks, and CLIP's attention + MLP
UNET_TARGETS = ("attn1.", "attn2.", "ff.net.", "proj_in", "proj_out")
TE_TARGETS = ("self_attn.", "mlp.")
# cross-attention (U-Net) and text widths of the families a LoRA may have been trained for
_CONTEXT_FAMILY = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}
_TEXT_FAMILY = {768: "SD1.x", 1024: "SD2.x", 1280: "SDXL (second text encoder)"}


# what a LoRA file may change: Linear/Conv2d weights, and norm layers (LyCORIS w_norm/b_norm)
_TARGET_TYPES = (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class Target:
    """A Linear/Conv2d a LoRA may change, under each name files use for it."""

    module: nn.Module
    where: str  # ldmkit path: "unet.input_blocks.1.1.proj_in"
    kohya: str  # "lora_unet_down_blocks_0_attentions_0_proj_in"
    peft: str  # "unet.down_blocks.0.attentions.0.proj_in"
    aliases: tuple[str, ...]  # every (part-relative) name a file may use: diffusers/LDM, dotted/underscored


def _targets(unet: nn.Module, text_encoder: nn.Module, cfg: ModelConfig,
             text_encoder_2: nn.Module | None = None) -> list[Target]:
    # the key tables rename state-dict keys (of every module with a weight, norms included, as the tables
    # expect whole blocks); a tag tensor carries each module's index through them
    paths = [p for p, m in unet.named_modules() if m._parameters.get("weight") is not None]
    tags = {f"{p}.weight": torch.tensor(i) for i, p in enumerate(paths)}
    diffusers = {paths[int(t)]: k.removesuffix(".weight")
                 for k, t in convert.unet_ldm_to_diffusers(tags, cfg.unet).items()}
    out = []
    for path, mod in unet.named_modules():
        if isinstance(mod, _TARGET_TYPES) and getattr(mod, "weight", None) is not None:
            d = diffusers[path]
            # kohya names SDXL's U-Net modules by their sgm (LDM) paths, SD1/SD2's by diffusers paths
            kohya = UNET_PREFIX + (path if cfg.is_sdxl else d).replace(".", "_")
            out.append(Target(mod, f"unet.{path}", kohya, f"unet.{d}",
                              (d, d.replace(".", "_"), path, path.replace(".", "_"))))
    # SDXL: the second text encoder (OpenCLIP bigG) is lora_te2_ / text_encoder_2, and the first lora_te1_.
    te_prefix = "lora_te1_" if text_encoder_2 is not None else TE_PREFIX
    encoders = [("text_encoder", te_prefix, text_encoder)] + \
        ([("text_encoder_2", "lora_te2_", text_encoder_2)] if text_encoder_2 is not None else [])
    for part, prefix, encoder in encoders:
        for path, mod in encoder.named_modules():
            if isinstance(mod, _TARGET_TYPES) and getattr(mod, "weight", None) is not None:
                # files written against transformers >= 5 lack CLIPTextModel's `text_model.` level
                short = path.removeprefix("text_model.")
                out.append(Target(mod, f"{part}.{path}", prefix + path.replace(".", "_"), f"{part}.{path}",
                                  (path, path.replace(".", "_"), short, short.replace(".", "_"))))
    return out


def lora_targets(model: StableDiffusion) -> list[Target]:
    """Every Linear/Conv2d (and norm layer) of the U-Net and text encoders, with the names LoRA files give it."""
    return _targets(model.unet, model.text_encoder, model.cfg, getattr(model, "text_encoder_2", None))


def lora_names(model: StableDiffusion) -> dict[str, tuple[nn.Module, str]]:
    """kohya name -> (module, ldmkit module path) for every Linear/Conv2d a LoRA may target."""
    return {t.kohya: (t.module, t.where) for t in lora_targets(model)}


def peft_names(cfg: ModelConfig) -> dict[str, str]:
    """kohya name -> diffusers/PEFT name (``unet.down_blocks...``) for a model of this config."""
    with torch.device("meta"):  # names only: no weights are allocated
        unet, text = UNetModel(cfg.unet), CLIPTextModel(cfg.text)
        text2 = CLIPTextModel(cfg.text2) if cfg.text2 is not None else None
    return {t.kohya: t.peft for t in _targets(unet, text, cfg, text2)}


def lora_delta(down: Tensor, up: Tensor, alpha: float | None, weight_shape: torch.Size) -> Tensor:
    """ΔW for one module (without the user's multiplier)."""
    return LoRAPair(down, up, alpha).delta(torch.empty(weight_shape, device="meta"))


def _row_norm(w: Tensor) -> Tensor:
    """‖w‖ over everything but the output axis, shaped to broadcast against ``w``."""
    return w.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.ndim - 1))


def merged_weight(weight: Tensor, pair: LoRAPair | LycoModule, multiplier: float = 1.0) -> Tensor:
    """The weight with the LoRA merged, in float32.

    Plain LoRA: ``W + m·s·ΔW`` (s = alpha/rank). DoRA as PEFT defines it (``lora_magnitude_vector``, one
    magnitude per output row): ``mag · V / ‖V‖_row`` with ``V = W + m·s·ΔW`` (peft.tuners.lora.dora; the
    multiplier scales ΔW inside, as diffusers' adapter weights do). DoRA in kohya/LyCORIS files
    (``dora_scale``, per input column unless shaped per output row): ``W + m·(dora(W + s·ΔW) - W)``, as
    A1111 and ComfyUI merge it. LyCORIS kinds (:class:`ldmkit.lycoris.LycoModule`) give their own ``s·ΔW``.
    """
    w = weight.float()
    delta = pair.delta(w)
    if pair.magnitude is None:
        return w + multiplier * delta
    mag = pair.magnitude.float()
    if pair.dora == "peft":
        v = w + multiplier * delta
        return mag.reshape(-1, *[1] * (w.ndim - 1)) * v / _row_norm(v)
    v = w + delta
    if mag.shape[0] == w.shape[0] and mag.numel() == w.shape[0] and w.shape[0] != 1:
        norm = _row_norm(v)  # LyCORIS wd_on_output
    else:
        norm = _row_norm(v.transpose(0, 1)).transpose(0, 1)
    return w + multiplier * (v * (mag.reshape(norm.shape) / norm) - w)


def _family(lora: LoRAFile) -> str:
    """Which model family a LoRA's shapes point at, e.g. "SD2.x (cross-attention width 1024)"."""
    for (part, name), pair in lora.targets.items():
        if part == "unet" and "attn2" in name and ("to_k" in name or "to_v" in name) and pair.in_features:
            width = pair.in_features
            return f"{_CONTEXT_FAMILY.get(width, 'an unknown family')} (cross-attention width {width})"
    for (part, name), pair in lora.targets.items():
        if part == "text_encoder" and ("q_proj" in name or "fc1" in name) and pair.in_features:
            width = pair.in_features
            return f"{_TEXT_FAMILY.get(width, 'an unknown family')} (text width {width})"
    return "another model"


def _fits(pair: LoRAPair | LycoModule, w: Tensor) -> bool:
    if isinstance(pair, LycoModule):
        try:
            pair.delta(w)
        except (ValueError, RuntimeError):  # RuntimeError: factor shapes that do not multiply
            return False
        return pair.magnitude is None or pair.magnitude.numel() in (w.shape[0], w.shape[1])
    if w.ndim < 2:  # a norm layer: only LyCORIS w_norm updates it
        return False
    kernel = math.prod(w.shape[2:])
    return (pair.down.shape[1] == w.shape[1] and pair.up.shape[0] == w.shape[0]
            and math.prod(pair.down.shape[2:]) in (1, kernel) and math.prod(pair.up.shape[2:]) == 1
            and (pair.magnitude is None or pair.magnitude.numel() in (w.shape[0], w.shape[1])))


def _beyond_text_layers(key: tuple[Part, str], model: StableDiffusion) -> bool:
    """A text-encoder target in a layer this model does not have: SD2 diffusers folders keep 23 of OpenCLIP's
    24 layers (the last one's output is never used), while LoRAs trained on single files may target all 24."""
    m = re.search(r"encoder[._]layers[._](\d+)[._]", key[1])
    return key[0] == "text_encoder" and m is not None and int(m[1]) >= len(model.text_encoder.text_model.encoder.layers)


def resolve_lora(model: StableDiffusion, lora: LoRAFile) -> list[tuple[Target, LoRAPair | LycoModule]]:
    """Each of the file's targets paired with the model's module, or a CheckpointError saying what differs."""
    table: dict[tuple[Part, str], Target] = {}
    if lora.sdxl_prefix and not model.cfg.is_sdxl:
        raise CheckpointError(f"{lora.path}: a LoRA for SDXL ({lora.sdxl_prefix}... keys), and this model is "
                              f"{model.cfg.family}; use it with an SDXL model")
    for t in lora_targets(model):
        part: Part = t.where.split(".", 1)[0]  # type: ignore[assignment]
        for alias in t.aliases:
            table[(part, alias)] = t
    model_family = f"this model is {model.cfg.family} (cross-attention width {model.cfg.unet.context_dim})"
    targets = {key: pair for key, pair in lora.targets.items() if key in table or not _beyond_text_layers(key, model)}
    unknown = [f"{part}:{name}" for part, name in targets if (part, name) not in table]
    if unknown or not targets:
        n = len(lora.targets)
        which = (f"none of its {n} targets match" if len(unknown) in (0, n)
                 else f"{len(unknown)} of its {n} targets match no")
        example = (unknown or [f"{part}:{name}" for part, name in lora.targets])[0]
        family = _family(lora)
        guess = (f"it looks like a {lora.layout} LoRA for {family} and {model_family}"
                 if f"width {model.cfg.unet.context_dim})" not in family and family != "another model"
                 else f"a {lora.layout}-layout LoRA whose names are not modules of an SD U-Net or CLIP text encoder")
        raise CheckpointError(f"{lora.path}: {which} a layer of this model (e.g. {example}); {guess}")
    pairs = [(table[key], pair) for key, pair in targets.items()]
    for t, pair in pairs:
        if not _fits(pair, t.module.weight):
            shapes = "/".join(str(tuple(x.shape)) for x in ((pair.down, pair.up) if isinstance(pair, LoRAPair)
                                                            else pair.w.values()))
            raise CheckpointError(
                f"{lora.path}: {t.peft} has LoRA shapes {shapes} that don't "
                f"fit the layer {tuple(t.module.weight.shape)}; it looks like a LoRA for {_family(lora)} and "
                f"{model_family}")
    return pairs


def apply_lora(model: StableDiffusion, path: str | os.PathLike | LoRAFile, multiplier: float = 1.0,
               unet_multiplier: float | None = None) -> int:
    """Merge a LoRA file (any layout or LyCORIS kind, or a PEFT folder) into the model's weights; returns the
    modules changed. ``unet_multiplier`` (default: ``multiplier``) weighs the U-Net part and ``multiplier`` the
    text encoder's, as A1111's ``<lora:name:te:unet>``."""
    lora = path if isinstance(path, LoRAFile) else read_lora_file(path)
    pairs = resolve_lora(model, lora)
    with torch.no_grad():
        for t, pair in pairs:
            m = multiplier if unet_multiplier is None or not t.where.startswith("unet.") else unet_multiplier
            merge_into(t.module, pair, m)
    return len(pairs)


def merge_into(mod: nn.Module, pair: LoRAPair | LycoModule, multiplier: float) -> None:
    """Add one target's update to a Linear/Conv2d in place (weights kept in their dtype)."""
    mod.weight.copy_(merged_weight(mod.weight, pair, multiplier).to(mod.weight.dtype))
    bias = pair.bias_delta()
    if bias is not None and mod.bias is not None:
        mod.bias += (multiplier * bias).to(mod.bias.dtype)


def read_lora(path: str | os.PathLike) -> dict[str, dict[str, Tensor]]:
    """A kohya-layout file grouped by target: {name: {"lora_down.weight", "lora_up.weight", "alpha"}}."""
    sd, _ = read_state_dict(path)
    groups: dict[str, dict[str, Tensor]] = {}
    for key, t in sd.items():
        name, _, part = key.partition(".")
        if part not in ("lora_down.weight", "lora_up.weight", "alpha"):
            raise CheckpointError(f"{path}: {key!r} is not a kohya LoRA key (lora_down/lora_up/alpha)")
        groups.setdefault(name, {})[part] = t
    if not groups:
        raise CheckpointError(f"{path}: empty LoRA file")
    return groups


def parse_lora_arg(spec: str) -> tuple[str, float]:
    """``file.safetensors:0.8`` -> (path, 0.8); a bare path means 1.0."""
    path, sep, weight = spec.rpartition(":")
    if sep and path and not Path(spec).exists():
        try:
            return path, float(weight)
        except ValueError:
            pass
    return spec, 1.0


# ---------------------------------------------------------------- training


class LoRAModule(nn.Module):
    """Wraps a Linear/Conv2d: ``org(x) + multiplier · scale · up(down(x))``; ``up`` starts at zero."""

    def __init__(self, org: nn.Module, rank: int, alpha: float):
        super().__init__()
        self.org = org
        self.rank, self.scale, self.multiplier = rank, alpha / rank, 1.0
        if isinstance(org, nn.Linear):
            self.lora_down = nn.Linear(org.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, org.out_features, bias=False)
        else:
            assert isinstance(org, nn.Conv2d)
            self.lora_down = nn.Conv2d(org.in_channels, rank, org.kernel_size, org.stride, org.padding, bias=False)
            self.lora_up = nn.Conv2d(rank, org.out_channels, 1, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.peft_name = ""  # the diffusers/PEFT name, for save_lora(layout="peft"); set by inject_lora

    @property
    def weight(self) -> Tensor:  # what lora_names() and other code look at
        return self.org.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.org(x) + self.lora_up(self.lora_down(x)) * (self.multiplier * self.scale)


def inject_lora(model: StableDiffusion, rank: int = 8, alpha: float = 8.0, text_encoder: bool = True,
                conv: bool = False) -> dict[str, LoRAModule]:
    """Wrap the targeted modules for training; the base weights are frozen. Returns kohya name -> module."""
    model.requires_grad_(False)
    injected: dict[str, LoRAModule] = {}
    for target in lora_targets(model):
        name, mod, (part, path) = target.kohya, target.module, target.where.split(".", 1)
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            continue
        targets = UNET_TARGETS if part == "unet" else TE_TARGETS
        if part.startswith("text_encoder") and not text_encoder:  # SDXL: both encoders
            continue
        is_1x1 = isinstance(mod, nn.Linear) or mod.kernel_size == (1, 1)
        if not any(t in path for t in targets) and not (conv and part == "unet" and not is_1x1):
            continue
        wrapper = LoRAModule(mod, rank, alpha).to(mod.weight.device)
        wrapper.peft_name = target.peft
        parent_path, _, attr = path.rpartition(".")
        parent = getattr(model, part).get_submodule(parent_path)
        if isinstance(parent, nn.Sequential) or attr.isdigit():
            parent[int(attr)] = wrapper
        else:
            setattr(parent, attr, wrapper)
        injected[name] = wrapper
    return injected


def lora_state_dict(injected: dict[str, LoRAModule]) -> dict[str, Tensor]:
    sd: dict[str, Tensor] = {}
    for name, m in injected.items():
        sd[f"{name}.lora_down.weight"] = m.lora_down.weight.detach().cpu().contiguous()
        sd[f"{name}.lora_up.weight"] = m.lora_up.weight.detach().cpu().contiguous()
        sd[f"{name}.alpha"] = m.alpha.detach().cpu()
    return sd


def save_lora(injected: dict[str, LoRAModule], path: str | os.PathLike, metadata: dict[str, str] | None = None,
              dtype: torch.dtype | None = None, layout: Layout = "kohya") -> None:
    """Write trained LoRA modules in the kohya/A1111 layout or the diffusers/PEFT one (``layout="peft"``)."""
    groups: dict[str, dict[str, Tensor]] = {}
    for key, t in lora_state_dict(injected).items():
        name, _, part = key.partition(".")
        groups.setdefault(name, {})[part] = t
    write_lora(groups, path, layout, {name: m.peft_name for name, m in injected.items()}, metadata, dtype)


def write_lora_state_dict(sd: dict[str, Tensor], path: str | os.PathLike, layout: Layout, cfg: ModelConfig,
                          metadata: dict[str, str] | None = None, dtype: torch.dtype | None = None) -> None:
    """Write kohya-named LoRA weights (``<kohya name>.lora_down.weight`` ...) of a model of ``cfg`` in ``layout``."""
    groups: dict[str, dict[str, Tensor]] = {}
    for key, t in sd.items():
        name, _, part = key.partition(".")
        groups.setdefault(name, {})[part] = t
    names = peft_names(cfg) if layout == "peft" else None
    if names is not None and (unknown := sorted(set(groups) - set(names))):
        raise ValueError(f"{len(unknown)} LoRA targets are not modules of this model (e.g. {unknown[0]})")
    write_lora(groups, path, layout, names, metadata, dtype)


def relayout_lora(path: str | os.PathLike, layout: Layout, cfg: ModelConfig) -> None:
    """Rewrite an ldmkit kohya-layout LoRA file (of a model of ``cfg``) in place in ``layout``."""
    if layout == "kohya":
        return
    sd, metadata = read_state_dict(path)
    write_lora_state_dict(sd, path, layout, cfg, metadata)


def remove_lora(model: StableDiffusion, injected: dict[str, LoRAModule]) -> None:
    """Put the original modules back (after training)."""
    for part in model.parts():
        if part == "vae":
            continue
        root = getattr(model, part)
        for path, mod in list(root.named_modules()):
            if isinstance(mod, LoRAModule):
                parent_path, _, attr = path.rpartition(".")
                parent = root.get_submodule(parent_path)
                if isinstance(parent, nn.Sequential) or attr.isdigit():
                    parent[int(attr)] = mod.org
                else:
                    setattr(parent, attr, mod.org)
