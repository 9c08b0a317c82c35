"""Autoencoder training (LDM's first stage): reconstruction + KL + structure loss + optional patch GAN.

Loss, per image: ``rec + perceptual_weight * structure + kl_weight * KL / (3 H W)
+ disc_factor * (disc_weight * g_loss + d_loss)``. LDM sums the reconstruction loss over pixels;
ours is the per-pixel mean, so the KL is divided by the pixel count to keep LDM's 1e-6 ratio.
The discriminator uses the hinge loss with a fixed weight (LDM adapts it from gradient norms).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ldmkit.models.vae import AutoencoderKL
from ldmkit.train.config import TrainConfig, TrainError, base_model_config
from ldmkit.train.data import load_dataset, save_grid, split_holdout, to_pil
from ldmkit.train.losses import PatchDiscriminator, kl_divergence, psnr, structure_loss
from ldmkit.train.runner import CHECKPOINT, DistInfo
from ldmkit.train.sources import load_vae_source


class VAENet(nn.Module):
    """The autoencoder (and discriminator) with the training loss as its forward."""

    def __init__(self, vae: AutoencoderKL, cfg: TrainConfig, disc: PatchDiscriminator | None = None):
        super().__init__()
        self.vae = vae
        self.disc = disc
        self.rec_loss, self.kl_weight, self.perceptual_weight = cfg.rec_loss, cfg.kl_weight, cfg.perceptual_weight
        self.disc_weight = cfg.disc_weight

    def forward(self, images: Tensor, noise: Tensor, disc_factor: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
        mean, logvar = self.vae.encode(images)
        rec = self.vae.decode(mean + torch.exp(0.5 * logvar) * noise.to(mean.dtype))
        diff = rec.float() - images.float()
        rec_loss = diff.abs().mean() if self.rec_loss == "l1" else diff.pow(2).mean()
        kl = kl_divergence(mean, logvar)
        loss = rec_loss + self.kl_weight * kl / images[0].numel()
        logs = {"rec": rec_loss.detach(), "kl": kl.detach()}
        if self.perceptual_weight:
            structure = structure_loss(rec, images)
            loss = loss + self.perceptual_weight * structure
            logs["structure"] = structure.detach()
        if self.disc is not None:
            # generator term through a detached copy of the discriminator: its gradient reaches
            # only the autoencoder; the discriminator learns from d_loss alone
            frozen = {k: v.detach() for k, v in self.disc.named_parameters()}
            g_loss = -functional_call(self.disc, frozen, (rec,)).mean()
            d_real, d_fake = self.disc(images.detach()), self.disc(rec.detach())
            d_loss = 0.5 * (F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean())
            # computed even before disc_start (factor 0) so every rank uses every parameter (DDP)
            loss = loss + disc_factor * (self.disc_weight * g_loss + d_loss)
            logs |= {"g_loss": g_loss.detach(), "d_loss": d_loss.detach()}
        return loss, logs


class VAETask:
    arch_parts = ("vae",)

    def __init__(self, cfg: TrainConfig, run_dir: Path, d: DistInfo):
        self.cfg, self.run_dir = cfg, run_dir
        data = load_dataset(cfg.data, cfg.size)
        self.train, self.held = split_holdout(data, cfg.data, cfg.holdout)
        base = base_model_config(cfg)
        init_sd = None
        if cfg.init_from:
            vae_cfg, init_sd, _ = load_vae_source(cfg.init_from)
            base = base.replace(vae=vae_cfg)
        f = base.vae.downscale
        if cfg.size % f:
            raise TrainError(f"size {cfg.size} is not a multiple of the VAE's downscale factor {f}")
        self.model_cfg = base.replace(name=run_dir.name, family="custom", extra={"image_size": cfg.size})
        disc = None
        if cfg.disc_start >= 0:
            disc = PatchDiscriminator(self.model_cfg.vae.out_channels, n_layers=PatchDiscriminator.layers_for(cfg.size))
        vae = AutoencoderKL(self.model_cfg.vae)
        if init_sd is not None and not (run_dir / CHECKPOINT).exists():  # a resumed run's come from its checkpoint
            vae.load_state_dict(init_sd)
        if cfg.freeze_encoder:
            # the posterior stays what the U-Net was trained on; only the way back to pixels improves
            vae.encoder.requires_grad_(False)
            vae.quant_conv.requires_grad_(False)
        self.net = VAENet(vae, cfg, disc)
        self.train_size = len(self.train)
        self.sample_weights = self.train.weights  # metadata.jsonl's "weight"s, for balanced sampling
        self._latent_shape = (self.model_cfg.vae.z_channels, cfg.size // f, cfg.size // f)

    def make_batch(self, idx: Tensor, gen: torch.Generator, step: int) -> dict[str, Any]:
        x = self.train.as_float(idx)
        if self.cfg.flip:
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        noise = torch.randn((len(idx), *self._latent_shape), generator=gen)
        on = 0 <= self.cfg.disc_start <= step
        return {"images": x, "noise": noise, "disc_factor": 1.0 if on else 0.0}

    def evaluate(self, eval_net: nn.Module, step: int) -> dict[str, float]:
        """PSNR of posterior-mean reconstructions of the held-out images; a grid of them as PNG."""
        vae: AutoencoderKL = eval_net.vae
        held = len(self.held) > 0
        images = self.held if held else self.train.subset(list(range(min(8, len(self.train)))))
        device = next(vae.parameters()).device
        scores, recs = [], []
        for i in range(0, len(images), 16):
            x = images.as_float(list(range(i, min(i + 16, len(images))))).to(device)
            rec = vae.decode(vae.encode(x)[0])
            scores.append(psnr(rec, x).cpu())
            recs.append(rec.cpu())
        n = min(8, len(images))
        originals = [to_pil(t) for t in images.as_float(list(range(n)))]
        save_grid(originals + [to_pil(t) for t in torch.cat(recs)[:n]], n,
                  self.run_dir / "samples" / f"step_{step:07d}.png")
        return {"psnr_holdout" if held else "psnr_train": float(torch.cat(scores).mean())}

    def state(self) -> dict[str, Any]:
        return {}
