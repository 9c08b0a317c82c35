"""Upscaler time and peak memory, untiled vs tiled, for a network of RealESRGAN_x4plus's shape (RRDBNet, 64
features, 23 blocks; random weights: the cost does not depend on them) or any upscaler file.

    OMP_NUM_THREADS=1 flock /tmp/ldmkit-big.lock python bench/bench_upscale.py --size 256 --tiles 0 128 256

Each configuration runs in a fresh process, so its peak RSS (ru_maxrss) is its own. Also prints how far the
tiled output is from the untiled one (max and mean absolute difference in 8-bit levels).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from ldmkit.models.esrgan import RRDBNet
    from ldmkit.upscale import Upscaler, load_upscaler, run_network

    if args.upscaler:
        up = load_upscaler(args.upscaler)
    else:
        torch.manual_seed(0)
        net = RRDBNet(num_feat=64, num_block=23).eval().requires_grad_(False)
        with torch.no_grad():
            net.conv_last.bias += 0.9  # centre the random net's output in [0, 1], so that clamping hides little
        up = Upscaler("x4plus-shaped", 4.0, module=net)
    img = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    start = time.perf_counter()
    x = torch.from_numpy(img.astype(np.float32) / 255).permute(2, 0, 1)[None]  # (1, 3, H, W)
    y = run_network(up.module, x, tile=args.tile, overlap=args.overlap)
    out = (y[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    seconds = time.perf_counter() - start
    np.save(args.out, out)
    print(json.dumps({"tile": args.tile, "seconds": round(seconds, 2),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upscaler", default=None, help="an upscaler file (default: a random x4plus-shaped net)")
    ap.add_argument("--size", type=int, default=256, help="input image side")
    ap.add_argument("--tiles", type=int, nargs="+", default=[0, 128, 256], help="tile sizes (0: untiled)")
    ap.add_argument("--overlap", type=int, default=32)
    ap.add_argument("--tile", type=int, default=None, help=argparse.SUPPRESS)  # child process
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tile is not None:
        return one(args)
    import numpy as np

    results = []
    for tile in args.tiles:
        out = f"/tmp/bench_upscale_{tile}.npy"
        cmd = [sys.executable, __file__, "--size", str(args.size), "--tile", str(tile), "--overlap",
               str(args.overlap), "--out", out] + (["--upscaler", args.upscaler] if args.upscaler else [])
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results.append((json.loads(line), np.load(out).astype(np.int16)))
    base = results[0][1]
    for r, arr in results:
        diff = np.abs(arr - base)
        print(f"tile {r['tile']:>4}: {r['seconds']:7.2f} s  peak RSS {r['peak_rss_mb']:6d} MB  "
              f"vs first: max {diff.max()} mean {diff.mean():.4f} levels")


if __name__ == "__main__":
    main()
