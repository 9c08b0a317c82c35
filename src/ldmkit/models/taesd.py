"""TAESD, the tiny autoencoder (madebyollin/taesd; diffusers ``AutoencoderTiny``).

Plain 3x3 convolutions and ReLU residual blocks, no normalisation or attention: about 1.2M
parameters per half at width 64, against the KL VAE's 34M (encoder) and 49M (decoder).
Unlike the KL VAE it works on *scaled* latents: ``encode`` returns what the U-Net sees and
``decode`` takes it, with no ``scale_factor`` in between.

Attribute names are the original files' keys: ``encoder`` and ``decoder`` are ``nn.Sequential``s
whose indices are those of ``taesd_encoder.pth`` / ``taesd_decoder.pth`` (``decoder.0`` is the
parameter-free soft clamp). Images are in [-1, 1] at the interface; the original network works in
[0, 1], as diffusers' ``EncoderTiny``/``DecoderTiny`` also convert.

Layouts read (decided by key inspection; every key and shape is checked):

- the original files: ``taesd_encoder.pth`` / ``taesd_decoder.pth`` (or ``.safetensors``), each the
  state dict of one ``nn.Sequential`` (keys ``0.weight``, ``1.conv.0.weight``, ...); a folder holding
  them; or one combined file with ``encoder.N...`` and ``decoder.N...`` keys (what ldmkit writes), or
  ComfyUI's ``taesd_encoder.N...`` / ``taesd_decoder.N...``;
- diffusers' ``AutoencoderTiny`` folder: ``config.json`` + ``diffusion_pytorch_model.safetensors``
  with keys ``encoder.layers.N...`` and ``decoder.layers.N...``. diffusers' decoder has no layer for
  the parameter-free clamp, so its index N is the original file's N + 1.

The configuration of a raw file (latent channels, levels, widths, blocks per level) is read from
its keys and shapes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ldmkit import latent_norm
from ldmkit.config import VAEConfig
from ldmkit.file_kind import TAESD_KEY, folder_class, header_keys


@dataclass(frozen=True)
class TAESDConfig:
    """Widths and residual-block counts per resolution level (SD: four levels, f = 8).

    ``scaling_factor``/``shift_factor`` are diffusers' ``AutoencoderTiny`` config: the decoder reads
    ``latent / scaling_factor + shift_factor`` (1 and 0 for TAESD, which was trained on scaled latents).
    ``latent_magnitude``/``latent_shift`` map raw latents to [0, 1] for storing them as 8-bit images.
    """

    latent_channels: int = 4
    image_channels: int = 3
    encoder_widths: tuple[int, ...] = (64, 64, 64, 64)
    encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    decoder_widths: tuple[int, ...] = (64, 64, 64, 64)
    decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    has_encoder: bool = True
    has_decoder: bool = True
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    latent_magnitude: float = 3.0
    latent_shift: float = 0.5

    @property
    def downscale(self) -> int:
        levels = len(self.encoder_widths) if self.has_encoder else len(self.decoder_widths)
        return 2 ** (levels - 1)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> TAESDConfig:
        d = json.loads(text)
        return TAESDConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    @staticmethod
    def of_width(width: int = 64, latent_channels: int = 4, levels: int = 4) -> TAESDConfig:
        """TAESD's block counts (1, 3, 3, ... / ..., 3, 3, 1) at ``levels`` levels of ``width`` channels."""
        return TAESDConfig(latent_channels=latent_channels, encoder_widths=(width,) * levels,
                           encoder_blocks=(1,) + (3,) * (levels - 1), decoder_widths=(width,) * levels,
                           decoder_blocks=(3,) * (levels - 1) + (1,))


def _conv(n_in: int, n_out: int, **kw: object) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kw)  # type: ignore[arg-type]


class Clamp(nn.Module):
    """Soft clamp of the decoder's input to (-3, 3): out-of-range latents cannot blow up the image."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


def build_encoder(cfg: TAESDConfig) -> nn.Sequential:
    """[0, 1] image -> raw latent; each level after the first starts with a stride-2 convolution."""
    w = cfg.encoder_widths
    layers: list[nn.Module] = [_conv(cfg.image_channels, w[0])]
    for i, n in enumerate(cfg.encoder_blocks):
        if i:
            layers.append(_conv(w[i - 1], w[i], stride=2, bias=False))
        layers += [Block(w[i], w[i]) for _ in range(n)]
    layers.append(_conv(w[-1], cfg.latent_channels))
    return nn.Sequential(*layers)


def build_decoder(cfg: TAESDConfig) -> nn.Sequential:
    """Raw latent -> [0, 1] image; each level but the last ends with 2x nearest upsampling and a conv."""
    w = cfg.decoder_widths
    layers: list[nn.Module] = [Clamp(), _conv(cfg.latent_channels, w[0]), nn.ReLU()]
    for i, n in enumerate(cfg.decoder_blocks):
        layers += [Block(w[i], w[i]) for _ in range(n)]
        if i < len(w) - 1:
            layers += [nn.Upsample(scale_factor=2), _conv(w[i], w[i + 1], bias=False)]
    layers.append(_conv(w[-1], cfg.image_channels))
    return nn.Sequential(*layers)


class TinyAutoencoder(nn.Module):
    """TAESD's encoder and/or decoder (a file may hold only one of them)."""

    # the pipeline passes scaled latents to this autoencoder (no division by the KL scale factor)
    scaled_latents = True

    def __init__(self, cfg: TAESDConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.has_encoder:
            self.encoder = build_encoder(cfg)
        if cfg.has_decoder:
            self.decoder = build_decoder(cfg)

    @property
    def latent_channels(self) -> int:
        return self.cfg.latent_channels

    def encode(self, x: Tensor) -> Tensor:
        """Image in [-1, 1] (B, 3, H, W) -> scaled latent (B, C, H/f, W/f), what the U-Net sees."""
        if not self.cfg.has_encoder:
            raise ValueError("this tiny autoencoder has no encoder (a decoder-only file)")
        raw = self.encoder(x.add(1).div(2))
        return (raw - self.cfg.shift_factor) * self.cfg.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latent (B, C, h, w) -> image nominally in [-1, 1] (B, 3, h*f, w*f)."""
        if not self.cfg.has_decoder:
            raise ValueError("this tiny autoencoder has no decoder (an encoder-only file)")
        raw = latents / self.cfg.scaling_factor + self.cfg.shift_factor
        return self.decoder(raw).mul(2).sub(1)

    def latents_to_unit(self, raw: Tensor) -> Tensor:
        """Raw latent -> [0, 1], the range TAESD stores latents in as 8-bit images."""
        return raw.div(2 * self.cfg.latent_magnitude).add(self.cfg.latent_shift).clamp(0, 1)

    def unit_to_latents(self, x: Tensor) -> Tensor:
        return x.sub(self.cfg.latent_shift).mul(2 * self.cfg.latent_magnitude)


# ---------------------------------------------------------------- files

StateDict = dict[str, Tensor]
CONFIG_METADATA_KEY = "ldmkit.taesd"
_DIFFUSERS_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_EXTENSIONS = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
_KEY = TAESD_KEY  # a TAESD key: optional part prefix, optional diffusers `layers.`, then a Sequential index


def _error(msg: str) -> ValueError:
    from ldmkit.checkpoint import CheckpointError

    return CheckpointError(msg)


def resolve_path(path: str | os.PathLike) -> Path:
    """A path, or the name of a tiny autoencoder shipped with ldmkit (``emoji-taesd``)."""
    from ldmkit.api import builtin_vae_path

    return builtin_vae_path(str(path)) or Path(path)


# ---------------------------------------------------------------- detection


def _is_diffusers_folder(p: Path) -> bool:
    return folder_class(p) == "AutoencoderTiny"


def _original_files(folder: Path) -> dict[str, Path]:
    """``{"encoder": taesd_encoder.*, "decoder": taesd_decoder.*}`` present in a folder."""
    found = {}
    for part in ("encoder", "decoder"):
        for ext in _EXTENSIONS:
            if (folder / f"taesd_{part}{ext}").exists():
                found[part] = folder / f"taesd_{part}{ext}"
                break
    return found


def _file_keys(p: Path) -> list[str]:
    if p.suffix.lower() == ".safetensors":
        return header_keys(p) or []  # unreadable: not ours to judge here, the VAE loader reports it
    from ldmkit.checkpoint import read_state_dict

    try:
        return list(read_state_dict(p)[0])
    except ValueError:
        return []


def looks_tiny(keys: list[str]) -> bool:
    """Whether state-dict keys are TAESD's (Sequential indices), not a KL VAE's (``decoder.up.0...``)."""
    return bool(keys) and all(_KEY.match(k) for k in keys)


def is_taesd(path: str | os.PathLike) -> bool:
    """Whether ``path`` (file, folder, or built-in name) holds a tiny autoencoder rather than a KL VAE."""
    p = resolve_path(path)
    if p.is_dir():
        return _is_diffusers_folder(p) or bool(_original_files(p))
    return p.is_file() and looks_tiny(_file_keys(p))


# ---------------------------------------------------------------- reading


def _split_parts(sd: StateDict, where: str) -> dict[str, StateDict]:
    """Keys of any TAESD layout -> {"encoder": {"N.rest": ...}, "decoder": {...}} in original indices."""
    parts: dict[str, StateDict] = {"encoder": {}, "decoder": {}}
    bare: StateDict = {}
    for k, v in sd.items():
        m = _KEY.match(k)
        if m is None:
            raise _error(f"{where}: key {k!r} is not a tiny autoencoder (TAESD) key")
        part, diffusers, idx, rest = m.group(1), m.group(2), int(m.group(3)), m.group(4)
        if part is None:
            bare[f"{idx}.{rest}"] = v
            continue
        if diffusers and part == "decoder":
            idx += 1  # diffusers has no layer for the clamp
        parts[part][f"{idx}.{rest}"] = v
    if bare:
        # a single original file: the encoder's first layer is a conv, the decoder's is the clamp
        parts["encoder" if "0.weight" in bare else "decoder"] = bare
    return parts


def _items(sd: StateDict) -> list[tuple[int, str, Tensor]]:
    """(index, "conv" | "block", weight) of each layer holding parameters, in order."""
    out = []
    for i in sorted({int(k.split(".")[0]) for k in sd}):
        if f"{i}.weight" in sd:
            out.append((i, "conv", sd[f"{i}.weight"]))
        elif f"{i}.conv.0.weight" in sd:
            out.append((i, "block", sd[f"{i}.conv.0.weight"]))
        else:
            raise _error(f"layer {i}: neither a convolution nor a TAESD block")
    return out


def _levels(sd: StateDict, part: str) -> tuple[Tensor, Tensor, tuple[int, ...], tuple[int, ...]]:
    """(first conv weight, last conv weight, widths, blocks per level) of an encoder or decoder: a convolution
    between blocks (stride-2 downsampling, or after 2x upsampling) starts a new level."""
    items = _items(sd)
    if len(items) < 2 or items[0][1] != "conv" or items[-1][1] != "conv":
        raise ValueError(f"the {part} must start and end with a convolution")
    widths, blocks = [items[0][2].shape[0]], [0]
    for _, kind, w in items[1:-1]:
        if kind == "conv":
            widths.append(w.shape[0])
            blocks.append(0)
        else:
            blocks[-1] += 1
    return items[0][2], items[-1][2], tuple(widths), tuple(blocks)


def _encoder_shape(sd: StateDict) -> dict:
    first, last, widths, blocks = _levels(sd, "encoder")
    return {"image_channels": first.shape[1], "latent_channels": last.shape[0],
            "encoder_widths": widths, "encoder_blocks": blocks}


def _decoder_shape(sd: StateDict) -> dict:
    first, last, widths, blocks = _levels(sd, "decoder")
    return {"image_channels": last.shape[0], "latent_channels": first.shape[1],
            "decoder_widths": widths, "decoder_blocks": blocks}


def config_from_weights(parts: dict[str, StateDict], base: TAESDConfig | None = None) -> TAESDConfig:
    """The configuration the layers of a raw file describe."""
    fields: dict = {"has_encoder": bool(parts["encoder"]), "has_decoder": bool(parts["decoder"])}
    if not (fields["has_encoder"] or fields["has_decoder"]):
        raise ValueError("no encoder or decoder weights")
    shapes = []
    if parts["encoder"]:
        shapes.append(_encoder_shape(parts["encoder"]))
    if parts["decoder"]:
        shapes.append(_decoder_shape(parts["decoder"]))
    if len(shapes) == 2:
        for k in ("image_channels", "latent_channels"):
            if shapes[0][k] != shapes[1][k]:
                raise ValueError(f"the encoder has {shapes[0][k]} {k.replace('_', ' ')}, the decoder {shapes[1][k]}")
        if len(shapes[0]["encoder_widths"]) != len(shapes[1]["decoder_widths"]):
            raise ValueError("the encoder and decoder have different numbers of levels")
    for s in shapes:
        fields.update(s)
    if base is not None:
        fields = {**{k: v for k, v in base.__dict__.items()}, **fields}
    return TAESDConfig(**fields)


def _load(cfg: TAESDConfig, parts: dict[str, StateDict], where: str, dtype: torch.dtype) -> TinyAutoencoder:
    from ldmkit.checkpoint import load_strict

    ae = TinyAutoencoder(cfg)
    sd = {f"{part}.{k}": v for part, p in parts.items() for k, v in p.items()}
    load_strict(ae, sd, f"tiny autoencoder {where}", dtype)
    return ae.eval().requires_grad_(False)


def _read(p: Path) -> tuple[StateDict, dict[str, str]]:
    from ldmkit.checkpoint import read_state_dict

    return read_state_dict(p)


def _diffusers_config(d: dict, where: str) -> TAESDConfig:
    for key, want in (("act_fn", "relu"), ("upsample_fn", "nearest"), ("upsampling_scaling_factor", 2)):
        if d.get(key, want) != want:
            raise _error(f"{where}: {key} = {d[key]!r} is not supported (TAESD uses {want!r})")
    base = TAESDConfig()
    return TAESDConfig(
        latent_channels=d.get("latent_channels", 4), image_channels=d.get("in_channels", 3),
        encoder_widths=tuple(d.get("encoder_block_out_channels", base.encoder_widths)),
        encoder_blocks=tuple(d.get("num_encoder_blocks", base.encoder_blocks)),
        decoder_widths=tuple(d.get("decoder_block_out_channels", base.decoder_widths)),
        decoder_blocks=tuple(d.get("num_decoder_blocks", base.decoder_blocks)),
        scaling_factor=float(d.get("scaling_factor", 1.0)), shift_factor=float(d.get("shift_factor") or 0.0),
        latent_magnitude=float(d.get("latent_magnitude", 3.0)), latent_shift=float(d.get("latent_shift", 0.5)),
    )


def load_taesd(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> TinyAutoencoder:
    """A tiny autoencoder (TAESD) from a file, a folder (original files or diffusers ``AutoencoderTiny``),
    or a built-in name such as ``emoji-taesd``; eval mode, no gradients, on the CPU.

    ``ae.decode(latents)`` turns the latents a sampler produces (scaled, as the U-Net sees them) into
    images in [-1, 1]: what a live preview needs. A ``taesd_decoder`` file whose ``taesd_encoder``
    sibling exists is loaded with it.
    """
    p = resolve_path(path)
    where = str(path)
    if p.is_dir():
        if _is_diffusers_folder(p):
            cfg = _diffusers_config(json.loads((p / "config.json").read_text()), where)
            weights = next((p / n for n in _DIFFUSERS_FILES if (p / n).exists()), None)
            if weights is None:
                raise _error(f"{where}: no weights file (looked for {', '.join(_DIFFUSERS_FILES)})")
            parts = _split_parts(_read(weights)[0], where)
            return _load(cfg, parts, where, dtype)
        files = _original_files(p)
        if not files:
            raise _error(f"{where}: neither a diffusers AutoencoderTiny folder (config.json) nor a folder with "
                         "taesd_encoder/taesd_decoder files")
    elif p.is_file():
        files = {"file": p}
        m = re.fullmatch(r"(.*)_(encoder|decoder)(\.\w+)", p.name)
        if m:  # the other half beside it, as the original repository ships them
            other = p.with_name(f"{m.group(1)}_{'decoder' if m.group(2) == 'encoder' else 'encoder'}{m.group(3)}")
            if other.exists():
                files["other"] = other
    else:
        raise _error(f"{where}: no such file or folder")
    parts: dict[str, StateDict] = {"encoder": {}, "decoder": {}}
    meta: dict[str, str] = {}
    for f in files.values():
        sd, md = _read(f)
        meta |= md
        for part, d in _split_parts(sd, str(f)).items():
            if d and parts[part]:
                raise _error(f"{where}: two files hold a tiny {part}")
            parts[part] = parts[part] or d
    try:
        base = TAESDConfig.from_json(meta[CONFIG_METADATA_KEY]) if CONFIG_METADATA_KEY in meta else None
        cfg = config_from_weights(parts, base)
    except (ValueError, KeyError, IndexError) as e:
        raise _error(f"{where}: not a tiny autoencoder (TAESD) file: {e}") from None
    return _load(cfg, parts, where, dtype)


# ---------------------------------------------------------------- writing


def save_taesd(ae: TinyAutoencoder, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """One ``.safetensors`` file in the original layout (``encoder.N...``, ``decoder.N...``), config in metadata."""
    from ldmkit.checkpoint import atomic_save_safetensors

    sd = {k: (v.to(dtype) if dtype is not None else v).detach().cpu() for k, v in ae.state_dict().items()}
    atomic_save_safetensors(sd, path, {CONFIG_METADATA_KEY: ae.cfg.to_json()})
    return Path(path)


# ---------------------------------------------------------------- as a model's autoencoder


def check_compatible(ae: TinyAutoencoder, model: nn.Module, where: str = "") -> None:
    """Refuse a tiny autoencoder whose latents can't be the model's (channel count, downscale factor)."""
    cfg = model.cfg
    where = where or "the tiny autoencoder"
    if ae.cfg.latent_channels != cfg.vae.z_channels:
        raise _error(
            f"{where}: a tiny autoencoder with {ae.cfg.latent_channels} latent channels, but {cfg.name} uses "
            f"{cfg.vae.z_channels} (taesd3/taef1 are for 16-channel SD3/FLUX latents); use the TAESD made for "
            "this model (taesd for SD1/SD2)")
    if ae.cfg.downscale != cfg.vae.downscale:
        raise _error(f"{where}: a tiny autoencoder that downscales {ae.cfg.downscale}x, but {cfg.name}'s "
                     f"latents are {cfg.vae.downscale}x smaller than its images")


class DecoderOnly(nn.Module):
    """A tiny decoder with the model's KL encoder: what stands in for ``model.vae`` given a decoder-only file."""

    scaled_latents = True

    def __init__(self, tiny: TinyAutoencoder, kl: nn.Module, vae_cfg: VAEConfig):
        super().__init__()
        self.tiny, self.kl, self.vae_cfg = tiny, kl, vae_cfg

    def encode(self, x: Tensor) -> Tensor:
        return latent_norm.to_unet(self.vae_cfg, self.kl.encode(x)[0])  # posterior mean, as the U-Net sees it

    def decode(self, latents: Tensor) -> Tensor:
        return self.tiny.decode(latents)


def as_vae(ae: TinyAutoencoder, model: nn.Module, where: str = "") -> nn.Module:
    """``ae`` ready to replace ``model.vae``: checked against the model, its KL encoder kept if ``ae`` has none."""
    check_compatible(ae, model, where)
    if not ae.cfg.has_decoder:
        raise _error(f"{where or 'the tiny autoencoder'}: an encoder-only tiny autoencoder cannot decode; "
                     "pass the taesd_decoder file")
    if ae.cfg.has_encoder:
        return ae
    return DecoderOnly(ae, model.vae, model.cfg.vae)


def use_taesd(model: nn.Module, path: str | os.PathLike) -> None:
    """Make the tiny autoencoder at ``path`` the model's autoencoder (final decode, img2img encode)."""
    model.vae = as_vae(load_taesd(path, model.dtype), model, f"--vae {path}")
