"""Depth-conditioned Stable Diffusion 2 (``512-depth-ema``): a U-Net with a fifth input channel, the depth map.

The map (larger = nearer, as MiDaS/DPT predict it) is resized to the latent size (bicubic) and normalised to
[-1, 1] by its own minimum and maximum, then concatenated to the noisy latent at every step (diffusers'
``StableDiffusionDepth2ImgPipeline.prepare_depth_map``; Stability's ``LatentDepth2ImageDiffusion``). The user
brings the map (``--depth-map depth.png``), or ldmkit estimates it from the init image with a DPT model that
``transformers`` loads from a local folder (``--depth-model FOLDER``, or the ``depth_estimator/`` of a diffusers
depth2img folder); nothing is ever downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

DEPTH_CHANNELS = 5  # 4 latent channels + the depth map


def is_depth_model(model: object) -> bool:
    return model.cfg.unet.in_channels == DEPTH_CHANNELS  # type: ignore[attr-defined]


def depth_tensor(depth: object) -> Tensor:
    """A depth map as a float tensor (1, H, W): a PIL image (8- or 16-bit greyscale, or colour read as
    luminance), a numpy array or a tensor (H, W) / (1, H, W). Only the relative values matter."""
    if isinstance(depth, Image.Image):
        img = depth if depth.mode in ("I", "I;16", "I;16B", "F", "L") else depth.convert("L")
        depth = np.asarray(img).astype(np.float32)
    t = torch.as_tensor(depth, dtype=torch.float32)
    if t.ndim == 3 and t.shape[0] != 1:
        raise ValueError(f"a depth map must be one channel (H, W); got shape {tuple(t.shape)}")
    bad = int((~torch.isfinite(t)).sum())
    if bad:  # a float TIFF/array with holes: it would reach the U-Net as NaN ("try a lower CFG scale")
        raise ValueError(f"the depth map has {bad} NaN or infinite value(s) of {t.numel()}: fill them (e.g. with "
                         "the farthest depth) and save it again")
    return t if t.ndim == 3 else t[None]


def depth_condition(depth: object, latent_size: tuple[int, int]) -> Tensor:
    """The U-Net's fifth channel (1, 1, h, w): the map resized to the latent size (bicubic) and scaled to
    [-1, 1] by its range, as diffusers' depth2img pipeline prepares it."""
    d = F.interpolate(depth_tensor(depth)[:, None], size=latent_size, mode="bicubic", align_corners=False)
    lo, hi = d.amin(dim=(1, 2, 3), keepdim=True), d.amax(dim=(1, 2, 3), keepdim=True)
    return 2.0 * (d - lo) / (hi - lo).clamp_min(1e-12) - 1.0


def check(model: object, depth: object) -> str | None:
    """Why ``depth`` cannot go with ``model`` (one line), or None."""
    if depth is not None and not is_depth_model(model):
        return (f"a depth map was given but {getattr(model, 'source_name', 'the model')} is not a depth model "
                f"(its U-Net reads {model.cfg.unet.in_channels} channels, a depth model 5): use a depth "  # type: ignore
                "checkpoint such as 512-depth-ema.safetensors, or drop --depth-map")
    if depth is None and is_depth_model(model):
        return (f"{getattr(model, 'source_name', 'the model')} is a depth model: give it a depth map "
                "(--depth-map depth.png, or --depth-model DPT_FOLDER to estimate one from --init-image)")
    return None


# ---------------------------------------------------------------- estimating depth with DPT (transformers)


def _processor_folder(folder: Path) -> Path:
    """Where the DPT image processor's preprocessor_config.json is: the model folder, or a diffusers depth2img
    folder's feature_extractor/ beside depth_estimator/."""
    for cand in (folder, folder.parent / "feature_extractor"):
        if (cand / "preprocessor_config.json").exists():
            return cand
    raise ValueError(f"{folder}: no preprocessor_config.json (the DPT image processor) here or in "
                     "../feature_extractor: save the processor with the model, or give --depth-map")


def estimate_depth(folder: str | os.PathLike, image: Image.Image) -> Tensor:
    """Depth (1, H', W') of ``image`` from a DPT/MiDaS model in a local folder (``transformers``
    DPTForDepthEstimation + DPTImageProcessor; never downloaded)."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise ValueError(f"--depth-model {folder}: not a local DPT model folder (no config.json); give the folder "
                         "with config.json and the weights (e.g. a depth2img model's depth_estimator/), or --depth-map")
    try:
        from transformers import DPTForDepthEstimation, DPTImageProcessor
    except ImportError:
        raise ValueError("depth estimation needs the transformers package (pip install transformers); "
                         "or give the depth map yourself with --depth-map depth.png") from None
    proc = DPTImageProcessor.from_pretrained(str(_processor_folder(folder)), local_files_only=True)
    net = DPTForDepthEstimation.from_pretrained(str(folder), local_files_only=True).eval()
    pixels = proc(images=image.convert("RGB"), return_tensors="pt").pixel_values
    with torch.inference_mode():
        return net(pixels).predicted_depth.float()  # (1, H', W')


def default_estimator(model_path: str | os.PathLike | None) -> Path | None:
    """A diffusers depth2img folder's own depth_estimator/, if it has one."""
    if model_path is None:
        return None
    p = Path(model_path) / "depth_estimator"
    return p if (p / "config.json").exists() else None


# ---------------------------------------------------------------- command line


def add_depth_args(p: object) -> None:
    add = p.add_argument  # type: ignore[attr-defined]
    add("--depth-map", default=None, metavar="IMAGE",
        help="depth-conditioned models (512-depth-ema): the depth map, white = near (8/16-bit greyscale); "
             "resized to the latent size")
    add("--depth-model", default=None, metavar="FOLDER",
        help="without --depth-map: estimate the depth of --init-image with this local DPT model folder "
             "(transformers DPTForDepthEstimation; a diffusers depth2img folder's depth_estimator/ is used by "
             "default); never downloaded")


def depth_from_args(args: object, model: object, width: int, height: int,
                    log: Callable[[str], None] | None = None) -> object:
    """The depth map of a command line (None without one): --depth-map, else an estimate from --init-image with
    --depth-model (or the model folder's depth_estimator/) when the model is a depth model."""
    from ldmkit.pipeline import open_image

    path = getattr(args, "depth_map", None)
    folder = getattr(args, "depth_model", None)
    if path is not None:
        img = open_image(path)
        if img.size != (width, height) and log is not None:
            log(f"depth map {img.size[0]}x{img.size[1]} differs from the output size {width}x{height}: resized "
                "(bicubic, to the latent size)")
        return img
    if not is_depth_model(model):
        if folder is not None:
            raise ValueError("--depth-model is for depth models (512-depth-ema); the model is not one: drop it")
        return None
    folder = folder or default_estimator(getattr(model, "source_path", None) or getattr(args, "model", None))
    init = getattr(args, "init_image", None)
    if folder is None or init is None:
        raise ValueError(f"{getattr(model, 'source_name', 'the model')} is a depth model: give --depth-map "
                         "depth.png (or --depth-model DPT_FOLDER with --init-image to estimate it)")
    if log is not None:
        log(f"depth estimated from {init} with {folder}")
    return estimate_depth(folder, open_image(init))


__all__ = ["add_depth_args", "check", "depth_condition", "depth_from_args", "depth_tensor", "estimate_depth",
           "is_depth_model"]
