"""kohya's ControlNet-LLLite ("LoRA-like lite" ControlNet, SDXL): files, network and control units.

A file holds one small module per targeted U-Net layer, named after it: ``lllite_unet_`` + the layer's sgm name with
dots as underscores (``lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), each with

- ``conditioning1.{0,2[,4]}``: stride = kernel convolutions with ReLUs between (3 -> cond_emb_dim / 2 -> ...
  -> cond_emb_dim) that bring the control map, in [-1, 1], to the layer's resolution (8x, 16x or 32x smaller for
  SDXL's three levels); computed once per map and pass size;
- ``down.0`` (in_dim -> mlp_dim, ReLU), ``mid.0`` (mlp_dim + cond_emb_dim -> mlp_dim, ReLU), ``up.0``
  (mlp_dim -> in_dim): Linear layers (1x1 convolutions for a convolution target).

At every step the module adds ``weight * up(mid(cat[cond_emb, down(x)]))`` to the *input* ``x`` of its layer
(sd-scripts ``networks/control_net_lllite.py``: ``org_forward(x + cx)``); the released files target the
self-attention's q/k/v and the cross-attention's q of the input and middle blocks' transformers. Both halves of a
CFG batch get it (sd-scripts' and ComfyUI's default); sd-scripts' ``set_batch_cond_only(cond_only, zeros)`` is the
unit's ``batch``: "cond-only" (the module reads and changes the conditional rows only) or "zeros-uncond" (the
unconditional rows get an all-zero condition embedding; the module still acts there). Several LLLite units on one
layer chain in unit order (each reads the input the previous one made), as sd-scripts and ComfyUI chain their
patches.

The A1111 extension (``scripts/controlnet_lllite.py``) ignores a unit's control mode for LLLite (its patch reads
only weight, start and end) and skips LLLite in the hires fix's second pass whatever ``hr_option``; ldmkit keeps
the control mode in the infotext only and follows ``hr_option`` as for a ControlNet ("Low res only" is the
extension's behaviour).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ldmkit import file_kind
from ldmkit.checkpoint import read_state_dict
from ldmkit.controlnet import ControlledUNet, ControlNetError, check_window, in_window, map_at

StateDict = dict[str, Tensor]
PREFIX = "lllite_unet_"
# sd-scripts' set_batch_cond_only(cond_only, zeros): (False, False), (True, -), (False, True)
BATCH_MODES = ("both", "cond-only", "zeros-uncond")
_PART = re.compile(r"^(conditioning1\.\d+|down\.0|mid\.0|up\.0)\.(weight|bias)$")


class LLLiteError(ControlNetError):
    """A file that is not a ControlNet-LLLite, a broken one, or one made for another model; the message says which."""


def batch_mode(value: object) -> str:
    """A unit's CFG rows: "both", "cond-only" (sd-scripts' batch_cond_only), "zeros-uncond"
    (use_zeros_for_batch_uncond); a ValueError names them."""
    v = str(value).strip().lower().replace("_", "-")
    v = {"cond": "cond-only", "batch-cond-only": "cond-only", "zeros": "zeros-uncond",
         "use-zeros-for-batch-uncond": "zeros-uncond"}.get(v, v)
    if v not in BATCH_MODES:
        raise ValueError(f"--lllite-batch {value!r}: use one of {', '.join(BATCH_MODES)}")
    return v


def is_lllite(keys: object) -> bool:
    """Whether a state dict's key names are a ControlNet-LLLite's."""
    return any(str(k).startswith(PREFIX) for k in keys)  # type: ignore[attr-defined]


# ---------------------------------------------------------------- the network


class LLLiteModule(nn.Module):
    """One LLLite module: conditioning embedding (``conditioning1``) and the down / mid / up layers."""

    def __init__(self, kernels: Sequence[int], cond_emb_dim: int, in_dim: int, mlp_dim: int, conv: bool):
        super().__init__()
        chans = [3] + [cond_emb_dim // 2] * (len(kernels) - 1) + [cond_emb_dim]
        layers: list[nn.Module] = []
        for j, k in enumerate(kernels):
            if j:
                layers.append(nn.ReLU())
            layers.append(nn.Conv2d(chans[j], chans[j + 1], k, stride=k))
        self.conditioning1 = nn.Sequential(*layers)
        lin = (lambda i, o: nn.Conv2d(i, o, 1)) if conv else nn.Linear
        self.down = nn.Sequential(lin(in_dim, mlp_dim), nn.ReLU())
        self.mid = nn.Sequential(lin(mlp_dim + cond_emb_dim, mlp_dim), nn.ReLU())
        self.up = nn.Sequential(lin(mlp_dim, in_dim))
        self.conv = conv
        self.downscale = 1
        for k in kernels:
            self.downscale *= k

    def embed(self, cond: Tensor) -> Tensor:
        """The map (B, 3, H, W) in [-1, 1] as the module's condition: (B, H/d * W/d, C), or (B, C, H/d, W/d) for
        a convolution target."""
        c = self.conditioning1(cond)
        return c if self.conv else c.flatten(2).transpose(1, 2)

    def delta(self, x: Tensor, emb: Tensor) -> Tensor:
        """What the module adds to its layer's input ``x`` (weight 1)."""
        if emb.shape[0] != x.shape[0]:
            emb = emb.expand(x.shape[0], *emb.shape[1:]) if emb.shape[0] == 1 else emb.repeat(
                x.shape[0] // emb.shape[0], *([1] * (emb.ndim - 1)))
        if emb.shape[2 if self.conv else 1] != x.shape[2 if self.conv else 1]:
            raise ValueError(f"ControlNet-LLLite condition of {tuple(emb.shape[1:])} does not fit the layer input "
                             f"{tuple(x.shape[1:])}: use an image size that is a multiple of {self.downscale}")
        h = torch.cat([emb.to(x.dtype), self.down(x)], dim=1 if self.conv else 2)
        return self.up(self.mid(h))


class LLLite(nn.Module):
    """The modules of a file, under the file's names (so its state dict is the file's); ``targets`` maps each name
    to the dotted name of the U-Net layer it acts on."""

    def __init__(self, modules: Mapping[str, LLLiteModule], targets: Mapping[str, str]):
        super().__init__()
        for name, m in modules.items():
            self.add_module(name, m)
        self.targets = dict(targets)

    def items(self) -> list[tuple[str, LLLiteModule]]:
        return [(n, m) for n, m in self.named_children() if isinstance(m, LLLiteModule)]


def split_modules(sd: Mapping[str, Tensor], name: str = "file") -> dict[str, dict[str, Tensor]]:
    """{module name: {part key: tensor}}; refuses keys that are not LLLite's."""
    out: dict[str, dict[str, Tensor]] = {}
    for k, v in sd.items():
        mod, _, part = k.partition(".")
        if not mod.startswith(PREFIX) or not _PART.match(part):
            raise LLLiteError(f"{name}: key {k!r} is not a ControlNet-LLLite weight (lllite_unet_<layer>."
                              "conditioning1/down/mid/up): not a ControlNet-LLLite file ldmkit reads")
        out.setdefault(mod, {})[part] = v
    return out


def module_shape(parts: Mapping[str, Tensor], name: str) -> tuple[list[int], int, int, int, bool]:
    """(conditioning kernel sizes, cond_emb_dim, in_dim, mlp_dim, convolution target) of one module's weights."""
    need = ["down.0.weight", "mid.0.weight", "up.0.weight", "conditioning1.0.weight"]
    if missing := [p for p in need if p not in parts]:
        raise LLLiteError(f"ControlNet-LLLite module {name} lacks {missing[0]}: a broken or truncated file")
    convs = sorted(int(m[1]) for p in parts if (m := re.fullmatch(r"conditioning1\.(\d+)\.weight", p)))
    if convs != list(range(0, 2 * len(convs), 2)):
        raise LLLiteError(f"ControlNet-LLLite module {name}: conditioning convolutions at {convs}, expected 0, 2, 4...")
    kernels = [int(parts[f"conditioning1.{j}.weight"].shape[-1]) for j in convs]
    down = parts["down.0.weight"]
    mlp, in_dim = int(down.shape[0]), int(down.shape[1])
    cond = int(parts[f"conditioning1.{convs[-1]}.weight"].shape[0])
    mid = parts["mid.0.weight"]
    if int(mid.shape[1]) != mlp + cond or int(parts["up.0.weight"].shape[0]) != in_dim:
        raise LLLiteError(f"ControlNet-LLLite module {name}: mid/up widths {tuple(mid.shape[:2])}, "
                          f"{tuple(parts['up.0.weight'].shape[:2])} do not fit down {tuple(down.shape[:2])} and a "
                          f"{cond}-wide condition: a broken file")
    return kernels, cond, in_dim, mlp, down.ndim == 4


def layer_names(root: nn.Module) -> dict[str, str]:
    """{LLLite module name: dotted layer name} of every Linear / Conv2d in ``root`` (the U-Net)."""
    return {PREFIX + n.replace(".", "_"): n for n, m in root.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def layer_downscale(layer: str, unet_cfg: object, vae_downscale: int) -> int | None:
    """Pixels per token (per side) at a U-Net layer, from its block (sgm layout); None when not in a block."""
    c = unet_cfg
    per, levels = c.num_res_blocks + 1, len(c.channel_mult)  # type: ignore[attr-defined]
    parts = layer.split(".")
    if parts[0] == "middle_block":
        level = levels - 1
    elif parts[0] == "input_blocks":
        level = max(int(parts[1]) - 1, 0) // per
    elif parts[0] == "output_blocks":
        level = levels - 1 - int(parts[1]) // per
    else:
        return None
    return vae_downscale * 2 ** level


def family(unet_cfg: object) -> str:
    from ldmkit.controlnet import _family_of

    return _family_of(unet_cfg)  # type: ignore[arg-type]


def build(sd: Mapping[str, Tensor], unet: nn.Module, vae_downscale: int, name: str = "file",
          dtype: torch.dtype = torch.float32) -> LLLite:
    """The LLLite of a state dict, each module placed on ``unet``'s layer of its name and checked against it (width,
    resolution); one-line errors name the problem. Meta tensors give a meta network (the layout, no weights)."""
    split = split_modules(sd, name)
    if not split:
        raise LLLiteError(f"{name}: no ControlNet-LLLite weights")
    layers, mods, targets = layer_names(unet), {}, {}
    where = dict(unet.named_modules())
    ucfg = getattr(unet, "cfg", None)
    fam = family(ucfg) if ucfg is not None else "this model"
    meta = any(t.is_meta for t in sd.values())
    for mod, parts in split.items():
        kernels, cond, in_dim, mlp, conv = module_shape(parts, mod)
        layer = layers.get(mod)
        if layer is None:
            raise LLLiteError(f"ControlNet-LLLite {name} has a module for {mod.removeprefix(PREFIX)}, a layer the "
                              f"model ({fam}) lacks: the file is for another model (released LLLite files are for "
                              "SDXL)")
        target = where[layer]
        width = target.in_features if isinstance(target, nn.Linear) else target.in_channels
        if width != in_dim or conv != isinstance(target, nn.Conv2d):
            raise LLLiteError(f"ControlNet-LLLite {name}: {layer} takes {width} features but its module is "
                              f"{in_dim} wide: it is for another model than this {fam} one; use one made for it")
        with torch.device("meta" if meta else "cpu"):
            m = LLLiteModule(kernels, cond, in_dim, mlp, conv)
        want = layer_downscale(layer, ucfg, vae_downscale) if ucfg is not None else None
        if want is not None and m.downscale != want:
            raise LLLiteError(f"ControlNet-LLLite {name}: module {mod} embeds the map {m.downscale}x smaller but "
                              f"{layer} works at 1/{want} of the image: made for another model than this {fam} one")
        mods[mod], targets[mod] = m, layer
    net = LLLite(mods, targets)
    if meta:
        return net
    missing, unexpected = net.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=False)
    if missing or unexpected:
        bad = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise LLLiteError(f"ControlNet-LLLite {name}: {bad}: a broken file")
    return net.to(dtype)


def read_lllite(path: str | os.PathLike) -> StateDict:
    """The weights of a ControlNet-LLLite file (.safetensors, .pth/.pt); refuses other files by name."""
    sd = read_state_dict(Path(path))[0]
    if not is_lllite(sd):
        raise LLLiteError(f"{path} is not a ControlNet-LLLite file: no lllite_unet_* weights")
    return sd


def load_lllite(path: str | os.PathLike, model: object, *, dtype: torch.dtype | None = None,
                device: str | torch.device | None = None) -> LLLite:
    """The ControlNet-LLLite at ``path`` for ``model`` (a StableDiffusion / StableDiffusionXL)."""
    dtype = dtype or getattr(model, "compute_dtype", None) or getattr(model, "dtype", None) or torch.float32
    net = build(read_lllite(path), model.unet, model.cfg.vae.downscale, str(path), dtype)  # type: ignore[attr-defined]
    net.source_name = Path(path).stem  # type: ignore[assignment]
    return net.to(device=device or model.device).eval().requires_grad_(False)  # type: ignore[attr-defined]


def is_lllite_path(path: object) -> bool:
    """Whether a --controlnet path (or its file_kind.Header) names a ControlNet-LLLite file (by its header; a .pth/.pt
    with "lllite" in its name by loading it)."""
    if not isinstance(path, (str, os.PathLike, file_kind.Header)):  # a loaded network
        return False
    p = path.path if isinstance(path, file_kind.Header) else Path(path)
    try:
        if not p.is_file():
            return False
    except OSError:  # e.g. a name too long for a path
        return False
    if p.suffix.lower() == ".safetensors":
        return file_kind.kind_of(path) == file_kind.LLLITE
    # a pickle shows its keys only when loaded: probe only a .pth/.pt named so (ControlNet .pth files stay read once)
    if p.suffix.lower() in (".pth", ".pt") and "lllite" in p.name.lower():
        try:
            return is_lllite(read_state_dict(p)[0])
        except Exception:  # noqa: BLE001 - the ControlNet loader reports what is wrong with it
            return False
    return False


# ---------------------------------------------------------------- units and how they act


@dataclass(frozen=True, eq=False)
class LLLiteUnit:
    """One ControlNet-LLLite with its map: its modules' outputs x ``weight`` (sd-scripts' multiplier), on the steps
    i of n with start <= i/n and (i+1)/n <= end, as a ControlNet unit."""

    model: LLLite
    image: Tensor  # (1, 3, H, W) in [0, 1] at the output size
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    settings: dict | None = None
    _cache: dict = field(default_factory=dict, repr=False)
    batch: str = "both"  # BATCH_MODES: which rows of a CFG call the modules act on
    hr_option: str = "Both"  # the hires fix: "Both", "Low res only" (first pass), "High res only" (second)

    def __post_init__(self) -> None:
        check_window(self.start, self.end)
        from ldmkit.controlnet_a1111 import hr_option_name

        object.__setattr__(self, "batch", batch_mode(self.batch))
        object.__setattr__(self, "hr_option", hr_option_name(self.hr_option))

    def active(self, i: int, n: int) -> bool:
        return in_window(self.start, self.end, i, n)

    def embeddings(self, size: tuple[int, int], device: torch.device) -> dict[str, Tensor]:
        """Each module's condition for a pass at pixel ``size`` (H, W), computed once per size (the map resized for
        another pass, e.g. the hires fix's second)."""
        if size not in self._cache:
            x = map_at(self.image, size, device, next(self.model.parameters()).dtype)
            with torch.inference_mode():
                self._cache[size] = {n: m.embed(x * 2 - 1) for n, m in self.model.items()}
        return self._cache[size]


@contextmanager
def applied(root: nn.Module, plan: Sequence[tuple], uncond_rows: int = 0,
            record: Callable[[int, str, Tensor], None] | None = None):
    """Within the block, in this thread only, each (LLLite, {module: condition}, weight[, batch]) of ``plan`` adds
    its modules' output x weight to the input of its layer of ``root`` (in plan order when several share a layer).
    ``batch`` (BATCH_MODES) with ``uncond_rows`` leading unconditional rows: "cond-only" acts on the other rows
    only, "zeros-uncond" gives those rows a zero condition. ``record(plan index, layer, added)``: told each addition
    (the explain page's strength table)."""
    where = dict(root.named_modules())
    per_layer: dict[str, list[tuple]] = {}
    for k, (net, embs, w, *rest) in enumerate(plan):
        for name, m in net.items():
            per_layer.setdefault(net.targets[name], []).append((m, embs[name], w, rest[0] if rest else "both", k))
    me = threading.get_ident()

    def hook(layer, chain):
        def pre(_mod: nn.Module, args: tuple) -> tuple | None:
            if threading.get_ident() != me:
                return None
            x = args[0]
            for m, emb, w, batch, k in chain:
                u = uncond_rows if 0 < uncond_rows < x.shape[0] else 0
                if batch == "cond-only" and u:  # sd-scripts' batch_cond_only: the conditional rows alone
                    d = torch.cat([torch.zeros_like(x[:u]), m.delta(x[u:], emb) * w])
                elif batch == "zeros-uncond" and u:  # use_zeros_for_batch_uncond: a zero condition there
                    e = emb.expand(x.shape[0] - u, *emb.shape[1:]) if emb.shape[0] == 1 else emb
                    d = m.delta(x, torch.cat([torch.zeros((u, *e.shape[1:]), dtype=e.dtype, device=e.device), e])) * w
                else:
                    d = m.delta(x, emb) * w
                if record is not None:
                    record(k, layer, d)
                x = x + d
            return (x, *args[1:])
        return pre

    handles = [where[layer].register_forward_pre_hook(hook(layer, chain)) for layer, chain in per_layer.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def block_of(layer: str) -> str:
    """The U-Net block of a layer's dotted sgm name: "input 4", "middle", "output 2"."""
    parts = layer.split(".")
    if parts[0] == "middle_block":
        return "middle"
    return f"{parts[0].removesuffix('_blocks')} {parts[1]}"


def blocks(net: LLLite) -> list[str]:
    """The U-Net blocks an LLLite's modules act in, in the U-Net's order."""
    order = {"input": 0, "middle": 1, "output": 2}
    names = {block_of(t) for t in net.targets.values()}
    return sorted(names, key=lambda b: (order[b.split()[0]], int(b.split()[1]) if " " in b else 0))


class LLLiteUNet(ControlledUNet):
    """``unet(x, t, context, ...)`` with the active LLLite units' modules on ``root``'s layers during the call."""

    def __init__(self, unet: Callable[..., Tensor], units, step_timesteps: Tensor, root: nn.Module, downscale: int,
                 uncond_rows: int = 0):
        super().__init__(unet, units, step_timesteps, uncond_rows)
        self.root, self.downscale = root, downscale

    def __call__(self, x: Tensor, timesteps: Tensor, context: Tensor, **kwargs) -> Tensor:
        i, n = self.step_index(timesteps), len(self.step_t)
        size = (x.shape[-2] * self.downscale, x.shape[-1] * self.downscale)
        units = [u for u in self.units if u.active(i, n) and u.weight != 0
                 and u.hr_option != ("Low res only" if tuple(u.image.shape[-2:]) != size else "High res only")]
        plan = [(u.model, u.embeddings(size, x.device), u.weight, u.batch) for u in units]
        if not plan:
            return self.unet(x, timesteps, context, **kwargs)
        from ldmkit import controlnet

        tracing = bool(getattr(controlnet._TRACES, "stack", None))  # the explain page records the strengths
        sums: dict[tuple[int, str], list[float]] = {}

        def record(k: int, layer: str, d: Tensor) -> None:
            acc = sums.setdefault((k, block_of(layer)), [0.0, 0.0])
            acc[0] += float(d.float().pow(2).sum())
            acc[1] += d.numel()

        with applied(self.root, plan, self.uncond_rows, record if tracing else None):
            out = self.unet(x, timesteps, context, **kwargs)
        for k, u in enumerate(units if tracing else ()):  # RMS of what each unit added, per U-Net block
            controlnet.report_rms(u, i, [torch.tensor((sums[k, b][0] / max(sums[k, b][1], 1)) ** 0.5)
                                         if (k, b) in sums else torch.zeros(()) for b in blocks(u.model)])
        return out


def wrap(net: Callable[..., Tensor], units, step_timesteps: Tensor, model: object,
         uncond_rows: int = 0) -> Callable[..., Tensor]:
    """``net`` with the :class:`LLLiteUnit` among ``units`` applied to ``model``'s U-Net (``net`` when none);
    ``uncond_rows``: under CFG, how many leading rows of a call are unconditional (for a unit's ``batch``)."""
    mine = [u for u in units if isinstance(u, LLLiteUnit)]
    if not mine:
        return net
    return LLLiteUNet(net, mine, step_timesteps, model.unet, model.cfg.vae.downscale,  # type: ignore[attr-defined]
                      uncond_rows)


def lllite_problem(unit: LLLiteUnit, model: object) -> str | None:
    """Why ``unit`` cannot act on ``model`` (one line), or None: its modules fit the U-Net's layers and the size
    is a multiple of the coarsest embedding's."""
    layers = layer_names(model.unet)  # type: ignore[attr-defined]
    name = getattr(unit.model, "source_name", "given")
    for mod, layer in unit.model.targets.items():
        if layers.get(mod) != layer:
            return (f"ControlNet-LLLite {name} acts on {layer}, which this model ({family(model.cfg.unet)}) "  # type: ignore[attr-defined]
                    "lacks: use one made for it")
    d = max(m.downscale for _, m in unit.model.items())
    h, w = unit.image.shape[-2:]
    if h % d or w % d:
        return (f"ControlNet-LLLite {name} needs an image size that is a multiple of {d}: {w}x{h} is not; use "
                f"{w // d * d or d}x{h // d * d or d}")
    return None


def make_unit(model: object, path: str | os.PathLike | LLLite, image: object, width: int, height: int,
              weight: float = 1.0, start: float = 0.0, end: float = 1.0, preprocessor: str = "none",
              log: Callable[[str], None] | None = None, resize_mode: str = "Just Resize",
              pixel_perfect: bool = False, processor_res: int | None = None, threshold_a: float | None = None,
              threshold_b: float | None = None, hr_option: str = "Both", control_mode: str = "Balanced",
              batch: str = "both", **_: object) -> LLLiteUnit:
    """An :class:`LLLiteUnit` for ``model`` from an LLLite file (or a loaded one) and a PIL image, preprocessed and
    brought to the output size as a ControlNet unit's map. ``batch``: :data:`BATCH_MODES`; ``control_mode`` (the
    A1111 extension's) is only written to the infotext: the extension ignores it for LLLite, and ``log`` says so."""
    from ldmkit.controlnet_a1111 import BALANCED, control_mode_name

    control_mode = control_mode_name(control_mode)
    if control_mode != BALANCED and log is not None:
        log(f"control mode {control_mode!r} has no effect on a ControlNet-LLLite (as in the A1111 extension)")
    from ldmkit.controlnet import map_tensor
    from ldmkit.controlnet_a1111 import control_image, model_title, module_name, resize_mode_name

    net = path if isinstance(path, LLLite) else load_lllite(path, model)
    module, resize_mode = module_name(preprocessor), resize_mode_name(resize_mode)
    hint, res = control_image(image, width, height, module, resize_mode, pixel_perfect, processor_res,
                              threshold_a, threshold_b, log)
    from ldmkit.controlnet_a1111 import slider_values

    title = getattr(net, "source_name", "given") if isinstance(path, LLLite) else model_title(path)
    sliders = [*slider_values(module, threshold_a, threshold_b).values(), -1, -1]
    settings = {"module": module, "model": title, "weight": float(weight), "resize_mode": resize_mode,
                "processor_res": res if res is not None else -1, "threshold_a": float(sliders[0]),
                "threshold_b": float(sliders[1]), "guidance_start": float(start), "guidance_end": float(end),
                "pixel_perfect": bool(pixel_perfect), "control_mode": control_mode}
    if batch_mode(batch) != "both":  # in the infotext, so the PNG says how it was made
        settings["lllite_batch"] = batch_mode(batch)
    return LLLiteUnit(net, map_tensor(hint), float(weight), float(start), float(end), settings, batch=batch,
                      hr_option=hr_option)


def describe_file(path: str | os.PathLike | file_kind.Header) -> str | None:
    """One line on a ControlNet-LLLite file (``ldmkit info``); None when it is not one."""
    header = file_kind.read_header(path)
    p = header.path
    if p.is_dir() or header.kind != file_kind.LLLITE:
        return None
    try:
        split = split_modules(read_lllite(p), str(p))
        shapes = [module_shape(parts, mod) for mod, parts in split.items()]
    except (LLLiteError, ValueError):
        return None
    sd_n = sum(t.numel() for parts in split.values() for t in parts.values())
    conds = sorted({s[1] for s in shapes})
    mlps = sorted({s[3] for s in shapes})
    scales = sorted({int(torch.tensor(s[0]).prod()) for s in shapes})
    size = f"{sd_n / 1e6:.1f}M" if sd_n >= 10**5 else f"{sd_n:,}"
    return (f"ControlNet-LLLite (kohya) for SDXL: {len(split)} modules on the U-Net's attention inputs, condition "
            f"width {'/'.join(map(str, conds))}, module width {'/'.join(map(str, mlps))}, map embedded "
            f"{', '.join(f'1/{s}' for s in scales)}, {size} parameters: use it with --controlnet {p} "
            "--control-image MAP and an SDXL --model")


__all__ = ["LLLite", "LLLiteError", "LLLiteModule", "LLLiteUNet", "LLLiteUnit", "applied", "build", "describe_file",
           "is_lllite", "is_lllite_path", "BATCH_MODES", "batch_mode", "block_of", "blocks",
           "layer_names", "lllite_problem", "load_lllite", "make_unit", "read_lllite",
           "split_modules", "wrap"]
