"""Autoencoder losses that need no pretrained network.

LDM trains its autoencoder with L1 + LPIPS + KL + a patch GAN. LPIPS needs VGG weights trained on
ImageNet, which don't exist offline, so ``structure_loss`` stands in for it: 1 - SSIM (Wang et al.
2004) plus an L1 on image gradients, at three scales. Both compare local structure (edges,
contrast) rather than raw pixels, which is what keeps L1-trained decoders from going blurry;
neither knows about textures the way a learned metric does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def ssim(x: Tensor, y: Tensor, window: int = 3, c1: float = 0.01**2, c2: float = 0.03**2) -> Tensor:
    """Mean SSIM of images in [0, 1] over ``window`` x ``window`` box windows (as monodepth2 does)."""
    pool = nn.functional.avg_pool2d
    pad = window // 2
    x, y = F.pad(x, (pad,) * 4, mode="reflect"), F.pad(y, (pad,) * 4, mode="reflect")
    mx, my = pool(x, window, 1), pool(y, window, 1)
    sxx = pool(x * x, window, 1) - mx * mx
    syy = pool(y * y, window, 1) - my * my
    sxy = pool(x * y, window, 1) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.mean()


def _gradients(x: Tensor) -> tuple[Tensor, Tensor]:
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def structure_loss(rec: Tensor, target: Tensor, scales: int = 3) -> Tensor:
    """Multi-scale (1 - SSIM) + image-gradient L1 for images in [-1, 1]; the offline LPIPS stand-in."""
    rec, target = (rec.float() + 1) / 2, (target.float() + 1) / 2
    total = rec.new_zeros(())
    n = 0
    for s in range(scales):
        if s and min(rec.shape[-2:]) < 8:
            break
        if s:
            rec, target = F.avg_pool2d(rec, 2), F.avg_pool2d(target, 2)
        (rx, ry), (tx, ty) = _gradients(rec), _gradients(target)
        total = total + (1 - ssim(rec, target)) + (rx - tx).abs().mean() + (ry - ty).abs().mean()
        n += 1
    return total / n


def kl_divergence(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over latent elements, averaged over the batch."""
    kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float())
    return kl.flatten(1).sum(1).mean()


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB per image, for images in [-1, 1]."""
    mse = ((x.float().clamp(-1, 1) - y.float()) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


class PatchDiscriminator(nn.Module):
    """pix2pix's PatchGAN (Isola et al. 2017), as in LDM, with GroupNorm instead of BatchNorm so
    there are no running statistics to synchronise across ranks or to checkpoint."""

    def __init__(self, in_channels: int = 3, ch: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ch, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for i in range(1, n_layers + 1):
            prev, mult = mult, min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(ch * prev, ch * mult, 4, stride, 1, bias=False), nn.GroupNorm(8, ch * mult),
                       nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(ch * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)

    @staticmethod
    def layers_for(size: int) -> int:
        """Depth that leaves a few output patches for images of ``size`` pixels."""
        return max(1, min(3, int(math.log2(size)) - 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)
