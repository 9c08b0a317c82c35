"""``ldmkit train taesd``: distil a tiny autoencoder (TAESD) from a model's KL autoencoder.

As madebyollin trained TAESD: the encoder learns to output the KL encoder's posterior mean
(scaled, as the U-Net sees it) with an MSE loss; the decoder learns to turn latents into what
the KL decoder makes of them (MSE in pixel space, plus L1 with ``rec_loss = l1``). The decoder's inputs are posterior
*samples*, the kind of latent a sampler ends on. The two halves never see each other's output,
so either can be trained alone (``--taesd-parts decoder``).

The teacher is frozen and not part of the checkpoint. Its outputs for every training image and
its mirror image (mean, one posterior sample, that sample's decode) are computed once at start
when they fit in ``CACHE_BYTES``: on a CPU the teacher would otherwise cost a third of each step.
Larger datasets run the teacher inside ``make_batch``, with a fresh posterior sample each time.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldmkit import latent_norm
from ldmkit.models.taesd import TAESDConfig, TinyAutoencoder
from ldmkit.models.vae import AutoencoderKL
from ldmkit.train.config import TrainConfig, TrainError, base_model_config
from ldmkit.train.data import load_dataset, save_grid, split_holdout, to_pil
from ldmkit.train.losses import psnr
from ldmkit.train.runner import CHECKPOINT, DistInfo, read_checkpoint
from ldmkit.train.sources import load_vae_source

PARTS = ("encoder", "decoder")
CACHE_BYTES = 2 << 30  # teacher outputs (decodes in float16) kept in memory up to this size


def parse_parts(text: str) -> tuple[bool, bool]:
    """'encoder,decoder' | 'decoder' | 'encoder' -> (train encoder?, train decoder?)."""
    parts = {p.strip() for p in text.split(",") if p.strip()}
    if not parts or parts - set(PARTS):
        raise TrainError(f"--taesd-parts {text!r}: name encoder,decoder or decoder (or encoder)")
    return "encoder" in parts, "decoder" in parts


def taesd_config(cfg: TrainConfig, latent_channels: int, downscale: int) -> TAESDConfig:
    levels = downscale.bit_length()  # f = 2 ** (levels - 1)
    if cfg.taesd_width < 1:
        raise TrainError(f"--width must be at least 1, got {cfg.taesd_width}")
    enc, dec = parse_parts(cfg.taesd_parts)
    return dataclasses.replace(TAESDConfig.of_width(cfg.taesd_width, latent_channels, levels),
                               has_encoder=enc, has_decoder=dec)


class TAESDNet(nn.Module):
    """The tiny autoencoder with the distillation loss as its forward."""

    def __init__(self, ae: TinyAutoencoder, l1: bool = False):
        super().__init__()
        self.ae, self.l1 = ae, l1

    def forward(self, images: Tensor, mean: Tensor, latents: Tensor, decoded: Tensor) -> tuple[Tensor, dict]:
        loss = torch.zeros((), device=images.device)
        logs: dict[str, Tensor] = {}
        if self.ae.cfg.has_encoder:
            latent_mse = F.mse_loss(self.ae.encode(images), mean)
            loss = loss + latent_mse
            logs["latent_mse"] = latent_mse.detach()
        if self.ae.cfg.has_decoder:
            out = self.ae.decode(latents)
            pixel_mse, pixel_l1 = F.mse_loss(out, decoded), F.l1_loss(out, decoded)
            loss = loss + pixel_mse + (pixel_l1 if self.l1 else 0.0)
            logs |= {"pixel_mse": pixel_mse.detach(), "pixel_l1": pixel_l1.detach()}
        return loss, logs


class TAESDTask:
    arch_parts = ("vae",)

    def __init__(self, cfg: TrainConfig, run_dir: Path, d: DistInfo):
        self.cfg, self.run_dir, self.device = cfg, run_dir, d.device
        vae_cfg, vae_sd, fresh = load_vae_source(cfg.init_from)
        if fresh:
            raise TrainError(f"--model {cfg.init_from}: a VAE run has no measured latent scale yet; distil from a "
                             "model (file, diffusers folder or built-in name) whose U-Net uses these latents")
        if cfg.size % vae_cfg.downscale:
            raise TrainError(f"size {cfg.size} is not a multiple of the VAE's downscale factor {vae_cfg.downscale}")
        self.model_cfg = base_model_config(cfg).replace(name=run_dir.name, family="custom", vae=vae_cfg)
        self.teacher = AutoencoderKL(vae_cfg)
        self.teacher.load_state_dict(vae_sd)
        self.teacher = self.teacher.to(d.device).eval().requires_grad_(False)
        self.taesd_cfg = taesd_config(cfg, vae_cfg.z_channels, vae_cfg.downscale)
        if (run_dir / CHECKPOINT).exists():
            old = read_checkpoint(run_dir).get("task", {}).get("taesd_config")
            if old is not None and TAESDConfig.from_json(old) != self.taesd_cfg:
                raise TrainError(f"{run_dir} trains another tiny autoencoder ({old}); resume without --width / "
                                 "--taesd-parts, or start a new run with another --out")
        data = load_dataset(cfg.data, cfg.size)
        self.train, self.held = split_holdout(data, cfg.data, cfg.holdout)
        self.net = TAESDNet(TinyAutoencoder(self.taesd_cfg), l1=cfg.rec_loss == "l1")
        self.train_size = len(self.train)
        views = 2 if cfg.flip else 1
        size = views * len(self.train) * self.train.images[0].numel() * 2
        self.cache = self._build_cache(views) if size <= CACHE_BYTES else None

    @torch.no_grad()
    def _build_cache(self, views: int, batch: int = 32) -> dict[str, Tensor]:
        """Teacher outputs per training image (index i) and its mirror image (index N + i), on the CPU.

        Each image's posterior sample comes from a generator seeded by its index, so the cache is the
        same on every start and resumption stays exact."""
        out: dict[str, list[Tensor]] = {"mean": [], "latents": [], "decoded": []}
        for flip in range(views):
            for i in range(0, len(self.train), batch):
                x = self.train.as_float(list(range(i, min(i + batch, len(self.train)))))
                x = x.flip(-1) if flip else x
                gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + flip * len(self.train) + i)
                t = self._teacher(x, gen)
                out["mean"].append(t["mean"].cpu())
                out["latents"].append(t["latents"].cpu())
                out["decoded"].append(t["decoded"].clamp(-1, 1).half().cpu())
        return {k: torch.cat(v) for k, v in out.items()}

    @torch.no_grad()
    def _teacher(self, x: Tensor, gen: torch.Generator | None) -> dict[str, Tensor]:
        """Scaled posterior mean, a scaled posterior sample (the mean when ``gen`` is None), its KL decode."""
        mean, logvar = self.teacher.encode(x.to(self.device))
        z = mean
        if gen is not None:
            z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen).to(mean.device)
        vae_cfg = self.model_cfg.vae
        return {"mean": latent_norm.to_unet(vae_cfg, mean), "latents": latent_norm.to_unet(vae_cfg, z),
                "decoded": self.teacher.decode(z).clamp(-1, 1)}

    def make_batch(self, idx: Tensor, gen: torch.Generator, step: int) -> dict[str, Any]:
        x = self.train.as_float(idx)
        flip = torch.zeros(len(idx), dtype=torch.bool)
        if self.cfg.flip:
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if self.cache is None:
            return {"images": x, **self._teacher(x, gen)}
        rows = idx + flip.long() * len(self.train)
        return {"images": x, **{k: v[rows].float() for k, v in self.cache.items()}}

    def evaluate(self, eval_net: nn.Module, step: int) -> dict[str, float]:
        """Held-out PSNR of the tiny decoder against the KL decoder (on posterior means) and against the
        images, and the tiny encoder's latent MSE; a grid: images, KL decodes, tiny decodes."""
        ae: TinyAutoencoder = eval_net.ae
        held = len(self.held) > 0
        images = self.held if held else self.train.subset(list(range(min(16, len(self.train)))))
        sums: dict[str, list[Tensor]] = {}
        rows: list[Tensor] = []
        for i in range(0, len(images), 16):
            x = images.as_float(list(range(i, min(i + 16, len(images))))).to(self.device)
            t = self._teacher(x, None)
            if ae.cfg.has_decoder:
                out = ae.decode(t["latents"])
                sums.setdefault("psnr_vs_kl", []).append(psnr(out, t["decoded"].clamp(-1, 1)).cpu())
                sums.setdefault("psnr_vs_image", []).append(psnr(out, x).cpu())
                if not rows:
                    rows = [x.cpu(), t["decoded"].cpu(), out.cpu()]
            if ae.cfg.has_encoder:
                err = (ae.encode(x) - t["mean"]).pow(2).flatten(1).mean(1)
                sums.setdefault("latent_mse", []).append(err.cpu())
        if rows:
            n = min(8, len(rows[0]))
            save_grid([to_pil(t) for r in rows for t in r[:n]], n, self.run_dir / "samples" / f"step_{step:07d}.png")
        suffix = "" if held else "_train"
        return {k + suffix: float(torch.cat(v).mean()) for k, v in sums.items()}

    def state(self) -> dict[str, Any]:
        return {"taesd_config": self.taesd_cfg.to_json()}


def export_taesd(run_dir: str | Path, out: str | Path, half: bool = False) -> Path:
    """The run's tiny autoencoder (EMA weights where kept) as one file in the TAESD layout."""
    from ldmkit.models.taesd import save_taesd
    from ldmkit.train.export import ema_weights

    ckpt = read_checkpoint(Path(run_dir))
    cfg = TAESDConfig.from_json(ckpt["task"]["taesd_config"])
    ae = TinyAutoencoder(cfg)
    ae.load_state_dict(ema_weights(ckpt, "ae."))
    return save_taesd(ae, out, torch.float16 if half else None)

