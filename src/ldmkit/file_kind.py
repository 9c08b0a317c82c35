"""What a model file or folder holds, from names alone: a ``.safetensors`` header's keys or a diffusers folder's
``config.json``. No tensor is read, so a scan of a folder of multi-GB checkpoints stays cheap.

The one place that tells ControlNets (and ControlNet-LLLites), T2I-Adapters, upscalers, TAESD, full checkpoints,
LoRAs and VAEs apart (and textual-inversion embeddings, bare U-Net and text-encoder weights, which a LoRA error
names): the loaders, the server's ``--controlnet-dir`` scan, ``ldmkit info`` and ``lora_formats`` ask it. A pickled
``.pth``/``.pt`` file has no header, so only loading it tells (:func:`kind_of` says None, :func:`may_be` says maybe).
To teach ldmkit a new kind, add a name below, a rule to :func:`kind_of_keys` (before any rule its keys would also
match) and, for diffusers folders, its ``_class_name`` to ``FOLDER_CLASSES``.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CONTROLNET = "controlnet"
ADAPTER = "t2i-adapter"
UPSCALER = "upscaler"
TAESD = "taesd"
SDXL = "sdxl"  # a full SDXL checkpoint (sgm layout)
SD = "sd"  # a full SD1/SD2 checkpoint (LDM layout)
LORA = "lora"
VAE = "vae"
LLLITE = "controlnet-lllite"  # kohya's ControlNet-LLLite (controlnet_lllite.py): lllite_unet_<layer>.* modules
EMBEDDING = "embedding"  # a textual-inversion embedding (A1111's emb_params / string_to_param, SDXL's clip_l/clip_g)
UNET = "unet"  # a diffusers U-Net's full weights, without the rest of a model
TEXT_ENCODER = "text-encoder"  # a CLIP text encoder's full weights

FOLDER_CLASSES = {"ControlNetModel": CONTROLNET, "ControlNetUnionModel": CONTROLNET, "T2IAdapter": ADAPTER,
                  "AutoencoderTiny": TAESD}

CONTROLNET_PREFIXES = ("control_model.", "input_hint_block.", "controlnet_cond_embedding.")
# ESRGAN (old and new names) and Real-ESRGAN's compact SRVGG: see models/esrgan.py
UPSCALER_KEYS = frozenset({"model.0.weight", "conv_first.weight", "body.0.weight"})
# a TAESD key: optional part prefix, optional diffusers `layers.`, then a Sequential index
TAESD_KEY = re.compile(r"^(?:(?:taesd_)?(encoder|decoder)\.)?(layers\.)?(\d+)\.(.+)$")


@dataclass(frozen=True)
class Header:
    """What a path's names say, read once at the edge: a ``.safetensors`` file's tensor names or a folder's
    ``config.json`` class. Pass it on instead of the path where one command asks several questions of one file
    (``ldmkit info``: upscaler? Union / Control-LoRA? LLLite? ControlNet? adapter? LoRA?); every function here and
    the ``describe_file``/``header_kind`` helpers take either."""

    path: Path
    keys: tuple[str, ...] | None  # a .safetensors header's names; None for anything else or an unreadable one
    folder_class: str | None  # a folder's config.json _class_name; None for anything else

    @functools.cached_property
    def kind(self) -> str | None:
        """The kind its names show (one of this module's names), or None; a pickled file's only loading shows."""
        if self.folder_class is not None:
            return FOLDER_CLASSES.get(self.folder_class)
        return kind_of_keys(self.keys) if self.keys else None


def read_header(path: str | os.PathLike | Header) -> Header:
    """``path``'s :class:`Header` (one read of the header or config.json); a Header is returned as it is."""
    if isinstance(path, Header):
        return path
    p = Path(path)
    if p.is_dir():
        return Header(p, None, _folder_class(p))
    return Header(p, _read_keys(p) if p.suffix.lower() == ".safetensors" else None, None)


def _read_keys(path: Path) -> tuple[str, ...] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return tuple(f.keys())
    except Exception:  # noqa: BLE001 - unreadable: the caller's loader reports it
        return None


def _folder_class(path: Path) -> str | None:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg.get("_class_name") if isinstance(cfg, dict) else None


WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")


def config_problem(folder: str | os.PathLike) -> str | None:
    """Why a folder's ``config.json`` cannot be read as a diffusers model's (not JSON, not an object, no
    ``_class_name``) when the folder holds model weights; None when it reads, or there are no weights beside it."""
    folder = Path(folder)
    try:
        if not any(f.is_file() and f.name.lower().endswith(WEIGHT_SUFFIXES) for f in folder.iterdir()):
            return None
        cfg = json.loads((folder / "config.json").read_text())
    except OSError as e:
        return f"config.json cannot be read ({e.strerror or e})"
    except UnicodeDecodeError:
        return "config.json is not text"
    except ValueError as e:
        return f"config.json is not valid JSON ({e})"
    if not isinstance(cfg, dict):
        return "config.json is not a JSON object"
    if "_class_name" not in cfg:
        return 'config.json has no "_class_name" (a diffusers ControlNet folder\'s says "ControlNetModel")'
    return None


def weights_kind(folder: str | os.PathLike) -> tuple[Path, str] | None:
    """(the file, its kind) of the first ``.safetensors`` in a folder whose names say what it holds: what a folder
    with a broken ``config.json`` holds; None when none says."""
    for f in sorted(Path(folder).glob("*.safetensors")):
        if (k := kind_of(f)) is not None:
            return f, k
    return None


def header_keys(path: str | os.PathLike | Header) -> list[str] | None:
    """The tensor names in a ``.safetensors`` file's header; None when it cannot be read (the loader says why)."""
    keys = read_header(path).keys
    return None if keys is None else list(keys)


def folder_class(path: str | os.PathLike | Header) -> str | None:
    """The ``_class_name`` in a diffusers folder's ``config.json``; None when there is none or it is unreadable."""
    return read_header(path).folder_class


def kind_of_keys(keys: Iterable[str]) -> str | None:
    """The kind of a state dict from its key names (one of this module's names), or None when none fits."""
    keys = list(keys)
    names = set(keys)

    def has(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    def contains(*parts: str) -> bool:  # parts that come under assorted prefixes (clip_l.transformer.text_model...)
        return any(p in k for k in keys for p in parts)

    if not keys:
        return None
    if ({"conv_in.weight", "body.0.block1.weight"} <= names or "body.0.body.0.block1.weight" in names
            or has("adapter.")):  # TencentARC full / light, diffusers
        return ADAPTER
    if has("lllite_unet_"):
        return LLLITE
    if has(*CONTROLNET_PREFIXES):
        return CONTROLNET
    if names & UPSCALER_KEYS:
        return UPSCALER
    if all(TAESD_KEY.match(k) for k in keys):
        return TAESD
    if has("conditioner.embedders."):
        return SDXL
    if has("model.diffusion_model."):
        return SD
    from ldmkit.lora_formats import lora_layout  # LoRA layouts are lora_formats' to tell (and its import is heavy)

    if lora_layout(keys):
        return LORA
    if has("first_stage_model.") or (has("encoder.conv_in.") and has("decoder.conv_in.")):
        return VAE
    if contains("emb_params", "string_to_param") or names <= {"clip_l", "clip_g"}:
        return EMBEDDING
    if contains("down_blocks.") and contains("up_blocks.") and contains("conv_in.weight"):  # a ControlNet has no up
        return UNET
    if contains("text_model.embeddings.", "token_embedding"):
        return TEXT_ENCODER
    return None


def kind_of(path: str | os.PathLike | Header) -> str | None:
    """The kind of a diffusers folder (by its config.json) or a ``.safetensors`` file (by its header); None for
    anything else, including pickled files, whose keys only loading shows."""
    return read_header(path).kind


def may_be(path: str | os.PathLike | Header, kind: str) -> bool:
    """Whether ``path`` may hold ``kind``: its names say so, or it is a ``.pth``/``.pt`` file only loading can tell."""
    h = read_header(path)
    if h.path.is_dir() or h.path.suffix.lower() == ".safetensors":
        return h.kind == kind
    return h.path.suffix.lower() in (".pth", ".pt")


# each kind in words, and the option that takes it (None: no option takes it alone): what an error says of a file
# given to the wrong option (a ControlNet as --lora, a LoRA as --controlnet / --vae / --model)
ROLES: dict[str, tuple[str, str | None]] = {
    SD: ("a full Stable Diffusion checkpoint (model.diffusion_model.* keys)", "pass it as --model"),
    SDXL: ("a full Stable Diffusion checkpoint (SDXL, conditioner.* keys)", "pass it as --model"),
    CONTROLNET: ("a ControlNet", "pass it as --controlnet with a --control-image"),
    LLLITE: ("a ControlNet-LLLite", "pass it as --controlnet with a --control-image and an SDXL --model"),
    ADAPTER: ("a T2I-Adapter", "pass it as --adapter with a --control-image"),
    UPSCALER: ("an image upscaler (ESRGAN family)", "use it with ldmkit upscale --upscaler or --hires-upscaler"),
    TAESD: ("a tiny autoencoder (TAESD)", "pass it as --vae or --preview-vae"),
    VAE: ("an autoencoder (VAE) file", "pass it as --vae"),
    LORA: ("a LoRA", "merge it with --lora FILE[:WEIGHT], or put it in a --lora-dir and write <lora:NAME:1> in "
                     "the prompt"),
    EMBEDDING: ("a textual-inversion embedding", "put it in an --embeddings-dir and write its name in the prompt"),
    UNET: ("a diffusers U-Net (full weights)", None),
    TEXT_ENCODER: ("a text encoder (full weights)", None),
}


def misplaced(kind: str | None, wanted: str, accepted: Iterable[str] = ()) -> str | None:
    """"<what kind is>, not <wanted>: <the option that takes it>" (wanted: "a LoRA", "a ControlNet", ...);
    None for an unknown kind or one of the ``accepted`` kinds (the option's own, which its loader reports on)."""
    if kind not in ROLES or kind in accepted:
        return None
    what, option = ROLES[kind]
    return f"{what}, not {wanted}" + (f": {option}" if option else "")


def usage(path: str | os.PathLike | Header) -> str | None:
    """``ldmkit info``'s line for a file that is no model on its own (a LoRA, a VAE, a tiny autoencoder): what
    it is and the option that uses it; None for anything else."""
    h = read_header(path)
    p, kind = h.path, h.kind
    if kind == LORA:
        from ldmkit.lora_formats import SDXL_PREFIXES, detect_lora_format, foreign_family

        keys = list(h.keys or ())
        notes = [f"{detect_lora_format(keys)} layout", f"{len(keys)} tensors"]
        if family := foreign_family(keys):
            notes.append(f"for {family}, which ldmkit does not run")
        elif any(k.startswith(SDXL_PREFIXES) for k in keys):
            notes.append("for SDXL")
        return (f"LoRA ({', '.join(notes)}): merge it with --lora {p}[:WEIGHT], or put it in a --lora-dir and "
                f"write <lora:{p.stem}:1> in the prompt")
    if kind == VAE:
        return f"autoencoder (VAE) weights, not a whole model: use them with --vae {p}"
    if kind == TAESD:
        return (f"tiny autoencoder (TAESD), not a whole model: use it with --vae {p} (fast decoding) or "
                f"--preview-vae {p}")
    return None


__all__ = ["ADAPTER", "CONTROLNET", "EMBEDDING", "FOLDER_CLASSES", "LLLITE", "LORA", "SD", "SDXL", "TAESD",
           "TEXT_ENCODER", "UNET", "UPSCALER", "VAE", "Header", "ROLES", "config_problem", "folder_class",
           "header_keys", "kind_of", "kind_of_keys", "may_be", "misplaced", "read_header", "usage", "weights_kind"]
