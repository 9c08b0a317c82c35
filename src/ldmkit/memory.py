"""How much memory a generation needs, and how much this machine has: requests that cannot fit are
refused before any work (issue 15, hardening 1) instead of being killed by the kernel half-way.

The estimate covers activations (weights are already loaded): the U-Net's, which grow with the
latent's pixels times its base width (CFG doubles the batch; attention is memory-efficient, so no
N^2 term), and the VAE decoder's at full resolution, a few full-size activations (``vae_tiling.decode``
tiles large images, and any image whose untiled decode would not fit the available memory). The
constants were measured on the built-in model (fp32, CPU) and rounded up: at 1024^2 one U-Net call
grew the process by 0.30 GB (8.4 MB per activation: 36 of them); a whole 2048^2 request to the server
peaked at 2.65 GiB (bench/bench_tiling.py --server 2048), ~2.2 GiB above the loaded server, which is
the U-Net's (33.5 MB per activation: ~65 of them, attention's work buffers included); the tiled 2048^2
decode alone peaked at 1.38 GiB, ~0.4 GiB of that the interpreter and model (512 MiB per activation: ~2).
"""

from __future__ import annotations

import os
from pathlib import Path

from ldmkit.model import StableDiffusion

UNET_ACTIVATIONS = 72  # live U-Net activations of (2B, model_channels, h, w): measured 36 at 1024^2, ~65 at 2048^2
DECODER_TILED = 4  # full-size decoder activations alive at once when tiled (measured ~2-3)
HEADROOM = 0.8  # of the available memory a request may plan to use


class TooLarge(ValueError):
    """A generation that would not fit in this machine's memory; the message names the size and the numbers."""


def estimate_generation_bytes(model: StableDiffusion, width: int, height: int, batch_size: int) -> int:
    """Peak activation memory of one txt2img/img2img call at this size, in bytes (an upper estimate)."""
    cfg = model.cfg
    f = cfg.vae.downscale
    itemsize = 4  # activations are fp32 on CPU (also in low-memory mode)
    latent = (width // f) * (height // f)
    unet = UNET_ACTIVATIONS * 2 * batch_size * cfg.unet.model_channels * latent * itemsize
    channels = cfg.vae.ch * max(cfg.vae.ch_mult[:2])
    # images are decoded one at a time, in tiles wherever the whole would not fit (vae_tiling.decode)
    decoder = DECODER_TILED * channels * width * height * itemsize
    return max(unet, decoder) + 3 * 4 * width * height * batch_size  # + the decoded images


def available_bytes() -> int:
    """Memory this process can still use: MemAvailable, lowered by a cgroup limit when one is set."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return 1 << 62  # unknown: do not refuse
    for limit, used in (("memory.max", "memory.current"), ("memory.limit_in_bytes", "memory.usage_in_bytes")):
        base = Path("/sys/fs/cgroup")
        try:
            lim, cur = (base / limit).read_text().strip(), (base / used).read_text().strip()
        except OSError:
            continue
        if lim.isdigit() and cur.isdigit():
            avail = min(avail, max(int(lim) - int(cur), 0))
        break
    return avail


def check_fits(model: StableDiffusion, width: int, height: int, batch_size: int, budget: int | None = None) -> None:
    """Raise ``TooLarge`` when the estimate passes ``budget`` (default: a share of the available memory)."""
    need = estimate_generation_bytes(model, width, height, batch_size)
    have = int(available_bytes() * HEADROOM) if budget is None else budget
    if need > have:
        what = f"{width}x{height}" + (f" x {batch_size} images" if batch_size > 1 else "")
        raise TooLarge(f"{what} needs about {need / 2**30:.1f} GiB of working memory and this machine has "
                       f"{have / 2**30:.1f} GiB to give; use a smaller size or batch size")
