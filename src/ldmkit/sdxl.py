"""Stable Diffusion XL (Podell et al. 2023) as one object: U-Net, autoencoder, two text encoders, two tokenizers.

What differs from SD1/SD2 (see docs/architecture.md): the prompt goes through CLIP ViT-L *and* OpenCLIP
ViT-bigG/14, both read at the penultimate layer without the final norm and concatenated to 2048 channels;
bigG's pooled, projected output and the image size/crop ids form a vector ``y`` that the U-Net adds to its
time embedding (``models.unet.sdxl_vector``). The refiner has only the bigG encoder.

Encoders are numbered as in the single file (``conditioner.embedders.{i}``): the base's ``text_encoder`` is
CLIP-L and ``text_encoder_2`` bigG; the refiner's ``text_encoder`` is bigG.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ldmkit.config import ModelConfig
from ldmkit.model import StableDiffusion
from ldmkit.models.clip import CLIPTextModel
from ldmkit.models.tokenizer import CLIPTokenizer
from ldmkit.prompt import embedding_matcher, pad_to, reweight, token_embeddings, tokenize_chunks


class StableDiffusionXL(StableDiffusion):
    """SDXL base, refiner or inpainting model; attribute names match the parts of a diffusers folder.

    A StableDiffusion (device, dtype, low-memory and tiling switches, source file and hash) with a second
    encoder and tokenizer; ``tokenizer`` is the first of ``tokenizers``.
    """

    def __init__(self, cfg: ModelConfig, tokenizers: list[CLIPTokenizer] | None = None):
        if not cfg.is_sdxl:
            raise ValueError(f"{cfg.name}: family {cfg.family!r} is not SDXL; use ldmkit.model.StableDiffusion")
        # the first tokenizer pads as its encoder was trained (CLIP-L: end token); bigG's pads with id 0
        tokenizers = tokenizers or [CLIPTokenizer.default(cfg.pad_with_eos, cfg.text.max_positions)] + (
            [CLIPTokenizer.default(False, cfg.text2.max_positions)] if cfg.text2 is not None else [])
        super().__init__(cfg, tokenizer=tokenizers[0])
        if cfg.text2 is not None:
            self.text_encoder_2 = CLIPTextModel(cfg.text2)
        self.tokenizers = tokenizers
        for tok, enc in zip(tokenizers, self.encoders, strict=False):
            tok.context_length = enc.cfg.max_positions
        if len(self.tokenizers) != len(self.encoders):
            raise ValueError(f"{cfg.name}: {len(self.encoders)} text encoders but {len(self.tokenizers)} tokenizers")
        if not self.encoders[-1].cfg.projection_dim:
            raise ValueError(f"{cfg.name}: the last text encoder has no text_projection, so no pooled output")

    @property
    def encoders(self) -> list[CLIPTextModel]:
        return [self.text_encoder] + ([self.text_encoder_2] if self.cfg.text2 is not None else [])

    def parts(self) -> dict[str, nn.Module]:
        names = ["text_encoder", "text_encoder_2"][: len(self.encoders)]
        return {"unet": self.unet, "vae": self.vae, **dict(zip(names, self.encoders, strict=True))}

    def encode_chunks(self, prompt: str) -> tuple[Tensor, Tensor]:
        """One prompt -> (context (1, 77 k, sum of widths), pooled (1, projection_dim)).

        A1111's syntax (emphasis, BREAK, chunks of 75 tokens) for every encoder alike; each encoder's
        hidden states are weighted and mean-rescaled on their own, as A1111 wraps each embedder; the pooled
        vector is the first chunk's, unweighted (A1111's ``zs[0].pooled``).
        """
        zs, pooled = [], None
        for enc, tok in zip(self.encoders, self.tokenizers, strict=True):
            # textual inversion (ldmkit.embeddings): an SDXL file's clip_l / clip_g vectors, by encoder width
            chunks = tokenize_chunks(tok, prompt, embedding_matcher(self, tok, enc.cfg.width))
            device = next(enc.parameters()).device
            ids = torch.tensor([c.tokens for c in chunks], device=device)  # (k, 77)
            w = torch.tensor([c.weights for c in chunks], device=device, dtype=torch.float32)
            with torch.inference_mode():
                hidden, pool = enc.hidden_and_pooled(ids, skip=self.cfg.clip_skip,
                                                     embeddings=token_embeddings(enc, ids, chunks))
            zs.append(reweight(hidden.float(), w))
            if pool is not None:
                pooled = pool[:1].float()
        if len({z.shape[0] for z in zs}) != 1:
            raise ValueError("the tokenizers split the prompt into different numbers of chunks")
        z = torch.cat(zs, dim=-1)  # (k, 77, 768 + 1280)
        assert pooled is not None
        return z.reshape(1, -1, z.shape[-1]), pooled

    def encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Prompts -> (context (B, 77 k, 2048), pooled (B, 1280)); shorter prompts padded with empty chunks
        to the longest, as A1111 does."""
        cache = {p: self.encode_chunks(p) for p in dict.fromkeys(prompts)}
        longest = max(z.shape[1] for z, _ in cache.values())
        if any(z.shape[1] != longest for z, _ in cache.values()):
            empty = self.encode_chunks("")[0]
            cache = {p: (pad_to(z, longest, empty), pool) for p, (z, pool) in cache.items()}
        return torch.cat([cache[p][0] for p in prompts]), torch.cat([cache[p][1] for p in prompts])
