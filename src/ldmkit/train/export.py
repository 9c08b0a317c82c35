"""``ldmkit export RUN_DIR OUT.safetensors``: a training run's EMA weights as a single model file.

A U-Net run becomes a complete Stable Diffusion file (LDM layout, config JSON in the metadata,
so ``ldmkit generate --model OUT.safetensors`` needs nothing else); a VAE run becomes a
standalone VAE file in the LDM layout (``encoder.*``, ``decoder.*``), loadable with ``--vae``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from ldmkit.config import ModelConfig
from ldmkit.model import StableDiffusion
from ldmkit.train.config import TrainError
from ldmkit.train.runner import read_checkpoint
from ldmkit.train.sources import load_model, load_vae_source


def safetensors_path(out: str | os.PathLike, why: str = "export writes .safetensors files") -> Path:
    """``out`` as a Path, refused unless it names a .safetensors file."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise TrainError(f"{out}: {why}; name the output *.safetensors")
    return out


def ema_weights(ckpt: dict, prefix: str) -> dict[str, torch.Tensor]:
    """The run's weights under ``prefix`` with the EMA shadows in place of the raw parameters."""
    sd = {k.removeprefix(prefix): v for k, v in ckpt["net"].items() if k.startswith(prefix)}
    for k, v in ckpt["ema"]["shadow"].items():
        if k.startswith(prefix):
            name = k.removeprefix(prefix)
            sd[name] = v.to(sd[name].dtype)
    return sd


def swap_decoder(vae_sd: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """``vae_sd`` with the decoder of ``source`` (a VAE run folder or model file), whose encoder must be
    the same: the U-Net was trained on that encoder's latents, so only a decoder fine-tune fits."""
    _, new, _ = load_vae_source(source)
    if new.keys() != vae_sd.keys() or any(new[k].shape != v.shape for k, v in vae_sd.items()):
        raise TrainError(f"--vae {source}: another autoencoder architecture than the run's")
    changed = [k for k in vae_sd if k.startswith(("encoder.", "quant_conv."))
               and not torch.equal(new[k].float(), vae_sd[k].float())]
    if changed:
        raise TrainError(f"--vae {source}: its encoder differs from the one the U-Net was trained on "
                         f"({changed[0]}, ...); swap in only a decoder fine-tune (`ldmkit train vae --init-from "
                         "RUN --freeze-encoder`)")
    return {k: new[k].to(v.dtype) for k, v in vae_sd.items()}


def model_from_run(run_dir: str | os.PathLike, vae: str = "") -> StableDiffusion:
    """The StableDiffusion a U-Net run has trained (EMA U-Net and text encoder, the run's VAE, or the
    run's VAE with the decoder of ``vae``)."""
    from ldmkit.checkpoint import build_model
    from ldmkit.train.unet import TEXT_FILE, read_text_file, read_vae_file

    run = Path(run_dir)
    ckpt = read_checkpoint(run)
    if ckpt["kind"] != "unet":
        raise TrainError(f"{run} is a {ckpt['kind']} run; only U-Net runs make a complete model")
    cfg = ModelConfig.from_json(ckpt["model_config"])
    _, vae_sd = read_vae_file(run)
    if vae:
        vae_sd = swap_decoder(vae_sd, vae)
    text_sd = ema_weights(ckpt, "text_encoder.") if not (run / TEXT_FILE).exists() else read_text_file(run)[1]
    model = build_model(cfg, {"unet": ema_weights(ckpt, "unet."), "vae": vae_sd, "text_encoder": text_sd})
    model.source_name = cfg.name
    return model


def export_model(source: str, out: str | os.PathLike, half: bool = False, vae: str = "") -> Path:
    """Rewrite a model (file, diffusers folder or built-in name) as one LDM-layout file, with the decoder
    of ``vae`` (a decoder fine-tune of its VAE) in place of its own: how a fine-tuned decoder is baked
    into a model whose U-Net run is not at hand."""
    from ldmkit.checkpoint import save_single_file

    out = safetensors_path(out)
    model = load_model(source, "export")
    if vae:
        model.vae.load_state_dict(swap_decoder(model.vae.state_dict(), vae))  # strict: same keys and shapes
    save_single_file(model, out, dtype=torch.float16 if half else None)
    return out


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, half: bool = False, vae: str = "") -> Path:
    """Write the run's model (U-Net run) or VAE (VAE run) to ``out`` (.safetensors); ``vae`` (U-Net runs)
    names a decoder fine-tune of the run's VAE to ship instead of its decoder."""
    from ldmkit.checkpoint import atomic_save_safetensors, save_single_file
    from ldmkit.train.unet import VAE_KEY

    out = safetensors_path(out)
    dtype = torch.float16 if half else None
    ckpt = read_checkpoint(Path(run_dir))
    if ckpt["kind"] == "vae":
        if vae:
            raise TrainError("--vae applies to U-Net runs; a VAE run exports its own autoencoder")
        sd = ema_weights(ckpt, "vae.")
        if dtype is not None:
            sd = {k: v.to(dtype) for k, v in sd.items()}
        vae_cfg = ModelConfig.from_json(ckpt["model_config"]).vae
        atomic_save_safetensors(sd, out, {VAE_KEY: json.dumps(dataclasses.asdict(vae_cfg))})
    else:
        save_single_file(model_from_run(run_dir, vae), out, dtype=dtype)
    return out
