"""ControlNet files and control units: load a ControlNet in any published layout, pair it with a control
map, and apply it at every denoising step (see ``models/controlnet.py`` for the network).

Layouts read: the original single file (lllyasviel's ``cldm.py`` names, bare or under ``control_model.``,
also inside a full SD+ControlNet checkpoint), and diffusers ``ControlNetModel`` (a folder with
``diffusion_pytorch_model.safetensors``/``.bin``, or that file alone); fp16 or fp32. The architecture is
read from the weights' names and shapes; attention heads, which the weights do not fix, follow the model
the ControlNet is used with (SD1: 8 heads; SD2: 64-wide heads).
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ldmkit import convert, file_kind
from ldmkit.checkpoint import CheckpointError, read_state_dict
from ldmkit.config import UNetConfig
from ldmkit.controlnet_a1111 import BALANCED, CONTROL, forced_soft, soft_scales
from ldmkit.models.controlnet import ControlNet, ControlNetConfig, Residuals

StateDict = dict[str, Tensor]
ORIGINAL_PREFIX = "control_model."
_DIFFUSERS_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_FAMILY = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}


class ControlNetError(CheckpointError):
    """A file that is not a ControlNet, or one that does not fit the model; the message says which."""


def _family(context_dim: int) -> str:
    return _FAMILY.get(context_dim, f"context dim {context_dim}")


def _family_of(u: UNetConfig) -> str:
    """SDXL (a U-Net with the vector conditioning) or SD1.x / SD2.x by the text context width."""
    if u.adm_in_channels:
        return "SDXL" if u.context_dim == 2048 else f"SDXL-like (context {u.context_dim}, vector {u.adm_in_channels})"
    return _family(u.context_dim)


# ---------------------------------------------------------------- layouts


def _read(path: Path) -> StateDict:
    if path.is_dir():
        for name in _DIFFUSERS_FILES:
            if (path / name).exists():
                return read_state_dict(path / name)[0]
        raise ControlNetError(f"{path}: a folder without {' or '.join(_DIFFUSERS_FILES)}: not a diffusers ControlNet")
    return read_state_dict(path)[0]


def _original_keys(sd: Mapping[str, Tensor]) -> StateDict | None:
    """The cldm.py-named weights (prefix stripped), or None if the file is not in that layout."""
    if any(k.startswith(ORIGINAL_PREFIX) for k in sd):
        return {k[len(ORIGINAL_PREFIX):]: v for k, v in sd.items() if k.startswith(ORIGINAL_PREFIX)}
    if "input_hint_block.0.weight" in sd:
        return dict(sd)
    return None


def _diffusers_blocks(sd: Mapping[str, Tensor]) -> list[convert._Block]:
    """The diffusers <-> cldm.py block table of a diffusers ControlNet: the U-Net's down path and middle
    (convert.py's table) plus the hint encoder and the zero convolutions."""
    count = convert._count
    levels, n_res = count(sd, r"down_blocks\.(\d+)\."), count(sd, r"down_blocks\.0\.resnets\.(\d+)\.")
    attn = tuple(f"down_blocks.{i}.attentions.0.proj_in.weight" in sd for i in range(levels))
    adm = sd["add_embedding.linear_1.weight"].shape[1] if "add_embedding.linear_1.weight" in sd else None  # SDXL
    shape = UNetConfig(channel_mult=(1,) * levels, num_res_blocks=n_res, attention_levels=attn,  # names only
                       adm_in_channels=adm)
    blocks = [b for b in convert._unet_blocks(shape) if b.ldm.startswith(("time_embed", "input_blocks", "middle_",
                                                                              "label_emb"))]
    n_hint = count(sd, r"controlnet_cond_embedding\.blocks\.(\d+)\.")
    hint = ["controlnet_cond_embedding.conv_in"] + [f"controlnet_cond_embedding.blocks.{j}" for j in range(n_hint)]
    hint.append("controlnet_cond_embedding.conv_out")
    blocks += [convert._Block(f"input_hint_block.{2 * j}", hf, "plain") for j, hf in enumerate(hint)]
    n_skips = count(sd, r"controlnet_down_blocks\.(\d+)\.")
    blocks += [convert._Block(f"zero_convs.{i}.0", f"controlnet_down_blocks.{i}", "plain") for i in range(n_skips)]
    return blocks + [convert._Block("middle_block_out.0", "controlnet_mid_block", "plain")]


def diffusers_to_original(sd: Mapping[str, Tensor]) -> StateDict:
    """diffusers ``ControlNetModel`` state dict -> cldm.py names (no ``control_model.`` prefix)."""
    return convert._convert(sd, _diffusers_blocks(sd), to_ldm=True, what="diffusers ControlNet")


def config_from_weights(sd: Mapping[str, Tensor], base: UNetConfig | None = None) -> ControlNetConfig:
    """The architecture of cldm.py-named weights; heads and GroupNorm groups (not in the weights) from ``base``
    (the model it is used with), else by the family convention of its context width (1024: SD2's 64-wide
    heads; otherwise SD1's 8 heads; 32 groups). SDXL (``label_emb.*``, the vector conditioning): 64-wide heads
    and a transformer depth per level, as the SDXL U-Net. A ControlNet Union's: a ``UnionConfig``."""
    from ldmkit import controlnet_files

    if controlnet_files.is_union(sd):
        from ldmkit.models.controlnet_union import UnionConfig

        net, extras = controlnet_files.split_union(sd)
        plain = config_from_weights(net, base)
        return UnionConfig(plain.unet, plain.hint_in_channels, plain.hint_channels,
                           **controlnet_files.union_fields(extras))
    sdxl = "label_emb.0.0.weight" in sd
    to_k = "middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    extra = {}
    if sdxl and to_k not in sd and "middle_block.1.proj_in.weight" in sd:
        # SDXL "small" ControlNets (transformer_layers_per_block [0, 0, 0]): no cross-attention, so no text width
        # in the weights: the model's (SDXL's 2048 without one); the detector below reads it from this stand-in
        extra[to_k] = torch.empty(0, base.context_dim if base is not None else 2048)
    try:
        ctx = {**sd, **extra}[to_k].shape[1]
        in_ch = sd["input_blocks.0.0.weight"].shape[1]
    except KeyError as e:
        raise ControlNetError(f"ControlNet weights lack {e.args[0]!r}: not an SD1/SD2/SDXL ControlNet") from None
    # convert's U-Net detector wants the output conv, which a ControlNet lacks: its width is irrelevant here
    unet = convert._unet_config_from_weights({**sd, **extra, "out.2.weight": torch.empty(in_ch, 0)},
                                             "sd2" if ctx == 1024 or sdxl else "sd1")
    if sdxl:
        from ldmkit.convert_sdxl import _sdxl_unet_fields

        unet = dataclasses.replace(unet, **_sdxl_unet_fields(sd, unet.attention_levels))
    if base is not None:
        unet = dataclasses.replace(unet, num_heads=base.num_heads, head_dim=base.head_dim, norm_groups=base.norm_groups)
    return ControlNetConfig(unet, *hint_config(sd))


def hint_config(sd: Mapping[str, Tensor]) -> tuple[int, tuple[int, ...]]:
    """The hint encoder's (input channels, per-stage widths) from its cldm.py-named weights."""
    convs = sorted(int(m[1]) for k in sd if (m := re.fullmatch(r"input_hint_block\.(\d+)\.weight", k)))
    if len(convs) < 2 or convs != list(range(0, 2 * len(convs), 2)):
        raise ControlNetError(f"ControlNet hint encoder convolutions at {convs}: expected 0, 2, 4, ...")
    stages = len(convs) // 2
    hint = (sd["input_hint_block.0.weight"].shape[0],
            *(sd[f"input_hint_block.{4 + 4 * s}.weight"].shape[0] for s in range(stages - 1)))
    return sd["input_hint_block.0.weight"].shape[1], hint


def read_controlnet(path: str | os.PathLike) -> StateDict:
    """The cldm.py-named weights of a ControlNet file or folder in any layout (or a built-in ControlNet's name,
    e.g. ``emoji-silhouette``); refuses other files by name."""
    from ldmkit.api import builtin_controlnet_path, missing_name

    path = builtin_controlnet_path(str(path)) or Path(path)
    if not path.exists():  # a typo, or a built-in model's name: say what the built-in names are
        raise ControlNetError(missing_name(str(path), "--controlnet"))
    sd = _read(path)
    if "difference" in sd:  # the A1111 extension's "diff" files: weights to add to the base model's U-Net
        raise ControlNetError(f"{path} is a 'difference' ControlNet (weights relative to a base U-Net), which ldmkit "
                              "does not read: use the full ControlNet file (e.g. control_v11p_sd15_*.pth)")
    from ldmkit import controlnet_files, controlnet_lllite

    if controlnet_files.is_control_lora(sd):  # built over the base model by load_controlnet
        return dict(sd)
    if controlnet_lllite.is_lllite(sd):
        raise ControlNetError(f"{path} is a ControlNet-LLLite, which acts inside the model's U-Net: use it as a "
                              "control unit (--controlnet FILE --control-image MAP, or ldmkit.controlnet_lllite); "
                              "a .pth LLLite is recognised by 'lllite' in its name (or save it as .safetensors)")
    original = _original_keys(sd)
    if original is not None:
        return original
    if "controlnet_cond_embedding.conv_in.weight" in sd:
        try:
            if controlnet_files.is_union(sd):  # the U-Net part converted, the union's extras as they are
                net, extras = controlnet_files.split_union(sd)
                return {**diffusers_to_original(net), **extras}
            return diffusers_to_original(sd)
        except ValueError as e:
            raise ControlNetError(f"{path}: {e}") from None
    if any(k.startswith(convert.UNET_PREFIX) for k in sd) or "conv_in.weight" in sd:
        raise ControlNetError(f"{path} is a Stable Diffusion checkpoint, not a ControlNet: pass it as --model, "
                              "and a ControlNet file (control_*.safetensors or a diffusers ControlNetModel) "
                              "as --controlnet")
    if why := file_kind.misplaced(file_kind.kind_of_keys(sd), "a ControlNet", (file_kind.CONTROLNET, file_kind.LLLITE)):
        raise ControlNetError(f"{path}: {why}")
    raise ControlNetError(f"{path} is not a ControlNet: no control_model.*, input_hint_block.* or "
                          "controlnet_cond_embedding.* weights")


def load_controlnet(path: str | os.PathLike, base: UNetConfig | None = None, *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", base_weights: Mapping[str, Tensor] | None = None) -> ControlNet:
    """A ControlNet from ``path``, checked against ``base`` (the U-Net it will control) when given. A Control-LoRA
    is built over ``base_weights`` (that U-Net's state dict), a ControlNet Union as a ``UnionControlNet``."""
    from ldmkit import controlnet_files
    from ldmkit.checkpoint import build_strict
    from ldmkit.models.controlnet_union import UnionConfig, UnionControlNet

    sd = read_controlnet(path)
    if controlnet_files.is_control_lora(sd):
        if base is None or base_weights is None:
            raise ControlNetError(f"{path} is a Control-LoRA (deltas over the base model's U-Net): load it with the "
                                  "model it is for (--model)")
        cfg = ControlNetConfig(base, *hint_config(sd))
        with torch.device("meta"):
            expected = ControlNet(cfg).state_dict()
        sd = controlnet_files.control_lora_weights(sd, expected, base_weights, Path(path).name, _family_of(base))
    else:
        cfg = config_from_weights(sd, base)
    if base is not None:
        check_fits(cfg, base, str(path))
    net = build_strict(lambda: (UnionControlNet(cfg) if isinstance(cfg, UnionConfig) else ControlNet(cfg)), sd,
                       f"ControlNet {path}", dtype)
    net.source_name = Path(path).stem  # type: ignore[assignment]
    return net.to(device=device).eval().requires_grad_(False)


def check_fits(cfg: ControlNetConfig, base: UNetConfig, name: str) -> None:
    """Refuse a ControlNet whose residuals cannot be added to ``base``'s skips, naming both families."""
    u = cfg.unet
    if u.context_dim != base.context_dim or u.adm_in_channels != base.adm_in_channels:
        raise ControlNetError(
            f"ControlNet {name} is for {_family_of(u)} (text context {u.context_dim}) but the model is "
            f"{_family_of(base)} (context {base.context_dim}): use a ControlNet made for that model")
    mine = (u.model_channels, u.channel_mult, u.num_res_blocks)
    theirs = (base.model_channels, base.channel_mult, base.num_res_blocks)
    if mine != theirs:
        raise ControlNetError(f"ControlNet {name} has U-Net widths {mine} (model channels, levels, blocks) but the "
                              f"model has {theirs}: use a ControlNet made for that model")


# ---------------------------------------------------------------- units: a ControlNet, its map, when and how much


def check_window(start: float, end: float) -> None:
    """A unit's step window, as fractions of the run: 0 <= start < end <= 1, or a ValueError saying so."""
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(f"control start {start:g} and end {end:g} must satisfy 0 <= start < end <= 1")


def in_window(start: float, end: float, i: int, n: int) -> bool:
    """Whether step ``i`` of ``n`` lies in a unit's window: start <= i/n and (i+1)/n <= end (diffusers'
    control_guidance_start/end, A1111's guidance start/end)."""
    return not (i / n < start or (i + 1) / n > end)


def map_at(image: Tensor, size: Sequence[int], device: torch.device, dtype: torch.dtype) -> Tensor:
    """A unit's map (made at the output size) for a pass at pixel ``size`` (H, W): resized bilinearly when the
    pass has another size (the hires fix's second pass)."""
    x = image.to(device, dtype)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return x


@dataclass(frozen=True, eq=False)
class ControlUnit:
    """One ControlNet applied with a control map: ``weight`` scales its residuals (diffusers'
    controlnet_conditioning_scale); it acts only on the steps i of n with start <= i/n and (i+1)/n <= end
    (diffusers' control_guidance_start/end; A1111's guidance start/end)."""

    model: ControlNet
    image: Tensor  # (1 or B, 3, H, W) in [0, 1]; made at the output size (control_map), resized to other passes
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    # diffusers' guess_mode: the ControlNet reads only the conditional half of a CFG batch (the unconditional
    # half gets no residuals) and its residuals grow from 0.1 x weight (first skip) to 1 x weight (middle)
    guess_mode: bool = False
    # the A1111 extension's control mode (controlnet_a1111): "Balanced", "My prompt is more important" (soft
    # injection: skip k of K scaled 0.825^(K-k)), "ControlNet is more important" (soft, conditional rows only)
    control_mode: str = "Balanced"
    # the extension's unit settings (module, model, resize mode, ...) for the infotext; None: none written
    settings: dict | None = None
    # the extension's hires-fix option: "Both", "Low res only" (off in the second pass), "High res only"
    hr_option: str = "Both"
    # a ControlNet Union's control type of each map (``image`` then holds the maps side by side in its channels)
    control_types: tuple[int, ...] = ()
    # a Union unit with several maps: each map's weight and (start, end) window (diffusers' per-map
    # controlnet_conditioning_scale and control_guidance_start/end for one ControlNetUnionModel); () = the unit's
    map_weights: tuple[float, ...] = ()
    map_windows: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:
        check_window(self.start, self.end)
        from ldmkit.controlnet_a1111 import control_mode_name

        object.__setattr__(self, "control_mode", control_mode_name(self.control_mode))
        from ldmkit.controlnet_a1111 import hr_option_name

        object.__setattr__(self, "hr_option", hr_option_name(self.hr_option))
        if self.map_weights or self.map_windows:
            k = len(self.control_types)
            if k < 2 or len(self.map_weights) != k or len(self.map_windows) != k:
                raise ValueError(f"per-map weights and windows are for a ControlNet Union unit with several maps: "
                                 f"{len(self.map_weights)} weight(s), {len(self.map_windows)} window(s) for {k} "
                                 "map(s)")
            for s, e in self.map_windows:
                check_window(s, e)

    def active(self, i: int, n: int) -> bool:
        return in_window(self.start, self.end, i, n)


def control_map(image: object, width: int, height: int, log: Callable[[str], None] | None = None,
                resize_mode: str = "Just Resize") -> Tensor:
    """A PIL control image as a (1, 3, height, width) map in [0, 1]; another size is brought to the output size
    by ``resize_mode`` (the A1111 extension's: "Just Resize", "Crop and Resize", "Resize and Fill") and ``log``
    is told so."""
    from PIL import Image

    from ldmkit.controlnet_a1111 import control_image

    assert isinstance(image, Image.Image)
    return map_tensor(control_image(image, width, height, "none", resize_mode, log=log)[0])


def map_tensor(image: object) -> Tensor:
    """A PIL map as (1, 3, H, W) in [0, 1]."""
    rgb = image.convert("RGB")  # type: ignore[attr-defined]
    width, height = rgb.size
    x = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).reshape(height, width, 3)
    return x.permute(2, 0, 1)[None].float() / 255.0  # (1, 3, H, W)


def guess_scaled(r: Residuals, weight: float) -> Residuals:
    """diffusers' guess-mode scales: 10^(-1 + k/K) x weight for the k-th of K + 1 residuals (middle last, 1 x)."""
    scales = torch.logspace(-1, 0, len(r.down) + 1).tolist()
    return Residuals([d * (s * weight) for d, s in zip(r.down, scales, strict=False)], r.mid * (scales[-1] * weight))


_TRACES = threading.local()


@contextmanager
def trace_residuals() -> Iterator[list[tuple[object, int, list[float]]]]:
    """Record, in this thread, the root-mean-square of every residual each ControlNet adds (after its weight
    and control mode), and of every feature a T2I-Adapter adds (after its weight): a list of (the unit, step
    index, [RMS of skip 1, ..., skip K, middle] or [RMS of level 1, ..., level L]) per call.
    ``ldmkit explain`` shows it per block and step."""
    rows: list[tuple[object, int, list[float]]] = []
    stack = list(getattr(_TRACES, "stack", []))
    _TRACES.stack = [*stack, rows]
    try:
        yield rows
    finally:
        _TRACES.stack = stack


def report_rms(unit: object, i: int, tensors: Sequence[Tensor]) -> None:
    """Tell :func:`trace_residuals` (when one records) what ``unit`` added at step ``i``."""
    stack = getattr(_TRACES, "stack", None)
    if stack:
        rms = [float(t.float().pow(2).mean().sqrt()) for t in tensors]
        for rows in stack:
            rows.append((unit, i, rms))


class ControlledUNet:
    """``unet(x, t, context, ...)`` with the active control units' residuals added: what the denoiser calls.

    The step index of a call is read from its timestep against the plan's (a sampler's intermediate
    evaluations belong to the step they fall in). Under CFG the ControlNet sees the same doubled batch
    as the U-Net, the map repeated for both halves (diffusers without guess mode).
    """

    def __init__(self, unet: Callable[..., Tensor], units: Sequence[ControlUnit], step_timesteps: Tensor,
                 uncond_rows: int = 0):
        self.unet, self.units = unet, list(units)
        self.step_t = step_timesteps.float()  # (n,) decreasing: the timestep of each step's first call
        self.uncond_rows = uncond_rows  # under CFG: how many leading rows of a call are unconditional

    def step_index(self, t: Tensor) -> int:
        later = (self.step_t.to(t.device) >= t.float().max() - 1e-3).nonzero()
        return int(later[-1]) if len(later) else 0

    def residuals(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor | None = None) -> Residuals | None:
        """The summed residuals of the units active at ``t``'s step (None when none is); ``y``: SDXL's vector
        conditioning, which an SDXL ControlNet reads as its U-Net does."""
        i, n = self.step_index(t), len(self.step_t)
        total = None
        for unit in self.units:
            if not unit.active(i, n) or unit.weight == 0:
                continue
            net = unit.model
            dtype = next(net.parameters()).dtype
            size = [s * 2 ** (len(net.cfg.hint_channels) - 1) for s in x.shape[-2:]]
            in_hires = list(unit.image.shape[-2:]) != size  # the map is made at the first pass's size
            if unit.hr_option == ("Low res only" if in_hires else "High res only"):
                continue  # the extension's hires-fix option: this pass is not the unit's
            hint = map_at(unit.image, size, x.device, dtype)  # a second pass at another size: the map follows
            hint = hint.expand(x.shape[0], -1, -1, -1) if hint.shape[0] == 1 else hint.repeat(
                x.shape[0] // hint.shape[0], 1, 1, 1)
            latent = x[:, :net.cfg.unet.in_channels]  # an inpainting U-Net's input also holds mask + masked image
            # guess mode and the extension's "ControlNet is more important": the conditional rows only
            skip = self.uncond_rows if unit.guess_mode or unit.control_mode == CONTROL else 0
            weight, union = unit.weight, {}
            if unit.control_types:  # a ControlNet Union: with several maps the weight acts inside it (diffusers)
                union = {"types": unit.control_types, "weight": weight}
                if unit.map_weights:  # each map's weight, 0 outside its own window (diffusers' controlnet_keep)
                    union["weight"] = [w if in_window(s, e, i, n) else 0.0
                                       for w, (s, e) in zip(unit.map_weights, unit.map_windows, strict=True)]
                    if not any(union["weight"]):
                        continue  # no map active: the unit is off (diffusers would still run it with none)
                weight = 1.0 if len(unit.control_types) > 1 else weight
            r = net(latent[skip:].to(dtype), hint[skip:], t[skip:] if t.ndim else t, context[skip:].to(dtype),
                    None if y is None or net.cfg.unet.adm_in_channels is None else y[skip:].to(dtype), **union)
            if unit.guess_mode:
                r = guess_scaled(r, weight)
            elif unit.control_mode != BALANCED or (in_hires and forced_soft(unit.settings)):  # soft injection
                scales = [s * weight for s in soft_scales(len(r.down))]
                r = Residuals([d * s for d, s in zip(r.down, scales, strict=False)], r.mid * scales[-1])
            else:
                r = r.scaled(weight)
            report_rms(unit, i, [*r.down, r.mid])
            if skip:
                r = Residuals([F.pad(d, (0, 0, 0, 0, 0, 0, skip, 0)) for d in r.down],
                              F.pad(r.mid, (0, 0, 0, 0, 0, 0, skip, 0)))  # zeros for the unconditional rows
            total = r if total is None else total + r
        return total

    def __call__(self, x: Tensor, timesteps: Tensor, context: Tensor, **kwargs) -> Tensor:
        control = self.residuals(x, timesteps, context, kwargs.get("y"))
        if control is None:
            return self.unet(x, timesteps, context, **kwargs)
        return self.unet(x, timesteps, context, control=control, **kwargs)


def control_problem(units: Sequence[ControlUnit], model: object, deepcache: int = 1) -> str | None:
    """Why ``units`` cannot control ``model`` (one line), or None. A map's size is not checked: :class:`ControlledUNet`
    resizes it to each pass (the hires fix's second pass is larger)."""
    unet_cfg = model.cfg.unet  # type: ignore[attr-defined]
    if deepcache > 1:
        return ("DeepCache reuses the U-Net's deep features between steps, which would drop the ControlNet's "
                "residuals there: drop --deepcache (or the ControlNet)")
    from ldmkit.controlnet_lllite import LLLiteUnit, lllite_problem
    from ldmkit.t2i_adapter import AdapterUnit, adapter_problem

    for n, unit in enumerate(units, 1):
        if isinstance(unit, AdapterUnit):
            if bad := adapter_problem(unit, model):
                return bad
            continue
        if isinstance(unit, LLLiteUnit):
            if bad := lllite_problem(unit, model):
                return bad
            continue
        if not isinstance(unit, ControlUnit):
            return f"controlnets[{n - 1}] is a {type(unit).__name__}, not an ldmkit.controlnet.ControlUnit"
        try:
            check_fits(unit.model.cfg, unet_cfg, getattr(unit.model, "source_name", f"#{n}"))
        except ControlNetError as e:
            return str(e)
    return None


def describe_file(path: str | os.PathLike | file_kind.Header) -> str | None:
    """One line on a ControlNet file or folder (``ldmkit info``); None when it is not one (a .safetensors
    checkpoint is told apart from its header alone, so a large SD file is not read twice)."""
    from ldmkit import controlnet_files, controlnet_lllite

    header = file_kind.read_header(path)
    if header.path.is_dir() and header.folder_class is None and (why := file_kind.config_problem(header.path)):
        found = file_kind.weights_kind(header.path)  # a broken config.json: what its weights are (ldmkit reads those)
        line = describe_file(found[0]) if found is not None else None
        return None if line is None else f"{line} ({why}; ldmkit reads the network from {found[0].name})"
    if (special := controlnet_files.describe_file(header)) is not None:  # ControlNet Union, Control-LoRA
        return special
    if (lllite := controlnet_lllite.describe_file(header)) is not None:
        return lllite
    if not file_kind.may_be(header, file_kind.CONTROLNET):
        return None
    try:
        sd = read_controlnet(header.path)
        cfg = config_from_weights(sd)
    except CheckpointError:
        return None
    u = cfg.unet
    n = sum(t.numel() for t in sd.values())
    dtypes = ", ".join(sorted({str(t.dtype).removeprefix("torch.") for t in sd.values()}))
    return (f"ControlNet for {_family_of(u)}: model channels {u.model_channels}, levels {u.channel_mult}, "
            f"{len(cfg.hint_channels) - 1} hint downsamplings, {n / 1e6:.1f}M parameters ({dtypes})")


# ---------------------------------------------------------------- front-ends: command line and Python API


def make_unit(model: object, controlnet: str | os.PathLike | ControlNet, image: object, width: int, height: int,
              weight: float | Sequence[float] = 1.0, start: float | Sequence[float] = 0.0,
              end: float | Sequence[float] = 1.0, preprocessor: str = "none",
              log: Callable[[str], None] | None = None, guess_mode: bool = False, control_mode: str = "Balanced",
              resize_mode: str = "Just Resize", pixel_perfect: bool = False, processor_res: int | None = None,
              threshold_a: float | None = None, threshold_b: float | None = None,
              hr_option: str = "Both", control_type: object = None, lllite_batch: str = "both") -> ControlUnit:
    """A :class:`ControlUnit` for ``model`` (a StableDiffusion) from a ControlNet file/folder (or a loaded one)
    and a PIL image, preprocessed and brought to the output size ``width`` x ``height`` as the A1111 extension
    does (``controlnet_a1111.control_image``: pixel perfect, preprocessor resolution and sliders, resize mode).
    A ControlNet Union needs ``control_type`` (a name or number, or several joined by + with as many images in a
    list; ``auto``: none, one map); with several maps ``weight``, ``start`` and ``end`` may each be one per map.
    A Control-LoRA is built over ``model``'s U-Net. ``lllite_batch``: a ControlNet-LLLite's CFG rows
    (:data:`ldmkit.controlnet_lllite.BATCH_MODES`)."""
    from ldmkit import controlnet_lllite

    if isinstance(controlnet, controlnet_lllite.LLLite) or controlnet_lllite.is_lllite_path(controlnet):
        if control_type is not None or guess_mode:
            raise ValueError(f"{controlnet}: a ControlNet-LLLite takes no control type or guess mode: drop "
                             "--control-type / --control-mode guess")
        _single(controlnet, weight, start, end)
        return controlnet_lllite.make_unit(model, controlnet, image, width, height, weight, start, end,  # type: ignore
                                           preprocessor, log, resize_mode, pixel_perfect, processor_res,
                                           threshold_a, threshold_b, hr_option=hr_option,
                                           control_mode=control_mode, batch=lllite_batch)
    if lllite_batch != "both":
        raise ValueError(f"--lllite-batch is for ControlNet-LLLite files, and {controlnet} is not one: drop it")
    from ldmkit.controlnet_a1111 import control_image, model_title, module_name, resize_mode_name

    module = module_name(preprocessor)
    resize_mode = resize_mode_name(resize_mode)
    if isinstance(controlnet, ControlNet):
        net = controlnet
        check_fits(net.cfg, model.cfg.unet, getattr(net, "source_name", "given"))  # type: ignore[attr-defined]
        title = getattr(net, "source_name", "given")
    else:
        dtype = getattr(model, "compute_dtype", None) or getattr(model, "dtype", torch.float32)
        net = load_controlnet(controlnet, model.cfg.unet, dtype=dtype, device=model.device,  # type: ignore[attr-defined]
                              base_weights=LazyStateDict(model.unet))  # type: ignore[attr-defined]
        from ldmkit.api import builtin_controlnet_path

        title = model_title(builtin_controlnet_path(str(controlnet)) or controlnet)  # a built-in: its file
    from ldmkit.controlnet_files import union_types

    types = union_types(net, control_type, title, image)
    weight, start, end, per_map = _per_map(types, weight, start, end, title)
    maps = []
    for one in image if isinstance(image, (list, tuple)) else [image]:
        hint, res = control_image(one, width, height, module, resize_mode, pixel_perfect, processor_res,
                                  threshold_a, threshold_b, log)
        maps.append(map_tensor(hint))
    unit = ControlUnit(net, torch.cat(maps, dim=1), float(weight), float(start), float(end), guess_mode, control_mode,
                       hr_option=hr_option, control_types=types, **per_map)
    from ldmkit.controlnet_a1111 import slider_values

    sliders = list(slider_values(module, threshold_a, threshold_b).values()) + [-1, -1]
    settings = {"module": module, "model": title, "weight": float(weight), "resize_mode": resize_mode,
                "processor_res": res if res is not None else -1, "threshold_a": float(sliders[0]),
                "threshold_b": float(sliders[1]), "guidance_start": float(start), "guidance_end": float(end),
                "pixel_perfect": bool(pixel_perfect),
                "control_mode": "diffusers guess mode" if guess_mode else unit.control_mode}
    if types:  # a ControlNet Union: its type in the infotext, as the extension's union_control_type
        from ldmkit.controlnet_a1111 import union_control_type

        settings["union_control_type"] = union_control_type(types)
    if per_map:  # one value per map, joined with + as --control-weight 0.8+0.5 reads them
        settings["weight"] = "+".join(f"{w:g}" for w in unit.map_weights)
        settings["guidance_start"] = "+".join(f"{s:g}" for s, _ in unit.map_windows)
        settings["guidance_end"] = "+".join(f"{e:g}" for _, e in unit.map_windows)
    return dataclasses.replace(unit, settings=settings)


def _single(title: object, *values: object) -> None:
    """One-line error when a unit that reads one map is given per-map values (0.8+0.5)."""
    if any(isinstance(v, (list, tuple)) for v in values):
        raise ValueError(f"{title}: per-map weights/windows (a+b) are for a ControlNet Union unit with several maps "
                         "(--control-type depth+openpose): give one number")


def _per_map(types: Sequence[int], weight: object, start: object, end: object, title: str
             ) -> tuple[float, float, float, dict]:
    """(unit weight, start, end, ControlUnit's map_weights/map_windows or {}) from values that may be one per map
    (a Union unit with several maps: diffusers' per-map controlnet_conditioning_scale, control_guidance_start/end)."""
    if not any(isinstance(v, (list, tuple)) for v in (weight, start, end)):
        return float(weight), float(start), float(end), {}  # type: ignore[arg-type]
    if len(types) < 2:
        _single(title, weight, start, end)
    k = len(types)
    per = []
    for name, v in (("--control-weight", weight), ("--control-start", start), ("--control-end", end)):
        vs = [float(x) for x in v] if isinstance(v, (list, tuple)) else [float(v)] * k  # type: ignore[arg-type]
        if len(vs) != k:
            raise ValueError(f"{name} {'+'.join(f'{x:g}' for x in vs)} gives {len(vs)} values for {k} maps: one per "
                             "map (joined with +), or one for all")
        per.append(vs)
    ws, ss, es = per
    for s_, e_ in zip(ss, es, strict=True):
        check_window(s_, e_)
    return (max(ws), min(ss), max(es), {"map_weights": tuple(ws), "map_windows": tuple(zip(ss, es, strict=True))})


class LazyStateDict(Mapping):
    """A module's state dict, read only when a Control-LoRA asks for it (float32, on the CPU)."""

    def __init__(self, module: torch.nn.Module):
        self.module, self._sd = module, None

    def _get(self) -> dict[str, Tensor]:
        if self._sd is None:
            self._sd = self.module.state_dict()
        return self._sd

    def __getitem__(self, k: str) -> Tensor:
        return self._get()[k].detach().float().cpu()

    def __iter__(self):  # type: ignore[override]
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


_PER_UNIT = (("control_image", "--control-image"), ("control_weight", "--control-weight"),
             ("control_start", "--control-start"), ("control_end", "--control-end"),
             ("preprocessor", "--preprocessor"), ("control_mode", "--control-mode"),
             ("resize_mode", "--resize-mode"), ("pixel_perfect", "--pixel-perfect"),
             ("processor_res", "--processor-res"), ("control_threshold_a", "--control-threshold-a"),
             ("control_threshold_b", "--control-threshold-b"), ("control_hr_option", "--control-hr-option"),
             ("control_type", "--control-type"), ("lllite_batch", "--lllite-batch"))


def _mode(value: object) -> tuple[str, bool]:
    """--control-mode: (the A1111 extension's mode, whether diffusers' guess mode): "guess" is the latter."""
    from ldmkit.controlnet_a1111 import control_mode_name

    if isinstance(value, str) and value.strip().lower() in ("guess", "guess-mode", "guess_mode"):
        return "Balanced", True
    return control_mode_name(value), False


def _on_off(value: str) -> bool:
    v = value.strip().lower()
    if v in ("on", "true", "yes", "1"):
        return True
    if v in ("off", "false", "no", "0"):
        return False
    raise ValueError(f"--pixel-perfect takes on or off, got {value!r}")


def add_controlnet_args(p: object) -> None:
    """--controlnet FILE --control-image PNG [--control-weight W --control-start S --control-end E
    --preprocessor NAME --control-mode M --resize-mode R --pixel-perfect --processor-res N
    --control-threshold-a A --control-threshold-b B], repeatable: the n-th of each belongs to the n-th
    --controlnet (one value: every unit)."""
    from ldmkit.preprocess import PREPROCESSORS

    add = p.add_argument  # type: ignore[attr-defined]
    add("--controlnet", action="append", default=[], metavar="FILE",
        help="ControlNet (.safetensors/.pth in the original layout, or a diffusers ControlNetModel folder); "
             "repeat for several, each paired in order with the options below")
    add("--control-image", action="append", default=[], metavar="IMAGE",
        help="the control map (edges, depth...) of the matching --controlnet; resized to the output size")
    add("--control-weight", action="append", default=[], metavar="W",
        help="strength of the ControlNet's residuals (default 1; one value applies to all); a ControlNet Union "
             "unit with several maps takes one per map: 0.8+0.5")
    add("--control-start", action="append", default=[], metavar="S",
        help="fraction of the steps where it starts acting (default 0; per map as --control-weight)")
    add("--control-end", action="append", default=[], metavar="E",
        help="fraction of the steps where it stops (default 1; per map as --control-weight)")
    add("--preprocessor", action="append", default=[], metavar="NAME",
        help=f"turn the control image into a map first: {', '.join(PREPROCESSORS)} (default none)")
    add("--control-mode", action="append", default=[], metavar="MODE",
        help="A1111's control mode: balanced (default), prompt ('My prompt is more important': residuals "
             "scaled 0.825^k towards the first skip), controlnet ('ControlNet is more important': that, and "
             "none for the negative prompt's half); or guess (diffusers' guess_mode: the conditional half only, "
             "residuals scaled 0.1 .. 1)")
    add("--resize-mode", action="append", default=[], metavar="MODE",
        help="a control image of another size: just-resize (default), crop-and-resize, resize-and-fill "
             "(A1111's names work too)")
    add("--pixel-perfect", action="append", default=[], nargs="?", const="on", metavar="on|off",
        help="run the preprocessor at the resolution the output needs (A1111's pixel perfect)")
    add("--processor-res", action="append", default=[], type=int, metavar="N",
        help="preprocessor resolution: the image's short side is scaled to N first (default: as it is)")
    add("--control-threshold-a", action="append", default=[], type=float, metavar="A",
        help="preprocessor slider 1 (A1111's threshold_a): canny low (100), threshold level (127), binary "
             "level (0 = Otsu), blur sigma (9)")
    add("--control-threshold-b", action="append", default=[], type=float, metavar="B",
        help="preprocessor slider 2 (A1111's threshold_b): canny high (200)")
    from ldmkit.controlnet_files import type_names

    add("--control-type", action="append", default=[], metavar="NAME",
        help=f"a ControlNet Union's control type for the map: {type_names()} (also canny, lineart, scribble, "
             "seg, inpaint...; the A1111 extension's names work too); several maps in one unit: "
             "depth+openpose with --control-image d.png+p.png; none for a plain ControlNet's unit beside a Union")
    add("--control-hr-option", action="append", default=[], metavar="WHEN",
        help="with the hires fix: both (default), low (first pass only), high (second pass only)")
    add("--lllite-batch", action="append", default=[], metavar="ROWS",
        help="a ControlNet-LLLite's rows of the CFG batch (sd-scripts' set_batch_cond_only): both (default), "
             "cond-only (batch_cond_only: the prompt's rows only), zeros-uncond (use_zeros_for_batch_uncond: the "
             "negative prompt's rows get an all-zero condition). Given once: every LLLite unit (other units take "
             "none); once per unit: - for a unit that is not an LLLite")


MAX_WEIGHT = 10.0  # a unit's weight on the command line (ComfyUI's strength range; the A1111 extension's: 0-2)


def per_map_number(value: object, flag: str = "--control-weight") -> float | tuple[float, ...]:
    """--control-weight/start/end: a number, or one per map of a Union unit joined with + (0.8+0.5)."""
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    try:
        return float(text)  # also 1e+2
    except ValueError:
        pass
    try:
        parts = [float(p) for p in text.split("+")]
    except ValueError:
        raise ValueError(f"{flag} {text!r} is not a number (or numbers joined with +, one per map of a ControlNet "
                         "Union unit)") from None
    return parts[0] if len(parts) == 1 else tuple(parts)


def check_args(args: object) -> None:
    """One-line errors for control options that do not pair up, before any model is loaded."""
    from ldmkit.t2i_adapter import unit_kinds

    n = len(unit_kinds(args))  # the --controlnet and --adapter units
    for attr, flag in _PER_UNIT:
        k = len(getattr(args, attr, []) or [])
        if n == 0 and k:
            raise ValueError(f"{flag} needs --controlnet FILE (the ControlNet it belongs to)")
        if attr == "control_image" and k != n:
            raise ValueError(f"--controlnet given {n} time(s) but --control-image {k}: give one --control-image "
                             "per --controlnet, in the same order")
        if k not in (0, 1, n):
            raise ValueError(f"{flag} given {k} times for {n} ControlNets: give it once (for all) or once per "
                             "--controlnet")
    from ldmkit.controlnet_a1111 import module_name, resize_mode_name

    for name in getattr(args, "preprocessor", []) or []:
        module_name(name)  # ldmkit's names or the A1111 extension's (blur_gaussian, ...)
    for mode in getattr(args, "control_mode", []) or []:
        _mode(mode)
    for mode in getattr(args, "resize_mode", []) or []:
        resize_mode_name(mode)
    for v in getattr(args, "pixel_perfect", []) or []:
        _on_off(v)
    from ldmkit.controlnet_a1111 import hr_option_name

    for v in getattr(args, "control_hr_option", []) or []:
        hr_option_name(v)
    from ldmkit.controlnet_lllite import batch_mode

    for v in getattr(args, "lllite_batch", []) or []:
        if not _no_batch(v):  # "-": a placeholder for a unit that is not an LLLite
            batch_mode(v)
    for attr in ("control_weight", "control_start", "control_end"):
        for v in getattr(args, attr, []) or []:
            got = per_map_number(v, "--" + attr.replace("_", "-"))
            if not all(abs(x) < float("inf") for x in (got if isinstance(got, tuple) else (got,))):  # nan, inf
                raise ValueError(f"--{attr.replace('_', '-')} {v}: not a finite number; give e.g. 0.8 (a weight) "
                                 "or a fraction of the steps from 0 to 1 (start, end)")
            top = MAX_WEIGHT if attr == "control_weight" else 1.0
            if not all(0.0 <= x <= top for x in (got if isinstance(got, tuple) else (got,))):
                what = (f"a weight from 0 to {MAX_WEIGHT:g} (ComfyUI's range; the A1111 extension's slider goes to 2)"
                        if attr == "control_weight" else "a fraction of the steps from 0 to 1")
                raise ValueError(f"--{attr.replace('_', '-')} {v}: give {what}")
    starts, ends = list(getattr(args, "control_start", []) or []), list(getattr(args, "control_end", []) or [])
    for i in range(max(len(starts), len(ends))):  # each unit's (and map's) window, before any model is loaded
        s_ = per_map_number(starts[min(i, len(starts) - 1)]) if starts else 0.0
        e_ = per_map_number(ends[min(i, len(ends) - 1)]) if ends else 1.0
        k = max(len(v) if isinstance(v, tuple) else 1 for v in (s_, e_))
        ss, es = (list(v) if isinstance(v, tuple) else [v] * k for v in (s_, e_))
        if len(ss) == len(es):  # a count that does not match is said with the maps
            for a, b in zip(ss, es, strict=True):
                check_window(a, b)
    kinds, types = unit_kinds(args), list(getattr(args, "control_type", []) or [])
    for i, image in enumerate(getattr(args, "control_image", []) or []):  # a.png+b.png: a Union unit's maps
        ctype = types[i] if len(types) > 1 else types[0] if types else None
        _joined_maps(image, None if kinds[i][0] == "adapter" else ctype)
    for v in getattr(args, "processor_res", []) or []:
        if v is not None and v < 1 and v != -1:
            raise ValueError(f"--processor-res {v}: give the preprocessor's resolution in pixels (e.g. 512), or "
                             "-1 / leave it out to run it on the image as it is")


def _no_batch(value: object) -> bool:
    return str(value).strip().lower() in ("", "-", "none")


def lllite_batches(args: object, log: Callable[[str], None] | None = None) -> list[str]:
    """--lllite-batch per unit: given once, it is every ControlNet-LLLite unit's (the other units take none: said in
    the log; an error when no unit is an LLLite); given once per unit, the n-th is the n-th unit's, and a unit that
    is not an LLLite takes ``-`` (or both)."""
    from ldmkit import t2i_adapter
    from ldmkit.controlnet_lllite import LLLite, batch_mode, is_lllite_path

    given = list(getattr(args, "lllite_batch", []) or [])
    kinds = t2i_adapter.unit_kinds(args)
    if not given:
        return ["both"] * len(kinds)
    lllite = [kind != "adapter" and (isinstance(path, LLLite) or is_lllite_path(path)) for kind, path in kinds]
    if len(given) == 1:
        value = "both" if _no_batch(given[0]) else batch_mode(given[0])
        if value != "both" and not any(lllite):
            if all(kind == "adapter" for kind, _ in kinds):
                raise ValueError("--lllite-batch is not for a T2I-Adapter (it acts in both hires passes, with no "
                                 "control type or LLLite batch): drop it")
            raise ValueError(f"--lllite-batch {given[0]} sets a ControlNet-LLLite unit's CFG rows, and no unit here "
                             f"is one ({', '.join(str(p) for _, p in kinds)}): drop it")
        if value != "both" and not all(lllite) and log is not None:
            others = ", ".join(str(p) for (_, p), is_l in zip(kinds, lllite, strict=True) if not is_l)
            log(f"--lllite-batch {value}: for the ControlNet-LLLite unit(s) only; not for {others}")
        return [value if is_l else "both" for is_l in lllite]
    out = []
    for i, ((kind, path), is_l, v) in enumerate(zip(kinds, lllite, given, strict=True)):
        value = "both" if _no_batch(v) else batch_mode(v)
        if value != "both" and not is_l:
            what = "a T2I-Adapter" if kind == "adapter" else "not a ControlNet-LLLite"
            raise ValueError(f"--lllite-batch {v} (the {_ordinal(i)}) pairs with {path}, which is "
                             f"{what}: give - for that unit (--lllite-batch is for ControlNet-LLLite units)")
        out.append(value)
    return out


def _joined_maps(image_path: object, control_type: object) -> None:
    """One-line errors for --control-image a.png+b.png that is not a Union unit's maps (it said "no such image file
    a.png+b.png"), or has an empty name between its + signs (it said ": no such image file")."""
    text = str(image_path)
    if "+" not in text or Path(text).exists():
        return
    parts = text.split("+")
    if not all(p.strip() for p in parts):
        raise ValueError(f"--control-image {text}: an empty name between the + signs: join existing map files "
                         "(depth.png+pose.png)")
    typed = control_type is not None and "+" in str(control_type)
    if not typed and all(Path(p).exists() for p in parts):
        raise ValueError(f"--control-image {text}: maps joined with + are several maps of one ControlNet Union "
                         "unit: name one control type per map with --control-type (depth+openpose), or give each "
                         "map its own --controlnet")


def _ordinal(i: int) -> str:
    return {0: "first", 1: "second", 2: "third"}.get(i, f"{i + 1}th")


def units_from_args(args: object, model: object, width: int, height: int,
                    log: Callable[[str], None] | None = None) -> tuple[ControlUnit, ...]:
    """The control units of the command line (see :func:`add_controlnet_args`)."""
    from ldmkit import t2i_adapter
    from ldmkit.pipeline import open_image

    check_args(args)
    from ldmkit import memory

    try:  # before the maps are made at this size (a map of 100000x100000 asked OpenCV for 30 GB: a traceback)
        memory.check_fits(model, width, height, 1)  # type: ignore[arg-type]
    except memory.TooLarge as e:
        raise ValueError(str(e)) from None

    def nth(attr: str, i: int, default: object) -> object:
        v = getattr(args, attr, []) or []
        v = default if not v else v[i] if len(v) > 1 else v[0]
        return per_map_number(v) if attr in ("control_weight", "control_start", "control_end") else v

    hires = getattr(args, "hires_scale", None) is not None or getattr(args, "hires_resize", None) is not None
    batches = lllite_batches(args, log)  # --lllite-batch given once: the LLLite units'
    units = []
    for i, (kind, path) in enumerate(t2i_adapter.unit_kinds(args)):  # ControlNets and T2I-Adapters, in order
        image_path = nth("control_image", i, None)
        tell = None if log is None else (lambda msg, f=image_path: log(f"{f}: {msg}"))
        if kind == "adapter":
            _single(path, *(nth(a, i, 0.0) for a in ("control_weight", "control_start", "control_end")))
            if _mode(nth("control_mode", i, "Balanced")) != (BALANCED, False):  # was silently ignored
                raise ValueError(f"{path}: --control-mode {nth('control_mode', i, '')} is for ControlNets; a "
                                 "T2I-Adapter runs in the balanced mode (as on the server): give --control-mode "
                                 "once per unit, balanced for the adapter, or drop it")
            from ldmkit.controlnet_a1111 import hr_option_name

            for flag, given in (("--control-type", str(nth("control_type", i, "none")).strip().lower() not in
                                 ("", "none", "-")),
                                ("--control-hr-option", hr_option_name(nth("control_hr_option", i, "both")) != "Both")):
                if given:  # was silently ignored
                    raise ValueError(f"{path}: {flag} is not for a T2I-Adapter (it acts in both hires passes, "
                                     "with no control type or LLLite batch): give it once per unit, or drop it")
            image, preprocessor = open_image(image_path), nth("preprocessor", i, "none")
            if any(getattr(args, a, None) for a in ("resize_mode", "pixel_perfect", "processor_res",
                                                     "control_threshold_a", "control_threshold_b")):
                from ldmkit.controlnet_a1111 import control_image  # the map made as the server makes it

                image, _ = control_image(image, width, height, preprocessor, nth("resize_mode", i, "Just Resize"),
                                         _on_off(nth("pixel_perfect", i, "off")), nth("processor_res", i, None),
                                         nth("control_threshold_a", i, None), nth("control_threshold_b", i, None),
                                         tell)
                preprocessor = "none"
            units.append(t2i_adapter.make_unit(model, path, image, width, height,
                                               nth("control_weight", i, 1.0), nth("control_start", i, 0.0),
                                               nth("control_end", i, 1.0), preprocessor, tell))
            continue
        ctype = nth("control_type", i, None)
        mode = _mode(nth("control_mode", i, "Balanced"))
        if mode[0] != BALANCED and not isinstance(path, ControlNet):
            from ldmkit.controlnet_lllite import is_lllite_path

            if is_lllite_path(path):  # the server takes it, as the extension does (where it changes nothing)
                raise ValueError(f"{path}: --control-mode {nth('control_mode', i, '')} has no effect on a "
                                 "ControlNet-LLLite (the A1111 extension ignores it there too): drop it, or use "
                                 "--lllite-batch cond-only to leave the negative prompt's rows alone")
        if ctype is not None and str(ctype).strip().lower() in ("", "none", "-"):  # a plain ControlNet's unit
            ctype = None
        several = ctype is not None and "+" in str(ctype) and not Path(image_path).exists()  # maps of one unit
        image = [open_image(f) for f in str(image_path).split("+")] if several else open_image(image_path)
        units.append(make_unit(model, path, image, width, height, nth("control_weight", i, 1.0),
                               nth("control_start", i, 0.0), nth("control_end", i, 1.0),
                               nth("preprocessor", i, "none"), tell,
                               control_mode=mode[0], guess_mode=mode[1],
                               resize_mode=nth("resize_mode", i, "Just Resize"),
                               pixel_perfect=_on_off(nth("pixel_perfect", i, "off")),
                               processor_res=nth("processor_res", i, None),
                               threshold_a=nth("control_threshold_a", i, None),
                               threshold_b=nth("control_threshold_b", i, None),
                               hr_option=nth("control_hr_option", i, "Both") if hires else "Both",
                               control_type=ctype, lllite_batch=batches[i]))
    return tuple(units)


__all__ = ["ControlNetError", "ControlUnit", "ControlledUNet", "check_fits", "config_from_weights", "control_map",
           "control_problem", "describe_file", "diffusers_to_original", "load_controlnet", "make_unit", "map_tensor",
           "read_controlnet", "units_from_args", "LazyStateDict"]
