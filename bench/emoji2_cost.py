"""Relative training cost of second-generation emoji architectures (issue 17), measured interleaved in
one process so that a busy shared machine slows every candidate alike.

    OMP_NUM_THREADS=1 python bench/emoji2_cost.py [--repeats 5]

Times one AdamW training step (forward + backward + update) of the U-Net at batch 32 and of the
autoencoder at batch 16 for each candidate, as ratios to the shipped `emoji` model's (recipes/emoji),
whose absolute step times on one idle core are on its card (U-Net 0.85 s/step, VAE 1.36 s/step).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from ldmkit.models.unet import UNetModel
from ldmkit.models.vae import AutoencoderKL
from ldmkit.train.config import base_model_config, defaults, load_toml

UNETS = {  # name: (latent side, arch.unet overrides)
    "shipped 8x8 latents (f=8 @ 64)": (8, {}),
    "16x16 latents (f=4 @ 64 or f=8 @ 128), same U-Net": (16, {}),
    "16x16 latents, attention only at 8x8 and 4x4": (16, {"attention_levels": [False, True, True]}),
    "32x32 latents (f=4 @ 128), attention at 16/8": (32, {"channel_mult": [1, 2, 2, 2],
                                                     "attention_levels": [False, True, True, False]}),
}
VAES = {  # name: (image side, arch.vae overrides)
    "shipped f=8 (16/32/64/128) @ 64": (64, {}),
    "f=4 (16/32/64) @ 64": (64, {"ch_mult": [1, 2, 4]}),
    "f=8, 16 latent channels @ 64": (64, {"z_channels": 16}),
    "f=8, first level 32 (32/64/128/128) @ 64": (64, {"ch": 32, "ch_mult": [1, 2, 4, 4]}),
    "shipped f=8 @ 128": (128, {}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    base = base_model_config(load_toml("recipes/emoji/emoji.toml", defaults("unet")))
    ctx_dim = base.unet.context_dim
    jobs = {}
    for name, (side, over) in UNETS.items():
        net = UNetModel(dataclasses.replace(base.unet, **over))
        x, ctx = torch.randn(32, base.unet.in_channels, side, side), torch.randn(32, 24, ctx_dim)
        t = torch.randint(0, 1000, (32,))
        jobs[f"U-Net: {name}"] = (net, lambda n=net, x=x, t=t, c=ctx: (n(x, t, c) - x).square().mean())
    for name, (side, over) in VAES.items():
        vae = AutoencoderKL(dataclasses.replace(base.vae, **over))
        x = torch.randn(16, 3, side, side)
        jobs[f"VAE: {name}"] = (vae, lambda v=vae, x=x: (v.decode(v.encode(x)[0]) - x).abs().mean())
    opts = {k: torch.optim.AdamW(m.parameters(), 1e-4) for k, (m, _) in jobs.items()}
    times: dict[str, list[float]] = {k: [] for k in jobs}
    for r in range(args.repeats + 1):  # the first round warms up
        for k, (_, loss_fn) in jobs.items():
            t0 = time.perf_counter()
            opts[k].zero_grad()
            loss_fn().backward()
            opts[k].step()
            if r:
                times[k].append(time.perf_counter() - t0)
    ref_u = statistics.median(times[next(k for k in jobs if k.startswith("U-Net"))])
    ref_v = statistics.median(times[next(k for k in jobs if k.startswith("VAE"))])
    print(f"| step (threads {torch.get_num_threads()}, median of {args.repeats}) | s/step here | "
          "× shipped | params |\n|---|--:|--:|--:|")
    for k, (m, _) in jobs.items():
        med = statistics.median(times[k])
        ref = ref_u if k.startswith("U-Net") else ref_v
        print(f"| {k} | {med:.2f} | {med / ref:.2f} | {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M |")


if __name__ == "__main__":
    main()
