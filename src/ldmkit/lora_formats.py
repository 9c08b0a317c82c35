"""LoRA files in the layouts people publish, read into one form; and the diffusers/PEFT layout written.

Layouts, told apart by their keys (:func:`detect_lora_format`):

``kohya``  (kohya-ss sd-scripts, A1111, LyCORIS LoCon, the published LCM-LoRA files)
    ``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` [/ ``.dora_scale``], the
    module path with ``.`` turned into ``_`` (diffusers names, or LDM names ``input_blocks_1_1_proj_in``);
    ``lora_te_<module>`` for the text encoder.
``peft``  (diffusers >= 0.23 ``save_lora_weights``, a PEFT ``save_pretrained`` folder)
    ``[unet.|text_encoder.|base_model.model.]<module>.lora_A.weight`` / ``.lora_B.weight``
    [/ ``.lora_B.bias`` / ``.lora_magnitude_vector`` (DoRA)]. The tensors carry no alpha: it comes from
    ``.alpha`` keys, the ``lora_adapter_metadata`` JSON diffusers writes into the safetensors header
    (``unet.lora_alpha``, ``unet.alpha_pattern``, ``unet.use_rslora``), or an ``adapter_config.json``
    beside the file (PEFT folder); without any, alpha = rank (scale 1), as diffusers assumes.
``diffusers-old``  (diffusers < 0.23: attention processors, LoRACompatible layers)
    ``<attn>.processor.to_q_lora.down.weight``, ``<module>.lora.down.weight``,
    ``text_encoder.<layer>.self_attn.to_q_lora.down.weight``, ``<layer>.mlp.fc1.lora_linear_layer.down.weight``.

Every layout becomes ``{(part, name): LoRAPair}``: part is ``unet`` or ``text_encoder``, name the module
path as the file spells it (dotted, or underscored for kohya; text-encoder dotted names always start with
``text_model.``). :mod:`ldmkit.lora` matches those names against the model's modules.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from ldmkit import file_kind, lycoris
from ldmkit.checkpoint import CheckpointError, atomic_save_safetensors, read_state_dict
from ldmkit.lycoris import LycoModule

Part = Literal["unet", "text_encoder", "text_encoder_2"]
Layout = Literal["kohya", "peft"]
# lora_te1_: diffusers' own kohya writer (convert_state_dict_to_kohya) names SD1's text encoder so too
# (SDXL: lora_te1_ is CLIP-L, lora_te2_ OpenCLIP bigG)
KOHYA_PREFIXES: dict[str, Part] = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                                   "lora_te2_": "text_encoder_2"}
_KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha", "dora_scale": "dora_scale",
                "scale": "scale", **{role: role for role in lycoris.ROLES}}
_PEFT_KEY = re.compile(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_magnitude_vector(?:\.weight)?|alpha)")
_OLD_ATTN = re.compile(r"(.+?)\.(?:processor\.)?(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")
_OLD_LINEAR = re.compile(r"(.+)\.(?:lora|lora_linear_layer)\.(down|up)\.weight")
_OLD_ALPHA = re.compile(r"(.+?)(?:\.processor)?(?:\.(to_q|to_k|to_v|to_out)_lora)?\.alpha")
# diffusers' old attention-processor names -> module names (U-Net attention, CLIP attention)
_OLD_UNET_PROJ = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_OLD_TE_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
# prefixes of SDXL LoRAs (fine for an SDXL model, refused on SD1/SD2 ones by ldmkit.lora.resolve_lora)
SDXL_PREFIXES = ("lora_te2_", "text_encoder_2.", "lora_unet_label_emb", "unet.add_embedding")
# prefixes of other architectures' LoRAs, with the family they point at
_FOREIGN = (("lora_unet_double_blocks", "Flux"), ("lora_unet_single_blocks", "Flux"),
            ("transformer.single_transformer_blocks", "Flux"), ("lora_transformer_single", "Flux"),
            ("transformer.transformer_blocks", "a DiT (SD3/Flux)"), ("lora_unet_joint_blocks", "SD3"),
            ("diffusion_model.joint_blocks", "SD3"), ("lora_transformer_", "a DiT (SD3/Flux)"))


@dataclass(frozen=True)
class LoRAPair:
    """One target's update ``ΔW = scale · up @ down`` (plus a DoRA magnitude where the file has one)."""

    down: Tensor  # (rank, in) or (rank, in, kh, kw)
    up: Tensor  # (out, rank) or (out, rank, 1, 1)
    alpha: float | None = None  # None: alpha = rank, i.e. scale 1
    rslora: bool = False  # scale alpha / sqrt(rank) (Kalajdzievski 2023, PEFT use_rslora)
    up_bias: Tensor | None = None  # PEFT lora_bias: the bias of lora_B, added to the layer's bias
    magnitude: Tensor | None = None  # DoRA (Liu et al. 2024)
    dora: Literal["peft", "kohya"] | None = None  # whose DoRA convention ``magnitude`` follows

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        alpha = self.rank if self.alpha is None else self.alpha
        return alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def in_features(self) -> int:
        return self.down.shape[1]

    def delta(self, weight: Tensor) -> Tensor:
        """``scale · up @ down`` in float32, shaped like ``weight`` (without the user's multiplier)."""
        down, up = self.down.float(), self.up.float()
        if down.ndim == 2 or down.shape[2:] == (1, 1):
            d = up.flatten(1) @ down.flatten(1)
        else:  # 3x3 conv down, 1x1 conv up (LoCon)
            d = torch.einsum("or,rihw->oihw", up.flatten(1), down)
        return d.reshape(weight.shape) * self.scale

    def bias_delta(self) -> Tensor | None:
        return None if self.up_bias is None else self.up_bias.float() * self.scale


@dataclass
class LoRAFile:
    path: str
    layout: str  # "kohya", "peft" or "diffusers-old"
    targets: dict[tuple[Part, str], LoRAPair | LycoModule]
    metadata: dict[str, str]
    sdxl_prefix: str | None = None  # a key prefix only SDXL LoRAs have (lora_te2_, ...), if any


# ---------------------------------------------------------------- telling layouts apart


def _unsupported(keys: list[str]) -> str | None:
    """Why a file of LoRA-like networks ldmkit does not merge is refused; None for any other file."""
    def has(*parts: str) -> bool:
        return any(p in k for k in keys for p in parts)

    if has("oft_blocks", "oft_diag"):
        return "a LyCORIS OFT/BOFT network (oft_blocks keys), which ldmkit does not merge"
    if has(".a1.weight") and has(".b1.weight"):
        return "a LyCORIS GLoRA network (a1/a2/b1/b2 keys), which ldmkit does not merge"
    if has("lora_embedding_A"):
        return "a PEFT LoRA of embedding layers (lora_embedding_A keys), which ldmkit does not merge"
    return None


def _what_else(keys: list[str]) -> str:
    """What a file that is not a LoRA seems to hold, from its keys (file_kind: the one place that names a file's
    kind), and the option that takes it."""
    if why := _unsupported(keys):
        return why
    if why := file_kind.misplaced(file_kind.kind_of_keys(keys), "a LoRA", (file_kind.LORA,)):
        return why
    return f"no LoRA keys (lora_down/lora_up or lora_A/lora_B); first keys: {', '.join(keys[:3])}"


def lora_layout(keys: Iterable[str]) -> str | None:
    """The layout of a LoRA state dict: "kohya", "peft" or "diffusers-old"; None for anything else (including
    LoRA-like networks ldmkit does not merge)."""
    keys = list(keys)
    if not keys or _unsupported(keys):
        return None
    if all(k.startswith(tuple(KOHYA_PREFIXES)) for k in keys):
        return "kohya"
    if any(_PEFT_KEY.fullmatch(k) and ".lora_" in k for k in keys):
        return "peft"
    if any(_OLD_ATTN.fullmatch(k) or _OLD_LINEAR.fullmatch(k) for k in keys):
        return "diffusers-old"
    return None


def detect_lora_format(keys: Iterable[str]) -> str:
    """The layout of a LoRA state dict (:func:`lora_layout`); ValueError naming what it is otherwise."""
    keys = list(keys)
    if not keys:
        raise ValueError("the file holds no tensors")
    if layout := lora_layout(keys):
        return layout
    raise ValueError(_what_else(keys))


def foreign_family(keys: Iterable[str]) -> str | None:
    """The model family a LoRA is for when its key names alone show it is not SD1/SD2/SDXL (e.g. "Flux")."""
    for key in keys:
        for prefix, family in _FOREIGN:
            if key.startswith(prefix):
                return f"{family} ({prefix}... keys)"
    return None


# ---------------------------------------------------------------- reading


def _split_part(name: str) -> tuple[Part, str]:
    """(part, module name) of a dotted diffusers/PEFT name with or without its component prefix."""
    for prefix in ("unet.", "text_encoder.", "text_encoder_2.", "base_model.model."):
        if name.startswith(prefix):
            name = name.removeprefix(prefix)
            if prefix != "base_model.model.":
                part: Part = prefix[:-1]  # type: ignore[assignment]
                return part, _text_name(name) if part != "unet" else name
    # a bare adapter (PEFT saves one model's modules without prefix): CLIP's layers have their own names
    if name.startswith(("text_model.", "encoder.layers.")):
        return "text_encoder", _text_name(name)
    return "unet", name


def _text_name(name: str) -> str:
    # transformers >= 5 CLIPTextModel has no `text_model.` level, so newer files lack it
    return name if name.startswith("text_model.") else "text_model." + name


@dataclass
class _AlphaConfig:
    """PEFT's LoraConfig fields that set a module's scale."""

    lora_alpha: float | None = None
    alpha_pattern: dict[str, float] | None = None
    rslora: bool = False

    def alpha_for(self, names: Iterable[str]) -> float | None:
        # PEFT (utils.other.get_pattern_key): a pattern matches a module whose name ends with it
        for pattern, alpha in (self.alpha_pattern or {}).items():
            if any(re.match(rf"(.*\.)?({pattern})$", n) for n in names):
                return float(alpha)
        return None if self.lora_alpha is None else float(self.lora_alpha)

    @staticmethod
    def of(d: Mapping[str, Any]) -> _AlphaConfig:
        return _AlphaConfig(d.get("lora_alpha"), d.get("alpha_pattern") or {}, bool(d.get("use_rslora", False)))


def _alpha_configs(metadata: dict[str, str], adapter_config: dict | None) -> dict[str, _AlphaConfig]:
    """Per part ("unet", "text_encoder", or "" for the whole file), from diffusers' header or adapter_config."""
    out: dict[str, _AlphaConfig] = {}
    if adapter_config is not None:
        out[""] = _AlphaConfig.of(adapter_config)
    raw = metadata.get("lora_adapter_metadata")
    if raw:
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"the lora_adapter_metadata in the file header is not JSON ({e})") from None
        for part in ("unet", "text_encoder", "text_encoder_2"):
            fields = {k.removeprefix(part + "."): v for k, v in meta.items() if k.startswith(part + ".")}
            if fields:
                out[part] = _AlphaConfig.of(fields)
        if not out and any(k in meta for k in ("lora_alpha", "r")):
            out[""] = _AlphaConfig.of(meta)
    return out


def _group(sd: Mapping[str, Tensor], layout: str) -> dict[tuple[Part, str], dict[str, Tensor]]:
    """Tensors of each target under the layout-independent roles down/up/alpha/up_bias/magnitude/dora_scale."""
    groups: dict[tuple[Part, str], dict[str, Tensor]] = {}
    unknown: list[str] = []
    for key, t in sd.items():
        target: tuple[Part, str] | None = None
        role = ""
        if layout == "kohya":
            name, _, rest = key.partition(".")
            prefix = next((p for p in KOHYA_PREFIXES if name.startswith(p)), None)
            if prefix is not None and rest in _KOHYA_PARTS:
                target, role = (KOHYA_PREFIXES[prefix], name.removeprefix(prefix)), _KOHYA_PARTS[rest]
        elif layout == "peft":
            if m := _PEFT_KEY.fullmatch(key):
                role = {"lora_A.weight": "down", "lora_B.weight": "up", "lora_B.bias": "up_bias",
                        "alpha": "alpha"}.get(m[2], "magnitude")
                target = _split_part(m[1])
        else:  # diffusers-old
            if m := _OLD_ATTN.fullmatch(key):
                part, base = _split_part(m[1])
                proj = (_OLD_TE_PROJ if part != "unet" else _OLD_UNET_PROJ)[m[2]]
                target, role = (part, f"{base}.{proj}"), m[3]
            elif m := _OLD_LINEAR.fullmatch(key):
                target, role = _split_part(m[1]), m[2]
            elif m := _OLD_ALPHA.fullmatch(key):
                part, base = _split_part(m[1])
                proj = (_OLD_TE_PROJ if part != "unet" else _OLD_UNET_PROJ).get(m[2] or "")
                target, role = (part, f"{base}.{proj}" if proj else base), "alpha"
        if target is None:
            unknown.append(key)
            continue
        groups.setdefault(target, {})[role] = t
    if unknown:
        raise ValueError(f"{len(unknown)} keys do not fit the {layout} LoRA layout (e.g. {', '.join(unknown[:3])})")
    for (_, name), g in groups.items():
        if ("down" not in g or "up" not in g) and not any(r in lycoris.ROLES for r in g):
            raise ValueError(f"{name} lacks its {'down' if 'down' not in g else 'up'} matrix; the file is incomplete")
    return groups


def _locate(path: Path) -> tuple[Path, dict | None]:
    """The weights file, and the PEFT adapter_config.json that goes with it (if any)."""
    if path.is_dir():
        names = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors", "adapter_model.bin",
                 "pytorch_lora_weights.bin")
        weights = next((path / n for n in names if (path / n).exists()), None)
        if weights is None:
            raise CheckpointError(f"{path}: a folder without a LoRA file ({' or '.join(names[:2])})")
    else:
        weights = path
    config_path = weights.parent / "adapter_config.json"
    if not config_path.exists():
        return weights, None
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_path}: not a readable adapter config ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{config_path}: a {config.get('peft_type') if isinstance(config, dict) else '?'} "
                              "adapter, not a LoRA")
    return weights, config


def read_lora_file(path: str | os.PathLike) -> LoRAFile:
    """Any layout's LoRA file (or PEFT folder) as ``{(part, module name): LoRAPair}``."""
    weights, adapter_config = _locate(Path(path))
    sd, metadata = read_state_dict(weights)
    try:
        layout = detect_lora_format(sd)
        family = foreign_family(sd)
        if family:
            raise ValueError(f"a LoRA for {family}, not for an SD1/SD2/SDXL model")
        groups = _group(sd, layout)
        # diffusers' per-component header first, then a folder's adapter_config.json
        configs = _alpha_configs(metadata, adapter_config if layout == "peft" else None)
    except (ValueError, CheckpointError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    targets: dict[tuple[Part, str], LoRAPair | LycoModule] = {}
    for (part, name), g in groups.items():
        if any(r in lycoris.ROLES for r in g):
            try:
                roles = {{"down": "lora_down.weight", "up": "lora_up.weight"}.get(r, r): t for r, t in g.items()}
                targets[(part, name)] = lycoris.module_from_roles(name, roles)
            except ValueError as e:
                raise CheckpointError(f"{path}: {e}") from None
            continue
        cfg = configs.get(part) or configs.get("") or _AlphaConfig()
        alpha = g["alpha"].item() if "alpha" in g else cfg.alpha_for(_pattern_names(part, name))
        magnitude = g.get("magnitude", g.get("dora_scale"))
        targets[(part, name)] = LoRAPair(
            down=g["down"], up=g["up"], alpha=alpha, rslora=cfg.rslora, up_bias=g.get("up_bias"),
            magnitude=magnitude, dora=None if magnitude is None else ("kohya" if "dora_scale" in g else "peft"),
        )
    if (adapter_config or {}).get("use_dora") and not any(p.magnitude is not None for p in targets.values()):
        raise CheckpointError(f"{path}: adapter_config.json says use_dora but the file has no lora_magnitude_vector")
    sdxl = next((p for k in sd for p in SDXL_PREFIXES if k.startswith(p)), None)
    return LoRAFile(str(path), layout, targets, metadata, sdxl)


def _pattern_names(part: Part, name: str) -> list[str]:
    """The names a PEFT alpha_pattern may be written against (with and without CLIP's `text_model.`)."""
    return [name, name.removeprefix("text_model.")] if part != "unet" else [name]


# ---------------------------------------------------------------- writing


def write_lora(groups: Mapping[str, Mapping[str, Tensor]], path: str | os.PathLike, layout: Layout,
               peft_names: Mapping[str, str] | None = None, metadata: dict[str, str] | None = None,
               dtype: torch.dtype | None = None) -> None:
    """Write ``{kohya name: {"lora_down.weight", "lora_up.weight", "alpha"}}`` in the kohya or PEFT layout.

    ``peft_names`` maps kohya names to the component-prefixed diffusers names (``unet.down_blocks...``,
    ``text_encoder.text_model.encoder...``) the PEFT layout uses; :func:`ldmkit.lora.peft_names` gives them.
    The PEFT file carries diffusers' ``lora_adapter_metadata`` header (rank, alpha, target modules per
    component), which ``load_lora_weights`` turns into the LoraConfig.
    """
    def cast(t: Tensor) -> Tensor:
        t = t.detach().cpu().contiguous()
        return t.to(dtype) if dtype is not None and t.is_floating_point() and t.ndim else t

    if layout == "kohya":
        sd = {f"{name}.{k}": cast(t) for name, g in groups.items() for k, t in g.items()}
        atomic_save_safetensors(sd, path, {"ss_network_module": "networks.lora", **(metadata or {})})
        return
    if layout != "peft":
        raise ValueError(f"LoRA layout must be 'kohya' or 'peft', got {layout!r}")
    assert peft_names is not None
    sd = {}
    config: dict[str, dict[str, Any]] = {}
    for name, g in groups.items():
        full = peft_names.get(name, "")
        part, _, module = full.partition(".")
        if part not in ("unet", "text_encoder", "text_encoder_2") or not module:
            raise ValueError(f"no diffusers/PEFT name for the LoRA target {name}")
        sd[f"{full}.lora_A.weight"] = cast(g["lora_down.weight"])
        sd[f"{full}.lora_B.weight"] = cast(g["lora_up.weight"])
        rank = g["lora_down.weight"].shape[0]
        alpha = float(g["alpha"]) if "alpha" in g else float(rank)
        c = config.setdefault(part, {"ranks": {}, "alphas": {}, "targets": []})
        # CLIP layers are targeted by their name below `encoder.`, which matches with transformers' own
        # `text_model.` level and without it (transformers >= 5)
        target = module.removeprefix("text_model.encoder.") if part.startswith("text_encoder") else module
        c["ranks"][target], c["alphas"][target] = rank, alpha
        c["targets"].append(target)
    header: dict[str, Any] = {}
    for part, c in config.items():
        r = max(set(c["ranks"].values()), key=list(c["ranks"].values()).count)
        alpha = max(set(c["alphas"].values()), key=list(c["alphas"].values()).count)
        fields = {
            "r": r, "lora_alpha": alpha, "target_modules": sorted(c["targets"]), "use_dora": False,
            "rank_pattern": {f"^{t}$" if part == "unet" else t: v for t, v in c["ranks"].items() if v != r},
            "alpha_pattern": {f"^{t}$" if part == "unet" else t: v for t, v in c["alphas"].items() if v != alpha},
            "init_lora_weights": True, "lora_dropout": 0.0, "bias": "none", "peft_type": "LORA",
        }
        header.update({f"{part}.{k}": v for k, v in fields.items()})
    meta = {**(metadata or {}), "format": "pt",
            "lora_adapter_metadata": json.dumps(header, indent=2, sort_keys=True)}
    atomic_save_safetensors(sd, path, meta)
