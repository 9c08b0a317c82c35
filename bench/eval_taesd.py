"""Evaluate a tiny autoencoder (TAESD) against its model's full KL decoder: quality and speed.

    python bench/eval_taesd.py --model emoji --vae emoji-taesd --data data/emoji
    python bench/eval_taesd.py --model emoji --vae runs/emoji-taesd-export.safetensors --generated 32

Quality, in PSNR (dB, per image, images in [-1, 1], averaged):
- held-out latents: the KL encoder's posterior mean of every held-out image (holdout.json), decoded
  by the tiny decoder and by the KL decoder: tiny vs KL (the issue's target, >= 25 dB), tiny vs the
  image, and KL vs the image for scale;
- generated latents: what the model's sampler ends on for held-out captions (fixed seeds), the
  latents a decoder sees in use: tiny vs KL.
Speed: one image's decode (the pipeline decodes one at a time), median of --repeats, both decoders
alternating in one process, and the ratio KL / tiny (above 1: the tiny decoder is faster).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from ldmkit import api, latent_norm
from ldmkit import pipeline as P
from ldmkit.models import taesd
from ldmkit.train.data import load_dataset, split_holdout
from ldmkit.train.losses import psnr


class RecordingVAE(torch.nn.Module):
    """Stands in for the KL VAE during txt2img and keeps the (unscaled) latents it is asked to decode."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae, self.seen = vae, []

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self.seen.append(z.clone())
        return self.vae.decode(z)


def generated_latents(model, captions: list[str], steps: int) -> torch.Tensor:
    """Scaled latents the model's default sampler produces for ``captions`` (seed i for caption i)."""
    kl = model.vae
    model.vae = RecordingVAE(kl)
    size = model.cfg.native_size
    try:
        for i, c in enumerate(captions):
            P.txt2img(model, P.GenerationParams(c, steps=steps, seed=i, width=size, height=size))
        return latent_norm.to_unet(model.cfg.vae, torch.cat(model.vae.seen))
    finally:
        model.vae = kl


@torch.no_grad()
def quality(model, tiny, latents: torch.Tensor, images: torch.Tensor | None = None) -> dict[str, float]:
    kl_out = torch.cat([model.vae.decode(latent_norm.from_unet(model.cfg.vae, z))
                        for z in latents.split(16)]).clamp(-1, 1)
    tiny_out = torch.cat([tiny.decode(z) for z in latents.split(16)]).clamp(-1, 1)
    out = {"psnr_tiny_vs_kl": float(psnr(tiny_out, kl_out).mean())}
    if images is not None:
        out["psnr_tiny_vs_image"] = float(psnr(tiny_out, images).mean())
        out["psnr_kl_vs_image"] = float(psnr(kl_out, images).mean())
    return out


@torch.no_grad()
def decode_times(model, tiny, latent: torch.Tensor, repeats: int) -> dict[str, float]:
    fns = {"kl": lambda: model.vae.decode(latent_norm.from_unet(model.cfg.vae, latent)),
           "tiny": lambda: tiny.decode(latent)}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for r in range(repeats):
        for name in (("kl", "tiny") if r % 2 == 0 else ("tiny", "kl")):  # ABBA: load hits both alike
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    kl, tn = statistics.median(times["kl"]), statistics.median(times["tiny"])
    return {"decode_ms_kl": kl * 1e3, "decode_ms_tiny": tn * 1e3, "speedup_kl_over_tiny": kl / tn,
            "decode_min_ms_kl": min(times["kl"]) * 1e3, "decode_min_ms_tiny": min(times["tiny"]) * 1e3}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="emoji")
    ap.add_argument("--vae", default="emoji-taesd", help="the tiny autoencoder: file, folder or built-in name")
    ap.add_argument("--data", default="data/emoji")
    ap.add_argument("--generated", type=int, default=32, help="held-out captions to generate latents for")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = api.load(args.model, device="cpu").model
    tiny = taesd.load_taesd(args.vae)
    taesd.check_compatible(tiny, model, args.vae)
    size = model.cfg.native_size
    data = load_dataset(args.data, size)
    _, held = split_holdout(data, args.data, 16)
    images = held.as_float()
    with torch.no_grad():
        latents = latent_norm.to_unet(model.cfg.vae, torch.cat([model.vae.encode(x)[0] for x in images.split(16)]))
    res: dict = {"model": args.model, "vae": str(args.vae), "held_out_images": len(held), "size": size,
                 "tiny_decoder_params": sum(p.numel() for p in tiny.decoder.parameters()),
                 "kl_decoder_params": sum(p.numel() for p in model.vae.decoder.parameters())
                 + sum(p.numel() for p in model.vae.post_quant_conv.parameters()),
                 "held_out": quality(model, tiny, latents, images)}
    if args.generated:
        gen = generated_latents(model, held.captions[: args.generated], args.steps)
        res["generated"] = {"captions": len(gen), "steps": args.steps, **quality(model, tiny, gen)}
    res["speed"] = {"threads": args.threads, **decode_times(model, tiny, latents[:1], args.repeats)}
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
