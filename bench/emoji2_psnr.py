"""Where an emoji autoencoder loses PSNR (issue 17, goal 2: >= 28 dB on the held-out images).

    python bench/emoji2_psnr.py --vae runs/emoji2-vae-decoder --data data/emoji2 [--optimize-steps 300]
    python bench/emoji2_psnr.py --vae emoji --data data/emoji                  # the shipped model's, for scale

--vae: a VAE run folder (its EMA weights) or a model file / built-in name (its autoencoder). Reports
PSNR (as bench/eval_emoji.py measures it: 8-bit images, per image, averaged) of the posterior mean's
reconstruction on the 128 held-out images and on every training image, per Unicode group, variants
vs bare emoji, and the worst images. --optimize-steps N: the decoder's own ceiling on --probe-images K held-out
images: the latents optimised directly (Adam on the decoder's MSE, from the encoder's mean) with
the decoder fixed; if that ceiling is far above the encoder's PSNR, the decoder could draw the images
and what is missing is in the (frozen) encoder's latents; if it is near, the decoder itself is the
limit, and more or wider decoder training (which keeps the U-Net's latents valid) is the lever.
--overfit-steps N: the decoder's capacity: a copy of the decoder trained (Adam, MSE) on the K
held-out images' own latents only; if even that stays below 28 dB, the decoder's width (or the
latents' information) is the limit, not its training steps or data.
--sheet PATH: the worst held-out images, original above reconstruction.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldmkit.data.emoji_groups import GROUPS, group_of, load_emoji_groups
from ldmkit.models.vae import AutoencoderKL
from ldmkit.pipeline import image_to_tensor
from ldmkit.train.sources import load_vae_source


def psnr_8bit(x: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR of two (B, 3, H, W) batches in [-1, 1], both quantised to 8 bits (eval_emoji's)."""
    a = ((x + 1) * 127.5).round() / 255
    b = ((rec.float().clamp(-1, 1) + 1) * 127.5).round() / 255
    mse = ((a - b) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


def reconstruct(vae: AutoencoderKL, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    means, recs = [], []
    with torch.inference_mode():
        for chunk in x.split(64):
            mean, _ = vae.encode(chunk)
            means.append(mean)
            recs.append(vae.decode(mean))
    return torch.cat(means), torch.cat(recs)


def optimise_latents(vae: AutoencoderKL, x: torch.Tensor, z0: torch.Tensor, steps: int,
                     lr: float = 0.1) -> list[tuple[int, float]]:
    """Adam on the latents (decoder fixed) for the MSE to ``x``; (step, mean PSNR) at a few steps."""
    for p in vae.parameters():
        p.requires_grad_(False)
    z = z0.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    curve = []
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss = ((vae.decode(z) - x) ** 2).mean()
        loss.backward()
        opt.step()
        if step in (steps // 10, steps // 3, steps) or step == 1:
            with torch.inference_mode():
                curve.append((step, float(psnr_8bit(x, vae.decode(z)).mean())))
    return curve


def overfit_decoder(vae: AutoencoderKL, x: torch.Tensor, z: torch.Tensor, steps: int, lr: float = 3e-4,
                    batch: int = 32) -> list[tuple[int, float]]:
    """A copy of the decoder trained on (z, x) alone; (step, mean PSNR over all of x) at a few steps."""
    import copy

    dec = copy.deepcopy(vae)
    for name, p in dec.named_parameters():
        p.requires_grad_(name.startswith(("decoder.", "post_quant_conv.")))
    opt = torch.optim.Adam([p for p in dec.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(0)
    curve = []
    for step in range(1, steps + 1):
        idx = torch.randint(len(x), (batch,), generator=g)
        opt.zero_grad()
        loss = ((dec.decode(z[idx]) - x[idx]) ** 2).mean()
        loss.backward()
        opt.step()
        if step in (steps // 10, steps // 3, steps):
            with torch.inference_mode():
                curve.append((step, float(torch.cat([psnr_8bit(a, dec.decode(b)) for a, b in
                                                     zip(x.split(64), z.split(64), strict=True)]).mean())))
    return curve


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae", required=True, help="VAE run folder, model file or built-in name")
    ap.add_argument("--data", default="data/emoji2")
    ap.add_argument("--emoji-test", default=None)
    ap.add_argument("--optimize-steps", type=int, default=0)
    ap.add_argument("--overfit-steps", type=int, default=0)
    ap.add_argument("--probe-images", type=int, default=16, help="held-out images the two probes use")
    ap.add_argument("--holdout-only", action="store_true", help="only the held-out images (fast; no training rows)")
    ap.add_argument("--worst", type=int, default=12)
    ap.add_argument("--sheet", default=None, help="PNG of the worst held-out images (top: original, bottom: decoded)")
    ap.add_argument("--json", default=None, help="write the numbers here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    cfg, sd, _ = load_vae_source(args.vae)
    vae = AutoencoderKL(cfg).eval()
    vae.load_state_dict({k: v.float() for k, v in sd.items()})
    root = Path(args.data)
    rows = [json.loads(ln) for ln in (root / "metadata.jsonl").read_text().splitlines() if ln.strip()]
    holdout = set(json.loads((root / "holdout.json").read_text())["keys"])
    groups = load_emoji_groups(args.emoji_test)
    if args.holdout_only:
        rows = [r for r in rows if Path(r["file_name"]).stem in holdout]
    images = [Image.open(root / r["file_name"]).convert("RGB") for r in rows]
    size = images[0].size[0]
    x = torch.cat([image_to_tensor(im, size, size) for im in images])
    mean, rec = reconstruct(vae, x)
    p = psnr_8bit(x, rec).numpy()
    held = np.array([Path(r["file_name"]).stem in holdout for r in rows])
    variant = np.array([bool(r.get("variant")) for r in rows])
    group = np.array([group_of(r["emoji"], groups) or "(none)" for r in rows])

    out: dict[str, object] = {"vae": args.vae, "holdout": float(p[held].mean()),
                              "train": float(p[~held].mean()) if (~held).any() else None,
                              "n_holdout": int(held.sum()), "n_train": int((~held).sum())}
    print(f"{args.vae}: held-out {out['holdout']:.2f} dB ({held.sum()} images), training "
          f"{p[~held].mean() if (~held).any() else float('nan'):.2f} dB ({(~held).sum()}), f={cfg.downscale}, "
          f"latent {cfg.z_channels}x{size // cfg.downscale}^2")
    per = {}
    print("| group | held-out (n) | training (n) | training, bare (n) | training, variants (n) |")
    print("|---|--:|--:|--:|--:|")
    for g in GROUPS:
        sel = group == g

        def cell(m: np.ndarray) -> str:
            return f"{p[m].mean():.2f} ({m.sum()})" if m.any() else "– (0)"
        per[g] = {"holdout": float(p[sel & held].mean()) if (sel & held).any() else None,
                  "train": float(p[sel & ~held].mean()) if (sel & ~held).any() else None,
                  "n_train": int((sel & ~held).sum())}
        print(f"| {g} | {cell(sel & held)} | {cell(sel & ~held)} | {cell(sel & ~held & ~variant)} | "
              f"{cell(sel & ~held & variant)} |")
    out["groups"] = per
    order = np.argsort(p[held])
    worst = [rows[i] for i in np.flatnonzero(held)[order[:args.worst]]]
    out["worst_holdout"] = [(r["text"], float(v)) for r, v in zip(worst, p[held][order[:args.worst]], strict=True)]
    print("worst held-out:", ", ".join(f"{t} {v:.1f}" for t, v in out["worst_holdout"]))
    q = np.percentile(p[held], [10, 25, 50, 75, 90])
    out["holdout_percentiles"] = dict(zip(("p10", "p25", "p50", "p75", "p90"), map(float, q), strict=True))
    print("held-out percentiles 10/25/50/75/90:", " / ".join(f"{v:.2f}" for v in q))
    # MSE-weighted view: PSNR is averaged per image, so images far below the mean pull it down in dB terms
    mse = 10 ** (-p[held] / 10)
    out["holdout_psnr_of_mean_mse"] = float(-10 * np.log10(mse.mean()))
    # the probes train through the decoder: on one shared core, K images (evenly spaced among the held out)
    probe = torch.from_numpy(np.flatnonzero(held)[:: max(1, int(held.sum()) // args.probe_images)][:args.probe_images])
    if args.optimize_steps or args.overfit_steps:
        base = float(p[probe.numpy()].mean())
        out["probe_images"], out["probe_encoder_psnr"] = len(probe), base
        print(f"probes on {len(probe)} held-out images (encoder + decoder: {base:.2f} dB)")
    if args.optimize_steps:
        curve = optimise_latents(vae, x[probe], mean[probe], args.optimize_steps)
        out["latent_optimised"] = curve
        print("latents optimised with the decoder fixed (step, PSNR):", ", ".join(f"{s}: {v:.2f}" for s, v in curve))
    if args.overfit_steps:
        curve = overfit_decoder(vae, x[probe], mean[probe], args.overfit_steps, batch=min(32, len(probe)))
        out["decoder_overfit"] = curve
        print("a copy of the decoder trained on these images alone (step, PSNR):",
              ", ".join(f"{s}: {v:.2f}" for s, v in curve))
    if args.sheet:
        idx = np.flatnonzero(held)[order[:args.worst]]
        w = size + 4
        sheet = Image.new("RGB", (len(idx) * w, 2 * w), "white")
        for j, i in enumerate(idx):
            sheet.paste(images[i], (j * w, 0))
            r = ((rec[i].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            sheet.paste(Image.fromarray(r), (j * w, w))
        sheet.save(args.sheet, optimize=True)
    out["seconds"] = time.time() - t0
    print(f"took {out['seconds']:.0f} s on one thread")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
