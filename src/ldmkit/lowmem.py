"""Low-memory mode: weights stored in float16, computed in float32 one module at a time (CPU).

Half the weight memory at nearly full speed: every Linear, Conv2d, GroupNorm, LayerNorm and
Embedding keeps its weights in fp16 and upcasts them to fp32 just before it runs; the fp32
copy is freed when the module returns, so at most one module's weights exist in fp32 at a time.
Activations stay fp32 (bf16/fp16 arithmetic is far slower on CPUs and fp16 loses accuracy), so
the output equals an fp32 run of the same weights rounded to fp16.

Where the checkpoint is already fp16 safetensors, the weights are the file's own pages
(memory-mapped, never copied); other checkpoints are converted once at load. Each network's
pages are handed back to the kernel (``pages.page_out``) when the pipeline is done with it:
the text encoder after encoding, the U-Net after sampling, the decoder after decoding; they are
read back (usually from the page cache) on next use. A text encoder converted from fp32 (or
changed by a LoRA) is moved into a temporary file's mapping first, so it can be paged out too.

The class swap (``module.__class__ = UpcastLinear``) changes only this model's instances and
keeps checkpoint keys, ``isinstance`` checks and LoRA targeting unchanged. It measured as cheap
as forward pre-/post-hooks that swap the parameters, with less machinery: see docs/benchmarks.md.
"""

from __future__ import annotations

import mmap
import tempfile
import threading

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmkit.model import StableDiffusion
from ldmkit.pages import file_backed_ranges, is_file_backed, page_out

STORAGE_DTYPE = torch.float16
COMPUTE_DTYPE = torch.float32


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


_scratch = threading.local()


def _upcast_weight(w: Tensor, dtype: torch.dtype) -> Tensor:
    """A Linear/Conv2d weight in ``dtype``, written into this thread's reusable buffer.

    SD's large weights (up to 59 MB in fp32) are beyond glibc's mmap threshold, so a fresh ``w.to()``
    maps, zero-fills and unmaps new pages on every call: measured, that was most of the cost of
    upcasting. The buffer is reused by the next module, which is safe because a module is done with
    its weight when it returns; with autograd recording (training), a fresh copy is made instead.
    """
    if w.dtype == dtype or torch.is_grad_enabled():
        return w.to(dtype)
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.dtype != dtype or buf.numel() < w.numel():
        with torch.inference_mode(False):  # a normal tensor: usable in and out of inference mode
            buf = torch.empty(w.numel(), dtype=dtype)
        _scratch.buf = buf
    return buf[: w.numel()].view(w.shape).copy_(w)


class UpcastLinear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, _upcast_weight(self.weight, x.dtype), _cast(self.bias, x.dtype))


class UpcastConv2d(nn.Conv2d):
    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, _upcast_weight(self.weight, x.dtype), _cast(self.bias, x.dtype))


class UpcastGroupNorm(nn.GroupNorm):
    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, self.num_groups, _cast(self.weight, x.dtype), _cast(self.bias, x.dtype), self.eps)


class UpcastLayerNorm(nn.LayerNorm):
    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, _cast(self.weight, x.dtype), _cast(self.bias, x.dtype),
                            self.eps)


class UpcastEmbedding(nn.Embedding):
    def forward(self, ids: Tensor) -> Tensor:
        # a lookup copies rows: upcasting the few rows read is exact and avoids copying the whole table
        return F.embedding(ids, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse).to(COMPUTE_DTYPE)


# exact types only: wrappers such as a training LoRAModule keep their own forward
_UPCAST: dict[type, type] = {nn.Linear: UpcastLinear, nn.Conv2d: UpcastConv2d, nn.GroupNorm: UpcastGroupNorm,
                             nn.LayerNorm: UpcastLayerNorm, nn.Embedding: UpcastEmbedding}


def enable(model: StableDiffusion) -> StableDiffusion:
    """Switch a CPU model to low-memory mode in place: fp16 weights, fp32 compute, networks paged out when idle."""
    if model.device.type != "cpu":
        raise ValueError("low-memory mode is for CPU; on a GPU the default already stores and computes in fp16")
    for part in model.parts().values():
        for mod in part.modules():
            swapped = type(mod) in _UPCAST
            if swapped:
                mod.__class__ = _UPCAST[type(mod)]
            for name, p in mod.named_parameters(recurse=False):
                # modules without an upcasting forward keep their weights in the compute dtype
                want = STORAGE_DTYPE if swapped else COMPUTE_DTYPE
                if p.is_floating_point() and p.dtype != want:
                    setattr(mod, name, nn.Parameter(p.detach().to(want), requires_grad=False))
    model.compute_dtype = COMPUTE_DTYPE
    for name, part in model.parts().items():  # SDXL: text_encoder_2 (bigG) too
        if name.startswith("text_encoder"):
            _make_pageable(part)
    for part in model.parts().values():
        page_out(_tensors(part))
    return model


def is_low_memory(model: StableDiffusion) -> bool:
    return model.compute_dtype is not None


def release(model: StableDiffusion, part: str) -> None:
    """The pipeline is done with ``part`` for now: give its weights' pages back (low-memory mode only)."""
    if is_low_memory(model):
        page_out(_tensors(model.parts()[part]))


def _tensors(module: nn.Module) -> list[Tensor]:
    return [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]


def _make_pageable(module: nn.Module) -> None:
    """Move the weights that live in anonymous memory (converted, LoRA-merged) into a temporary file's mapping.

    Anonymous pages can't be dropped without swap; clean pages of a file mapping can, and are read
    back from the file when the module runs again. The file is unlinked at once (it vanishes with the
    process) and mapped privately, so nothing is ever written back to it.
    """
    ranges = file_backed_ranges()
    if not ranges:  # not Linux: nothing would page them out anyway
        return
    todo = [(mod, name, p) for mod in module.modules() for name, p in mod.named_parameters(recurse=False)
            if p.is_floating_point() and p.is_contiguous() and not is_file_backed(p, ranges)]
    if not todo:
        return
    align = 64
    offsets, size = [], 0
    for _, _, p in todo:
        offsets.append(size)
        size += -(-p.numel() * p.element_size() // align) * align
    with tempfile.TemporaryFile(prefix="ldmkit-lowmem-") as f:
        for (_, _, p), off in zip(todo, offsets, strict=True):
            f.seek(off)
            f.write(p.detach().reshape(-1).view(torch.uint8).numpy().tobytes())
        f.truncate(size)
        f.flush()
        # a private mapping: its pages stay clean (droppable) and no write could ever reach the file
        private = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    for (mod, name, p), off in zip(todo, offsets, strict=True):
        t = torch.frombuffer(private, dtype=p.dtype, count=p.numel(), offset=off).view(p.shape)
        setattr(mod, name, nn.Parameter(t, requires_grad=False))
