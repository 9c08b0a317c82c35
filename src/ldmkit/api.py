"""The Python entry point: ``pipe = ldmkit.load(path); pipe.txt2img("a red apple")``."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import torch
from PIL import Image

from ldmkit import pipeline as P
from ldmkit.checkpoint import CheckpointError
from ldmkit.checkpoint import load as load_model
from ldmkit.model import StableDiffusion
from ldmkit.recommended import apply_recommended, file_recommended

# models that ship inside the package, selectable by name
# emoji-lcm: emoji distilled for 4 steps (`ldmkit train lcm`; it records LCM / 4 steps / CFG 1 as its settings)
BUILTIN_MODELS = {"emoji": "emoji.safetensors", "emoji-lcm": "emoji-lcm.safetensors"}
# autoencoders that ship inside the package, selectable by name with --vae / load(vae=...)
BUILTIN_VAES = {"emoji-taesd": "emoji-taesd.safetensors"}
# ControlNets that ship inside the package, selectable by name with --controlnet (docs/models/emoji-silhouette.md)
BUILTIN_CONTROLNETS = {"emoji-silhouette": "emoji-silhouette.safetensors"}
# the tiny autoencoder that previews each built-in model (emoji-lcm keeps the teacher's KL autoencoder)
BUILTIN_PREVIEW_VAES = {"emoji": "emoji-taesd", "emoji-lcm": "emoji-taesd"}


class NoModelError(CheckpointError):
    pass


def _builtin_asset(table: dict[str, str], name: str) -> Path | None:
    """The packaged file ``table`` names for ``name`` (None for any other string or a missing asset)."""
    fname = table.get(name)
    if fname is None:
        return None
    p = Path(str(resources.files("ldmkit") / "assets" / fname))
    return p if p.exists() else None


def builtin_model_path(name: str) -> Path | None:
    return _builtin_asset(BUILTIN_MODELS, name)


def builtin_controlnet_path(name: str) -> Path | None:
    """The file of a built-in ControlNet name (None for any other string or a missing asset)."""
    return _builtin_asset(BUILTIN_CONTROLNETS, name)


def missing_name(name: str, flag: str) -> str:
    """The one-line error for ``flag NAME`` (--controlnet, --adapter) when NAME is no file or folder: the
    built-in ControlNets, and what NAME is if it names another kind of built-in (emoji is a model)."""
    tables = {"--model": ("model", BUILTIN_MODELS), "--controlnet": ("ControlNet", BUILTIN_CONTROLNETS),
              "--vae": ("autoencoder", BUILTIN_VAES)}
    for other, (what, table) in tables.items():
        if name in table and other != flag:
            return f"{name}: no such file or folder; {name} is the built-in {what}: give it as {other} {name}"
    kinds = {"--controlnet": "ControlNets", "--adapter": "T2I-Adapters"}
    builtin = ", ".join(BUILTIN_CONTROLNETS) if flag == "--controlnet" else "none"
    return f"{name}: no such file or folder (built-in {kinds.get(flag, flag)}: {builtin}); check the path"


def builtin_vae_path(name: str) -> Path | None:
    """The file of a built-in autoencoder name (None for any other string or a missing asset)."""
    return _builtin_asset(BUILTIN_VAES, name)


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """A path, a built-in model name, or None for the default model."""
    if model is None or str(model) in BUILTIN_MODELS:
        name = "emoji" if model is None else str(model)
        p = builtin_model_path(name)
        if p is None:
            raise NoModelError(
                f"no model installed: the built-in '{name}' model is not in this installation. Pass a Stable "
                "Diffusion checkpoint with --model PATH (a .safetensors/.ckpt file or a diffusers folder), "
                "e.g. v1-5-pruned-emaonly.safetensors downloaded from Hugging Face."
            )
        return p
    return Path(model)


class Pipeline:
    """A loaded model with txt2img, img2img and inpaint methods returning PIL images."""

    def __init__(self, model: StableDiffusion):
        self.model = model

    def _params(self, prompt: str, kw: dict) -> P.GenerationParams:
        unknown = set(kw) - {f for f in P.GenerationParams.__dataclass_fields__} - {"callback"}
        if unknown:
            raise TypeError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
        # sampler, scheduler, steps, cfg_scale not given: the model's recommended ones, else the defaults
        kw = apply_recommended({k: v for k, v in kw.items() if k != "callback"}, self.model.recommended)
        # SDXL draws poorly below its 1024², and a model that records its training size (the 64-px built-in
        # emoji models) is drawn at that size, as the CLI does; other SD1/SD2 keep GenerationParams' 512
        if self.model.cfg.is_sdxl or "image_size" in self.model.cfg.extra:
            for side in ("width", "height"):
                kw.setdefault(side, self.model.cfg.native_size)
        return P.GenerationParams(prompt=prompt, **{k: v for k, v in kw.items() if v is not None})

    def txt2img(self, prompt: str, hires=None, **kw) -> list[Image.Image]:
        """``hires``: an ``ldmkit.hires.HiresParams`` for A1111's hires fix (upscale, then a second pass)."""
        if hires is not None:
            from ldmkit.hires import txt2img_hires

            return txt2img_hires(self.model, self._params(prompt, kw), hires, callback=kw.get("callback"))
        return P.txt2img(self.model, self._params(prompt, kw), callback=kw.get("callback"))

    def control_unit(self, controlnet, image: Image.Image, width: int, height: int, weight: float = 1.0,
                     start: float = 0.0, end: float = 1.0, preprocessor: str = "none", guess_mode: bool = False,
                     **a1111):
        """A ControlNet (file, folder or loaded) with its control image, for ``txt2img(..., controlnets=[...])``;
        the image is preprocessed and resized to ``width`` x ``height``, the size to generate at. ``a1111``: the
        extension's unit settings (control_mode, resize_mode, pixel_perfect, processor_res, threshold_a/b)."""
        from ldmkit.controlnet import make_unit

        return make_unit(self.model, controlnet, _control_image(image), width, height, weight, start, end,
                         preprocessor, guess_mode=guess_mode, **a1111)

    def adapter_unit(self, adapter, image: Image.Image, width: int, height: int, weight: float = 1.0,
                     start: float = 0.0, end: float = 1.0, preprocessor: str = "none"):
        """A T2I-Adapter (file, folder or loaded) with its map, for ``txt2img(..., controlnets=[...])`` beside or
        instead of ControlNets; ``weight``: diffusers' adapter_conditioning_scale, ``end``: its
        adapter_conditioning_factor."""
        from ldmkit.t2i_adapter import make_unit

        return make_unit(self.model, adapter, _control_image(image), width, height, weight, start, end, preprocessor)

    def img2img(self, prompt: str, init_image: Image.Image, **kw) -> list[Image.Image]:
        return P.img2img(self.model, self._params(prompt, kw), init_image, callback=kw.get("callback"))

    def inpaint(self, prompt: str, init_image: Image.Image, mask: Image.Image, **kw) -> list[Image.Image]:
        return P.inpaint(self.model, self._params(prompt, kw), init_image, mask, callback=kw.get("callback"))


def _control_image(image: object) -> object:
    """A control unit's image as a PIL image: a PIL image as it is, a file path opened (``P.open_image``: a
    one-line error for a missing or foreign file), a uint8 numpy array (H, W[, C]) wrapped; a list or tuple (the
    maps of a ControlNet Union unit) each so. Anything else is a TypeError saying what is taken, instead of an
    AttributeError from deep inside the preprocessor."""
    import numpy as np

    if isinstance(image, (list, tuple)):
        return [_control_image(one) for one in image]
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, os.PathLike)):
        return P.open_image(image)
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim in (2, 3):
        return Image.fromarray(image)
    raise TypeError(f"the control image is a {type(image).__name__}: give a PIL image, an image file's path or a "
                    "uint8 numpy array (H, W) or (H, W, 3)")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load(model: str | os.PathLike | None = None, *, vae: str | os.PathLike | None = None,
         model_type: str | None = None, device: str | None = None, dtype: torch.dtype | None = None,
         loras: list[tuple[str, float]] | None = None, low_memory: bool = False,
         vae_tiling: bool = False, lora_dir: str | os.PathLike | None = None,
         embeddings_dir: str | os.PathLike | None = None, channels_last: bool | None = None) -> Pipeline:
    """Load a checkpoint file, a diffusers folder, or a built-in model by name (default: ``emoji``).

    ``loras``: (LoRA file or PEFT folder, multiplier) pairs merged into the weights; any layout
    :func:`ldmkit.lora_formats.detect_lora_format` knows (kohya/A1111, diffusers/PEFT, old diffusers) and
    the LyCORIS kinds of :mod:`ldmkit.lycoris`.
    Computes in float32 on CPU (bf16/fp16 are far slower there) and float16 on CUDA by default.
    ``low_memory`` (CPU): weights kept in float16, memory-mapped from fp16 safetensors files, and
    computed in float32 one module at a time (ldmkit.lowmem): about half the memory for a few
    percent more time; the same image as float32 weights rounded to float16.
    ``vae_tiling``: decode the image in tiles (ldmkit.vae_tiling): the same image, less memory at
    large sizes.
    ``lora_dir``: where ``<lora:NAME:W>`` in a prompt looks NAME up (applied for that generation only);
    ``embeddings_dir``: textual-inversion embeddings whose file names are words of the prompt.
    ``channels_last`` (CPU, not low-memory): run the U-Net and VAE with NHWC weights, faster and the same image
    to ~1e-5 (ldmkit.channels_last); default on unless the environment sets ``LDMKIT_CHANNELS_LAST=0``.
    """
    device = device or ("cpu" if low_memory else default_device())
    if low_memory and (str(device) != "cpu" or dtype not in (None, torch.float32)):
        raise ValueError("low-memory mode stores float16 weights and computes in float32 on the CPU; "
                         "drop --device/dtype (on a GPU the default float16 already halves the memory)")
    if dtype is None:
        dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    path = resolve_model_path(model)
    # low memory: an fp16 file's tensors are kept as they are (views of the mapped file), others converted once
    storage = torch.float16 if low_memory else torch.float32
    sd_model = load_model(path, vae=vae, model_type=model_type, dtype=storage, device="cpu")
    if loras:
        from ldmkit.lora import apply_lora

        for lora_path, multiplier in loras:
            apply_lora(sd_model, lora_path, multiplier)  # merged in float32, stored in the weights' dtype
            # a LoRA that changes how the model samples (an LCM-LoRA) recommends its own settings
            sd_model.recommended = file_recommended(lora_path) or sd_model.recommended
    if low_memory:
        from ldmkit import lowmem

        sd_model = lowmem.enable(sd_model)
    else:
        sd_model = sd_model.to(device=device, dtype=dtype)
        if sd_model.cfg.is_sdxl:
            from ldmkit.sdxl import upcast_vae

            upcast_vae(sd_model, vae)
    sd_model.vae_tiling = vae_tiling
    if channels_last is not None:  # (checkpoint.load set the default; applied on first use)
        sd_model.channels_last = channels_last
    attach_folders(sd_model, lora_dir, embeddings_dir)
    return Pipeline(sd_model)


def attach_folders(model: StableDiffusion, lora_dir: str | os.PathLike | None = None,
                   embeddings_dir: str | os.PathLike | None = None) -> None:
    """Give a model its LoRA folder (``<lora:NAME:W>``) and textual-inversion embeddings folder."""
    from ldmkit.embeddings import EmbeddingTable
    from ldmkit.networks import NetworkFolder

    try:
        if lora_dir is not None:
            model.lora_folder = NetworkFolder(lora_dir)
        if embeddings_dir is not None:
            model.embedding_table = EmbeddingTable(embeddings_dir)
    except NotADirectoryError as e:
        raise CheckpointError(str(e)) from None
