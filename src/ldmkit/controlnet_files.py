"""ControlNet files beyond the plain layouts: ControlNet Union (xinsir's controlnet-union-sdxl-1.0 / ProMax) and
Stability's Control-LoRA (control-lora-*.safetensors, sai_xl_*_*lora.safetensors).

ControlNet Union: a diffusers ``ControlNetUnionModel`` (a folder, or its ``diffusion_pytorch_model*.safetensors``
alone, as the ProMax file ships), told apart by ``control_add_embedding.*`` / ``task_embedding``. Its U-Net part
is converted to cldm.py names as any diffusers ControlNet; the union's extras keep their names
(``models/controlnet_union.py``). Each map is given a control type by name or number (:func:`control_type`).

Control-LoRA: a ControlNet stored relative to the base model, marked by a ``lora_controlnet`` key. Its encoder
copy is the base U-Net's weights plus low-rank deltas, ``X.up`` (out, r[, 1, 1]) and ``X.down`` (r, in[, kh, kw])
giving ``X.weight + up.flatten(1) @ down.flatten(1)`` (reshaped); every other key (hint encoder, zero
convolutions, and whatever the file stores whole: norms, biases) replaces the base's. Keys are cldm.py names
without a prefix, as ComfyUI's ControlLora reads them. So the network is built from the loaded model.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from ldmkit import file_kind
from ldmkit.controlnet import ControlNetError
from ldmkit.models.controlnet_union import AUTO, UNION_TYPES

StateDict = dict[str, Tensor]
UNION_PREFIXES = ("task_embedding", "transformer_layes.", "spatial_ch_projs.", "control_add_embedding.")
CONTROL_LORA_KEY = "lora_controlnet"

# names for each control type: the model card's / ComfyUI's, the A1111 extension's (union_control_type), and the
# preprocessors' that feed them
_TYPE_NAMES = {
    0: ("openpose", "pose", "dwpose", "OpenPose"),
    1: ("depth", "Depth", "midas", "zoe"),
    2: ("hed/pidi/scribble/ted", "hed", "pidi", "pidinet", "scribble", "ted", "softedge", "soft edge", "sketch",
        "Soft Edge"),
    3: ("canny/lineart/anime_lineart/mlsd", "canny", "lineart", "anime_lineart", "mlsd", "hardedge", "hard edge",
        "Hard Edge"),
    4: ("normal", "normalmap", "normal map", "Normal Map", "normalbae"),
    5: ("segment", "seg", "segmentation", "Segmentation"),
    6: ("tile", "Tile", "blur"),
    7: ("repaint", "inpaint", "outpaint", "Inpaint"),
}


AUTO_NAMES = ("auto", "unknown")  # ComfyUI's SetUnionControlNetType "auto" (its number: -1), the extension's Unknown


class ControlFileError(ControlNetError):
    """A Union or Control-LoRA file that cannot be used as asked; the message says why and what to do."""


def _norm(name: str) -> str:
    return re.sub(r"[\s_-]+", "", name.strip().lower())


def type_names() -> str:
    """The control types for help texts: "0 openpose, 1 depth, ..."."""
    return ", ".join(f"{i} {UNION_TYPES[i]}" for i in range(len(UNION_TYPES)))


def control_type(value: object, num_types: int = len(UNION_TYPES)) -> int:
    """A control type's number from a number or any of its names (``canny``, ``Hard Edge``, ``3``...); ``auto`` (the
    A1111 extension's ``Unknown``, ComfyUI's -1): :data:`~ldmkit.models.controlnet_union.AUTO`, no type."""
    text = str(value).strip()
    if _norm(text) in AUTO_NAMES or text == "-1":
        return AUTO
    if text.lstrip("-").isdigit():
        n = int(text)
    else:
        want = _norm(text)
        found = [i for i, names in _TYPE_NAMES.items() if any(_norm(n) == want for n in names)]
        if not found:
            raise ValueError(f"unknown ControlNet Union control type {text!r}: use one of {type_names()}")
        n = found[0]
    if not 0 <= n < num_types:
        raise ValueError(f"control type {text!r} ({n}) is not one of this ControlNet Union's {num_types}: "
                         f"{', '.join(f'{i} {UNION_TYPES[i]}' for i in range(min(num_types, len(UNION_TYPES))))}")
    return n


def control_types(value: object, num_types: int = len(UNION_TYPES)) -> tuple[int, ...]:
    """``depth`` -> (1,); ``openpose+depth`` (several maps in one unit) -> (0, 1); a sequence -> each."""
    if isinstance(value, (list, tuple)):
        return tuple(control_type(v, num_types) for v in value)
    return tuple(control_type(v, num_types) for v in str(value).split("+"))


# ---------------------------------------------------------------- ControlNet Union


def is_union(sd: Mapping[str, Tensor]) -> bool:
    return "control_add_embedding.linear_1.weight" in sd or "task_embedding" in sd


def split_union(sd: Mapping[str, Tensor]) -> tuple[StateDict, StateDict]:
    """(the ControlNet part, the union's extras) of a union state dict."""
    extras = {k: v for k, v in sd.items() if k.startswith(UNION_PREFIXES)}
    return {k: v for k, v in sd.items() if k not in extras}, extras


def union_fields(extras: Mapping[str, Tensor]) -> dict[str, int]:
    """UnionConfig's extra fields from the extras' shapes (heads are not in them: 8, as every released one)."""
    try:
        types, width = extras["task_embedding"].shape
        layers = 1 + max(int(m[1]) for k in extras if (m := re.match(r"transformer_layes\.(\d+)\.", k)))
        proj = extras["spatial_ch_projs.weight"].shape[0]
        embed_in = extras["control_add_embedding.linear_1.weight"].shape[1]
    except (KeyError, ValueError) as e:
        raise ControlFileError(f"ControlNet Union weights incomplete ({e}): expected task_embedding, "
                               "transformer_layes.*, spatial_ch_projs, control_add_embedding") from None
    return {"num_types": types, "trans_channels": width, "trans_layers": layers, "proj_channels": proj,
            "type_embed_dim": embed_in // types}


# ---------------------------------------------------------------- Control-LoRA


def is_control_lora(sd: Mapping[str, Tensor]) -> bool:
    return CONTROL_LORA_KEY in sd


def _lora_family(sd: Mapping[str, Tensor]) -> str:
    from ldmkit.controlnet import _family

    for k, v in sd.items():
        if k.endswith("attn2.to_k.down") or k.endswith("attn2.to_k.weight"):
            return f"{_family(v.shape[-1])} (text context {v.shape[-1]})"
    skips = len({m[1] for k in sd if (m := re.match(r"zero_convs\.(\d+)\.", k))})
    return f"a U-Net with {skips} skip connections"


def control_lora_weights(sd: Mapping[str, Tensor], expected: Mapping[str, Tensor],
                         base: Mapping[str, Tensor], name: str, model_family: str) -> StateDict:
    """The full cldm.py-named ControlNet weights of Control-LoRA ``sd``: ``expected`` (the ControlNet's own state
    dict, any device, for names and shapes), ``base`` (the base U-Net's). One-line error when the file does not
    fit (another model family, or a key the ControlNet does not have)."""

    def wrong(why: str) -> ControlFileError:
        return ControlFileError(f"Control-LoRA {name} is for {_lora_family(sd)} but the model is {model_family} "
                                f"({why}): use a Control-LoRA made for that model")

    out: StateDict = {}
    ups = {k[:-3] for k in sd if k.endswith(".up")}
    for k, v in sd.items():
        if k == CONTROL_LORA_KEY or k.endswith((".up", ".down")):
            continue
        if k not in expected:
            raise wrong(f"it has {k}, which the model's ControlNet lacks")
        if tuple(v.shape) != tuple(expected[k].shape):
            raise wrong(f"{k} is {tuple(v.shape)}, the model's {tuple(expected[k].shape)}")
        out[k] = v
    for stem in sorted(ups):
        key, down = f"{stem}.weight", sd.get(f"{stem}.down")
        if down is None:
            raise ControlFileError(f"Control-LoRA {name}: {stem}.up without {stem}.down: the file is incomplete")
        if key not in expected or key not in base:
            raise wrong(f"it has a delta for {key}, which the model's ControlNet lacks")
        shape = tuple(expected[key].shape)
        delta = sd[f"{stem}.up"].float().flatten(1) @ down.float().flatten(1)  # (out, in * kh * kw)
        if delta.numel() != expected[key].numel() or delta.shape[0] != shape[0]:
            raise wrong(f"the delta for {key} is {tuple(delta.shape)}, the weight {shape}")
        out[key] = base[key].float() + delta.reshape(shape)
    for k in expected:  # the rest of the encoder copy: the base U-Net's own weights
        if k not in out and k in base:
            out[k] = base[k]
    return out


def describe_union(sd: Mapping[str, Tensor]) -> str:
    f = union_fields(split_union(sd)[1])
    n = f["num_types"]
    return (f"ControlNet Union ({n} control types: {', '.join(UNION_TYPES[:n])}; pick one per map with "
            f"--control-type)")


def describe_control_lora(sd: Mapping[str, Tensor]) -> str:
    ranks = sorted({int(v.shape[0]) for k, v in sd.items() if k.endswith(".down")})
    n = sum(t.numel() for k, t in sd.items() if k != CONTROL_LORA_KEY)
    rank = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}" if ranks else "no deltas"
    dtypes = ", ".join(sorted({str(t.dtype).removeprefix("torch.") for t in sd.values() if t.numel()}))
    return (f"Control-LoRA for {_lora_family(sd)}: {rank}, {sum(k.endswith('.down') for k in sd)} low-rank deltas "
            f"over the base U-Net's encoder, {n / 1e6:.1f}M parameters ({dtypes}); built from the --model it is "
            "used with")


def control_lora_from(controlnet: Mapping[str, Tensor], base: Mapping[str, Tensor], rank: int | None = None,
                      keep: tuple[str, ...] = ("input_hint_block.", "zero_convs.", "middle_block_out.")) -> StateDict:
    """A Control-LoRA state dict for ControlNet weights ``controlnet`` over ``base`` (both cldm.py names): each
    2-D+ weight the base shares as ``up``/``down`` (SVD of the difference, truncated to ``rank``; all of it when
    None, which is exact), everything else whole. For tests and for making compact files."""
    out: StateDict = {}
    for k, w in controlnet.items():
        if k.startswith(keep) or k not in base or w.ndim < 2 or not k.endswith(".weight"):
            out[k] = w.clone()
            continue
        diff = (w.double() - base[k].double()).flatten(1)
        u, s, vh = torch.linalg.svd(diff, full_matrices=False)
        r = len(s) if rank is None else min(rank, len(s))
        up = (u[:, :r] * s[:r]).float()
        down = vh[:r].float()
        stem = k[: -len(".weight")]
        out[f"{stem}.up"] = up.reshape(up.shape[0], r, *([1] * (w.ndim - 2)))
        out[f"{stem}.down"] = down.reshape(r, *w.shape[1:])
    out[CONTROL_LORA_KEY] = torch.tensor([])
    return out




def union_types(net: object, control_type: object, title: str, image: object) -> tuple[int, ...]:
    """The control types of a unit of ``net`` (one per map in ``image``, a PIL image or a list of them); () for a
    plain ControlNet. One-line errors: a Union without a type, a type for a plain ControlNet, a count mismatch."""
    from ldmkit.models.controlnet_union import UnionConfig

    cfg = getattr(net, "cfg", None)
    n_maps = len(image) if isinstance(image, (list, tuple)) else 1
    if not isinstance(cfg, UnionConfig):
        if control_type is not None:
            raise ControlFileError(f"--control-type is for ControlNet Union files, and {title} is a plain ControlNet: "
                                   "drop --control-type")
        if n_maps != 1:
            raise ControlFileError(f"ControlNet {title} reads one map, {n_maps} given")
        return ()
    if control_type is None:
        raise ControlFileError(f"ControlNet {title} is a ControlNet Union: name the map's control type with "
                               f"--control-type ({type_names()}; or auto for none)")
    try:
        types = control_types(control_type, cfg.num_types)
    except ValueError as e:
        raise ControlFileError(str(e)) from None
    if len(types) != n_maps:
        raise ControlFileError(f"--control-type {control_type} names {len(types)} map(s) but {n_maps} control "
                               "image(s) were given: join as many images with + in --control-image")
    if AUTO in types and len(types) > 1:
        raise ControlFileError(f"--control-type {control_type}: auto (no control type) reads one map alone; name "
                               "each map's type to give several")
    return types


def header_kind(path: Path | file_kind.Header) -> str | None:
    """"union" / "control-lora" from a folder's config.json or a .safetensors header alone (as file_kind reads
    them); None otherwise."""
    header = file_kind.read_header(path)
    if header.folder_class is not None:
        return "union" if header.folder_class == "ControlNetUnionModel" else None
    names = dict.fromkeys(header.keys or ())
    if is_control_lora(names):  # type: ignore[arg-type]
        return "control-lora"
    return "union" if is_union(names) else None  # type: ignore[arg-type]


def describe_file(path: str | os.PathLike | file_kind.Header) -> str | None:
    """``ldmkit info``'s line for a ControlNet Union or Control-LoRA file/folder; None for anything else."""
    from ldmkit.controlnet import _family_of, config_from_weights, read_controlnet

    header = file_kind.read_header(path)
    kind = header_kind(header)
    if kind is None:
        return None
    sd = read_controlnet(header.path)
    if kind == "control-lora":
        return describe_control_lora(sd)
    u = config_from_weights(sd).unet
    n = sum(t.numel() for t in sd.values())
    return f"{describe_union(sd)} for {_family_of(u)}: model channels {u.model_channels}, {n / 1e6:.1f}M parameters"


__all__ = ["ControlFileError", "control_lora_from", "control_lora_weights", "control_type", "control_types",
           "describe_control_lora", "describe_file", "describe_union", "is_control_lora", "is_union", "split_union",
           "type_names", "union_fields", "union_types"]
