"""The three networks of Stable Diffusion plus its tokenizer, as one object."""

from __future__ import annotations

import torch
from torch import nn

from ldmkit.config import ModelConfig
from ldmkit.models.clip import CLIPTextModel
from ldmkit.models.tokenizer import CLIPTokenizer
from ldmkit.models.unet import UNetModel
from ldmkit.models.vae import AutoencoderKL
from ldmkit.recommended import Recommended


class StableDiffusion(nn.Module):
    """U-Net, autoencoder and text encoder of one model; attribute names match the LDM file's parts."""

    def __init__(self, cfg: ModelConfig, tokenizer: CLIPTokenizer | None = None):
        super().__init__()
        self.cfg = cfg
        self.unet = UNetModel(cfg.unet)
        self.vae = AutoencoderKL(cfg.vae)
        self.text_encoder = CLIPTextModel(cfg.text)
        self.tokenizer = tokenizer or CLIPTokenizer.default(cfg.pad_with_eos, cfg.text.max_positions)
        # prompts are cut to the encoder's position count, which a tokenizer folder does not record
        self.tokenizer.context_length = cfg.text.max_positions
        # set by the loader: file name and A1111-style short hash, for PNG infotext
        self.source_name = cfg.name
        self.source_path: str | None = None
        self._hash: str | None = None
        # low-memory mode (ldmkit.lowmem): weights stored in fp16, computed module by module in this dtype
        self.compute_dtype: torch.dtype | None = None
        # decode in tiles (ldmkit.vae_tiling) so the decoder's activations stay small at large sizes
        self.vae_tiling = False
        # settings the file recommends (ldmkit.recommended metadata); used where the user gives none
        self.recommended: Recommended | None = None

    @property
    def model_hash(self) -> str:
        """A1111's short hash of the file this model came from ("" when built in memory)."""
        if self._hash is None:
            from ldmkit.checkpoint import model_hash

            self._hash = model_hash(self.source_path) if self.source_path else ""
        return self._hash

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the networks compute in (their inputs' dtype); in low-memory mode not the weights'."""
        return self.compute_dtype or next(self.unet.parameters()).dtype

    def parts(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}
