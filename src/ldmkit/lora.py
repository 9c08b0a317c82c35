"""LoRA (Hu et al. 2021) in the kohya / A1111 file layout, so other tools load ldmkit's files and back.

A LoRA adds ``ΔW = multiplier · (alpha / rank) · up @ down`` to a Linear or Conv2d weight. Files name
each target by its diffusers-style module path with ``.`` replaced by ``_``:

    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight  (rank, in)
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight    (out, rank)
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha             ()
    lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight                   ...

ldmkit's U-Net uses LDM names, so the U-Net names are mapped through ``convert.unet_ldm_to_diffusers``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from ldmkit import convert
from ldmkit.checkpoint import CheckpointError, atomic_save_safetensors, read_state_dict
from ldmkit.model import StableDiffusion

UNET_PREFIX, TE_PREFIX = "lora_unet_", "lora_te_"
# kohya's default targets: every Linear/1x1 conv inside the transformer blocks, and CLIP's attention + MLP
UNET_TARGETS = ("attn1.", "attn2.", "ff.net.", "proj_in", "proj_out")
TE_TARGETS = ("self_attn.", "mlp.")


def lora_names(model: StableDiffusion) -> dict[str, tuple[nn.Module, str]]:
    """kohya name -> (module, ldmkit module path) for every Linear/Conv2d a LoRA may target."""
    ptr_to_diffusers = {
        v.data_ptr(): k for k, v in convert.unet_ldm_to_diffusers(model.unet.state_dict(), model.cfg.unet).items()
    }
    names: dict[str, tuple[nn.Module, str]] = {}
    for path, mod in model.unet.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            dname = ptr_to_diffusers[mod.weight.data_ptr()].removesuffix(".weight")
            names[UNET_PREFIX + dname.replace(".", "_")] = (mod, f"unet.{path}")
    for path, mod in model.text_encoder.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            names[TE_PREFIX + path.replace(".", "_")] = (mod, f"text_encoder.{path}")
    return names


def lora_delta(down: Tensor, up: Tensor, alpha: float | None, weight_shape: torch.Size) -> Tensor:
    """ΔW for one module (without the user's multiplier)."""
    rank = down.shape[0]
    scale = (alpha if alpha is not None else rank) / rank
    down, up = down.float(), up.float()
    if down.ndim == 2:
        delta = up @ down
    elif down.shape[2:] == (1, 1):
        delta = (up.flatten(1) @ down.flatten(1))[:, :, None, None]
    else:  # 3x3 conv down, 1x1 conv up (LoCon)
        delta = torch.einsum("or,rihw->oihw", up.flatten(1), down)
    return (delta * scale).reshape(weight_shape)


def read_lora(path: str | os.PathLike) -> dict[str, dict[str, Tensor]]:
    """A LoRA file grouped by target: {name: {"lora_down.weight", "lora_up.weight", "alpha"}}."""
    sd, _ = read_state_dict(path)
    groups: dict[str, dict[str, Tensor]] = {}
    for key, t in sd.items():
        name, _, part = key.partition(".")
        if part not in ("lora_down.weight", "lora_up.weight", "alpha"):
            raise CheckpointError(f"{path}: {key!r} is not a kohya LoRA key (lora_down/lora_up/alpha)")
        groups.setdefault(name, {})[part] = t
    if not groups:
        raise CheckpointError(f"{path}: empty LoRA file")
    for name, g in groups.items():
        if "lora_down.weight" not in g or "lora_up.weight" not in g:
            raise CheckpointError(f"{path}: {name} lacks lora_down or lora_up")
    return groups


def apply_lora(model: StableDiffusion, path: str | os.PathLike, multiplier: float = 1.0) -> int:
    """Merge a LoRA file into the model's weights; returns the number of modules changed."""
    groups = read_lora(path)
    names = lora_names(model)
    unknown = sorted(set(groups) - set(names))
    if unknown:
        raise CheckpointError(
            f"{path}: {len(unknown)} LoRA targets match no module of this model (e.g. {', '.join(unknown[:3])}); "
            "is it for a different base model (SD1 vs SD2)?"
        )
    with torch.no_grad():
        for name, g in groups.items():
            mod, where = names[name]
            alpha = g["alpha"].item() if "alpha" in g else None
            down, up = g["lora_down.weight"], g["lora_up.weight"]
            if down.shape[1] != mod.weight.shape[1] or up.shape[0] != mod.weight.shape[0]:
                raise CheckpointError(f"{path}: {name} has shapes that don't fit {where} {tuple(mod.weight.shape)}")
            delta = lora_delta(g["lora_down.weight"], g["lora_up.weight"], alpha, mod.weight.shape)
            # merged in float32, then stored in the weight's dtype (fp16 in low-memory mode): rounded once
            mod.weight.copy_((mod.weight.float() + multiplier * delta).to(mod.weight.dtype))
    return len(groups)


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
    for name, (mod, where) in lora_names(model).items():
        part, path = where.split(".", 1)
        targets = UNET_TARGETS if part == "unet" else TE_TARGETS
        if part == "text_encoder" and not text_encoder:
            continue
        is_1x1 = isinstance(mod, nn.Linear) or mod.kernel_size == (1, 1)
        if not any(t in path for t in targets) and not (conv and part == "unet" and not is_1x1):
            continue
        wrapper = LoRAModule(mod, rank, alpha).to(mod.weight.device)
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
              dtype: torch.dtype | None = None) -> None:
    sd = lora_state_dict(injected)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    atomic_save_safetensors(sd, path, {"ss_network_module": "networks.lora", **(metadata or {})})


def remove_lora(model: StableDiffusion, injected: dict[str, LoRAModule]) -> None:
    """Put the original modules back (after training)."""
    for part in ("unet", "text_encoder"):
        root = getattr(model, part)
        for path, mod in list(root.named_modules()):
            if isinstance(mod, LoRAModule):
                parent_path, _, attr = path.rpartition(".")
                parent = root.get_submodule(parent_path)
                if isinstance(parent, nn.Sequential) or attr.isdigit():
                    parent[int(attr)] = mod.org
                else:
                    setattr(parent, attr, mod.org)
