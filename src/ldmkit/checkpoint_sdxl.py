"""Reading and writing SDXL checkpoints: the single file and diffusers folders, strictly (every key and shape).

The parts are the SD ones plus a second text encoder: ``text_encoder`` (CLIP-L, the single file's embedder 0)
and ``text_encoder_2`` (OpenCLIP bigG with projection, embedder 1); the refiner has bigG alone, which is
embedder 0 in its single file and ``text_encoder_2/`` in its diffusers folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ldmkit import convert, convert_sdxl
from ldmkit.checkpoint import (
    CONFIG_METADATA_KEY,
    CheckpointError,
    _on_meta,
    _read_json,
    _read_part,
    atomic_save_safetensors,
    atomic_write_text,
    errors_naming,
    from_single_file,
    load_strict,
)
from ldmkit.config import ModelConfig, TextEncoderConfig
from ldmkit.models.tokenizer import CLIPTokenizer
from ldmkit.recommended import RECOMMENDED_METADATA_KEY, Recommended
from ldmkit.sdxl import StableDiffusionXL

StateDict = dict[str, torch.Tensor]
MODEL_TYPES = {"sdxl": "sdxl", "sdxl-refiner": "sdxl-refiner", "sdxl-inpainting": "sdxl", "sdxl-turbo": "sdxl"}
# SDXL-Turbo (adversarial diffusion distillation) has the base's weights layout: only --model-type tells it.
# It was trained at 512² and samples in 1-4 steps without CFG; settings as diffusers' model card (Euler
# ancestral, trailing spacing, guidance off)
TURBO_SIZE = 512
TURBO_RECOMMENDED = Recommended(sampler="Euler a", scheduler="trailing", steps=1, cfg_scale=1.0)
_UNET_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_TEXT_FILES = ("model.safetensors", "pytorch_model.bin")


def build_sdxl(cfg: ModelConfig, parts: dict[str, StateDict], tokenizers: list[CLIPTokenizer] | None = None,
               dtype: torch.dtype = torch.float32) -> StableDiffusionXL:
    with _on_meta():
        model = StableDiffusionXL(cfg, tokenizers)
    if parts.keys() != model.parts().keys():
        raise CheckpointError(f"{cfg.name}: parts {sorted(parts)} do not match an {cfg.family} model "
                              f"({sorted(model.parts())})")
    for name, module in model.parts().items():
        load_strict(module, parts[name], f"{cfg.name} {name}", dtype)
    return model.eval().requires_grad_(False)


def sdxl_config(sd: StateDict, metadata: dict[str, str], name: str, model_type: str | None = None) -> ModelConfig:
    """Config of an SDXL single file: the one ldmkit stored, else detected from keys and shapes."""
    if CONFIG_METADATA_KEY in metadata:
        cfg = ModelConfig.from_json(metadata[CONFIG_METADATA_KEY]).replace(name=name)
    else:
        cfg = ModelConfig(name=name, **convert_sdxl.detect_sdxl(sd))
    if model_type is not None:
        if model_type not in MODEL_TYPES:
            raise CheckpointError(f"unknown SDXL model type {model_type!r}; choose one of {', '.join(MODEL_TYPES)}")
        if MODEL_TYPES[model_type] != cfg.family or (model_type == "sdxl-inpainting") != cfg.is_inpainting:
            raise CheckpointError(f"{name}: --model-type {model_type} given but the weights are "
                                  f"{describe(cfg)}")
        if model_type == "sdxl-turbo":
            cfg = cfg.replace(extra={**cfg.extra, "image_size": TURBO_SIZE})
    return cfg


def describe(cfg: ModelConfig) -> str:
    """The family as users name it: "SDXL base", "SDXL refiner", "SDXL inpainting"."""
    if cfg.family == "sdxl-refiner":
        return "SDXL refiner"
    return "SDXL inpainting" if cfg.is_inpainting else "SDXL base"


def load_sdxl_single_file(path: str | os.PathLike, sd: StateDict, metadata: dict[str, str],
                          model_type: str | None = None, dtype: torch.dtype = torch.float32) -> StableDiffusionXL:
    p = Path(path)
    with errors_naming(p):
        cfg = sdxl_config(sd, metadata, p.stem, model_type)
        unet, vae, texts, _ = convert_sdxl.split_sdxl_checkpoint(sd)
    del sd
    names = ["text_encoder", "text_encoder_2"][: len(texts)]
    model = build_sdxl(cfg, {"unet": unet, "vae": vae, **dict(zip(names, texts, strict=True))}, dtype=dtype)
    from_single_file(model, p, metadata)
    if model_type == "sdxl-turbo" and model.recommended is None:
        model.recommended = TURBO_RECOMMENDED
    return model


def save_sdxl_single_file(model: StableDiffusionXL, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """The single-file layout Stability ships (and A1111, ComfyUI and diffusers' from_single_file read)."""
    layouts = ["openclip" if enc.cfg.projection_dim else "hf" for enc in model.encoders]
    sd = convert_sdxl.join_sdxl_checkpoint(model.unet.state_dict(), model.vae.state_dict(),
                                           [enc.state_dict() for enc in model.encoders], layouts)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    meta = {CONFIG_METADATA_KEY: model.cfg.to_json()}
    if model.recommended is not None:  # e.g. a Turbo model's 1 step without CFG travels with the file
        meta[RECOMMENDED_METADATA_KEY] = model.recommended.to_json()
    atomic_save_safetensors(sd, path, meta)


def is_sdxl_folder(root: Path) -> bool:
    return (root / "text_encoder_2").is_dir()


def load_sdxl_diffusers(folder: str | os.PathLike, dtype: torch.dtype = torch.float32) -> StableDiffusionXL:
    """A diffusers StableDiffusionXL(Img2Img/Inpaint)Pipeline folder; the refiner's has no text_encoder/."""
    root = Path(folder)
    for sub in ("unet", "vae", "text_encoder_2"):
        if not (root / sub).is_dir():
            raise CheckpointError(f"{root}: not a diffusers SDXL folder (no {sub}/ inside)")
    try:
        ucfg = convert.unet_config_from_diffusers(_read_json(root / "unet" / "config.json"))
        vcfg = convert.vae_config_from_diffusers(_read_json(root / "vae" / "config.json"))
        subs = [s for s in ("text_encoder", "text_encoder_2") if (root / s).is_dir()]
        tcfgs = [_text_config(_read_json(root / s / "config.json"), s == "text_encoder_2") for s in subs]
    except ValueError as e:
        raise CheckpointError(f"{root}: {e}") from None
    tok_dirs = [root / ("tokenizer" if s == "text_encoder" else "tokenizer_2") for s in subs]
    tokenizers = [CLIPTokenizer.from_dir(d) for d in tok_dirs] if all(d.is_dir() for d in tok_dirs) else None
    sched_path = root / "scheduler" / "scheduler_config.json"
    sched = _read_json(sched_path) if sched_path.exists() else {}
    cfg = ModelConfig(
        name=root.name, family="sdxl" if len(subs) == 2 else "sdxl-refiner", unet=ucfg, vae=vcfg,
        text=tcfgs[0], text2=tcfgs[1] if len(tcfgs) == 2 else None, clip_skip=2,
        prediction="v" if sched.get("prediction_type") == "v_prediction" else "eps",
        pad_with_eos=tokenizers[0].pad_id == tokenizers[0].eos_id if tokenizers else len(subs) == 2,
        beta_start=sched.get("beta_start", 0.00085), beta_end=sched.get("beta_end", 0.012),
        num_train_timesteps=sched.get("num_train_timesteps", 1000),
    )
    parts: dict[str, StateDict] = {
        "unet": convert.unet_diffusers_to_ldm(_read_part(root / "unet", _UNET_FILES), ucfg),
        "vae": convert.vae_diffusers_to_ldm(_read_part(root / "vae", _UNET_FILES), vcfg),
    }
    for name, sub in zip(["text_encoder", "text_encoder_2"], subs, strict=False):
        parts[name] = convert.normalize_hf_text(_read_part(root / sub, _TEXT_FILES))
    model = build_sdxl(cfg, parts, tokenizers, dtype)
    model.source_name = root.name
    return model


def _text_config(d: dict, projection: bool) -> TextEncoderConfig:
    cfg = convert.text_config_from_hf(d)
    if not projection:
        return cfg
    return TextEncoderConfig(**{**cfg.__dict__, "projection_dim": d.get("projection_dim", 512)})


def save_sdxl_diffusers(model: StableDiffusionXL, folder: str | os.PathLike) -> None:
    """A folder that ``StableDiffusionXLPipeline`` (refiner: ``StableDiffusionXLImg2ImgPipeline``) loads."""
    root = Path(folder)
    cfg = model.cfg
    atomic_save_safetensors(convert.unet_ldm_to_diffusers(model.unet.state_dict(), cfg.unet),
                            root / "unet" / "diffusion_pytorch_model.safetensors")
    atomic_write_text(root / "unet" / "config.json",
                      json.dumps(convert.diffusers_unet_config(cfg.unet, sample_size=128), indent=2))
    atomic_save_safetensors(convert.vae_ldm_to_diffusers(model.vae.state_dict(), cfg.vae),
                            root / "vae" / "diffusion_pytorch_model.safetensors")
    atomic_write_text(root / "vae" / "config.json",
                      json.dumps(convert.diffusers_vae_config(cfg.vae, sample_size=1024), indent=2))
    index: dict = {"_class_name": "StableDiffusionXLPipeline" if cfg.text2 else "StableDiffusionXLImg2ImgPipeline",
                   "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                   "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                   "text_encoder": [None, None], "tokenizer": [None, None]}
    for enc, tok in zip(model.encoders, model.tokenizers, strict=True):
        sub, tok_sub = ("text_encoder_2", "tokenizer_2") if enc.cfg.projection_dim else ("text_encoder", "tokenizer")
        hf = convert.hf_text_config(enc.cfg)
        if enc.cfg.projection_dim:
            hf |= {"architectures": ["CLIPTextModelWithProjection"], "projection_dim": enc.cfg.projection_dim}
        atomic_save_safetensors(enc.state_dict(), root / sub / "model.safetensors", {"format": "pt"})
        atomic_write_text(root / sub / "config.json", json.dumps(hf, indent=2))
        tok.save(root / tok_sub)
        index[sub] = ["transformers", hf["architectures"][0]]
        index[tok_sub] = ["transformers", "CLIPTokenizer"]
    scheduler = {
        "_class_name": "EulerDiscreteScheduler", "num_train_timesteps": cfg.num_train_timesteps,
        "beta_start": cfg.beta_start, "beta_end": cfg.beta_end, "beta_schedule": "scaled_linear",
        "prediction_type": "v_prediction" if cfg.prediction == "v" else "epsilon",
        "timestep_spacing": "leading", "steps_offset": 1,
    }
    atomic_write_text(root / "scheduler" / "scheduler_config.json", json.dumps(scheduler, indent=2))
    atomic_write_text(root / "model_index.json", json.dumps(index, indent=2))


def sdxl_kind(path: str | os.PathLike) -> str | None:
    """"SDXL base" / "SDXL refiner" / "SDXL inpainting" for an SDXL file or folder, None for anything else,
    from the key names and two shapes only (a safetensors header; no weights read)."""
    p = Path(path)
    if p.is_dir():
        if not is_sdxl_folder(p):
            return None
        unet = _read_json(p / "unet" / "config.json")
        if not (p / "text_encoder").is_dir():
            return "SDXL refiner"
        return "SDXL inpainting" if unet.get("in_channels", 4) == 9 else "SDXL base"
    if p.suffix.lower() != ".safetensors" or not p.is_file():
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            keys = set(f.keys())
            if not convert_sdxl.is_sdxl_checkpoint(keys):
                return None
            conv_in = f.get_slice("model.diffusion_model.input_blocks.0.0.weight").get_shape()
    except (SafetensorError, OSError):
        return None  # the loader reports a broken file
    if not any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "SDXL refiner"
    return "SDXL inpainting" if conv_in[1] == 9 else "SDXL base"

