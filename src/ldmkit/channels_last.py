"""channels_last (NHWC) weights for inference on the CPU: the generation core's default.

oneDNN, which runs PyTorch's CPU convolutions, works natively in NHWC; with the weights in
``torch.channels_last`` every convolution's output stays in that layout, and the reorders between
NCHW and oneDNN's layout around each convolution disappear (docs/benchmarks.md, "channels_last as the
default": 6-8 % per SD1.5 U-Net step, the same output to 5e-6).

Who gets it: a model loaded by :func:`ldmkit.checkpoint.load` (so also :func:`ldmkit.api.load`: the CLI, the
server, the Python API) carries ``model.channels_last`` (on unless ``LDMKIT_CHANNELS_LAST=0``,
``--no-channels-last`` or ``ldmkit.load(..., channels_last=False)``); the core converts its U-Net (and its
ControlNets) before sampling and its autoencoder before decoding/encoding, once, in place. A model swapped
in later (the server's VAE switch) is converted on its first use. The trainers' models
(``ldmkit.train.sources``) are loaded with the flag off, and models built directly (``StableDiffusion(cfg)``)
have none: they stay in the default layout, as do low-memory models (their fp16 weights are memory-mapped
from the file; converting would copy them into RAM), GPU models and any network with trainable parameters.

Only the layout changes, never a value: saving (``checkpoint.atomic_save_safetensors`` writes contiguous
copies), LoRA merging and the server's restore (``copy_`` into the weight) give the same bytes either way.
"""

from __future__ import annotations

import os
import threading

import torch
from torch import nn

ENV = "LDMKIT_CHANNELS_LAST"
_FLAG = "_ldmkit_channels_last"
_lock = threading.Lock()


def _env() -> str:
    return os.environ.get(ENV, "").strip().lower()


def default() -> bool:
    """The default for newly loaded models: on, unless ``LDMKIT_CHANNELS_LAST`` is 0/off/false/no."""
    return _env() not in ("0", "off", "false", "no")


def wanted(model: object) -> bool:
    """Whether ``model``'s networks should run in channels_last (see the module docstring).

    ``LDMKIT_CHANNELS_LAST=all`` extends it to models without the flag (built or loaded without
    ``ldmkit.load``, as the parity tests do): a way to run the test suite in channels_last."""
    flag = getattr(model, "channels_last", None)
    if flag is None:
        flag = _env() == "all"
    if not flag or getattr(model, "compute_dtype", None) is not None:
        return False  # not asked for (trainers' models), or low-memory mode
    device = getattr(model, "device", None)
    return device is None or torch.device(device).type == "cpu"


def convert(module: nn.Module | None) -> nn.Module | None:
    """Put ``module``'s 4-D parameters into channels_last in place, once (the Parameter objects stay:
    LoRA backups and optimizer references still point at them). Thread-safe; a no-op the second time."""
    if module is None or module.__dict__.get(_FLAG) or any(p.requires_grad for p in module.parameters()):
        return module  # done already, or a network being trained (its optimizer state keeps its layout)
    with _lock, torch.inference_mode(False), torch.no_grad():  # normal tensors: LoRA merges write into them later
        if not module.__dict__.get(_FLAG):
            for p in module.parameters():
                if p.dim() == 4 and not p.is_contiguous(memory_format=torch.channels_last):
                    p.data = p.data.contiguous(memory_format=torch.channels_last)
            module.__dict__[_FLAG] = True
    return module


def prepare(model: object, part: str) -> None:
    """Convert ``model``'s ``part`` ("unet" or "vae") if the model wants channels_last."""
    if wanted(model):
        convert(getattr(model, part, None))


def prepare_controlnets(model: object, units: tuple) -> None:
    """The ControlNets / T2I-Adapters of a generation, when their model runs in channels_last."""
    if units and wanted(model):
        for unit in units:
            net = getattr(unit, "model", None)
            if isinstance(net, nn.Module):
                convert(net)
