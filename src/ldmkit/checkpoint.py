"""Reading and writing Stable Diffusion checkpoints: single-file LDM layout and diffusers folders.

Every load checks every key and every shape and fails with a message naming them; nothing is
dropped silently. ``.ckpt`` files are read with ``weights_only=True`` so no pickled code runs,
and weights are assigned into a model built on the meta device, so a file is held in memory once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import threading
import types
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ldmkit import convert, convert_sdxl, file_kind
from ldmkit.atomic import cache_file, replacing
from ldmkit.config import ModelConfig, VAEConfig
from ldmkit.model import StableDiffusion
from ldmkit.models.tokenizer import CLIPTokenizer
from ldmkit.pages import file_backed_ranges, is_file_backed, page_out
from ldmkit.recommended import RECOMMENDED_METADATA_KEY, implied_recommended, read_recommended

StateDict = dict[str, Tensor]
M = typing.TypeVar("M", bound=nn.Module)
CONFIG_METADATA_KEY = "ldmkit.config"
# training-only parts of standalone VAE files (LPIPS and discriminator) and EMA shadows
_VAE_TRAINING_PREFIXES = ("loss.", "model_ema.")


class CheckpointError(ValueError):
    """A checkpoint that can't be read or doesn't fit the model; the message says which and why."""


# ---------------------------------------------------------------- reading files


def read_safetensors(path: str | os.PathLike) -> tuple[StateDict, dict[str, str]]:
    """Tensors and string metadata of a ``.safetensors`` file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, metadata
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"{path}: not a readable .safetensors file ({e}). The file may be truncated or corrupt: download it again."
        ) from None


def read_ckpt(path: str | os.PathLike) -> StateDict:
    """Tensors of a pickled ``.ckpt``/``.pt``/``.bin`` file, refusing anything but plain tensors."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        # old-style (non-zip) pickles can't be memory-mapped
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
            raise _ckpt_error(path, e) from None
    except Exception as e:  # noqa: BLE001
        raise _ckpt_error(path, e) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: the file holds no state dict of tensors; is it a model checkpoint?")
    return obj


def _ckpt_error(path: str | os.PathLike, e: Exception) -> CheckpointError:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "weights_only" in str(e) or "Unsupported global" in str(e):
        return CheckpointError(
            f"{path}: the .ckpt contains pickled Python objects besides tensors, which ldmkit refuses to run "
            "(weights_only=True). Convert it to .safetensors with a tool you trust."
        )
    return CheckpointError(f"{path}: not a readable checkpoint ({msg}). The file may be truncated or corrupt.")


def read_state_dict(path: str | os.PathLike) -> tuple[StateDict, dict[str, str]]:
    """Tensors (and metadata, for safetensors) of a checkpoint file of any supported kind."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file")
    suffix = p.suffix.lower()  # Upper.SAFETENSORS too (hardening 10)
    if suffix == ".safetensors":
        return read_safetensors(p)
    if suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return read_ckpt(p), {}
    raise CheckpointError(f"{p}: unknown checkpoint extension {p.suffix!r}; expected .safetensors or .ckpt")


def model_hash(path: str | os.PathLike) -> str:
    """A1111's short model hash: the first 10 hex digits of the file's SHA-256.

    Hashing reads the whole file (seconds for a 2-7 GB checkpoint, 0.03 s for the built-in model) in
    every new process's first image, so the result is kept in the user's cache folder, keyed by the
    file's path, size and modification time (A1111 keeps its cache.json the same way)."""
    p = Path(path)
    st = p.stat()
    cache = cache_file("sha256", f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}", ".txt")
    try:
        cached = cache.read_text()
        if len(cached) == 10 and all(c in "0123456789abcdef" for c in cached):
            return cached
    except (OSError, UnicodeDecodeError):
        pass  # not hashed yet, or an unreadable cache: hash the file
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    short = h.hexdigest()[:10]
    try:
        with replacing(cache) as tmp:
            Path(tmp).write_text(short)
    except OSError:
        pass  # a read-only home: hash every time
    return short


# ---------------------------------------------------------------- strict loading


def load_strict(module: nn.Module, sd: StateDict, what: str, dtype: torch.dtype = torch.float32) -> None:
    """Load ``sd`` into ``module`` checking every key and shape; fail naming what doesn't fit."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(f"{what}: {'; '.join(parts)}. The checkpoint does not match this architecture.")
    for k, v in expected.items():
        if tuple(v.shape) != tuple(sd[k].shape):
            raise CheckpointError(
                f"{what}: {k} has shape {tuple(sd[k].shape)} in the checkpoint but the model expects "
                f"{tuple(v.shape)}. The checkpoint is a different architecture than the one detected; "
                "pass the right --model-type."
            )
        if v.is_floating_point() and not sd[k].is_floating_point():
            raise CheckpointError(
                f"{what}: {k} holds {str(sd[k].dtype).removeprefix('torch.')} values; model weights must be "
                "floating point (fp32, fp16 or bf16): the file is not a plain model checkpoint"
            )
    check_finite(sd, what, keys=expected)
    mapped = file_backed_ranges() if any(sd[k].is_floating_point() and sd[k].dtype != dtype for k in expected) else []
    module.load_state_dict({k: _as_dtype(sd[k], dtype, mapped) for k in expected}, strict=True, assign=True)


def check_finite(sd: StateDict, what: str, keys: Iterator[str] | dict | None = None) -> None:
    """Refuse NaN or infinite weights (hardening 9); a model with them only ever draws black or noise.

    Cheap: one ``aminmax`` pass per tensor (NaN propagates into both, an inf shows as one), measured
    0.025 s per 100M weights in fp16/bf16/fp32 on one core, ~0.3 s for all of SD1.5 (a float32
    ``sum`` of fp16 weights took 20x longer; ``isfinite().all()`` 40x)."""
    bad = []
    for k in sd if keys is None else keys:
        t = sd[k]
        if t.is_floating_point() and t.numel():
            lo, hi = torch.aminmax(t)
            if not (torch.isfinite(lo) and torch.isfinite(hi)):
                bad.append(k)
    if bad:
        raise CheckpointError(f"{what}: {len(bad)} weight tensor(s) hold NaN or infinite values (e.g. "
                              f"{', '.join(bad[:3])}); the file is damaged or was saved from a diverged training run")


def _as_dtype(t: Tensor, dtype: torch.dtype, mapped: list[tuple[int, int]]) -> Tensor:
    """``t`` in ``dtype``. When that copies a tensor of a memory-mapped file, the file's pages are given
    back at once, so converting (fp16 file -> fp32, or fp32 -> fp16 for low-memory mode) never holds both."""
    if not t.is_floating_point() or t.dtype == dtype:
        return t
    out = t.to(dtype)
    if is_file_backed(t, mapped):
        page_out([t])
    return out


# nn.init functions that modules' reset_parameters call; on the meta device they only cost time
_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "kaiming_uniform_",
                   "kaiming_normal_", "xavier_uniform_", "xavier_normal_")
_init_lock = threading.Lock()
_init_users = 0
_init_originals: dict[str, typing.Any] = {}


def _skip_on_meta(fn: typing.Any) -> typing.Any:
    def init(tensor: Tensor, *args: typing.Any, **kwargs: typing.Any) -> Tensor:
        return tensor if tensor.is_meta else fn(tensor, *args, **kwargs)

    return init


@contextmanager
def _on_meta() -> Iterator[None]:
    """Modules built here get meta tensors, and their random initialisation is skipped (the file's weights
    replace them): ``nn.init``'s functions return a meta tensor untouched, through Python decompositions
    that took about half of building the built-in model (0.05 s of each first image). Any other tensor,
    in any thread, is initialised exactly as before."""
    global _init_users
    with _init_lock:
        if _init_users == 0:
            for name in _INIT_FUNCTIONS:
                _init_originals[name] = getattr(nn.init, name)
                setattr(nn.init, name, _skip_on_meta(_init_originals[name]))
        _init_users += 1
    try:
        with torch.device("meta"):
            yield
    finally:
        with _init_lock:
            _init_users -= 1
            if _init_users == 0:
                for name, fn in _init_originals.items():
                    setattr(nn.init, name, fn)


def build_strict(build: typing.Callable[[], M], sd: StateDict, what: str, dtype: torch.dtype = torch.float32) -> M:
    """``build()`` on the meta device (its random initialisation skipped), then ``sd`` loaded into it strictly in
    ``dtype`` (every key, shape, dtype kind and finite value checked; a memory-mapped file's pages given back as
    they are converted): how every network read from a file is made."""
    with _on_meta():
        module = build()
    load_strict(module, sd, what, dtype)
    return module


def build_model(cfg: ModelConfig, parts: dict[str, StateDict], tokenizer: CLIPTokenizer | None = None,
                dtype: torch.dtype = torch.float32) -> StableDiffusion:
    """Assemble a model from converted part state dicts (ldmkit names), strictly."""
    with _on_meta():
        model = StableDiffusion(cfg, tokenizer=tokenizer)
    for name, module in model.parts().items():
        load_strict(module, parts[name], f"{cfg.name} {name}", dtype)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------- single files


_MODEL_TYPES = ("sd1", "sd2", "sd2-v")


def config_from_metadata(text: str) -> ModelConfig:
    """The model config a file stores in its metadata, every field checked against its declared type."""
    where = f"metadata {CONFIG_METADATA_KEY!r}"
    try:
        d = json.loads(text)
    except (json.JSONDecodeError, TypeError) as e:
        raise CheckpointError(f"{where} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{where} must be a JSON object, got {type(d).__name__}")
    for section in ("unet", "vae", "text"):
        if not isinstance(d.get(section), dict):
            raise CheckpointError(f"{where}: {section} must be an object, got {d.get(section)!r:.40}")
    try:
        cfg = ModelConfig.from_json(text)
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{where} is not a model config ({type(e).__name__}: {e})") from None
    problem = config_type_problem(cfg)
    if problem:
        raise CheckpointError(f"{where}: {problem}")
    return cfg


def config_type_problem(obj: object, prefix: str = "") -> str | None:
    """The first field of a (nested) config dataclass whose value does not have its declared type, described;
    integers must also be non-negative. None when every field fits."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        v, hint = getattr(obj, f.name), hints[f.name]
        if dataclasses.is_dataclass(v):
            problem = config_type_problem(v, f"{prefix}{f.name}.")
            if problem:
                return problem
        elif not _fits(v, hint):
            return f"{prefix}{f.name} is {v!r:.40}, expected {_hint_name(hint)}"
    return None


def _fits(v: object, hint: object) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(v, a) for a in args)
    if hint is type(None):
        return v is None
    if hint is bool:
        return isinstance(v, bool)
    if hint is int:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0
    if hint is float:
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    if hint is str:
        return isinstance(v, str)
    if origin is tuple:
        if not isinstance(v, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(x, args[0]) for x in v)
        return len(args) == len(v) and all(_fits(x, a) for x, a in zip(v, args, strict=True))
    if origin is dict or hint is dict:
        return isinstance(v, dict)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return False  # a dataclass field that holds something else
    return True


def _hint_name(hint: object) -> str:
    name = str(hint).replace("typing.", "")
    return {"<class 'int'>": "a non-negative integer", "<class 'float'>": "a number", "<class 'bool'>": "true or false",
            "<class 'str'>": "a string"}.get(name, name.replace("<class '", "").replace("'>", ""))


def config_from_ldm(sd: StateDict, metadata: dict[str, str], name: str, model_type: str | None = None) -> ModelConfig:
    """Model config of an LDM-layout state dict: stored config, else detection from keys and shapes."""
    if CONFIG_METADATA_KEY in metadata:
        cfg = config_from_metadata(metadata[CONFIG_METADATA_KEY]).replace(name=name)
    else:
        cfg = ModelConfig(name=name, **convert.detect_family(sd))
        prediction = metadata.get("modelspec.prediction_type", "")
        if "v_pred" in sd or prediction.startswith("v"):
            cfg = cfg.replace(prediction="v")
    if model_type is not None:
        if model_type not in _MODEL_TYPES:
            raise CheckpointError(f"unknown model type {model_type!r}; choose one of "
                                  f"{', '.join(_MODEL_TYPES)}, sdxl, sdxl-refiner, sdxl-inpainting, sdxl-turbo")
        family = "sd1" if model_type == "sd1" else "sd2"
        if family != cfg.family:
            raise CheckpointError(f"{name}: --model-type {model_type} given but the weights are a {cfg.family} model")
        cfg = cfg.replace(prediction="v" if model_type == "sd2-v" else "eps")
    return cfg


def probe_v_prediction(unet: nn.Module, cfg: ModelConfig) -> bool:
    """Guess whether a trained U-Net predicts v rather than noise, from one small forward pass.

    Fed pure noise at the last timestep, an eps-model returns (nearly) its input; a v-model
    returns about ``-x0``, nearly uncorrelated with the input. Only meaningful for trained weights.
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.unet.in_channels, 16, 16, generator=g)
    ctx = torch.zeros(1, 77, cfg.unet.context_dim)
    with torch.no_grad():
        out = unet(x.to(unet.time_embed[0].weight), torch.tensor([999.0]), ctx.to(unet.time_embed[0].weight))
    cos = torch.nn.functional.cosine_similarity(out.float().flatten(), x[:, :4].flatten(), dim=0)
    return bool(cos < 0.5)


@contextmanager
def errors_naming(path: Path) -> Iterator[None]:
    """A ValueError raised inside (a key, config or metadata problem) becomes a CheckpointError that names
    ``path``; a CheckpointError already says what is wrong and passes as it is."""
    try:
        yield
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def from_single_file(model: M, path: Path, metadata: dict[str, str]) -> M:
    """``model`` (just built from the file ``path``) with the file's name and the settings its header
    recommends."""
    model.source_name, model.source_path = path.stem, str(path)  # type: ignore[attr-defined]
    with errors_naming(path):
        model.recommended = read_recommended(metadata)  # type: ignore[attr-defined]
    return model


def load_single_file(path: str | os.PathLike, model_type: str | None = None,
                     dtype: torch.dtype = torch.float32) -> StableDiffusion:
    p = Path(path)
    sd, metadata = read_state_dict(p)
    if convert_sdxl.is_sdxl_checkpoint(sd) or (model_type or "").startswith("sdxl"):
        from ldmkit.checkpoint_sdxl import load_sdxl_single_file

        return load_sdxl_single_file(p, sd, metadata, model_type, dtype)  # type: ignore[return-value]
    with errors_naming(p):
        cfg = config_from_ldm(sd, metadata, p.stem, model_type)
        unet, vae, text, _layout = convert.split_ldm_checkpoint(sd)
    del sd
    model = build_model(cfg, {"unet": unet, "vae": vae, "text_encoder": text}, dtype=dtype)
    if (model_type is None and CONFIG_METADATA_KEY not in metadata and cfg.family == "sd2"
            and cfg.prediction == "eps" and probe_v_prediction(model.unet, cfg)):
        model.cfg = cfg.replace(prediction="v")
    return from_single_file(model, p, metadata)


def save_single_file(model: StableDiffusion, path: str | os.PathLike, dtype: torch.dtype | None = None,
                     text_layout: str | None = None, metadata: dict[str, str] | None = None) -> None:
    """Write the LDM single-file layout (``model.diffusion_model.*`` etc.), config in the metadata.

    The model's recommended settings are kept; ``metadata`` entries (e.g. from
    :func:`ldmkit.recommended.recommended_metadata`) are added and win over them.
    """
    parts = {name: m.state_dict() for name, m in model.parts().items()}
    layout = text_layout or ("openclip" if model.cfg.family == "sd2" else "hf")
    sd = convert.join_ldm_checkpoint(parts["unet"], parts["vae"], parts["text_encoder"], layout)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    meta = {CONFIG_METADATA_KEY: model.cfg.to_json()}
    if model.recommended is not None:
        meta[RECOMMENDED_METADATA_KEY] = model.recommended.to_json()
    atomic_save_safetensors(sd, path, {**meta, **(metadata or {})})


def atomic_save_safetensors(sd: StateDict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write to a temporary file beside ``path`` and rename it, so a crash never leaves half a file."""
    with replacing(path) as tmp:
        save_file({k: v.contiguous() for k, v in sd.items()}, tmp, metadata=metadata)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with replacing(path) as tmp:
        Path(tmp).write_text(text)


# ---------------------------------------------------------------- diffusers folders


def _read_part(folder: Path, names: tuple[str, ...]) -> StateDict:
    for n in names:
        if (folder / n).exists():
            return read_state_dict(folder / n)[0]
    raise CheckpointError(f"{folder}: no weights file (looked for {', '.join(names)})")


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; a diffusers model folder needs it") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def _part_config(path: Path, convert_fn: typing.Callable[[dict], typing.Any]) -> typing.Any:
    """A diffusers part's config.json through ``convert_fn``, its type problems named with the file."""
    try:
        cfg = convert_fn(_read_json(path))
    except CheckpointError:
        raise
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a config ldmkit can read ({type(e).__name__}: {e})") from None
    problem = config_type_problem(cfg)
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    return cfg


_UNET_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_TEXT_FILES = ("model.safetensors", "pytorch_model.bin")


def load_diffusers(folder: str | os.PathLike, dtype: torch.dtype = torch.float32) -> StableDiffusion:
    root = Path(folder)
    for sub in ("unet", "vae", "text_encoder"):
        if not (root / sub).is_dir():
            raise CheckpointError(f"{root}: not a diffusers Stable Diffusion folder (no {sub}/ inside)")
    ucfg = _part_config(root / "unet" / "config.json", convert.unet_config_from_diffusers)
    vcfg = _part_config(root / "vae" / "config.json", convert.vae_config_from_diffusers)
    tcfg = _part_config(root / "text_encoder" / "config.json", convert.text_config_from_hf)
    sched_path = root / "scheduler" / "scheduler_config.json"
    sched = _read_json(sched_path) if sched_path.exists() else {}
    family = "sd2" if ucfg.context_dim == 1024 else "sd1"
    tokenizer = CLIPTokenizer.from_dir(root / "tokenizer") if (root / "tokenizer").is_dir() else None
    cfg = ModelConfig(
        name=root.name, family=family, unet=ucfg, vae=vcfg, text=tcfg,
        prediction="v" if sched.get("prediction_type") == "v_prediction" else "eps",
        # diffusers folders for SD2 already drop the text encoder's last layer
        clip_skip=1,
        pad_with_eos=tokenizer.pad_id == tokenizer.eos_id if tokenizer else family != "sd2",
        beta_start=sched.get("beta_start", 0.00085), beta_end=sched.get("beta_end", 0.012),
        num_train_timesteps=sched.get("num_train_timesteps", 1000),
    )
    parts = {
        "unet": convert.unet_diffusers_to_ldm(_read_part(root / "unet", _UNET_FILES), ucfg),
        "vae": convert.vae_diffusers_to_ldm(_read_part(root / "vae", _UNET_FILES), vcfg),
        "text_encoder": convert.normalize_hf_text(_read_part(root / "text_encoder", _TEXT_FILES)),
    }
    model = build_model(cfg, parts, tokenizer=tokenizer, dtype=dtype)
    model.source_name = root.name
    return model


def save_diffusers(model: StableDiffusion, folder: str | os.PathLike) -> None:
    """Write a diffusers-format folder that ``StableDiffusionPipeline.from_pretrained`` loads."""
    root = Path(folder)
    cfg = model.cfg
    unet_sd = convert.unet_ldm_to_diffusers(model.unet.state_dict(), cfg.unet)
    vae_sd = convert.vae_ldm_to_diffusers(model.vae.state_dict(), cfg.vae)
    text_sd = dict(model.text_encoder.state_dict())
    text_cfg = cfg.text
    if text_cfg.token_rows:
        # transformers' CLIPTextModel has one row per token id: write the compact table out in full
        text_sd.pop(convert.TOKEN_MAP_KEY)
        text_sd["text_model.embeddings.token_embedding.weight"] = model.text_encoder.text_model.embeddings.full_table()
        text_cfg = dataclasses.replace(text_cfg, token_rows=0)
    if cfg.clip_skip > 1:
        # diffusers has no clip-skip setting: keep only the layers whose output is used
        keep = cfg.text.layers - (cfg.clip_skip - 1)
        text_sd = {k: v for k, v in text_sd.items() if not _layer_at_or_after(k, keep)}
        text_cfg = dataclasses.replace(text_cfg, layers=keep)
    atomic_save_safetensors(unet_sd, root / "unet" / "diffusion_pytorch_model.safetensors")
    atomic_write_text(root / "unet" / "config.json", json.dumps(convert.diffusers_unet_config(cfg.unet), indent=2))
    atomic_save_safetensors(vae_sd, root / "vae" / "diffusion_pytorch_model.safetensors")
    vae_json = convert.diffusers_vae_config(cfg.vae)
    atomic_write_text(root / "vae" / "config.json", json.dumps(vae_json, indent=2))
    atomic_save_safetensors(text_sd, root / "text_encoder" / "model.safetensors", {"format": "pt"})
    atomic_write_text(root / "text_encoder" / "config.json", json.dumps(convert.hf_text_config(text_cfg), indent=2))
    model.tokenizer.save(root / "tokenizer")
    scheduler = {
        "_class_name": "EulerDiscreteScheduler",
        "num_train_timesteps": cfg.num_train_timesteps, "beta_start": cfg.beta_start, "beta_end": cfg.beta_end,
        "beta_schedule": "scaled_linear", "prediction_type": "v_prediction" if cfg.prediction == "v" else "epsilon",
        "timestep_spacing": "linspace", "steps_offset": 1,
    }
    atomic_write_text(root / "scheduler" / "scheduler_config.json", json.dumps(scheduler, indent=2))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False,
    }
    atomic_write_text(root / "model_index.json", json.dumps(index, indent=2))


def _layer_at_or_after(key: str, n: int) -> bool:
    parts = key.split(".")
    return "layers" in parts and int(parts[parts.index("layers") + 1]) >= n


# ---------------------------------------------------------------- standalone VAE


def load_vae_file(path: str | os.PathLike, cfg: VAEConfig) -> StateDict:
    """A standalone VAE file (LDM or diffusers layout, with or without prefix) or diffusers AutoencoderKL
    folder (e.g. SDXL's fp16-fix VAE) as ldmkit VAE keys."""
    if Path(path).is_dir():
        return _vae_folder(Path(path), cfg)
    sd, _ = read_state_dict(path)
    if not any(k.startswith(("decoder.", "first_stage_model.decoder.")) for k in sd):  # say what it is instead
        if why := file_kind.misplaced(file_kind.kind_of_keys(sd), "a VAE", (file_kind.VAE, file_kind.TAESD)):
            raise CheckpointError(f"{path}: {why}")  # a LoRA, ControlNet, upscaler, ... file
    sd = {k: v for k, v in sd.items() if not k.startswith(_VAE_TRAINING_PREFIXES)}
    if any(k.startswith("first_stage_model.") for k in sd):
        sd = {k.removeprefix("first_stage_model."): v for k, v in sd.items() if k.startswith("first_stage_model.")}
    if any(".down_blocks." in k or k.startswith("decoder.up_blocks") for k in sd):
        sd = convert.vae_diffusers_to_ldm(sd, cfg)
    if not any(k.startswith("decoder.") for k in sd):
        raise CheckpointError(f"{path}: no VAE decoder weights found; is it a VAE file?")
    return sd


def _vae_folder(root: Path, cfg: VAEConfig) -> StateDict:
    folder_json = _read_json(root / "config.json")
    try:
        folder_cfg = convert.vae_config_from_diffusers(folder_json)
    except ValueError as e:
        raise CheckpointError(f"{root}: {e}") from None
    if folder_cfg.scale_factor != cfg.scale_factor:  # the one thing an SD1 and an SDXL VAE folder differ in
        raise CheckpointError(f"{root}: a VAE for latents scaled by {folder_cfg.scale_factor} (config.json "
                              f"scaling_factor) but the model's are scaled by {cfg.scale_factor}: a VAE of another "
                              "model family (SD1/SD2 use 0.18215, SDXL 0.13025)")
    if dataclasses.replace(folder_cfg, scale_factor=cfg.scale_factor) != cfg:
        raise CheckpointError(f"{root}: its config.json describes a different autoencoder than the model's "
                              f"({folder_cfg} vs {cfg})")
    return convert.vae_diffusers_to_ldm(_read_part(root, _UNET_FILES), cfg)


def swap_vae(model: StableDiffusion, path: str | os.PathLike) -> None:
    """Replace the model's autoencoder: a KL VAE file, or a tiny autoencoder (TAESD file or folder, or
    diffusers AutoencoderTiny folder), told apart by their keys / config."""
    from ldmkit.models import taesd

    if taesd.is_taesd(path):
        taesd.use_taesd(model, path)
        return
    load_strict(model.vae, load_vae_file(path, model.cfg.vae), f"VAE {Path(path).name}", model.dtype)
    model.vae.requires_grad_(False)


# ---------------------------------------------------------------- entry point


def load(path: str | os.PathLike, *, vae: str | os.PathLike | None = None, model_type: str | None = None,
         dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> StableDiffusion:
    """Load a model from a single ``.safetensors``/``.ckpt`` file or a diffusers folder."""
    p = Path(path)
    try:
        if p.is_dir():
            if (p / "text_encoder_2").is_dir():  # SDXL (ldmkit.checkpoint_sdxl)
                from ldmkit.checkpoint_sdxl import load_sdxl_diffusers

                model = load_sdxl_diffusers(p, dtype=dtype)
            else:
                model = load_diffusers(p, dtype=dtype)
        elif p.exists():
            model = load_single_file(p, model_type=model_type, dtype=dtype)
        else:
            raise CheckpointError(f"{p}: no such file or folder")
    except CheckpointError as e:  # every message names the file (hardening 7)
        if p.name in str(e):
            raise
        raise CheckpointError(f"{p}: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, RuntimeError, ZeroDivisionError) as e:
        # a file this loader's checks did not foresee: still one line naming it, never a traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{p}: not a model ldmkit can load ({type(e).__name__}: {first[:300]})") from None
    if model.recommended is None:
        model.recommended = implied_recommended(bool(model.cfg.unet.time_cond_proj_dim))
    if vae is not None:
        swap_vae(model, vae)
    from ldmkit import channels_last  # inference default: NHWC weights on first use (the trainers opt out)

    model.channels_last = channels_last.default()
    return model.to(device)

