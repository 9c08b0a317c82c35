"""``ldmkit train lora`` on an SDXL base model: the denoising loss with SDXL's conditioning.

What differs from SD1/SD2 (:class:`ldmkit.train.unet.LatentDiffusionNet`): each caption is tokenized by both
tokenizers (CLIP-L pads with the end token, bigG with 0) and the two rows travel as one, concatenated; the
context is both encoders' penultimate hidden states side by side (2048 channels), and the U-Net also reads the
vector ``y``: bigG's pooled, projected output and the size/crop ids (original size = target size = the training
size, crop (0, 0): the images are resized and centre-cropped to it), as kohya's sdxl_train_network builds it.
The LoRA file names targets as kohya's SDXL LoRAs do: ``lora_unet_input_blocks_4_1_...`` (sgm block names),
``lora_te1_`` (CLIP-L) and ``lora_te2_`` (bigG); the PEFT layout ``unet.`` / ``text_encoder.`` / ``text_encoder_2.``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmkit.models.unet import sdxl_vector
from ldmkit.train.config import TrainError
from ldmkit.train.unet import _Shared


def check_model(model, source: str) -> None:
    """Only the SDXL base (and its fine-tunes) take a LoRA from this trainer."""
    if model.cfg.family == "sdxl-refiner":
        raise TrainError(f"--model {source} is an SDXL refiner; train LoRAs on the SDXL base model (the refiner "
                         "only finishes images, and LoRAs for it are not loaded by A1111 or diffusers)")


def tokenize(task, tokenizers: list) -> None:
    """``task.ids`` / ``task.empty_ids`` as the U-Net trainer makes them, with each tokenizer's row concatenated:
    (templates, captions, 77 + 77)."""
    ids, empty = [], []
    for tok in tokenizers:
        task.tokenize(tok)
        ids.append(task.ids)
        empty.append(task.empty_ids)
    task.ids, task.empty_ids = torch.cat(ids, dim=-1), torch.cat(empty, dim=-1)


class SDXLDiffusionNet(nn.Module):
    """SDXL's U-Net (+ trainable text encoders) with the denoising loss as its forward."""

    def __init__(self, model, train_text: bool, alphas_cumprod: Tensor, objective: str, size: int):
        from ldmkit.sdxl import micro_ids

        super().__init__()
        self.unet = model.unet
        encoders = nn.ModuleList(model.encoders)
        if train_text:
            self.text_encoders = encoders
        else:
            self.frozen_text = _Shared(encoders.requires_grad_(False).eval())
        self.lengths = [enc.cfg.max_positions for enc in model.encoders]
        self.clip_skip, self.objective = model.cfg.clip_skip, objective
        self.register_buffer("micro", micro_ids(model.cfg, size, size), persistent=False)
        self.register_buffer("sqrt_ab", alphas_cumprod.sqrt().float(), persistent=False)
        self.register_buffer("sqrt_1mab", (1 - alphas_cumprod).sqrt().float(), persistent=False)

    def encode_text(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """(context (B, 77, 768 + 1280), y (B, 2816)): penultimate states of both encoders, pooled + size ids."""
        trained = hasattr(self, "text_encoders")
        encoders = self.text_encoders if trained else self.frozen_text.module
        zs, pooled = [], None
        with torch.set_grad_enabled(trained and torch.is_grad_enabled()):
            for enc, part in zip(encoders, ids.split(self.lengths, dim=1), strict=True):
                hidden, pool = enc.hidden_and_pooled(part, skip=self.clip_skip)
                zs.append(hidden)
                if pool is not None:
                    pooled = pool
        if pooled is None:
            raise TrainError("the SDXL model's last text encoder has no projection, so no pooled output")
        return torch.cat(zs, dim=-1), sdxl_vector(pooled, self.micro.expand(len(ids), -1))

    def forward(self, latents: Tensor, ids: Tensor, t: Tensor, noise: Tensor) -> tuple[Tensor, dict]:
        a, s = self.sqrt_ab[t].view(-1, 1, 1, 1), self.sqrt_1mab[t].view(-1, 1, 1, 1)
        x_t = a * latents + s * noise
        context, y = self.encode_text(ids)
        pred = self.unet(x_t, t, context, y=y)
        target = noise if self.objective == "eps" else a * noise - s * latents
        return F.mse_loss(pred.float(), target.float()), {}
