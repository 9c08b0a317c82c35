"""Live preview cost per step at 512² (a 64² latent): Approx cheap, TAESD and the full VAE, ldmkit against diffusers.

    python bench/bench_previews.py                 # one thread, 3 repeats (1 for the full VAE)
    python bench/bench_previews.py --size 256 --threads 2

Each row is one preview of one image: decode the sampler's denoised latent, then encode it as the
server does (base64 PNG). TAESD and the full VAE run the same random weights in both libraries
(diffusers' ``AutoencoderTiny`` saved as a folder and read by ldmkit's loader; ldmkit's KL VAE moved
into ``diffusers.AutoencoderKL`` by the project's key map) and their outputs are compared. Repeats
alternate the two libraries. Ratios: ldmkit / diffusers, and each preview / the full VAE decode.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch


def timed(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Wall times of each function, alternating, after one untimed warm-up call each."""
    for fn in fns.values():
        fn()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t0 = time.perf_counter()
            fns[name]()
            out[name].append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--full-repeats", type=int, default=1, help="the full VAE decode is ~40 s at 512² on one core")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import diffusers

    from ldmkit import convert, previews
    from ldmkit.config import SD15
    from ldmkit.models.vae import AutoencoderKL
    from ldmkit.server.worker import encode_preview

    torch.manual_seed(0)
    z = torch.randn(1, 4, args.size // 8, args.size // 8)  # a scaled latent, as the sampler's denoised estimate
    with tempfile.TemporaryDirectory() as tmp:
        ref_tiny = diffusers.AutoencoderTiny().eval()  # TAESD's SD configuration
        ref_tiny.save_pretrained(Path(tmp) / "taesd")
        tiny = previews.tiny_decoder(Path(tmp) / "taesd")
    kl = AutoencoderKL(SD15.vae).eval()
    ref_kl = diffusers.AutoencoderKL(**{k: v for k, v in convert.diffusers_vae_config(SD15.vae).items()
                                        if not k.startswith("_")}).eval()
    ref_kl.load_state_dict(convert.vae_ldm_to_diffusers(kl.state_dict(), SD15.vae))
    sf = SD15.vae.scale_factor

    def png(images: list) -> str:
        return encode_preview(images[0])

    def diffusers_images(x: torch.Tensor) -> list:
        return previews.to_images(x)

    with torch.inference_mode():
        a, b = tiny.tiny.decode(z), ref_tiny.decode(z).sample
        tiny_err = ((a - b).abs().max() / b.abs().max()).item()
        light = timed({
            "approx cheap (ldmkit)": lambda: png(previews.approx_cheap(z)),
            "TAESD (ldmkit)": lambda: png(tiny(z)),
            "TAESD (diffusers AutoencoderTiny)": lambda: png(diffusers_images(ref_tiny.decode(z).sample)),
        }, args.repeats)
        full = timed({
            "full VAE (ldmkit)": lambda: png(previews.to_images(kl.decode(z / sf))),
            "full VAE (diffusers AutoencoderKL)": lambda: png(diffusers_images(ref_kl.decode(z / sf).sample)),
        }, args.full_repeats)
    rows = {**light, **full}
    med = {k: statistics.median(v) for k, v in rows.items()}
    base = med["full VAE (ldmkit)"]
    print(f"preview of one {args.size}² image (decode + base64 PNG), {args.threads} thread(s), median s")
    print("| preview | seconds | / full VAE (ldmkit) |\n|---|--:|--:|")
    for k, v in med.items():
        print(f"| {k} | {v:.4f} | {v / base:.4f} |")
    print(f"TAESD ldmkit / diffusers: {med['TAESD (ldmkit)'] / med['TAESD (diffusers AutoencoderTiny)']:.2f} "
          f"(decode rel. error {tiny_err:.1e}); full VAE ldmkit / diffusers: "
          f"{base / med['full VAE (diffusers AutoencoderKL)']:.2f}")
    print("raw:", {k: [round(t, 4) for t in v] for k, v in rows.items()})
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"diffusers {diffusers.__version__}")


if __name__ == "__main__":
    main()
