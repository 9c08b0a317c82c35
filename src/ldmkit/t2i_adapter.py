"""T2I-Adapter files and units: load an adapter in any published layout, pair it with a control map, and add
its features to the U-Net's down path (see ``models/t2i_adapter.py`` for the network).

Layouts read: diffusers ``T2IAdapter`` folders (config.json + diffusion_pytorch_model.safetensors/.bin, or the
weights file alone) and TencentARC's original single files (``t2iadapter_*_sd14v1.pth``,
``t2iadapter_*_sd15v2.pth`` and their .safetensors copies: ``conv_in``, ``body.N.block1``...; the light colour
adapter: ``body.N.in_conv``, ``body.N.body.M.block1``...). The adapter runs once per image size; its features,
times the unit's weight, are added on the steps of its window (diffusers' ``adapter_conditioning_scale`` and
``adapter_conditioning_factor`` = the window's end).
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ldmkit import file_kind
from ldmkit.checkpoint import CheckpointError, build_strict, read_state_dict
from ldmkit.controlnet import ControlledUNet, check_window, control_map, in_window, map_at
from ldmkit.models.t2i_adapter import ADAPTER_TYPES, AdapterConfig, T2IAdapter

StateDict = dict[str, Tensor]
_DIFFUSERS_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


class AdapterError(CheckpointError):
    """A file that is not a T2I-Adapter, or one that does not fit the model; the message says which."""


# ---------------------------------------------------------------- layouts


ORIGINAL_BLOCKS_PER_LEVEL = 2  # every released full adapter (TencentARC's and ComfyUI's loaders assume it too)


def _original_full(sd: Mapping[str, Tensor]) -> StateDict:
    """TencentARC's ``Adapter`` (``body.{level * 2 + j}``, ``in_conv`` on a level's first block) -> ours.
    Its variants that diffusers' T2IAdapter cannot hold are refused: convolutional downsampling
    (``use_conv``: ``down_opt.op``), 3x3 second convolutions (``ksize=3``), separate skip convolutions."""
    n = ORIGINAL_BLOCKS_PER_LEVEL
    if any(".down_opt." in k for k in sd):
        raise AdapterError("convolutional downsampling (down_opt, use_conv=True) is a variant ldmkit does not read")
    if "body.0.block2.weight" in sd and sd["body.0.block2.weight"].shape[-1] != 1:
        raise AdapterError("3x3 second convolutions (ksize=3) are a variant ldmkit does not read")
    if _count(sd, r"body\.(\d+)\.block1\.weight") % n:
        raise AdapterError(f"its residual blocks do not pair into levels of {n}")
    out = {k: v for k, v in sd.items() if k.startswith("conv_in.")}
    for k, v in sd.items():
        m = re.fullmatch(r"body\.(\d+)\.(block1|block2|in_conv)\.(weight|bias)", k)
        if m is None:
            if not k.startswith("conv_in."):
                raise AdapterError(f"unexpected key {k!r} (e.g. a skip convolution, sk=False) in a TencentARC "
                                   "adapter")
            continue
        level, j = divmod(int(m[1]), n)
        if m[2] == "in_conv":
            if j:
                raise AdapterError(f"{k}: an in_conv inside a level")
            out[f"body.{level}.in_conv.{m[3]}"] = v
        else:
            out[f"body.{level}.resnets.{j}.{m[2]}.{m[3]}"] = v
    return out


def _original_light(sd: Mapping[str, Tensor]) -> StateDict:
    """TencentARC's ``Adapter_light`` (``body.N.body.M.block1``) -> ours (``body.N.resnets.M.block1``)."""
    return {re.sub(r"^body\.(\d+)\.body\.", r"body.\1.resnets.", k): v for k, v in sd.items()}


def _count(sd: Mapping[str, Tensor], pattern: str) -> int:
    found = {int(m[1]) for k in sd if (m := re.fullmatch(pattern, k))}
    return max(found) + 1 if found else 0


def _read(path: Path) -> tuple[StateDict, dict | None]:
    """Weights and, for a diffusers folder, its config.json."""
    if path.is_dir():
        for name in _DIFFUSERS_FILES:
            if (path / name).exists():
                try:
                    cfg = json.loads((path / "config.json").read_text())
                except (OSError, ValueError):
                    cfg = None
                return read_state_dict(path / name)[0], cfg
        raise AdapterError(f"{path}: a folder without {' or '.join(_DIFFUSERS_FILES)}: not a diffusers T2IAdapter")
    if path.suffix.lower() in (".pth", ".pt") and path.exists():
        try:  # some .pth files nest the weights under "adapter" (ComfyUI and the A1111 extension unwrap it)
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - read_state_dict below says why, in its words
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("adapter"), dict):
            obj = obj["adapter"]
        if isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()):
            return obj, None
    return read_state_dict(path)[0], None  # anything else: its error message


def read_adapter(path: str | os.PathLike) -> tuple[StateDict, dict | None]:
    """(our weight names, diffusers config or None) of an adapter file/folder in any layout; refuses others by
    name."""
    path = Path(path)
    if not path.exists():  # emoji-silhouette is a built-in ControlNet, emoji a model: say so
        from ldmkit.api import missing_name

        raise AdapterError(missing_name(str(path), "--adapter"))
    sd, cfg = _read(path)
    if cfg is not None and cfg.get("_class_name") == "ControlNetModel":
        raise AdapterError(f"{path} is a ControlNet, not a T2I-Adapter: pass it as --controlnet")
    if cfg is not None and cfg.get("_class_name") not in (None, "T2IAdapter"):
        raise AdapterError(f"{path} is a diffusers {cfg.get('_class_name')}, not a T2IAdapter")
    if any(k.startswith("adapter.") for k in sd):  # diffusers
        return {k.removeprefix("adapter."): v for k, v in sd.items()}, cfg
    if "body.0.body.0.block1.weight" in sd:  # the original light (colour) adapter
        return _original_light(sd), None
    if "conv_in.weight" in sd and "body.0.block1.weight" in sd:
        try:
            return _original_full(sd), None
        except AdapterError as e:
            raise AdapterError(f"{path}: {e}: not a T2I-Adapter layout ldmkit reads") from None
    # a ControlNet, LoRA, upscaler, ... file says what it is (checkpoints and U-Nets: below)
    kind = file_kind.kind_of_keys(sd)
    if why := file_kind.misplaced(kind, "a T2I-Adapter", (file_kind.ADAPTER, file_kind.SD, file_kind.SDXL,
                                                          file_kind.UNET)):
        raise AdapterError(f"{path} is {why}")
    if any(k.startswith(("model.diffusion_model.", "down_blocks.")) for k in sd) or "conv_in.weight" in sd:
        raise AdapterError(f"{path} is a Stable Diffusion checkpoint or U-Net, not a T2I-Adapter: pass it as "
                           "--model, and a T2I-Adapter (t2iadapter_*.pth or a diffusers T2IAdapter) as --adapter")
    if any("style_embedding" in k or "transformer_layes" in k for k in sd):
        raise AdapterError(f"{path} is a T2I style adapter (it reads CLIP vision features), which ldmkit does not "
                           "support: use a full or light T2I-Adapter")
    raise AdapterError(f"{path} is not a T2I-Adapter ldmkit reads: no adapter.*, conv_in/body.N.block1 (full) "
                       "or body.N.body.M.block1 (light) weights")


def config_from_weights(sd: Mapping[str, Tensor], diffusers_cfg: dict | None = None,
                        sdxl: bool = False, vae_downscale: int = 8) -> AdapterConfig:
    """The architecture of our-named weights; the type and pixel-unshuffle factor from config.json when
    there is one, else full/light from the names and full_adapter_xl when the model is SDXL (``sdxl``), the
    unshuffle the model's VAE factor (SDXL: twice it)."""
    light = "body.0.out_conv.weight" in sd
    levels = _count(sd, r"body\.(\d+)\..*")
    if not levels:
        raise AdapterError("no body.N weights")
    n_res = _count(sd, r"body\.0\.resnets\.(\d+)\..*")
    if light:
        channels = tuple(sd[f"body.{i}.out_conv.weight"].shape[0] for i in range(levels - 1))
        kind, c_in = "light_adapter", sd["body.0.in_conv.weight"].shape[1]
    else:
        channels = tuple(sd[f"body.{i}.resnets.0.block1.weight"].shape[0] for i in range(levels))
        kind, c_in = "full_adapter_xl" if sdxl else "full_adapter", sd["conv_in.weight"].shape[1]
    cfg_d = None
    if diffusers_cfg:
        kind = diffusers_cfg.get("adapter_type", kind)
        cfg_d = diffusers_cfg.get("downscale_factor")
    d = cfg_d or vae_downscale * (2 if kind == "full_adapter_xl" else 1)
    if kind not in ADAPTER_TYPES:
        raise AdapterError(f"adapter_type {kind!r}: ldmkit reads {', '.join(ADAPTER_TYPES)}")
    if c_in % (d * d):
        raise AdapterError(f"input width {c_in} is not a multiple of {d}x{d} (pixel unshuffle)")
    return AdapterConfig(c_in // (d * d), channels, n_res, d, kind)  # type: ignore[arg-type]


def load_adapter(path: str | os.PathLike, base: object | None = None, *, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> T2IAdapter:
    """A T2I-Adapter from ``path``, checked against ``base`` (a ModelConfig: the model it is used with)."""
    sd, dcfg = read_adapter(path)
    try:
        cfg = config_from_weights(sd, dcfg, sdxl=bool(getattr(base, "is_sdxl", False)),
                                  vae_downscale=base.vae.downscale if base is not None else 8)  # type: ignore
    except (KeyError, AdapterError) as e:
        raise AdapterError(f"{path}: {e}: not a T2I-Adapter layout ldmkit reads") from None
    if dcfg and dcfg.get("adapter_type") and tuple(dcfg.get("channels", cfg.channels)) != cfg.channels:
        raise AdapterError(f"{path}: config.json says channels {dcfg.get('channels')} but the weights have "
                           f"{cfg.channels}")
    if base is not None:
        check_fits(cfg, base, str(path))
    net = build_strict(lambda: T2IAdapter(cfg), sd, f"T2I-Adapter {path}", dtype)
    net.source_name = Path(path).stem  # type: ignore[assignment]
    return net.to(device=device).eval().requires_grad_(False)


def feature_shapes(cfg: AdapterConfig) -> list[tuple[int, int]]:
    """(channels, pixel downscale) of each feature the adapter gives."""
    d, ch = cfg.downscale_factor, cfg.channels
    if cfg.adapter_type == "full_adapter_xl":
        return [(c, d * (2 if i >= 2 else 1)) for i, c in enumerate(ch)]
    if cfg.adapter_type == "light_adapter":
        ch = (*ch, ch[-1])
    return [(c, d * 2**i) for i, c in enumerate(ch)]


def unet_slots(model_cfg: object) -> list[tuple[int, int]]:
    """(channels, pixel downscale) of the places the U-Net adds adapter features (``UNetModel.adapter_points``,
    then the middle block)."""
    u, f = model_cfg.unet, model_cfg.vae.downscale  # type: ignore[attr-defined]
    slots = []
    for level, mult in enumerate(u.channel_mult):
        down = not u.attention_levels[level] and level < len(u.channel_mult) - 1
        slots.append((u.model_channels * mult, f * 2 ** (level + down)))
    return slots + [(u.model_channels * u.channel_mult[-1], f * 2 ** (len(u.channel_mult) - 1))]


_FAMILY = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}


def check_fits(cfg: AdapterConfig, model_cfg: object, name: str) -> None:
    """Refuse an adapter whose features do not land on ``model_cfg``'s U-Net levels (widths and sizes)."""
    mine, slots = feature_shapes(cfg), unet_slots(model_cfg)
    if mine != slots[:len(mine)]:
        ctx = model_cfg.unet.context_dim  # type: ignore[attr-defined]
        family = _FAMILY.get(ctx, f"context {ctx}")
        raise AdapterError(
            f"T2I-Adapter {name} ({cfg.adapter_type}) gives features (width, downscale) {mine} but the {family} "
            f"model's encoder takes {slots[:len(mine)]}: it is for another model family; use an adapter made for "
            "that model")


# ---------------------------------------------------------------- units


@dataclass(frozen=True, eq=False)
class AdapterUnit:
    """One T2I-Adapter with its map: features x ``weight`` (diffusers' adapter_conditioning_scale) on the steps
    i of n with start <= i/n and (i+1)/n <= end (end = diffusers' adapter_conditioning_factor)."""

    model: T2IAdapter
    image: Tensor  # (1, C, H, W) in [0, 1] at the output size
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    _cache: dict = field(default_factory=dict, repr=False)
    # the A1111 extension's unit settings for the infotext (the server's alwayson_scripts units); None: none written
    settings: dict | None = None

    def __post_init__(self) -> None:
        check_window(self.start, self.end)

    def active(self, i: int, n: int) -> bool:
        return in_window(self.start, self.end, i, n)

    def features(self, size: tuple[int, int], device: torch.device) -> list[Tensor]:
        """The adapter's features for a pass at pixel ``size`` (H, W), computed once per size (the hires fix's
        second pass reads the map resized)."""
        if size not in self._cache:
            x = map_at(self.image, size, device, next(self.model.parameters()).dtype)
            with torch.inference_mode():
                self._cache[size] = self.model(x)
        return self._cache[size]


class AdaptedUNet(ControlledUNet):
    """``unet(x, t, context, ...)`` with the active adapter units' features (summed) added to its down path."""

    def __init__(self, unet: Callable[..., Tensor], units, step_timesteps: Tensor, downscale: int):
        super().__init__(unet, units, step_timesteps)
        self.downscale = downscale  # the VAE's: latent size -> the map's pixel size

    def features(self, x: Tensor, t: Tensor) -> list[Tensor] | None:
        from ldmkit.controlnet import report_rms

        i, n = self.step_index(t), len(self.step_t)
        total = None
        size = (x.shape[-2] * self.downscale, x.shape[-1] * self.downscale)
        for unit in self.units:
            if not unit.active(i, n) or unit.weight == 0:
                continue
            f = [v * unit.weight for v in unit.features(size, x.device)]
            report_rms(unit, i, f)  # the explain page's strength per level
            total = f if total is None else [a + b for a, b in zip(total, f, strict=True)]
        return total

    def __call__(self, x: Tensor, timesteps: Tensor, context: Tensor, **kwargs) -> Tensor:
        feats = self.features(x, timesteps)
        if feats is None:
            return self.unet(x, timesteps, context, **kwargs)
        return self.unet(x, timesteps, context, adapter=feats, **kwargs)


def wrap(net: Callable[..., Tensor], units, step_timesteps: Tensor, model: object) -> Callable[..., Tensor]:
    """``net`` with the :class:`AdapterUnit` among ``units`` applied (``net`` itself when there are none)."""
    mine = [u for u in units if isinstance(u, AdapterUnit)]
    if not mine:
        return net
    return AdaptedUNet(net, mine, step_timesteps, model.cfg.vae.downscale)  # type: ignore[attr-defined]


def adapter_problem(unit: AdapterUnit, model: object) -> str | None:
    try:
        check_fits(unit.model.cfg, model.cfg, getattr(unit.model, "source_name", "given"))  # type: ignore[attr-defined]
    except AdapterError as e:
        return str(e)
    f = unit.model.cfg.downscale_factor  # the pixel unshuffle's (odd sizes further down round up, as the U-Net's)
    h, w = unit.image.shape[-2:]
    if h % f or w % f:
        return (f"a T2I-Adapter ({unit.model.cfg.adapter_type}) needs an image size that is a multiple of {f}: "
                f"{w}x{h} is not; use {w // f * f or f}x{h // f * f or f}")
    return None


def adapter_map(image: object, cfg: AdapterConfig, width: int, height: int,
                log: Callable[[str], None] | None = None) -> Tensor:
    """A PIL image as the adapter's input (1, in_channels, H, W) in [0, 1]: greyscale for a 1-channel adapter
    (sketch, canny), resized to the output size (Lanczos, as diffusers) and ``log`` told so."""
    x = control_map(image.convert("L") if cfg.in_channels == 1 else image, width, height, log)  # type: ignore
    return x[:, :cfg.in_channels]


def make_unit(model: object, adapter: str | os.PathLike | T2IAdapter, image: object, width: int, height: int,
              weight: float = 1.0, start: float = 0.0, end: float = 1.0, preprocessor: str = "none",
              log: Callable[[str], None] | None = None) -> AdapterUnit:
    """An :class:`AdapterUnit` for ``model`` (a StableDiffusion) from an adapter file/folder (or a loaded one) and
    a PIL image, preprocessed and resized to the output size."""
    from ldmkit.preprocess import preprocess

    if isinstance(adapter, T2IAdapter):
        net = adapter
        check_fits(net.cfg, model.cfg, getattr(net, "source_name", "given"))  # type: ignore[attr-defined]
    else:
        dtype = getattr(model, "compute_dtype", None) or getattr(model, "dtype", torch.float32)
        net = load_adapter(adapter, model.cfg, dtype=dtype, device=model.device)  # type: ignore[attr-defined]
    hint = adapter_map(preprocess(preprocessor, image), net.cfg, width, height, log)  # type: ignore[arg-type]
    return AdapterUnit(net, hint, float(weight), float(start), float(end))


# ---------------------------------------------------------------- command line


class _AdapterAction(argparse.Action):
    """--adapter FILE, remembering its place among the --controlnet/--adapter units (argparse reads options in
    command-line order), so that the n-th --control-image belongs to the n-th unit of either kind."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
        order = list(getattr(namespace, "adapter_at", None) or [])
        order.append(len(getattr(namespace, "controlnet", None) or []) + len(order))
        namespace.adapter_at = order
        namespace.adapter = [*(getattr(namespace, "adapter", None) or []), values]


def add_adapter_args(p: object) -> None:
    p.add_argument("--adapter", action=_AdapterAction, default=[], metavar="FILE",  # type: ignore[attr-defined]
                   help="T2I-Adapter (TencentARC t2iadapter_*.pth/.safetensors, or a diffusers T2IAdapter folder): "
                        "a control unit like --controlnet, paired in order with --control-image (and "
                        "--control-weight/-start/-end, --preprocessor); repeatable")
    p.set_defaults(adapter_at=[])  # type: ignore[attr-defined]


def unit_kinds(args: object) -> list[tuple[str, str]]:
    """The command line's control units in order: ("controlnet" | "adapter", path)."""
    nets = list(getattr(args, "controlnet", None) or [])
    adapters = list(getattr(args, "adapter", None) or [])
    at = list(getattr(args, "adapter_at", None) or [])
    if len(at) != len(adapters):  # set programmatically, not parsed: adapters after the ControlNets
        at = list(range(len(nets), len(nets) + len(adapters)))
    out: list[tuple[str, str]] = []
    a = iter(zip(at, adapters, strict=True))
    nxt = next(a, None)
    for pos in range(len(nets) + len(adapters)):
        if nxt is not None and nxt[0] == pos:
            out.append(("adapter", nxt[1]))
            nxt = next(a, None)
        else:
            out.append(("controlnet", nets.pop(0)))
    return out


def describe_file(path: str | os.PathLike | file_kind.Header) -> str | None:
    """One line on a T2I-Adapter file or folder (``ldmkit info``); None when it is not one."""
    header = file_kind.read_header(path)
    if not file_kind.may_be(header, file_kind.ADAPTER):
        return None
    try:
        sd, dcfg = read_adapter(header.path)
        cfg = config_from_weights(sd, dcfg)
    except (CheckpointError, KeyError):
        return None
    n = sum(t.numel() for t in sd.values())
    return (f"T2I-Adapter ({cfg.adapter_type}): input channels {cfg.in_channels}, widths {cfg.channels}, "
            f"{cfg.num_res_blocks} residual blocks per level, {n / 1e6:.1f}M parameters")


__all__ = ["AdaptedUNet", "AdapterError", "AdapterUnit", "adapter_map", "adapter_problem", "check_fits",
           "config_from_weights", "describe_file", "load_adapter", "make_unit", "read_adapter", "unit_kinds", "wrap"]
