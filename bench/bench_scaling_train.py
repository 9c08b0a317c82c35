"""Training throughput (samples/s) for 1 and 2 data-parallel processes, a folder (latents cached) and streamed
tar shards (decoded and VAE-encoded per batch), on this machine. Issue 18, docs/scaling.md.

    flock /tmp/ldmkit-big.lock .venv/bin/python bench/bench_scaling_train.py [--data data/emoji] [--steps 60]

Each process runs PyTorch on one thread (OMP_NUM_THREADS=1); torchrun --standalone, gloo. The tiny preset at
32 px, batch 8 per process: samples/s = steps x 8 x processes / time, the median of the logged intervals after
the first (which includes start-up).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

COMMON = ["--model", "tiny", "--size", "32", "--batch-size", "8", "--warmup-steps", "1", "--sample-every", "0",
          "--checkpoint-every", "0", "--holdout", "0", "--device", "cpu"]


def run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")


def rate(run_dir: Path) -> float:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in rows if "images_per_s" in r][1:]  # the first includes start-up
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="data/emoji")
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ldmkit-bench-scaling-"))
    ldmkit = [sys.executable, "-m", "ldmkit"]
    run([*ldmkit, "train", "vae", "--data", args.data, "--out", str(tmp / "vae"), "--total-steps", "5",
         "--log-every", "5", *COMMON])
    run([*ldmkit, "data", "shards", args.data, "--out", str(tmp / "shards"), "--shard-size", "500", "--size", "32"])
    shards = str(tmp / "shards")
    print(f"| data | processes | samples/s | per process | vs 1 process | (tiny preset, 32 px, batch 8/process, "
          f"{args.steps} steps, 1 thread each, {os.cpu_count()} cores) |")
    print("|---|---|---|---|---|---|")
    cases = (("folder (cached latents)", args.data, 0), ("tar shards (streamed)", shards, 0),
             ("tar shards, --data-workers 1", shards, 1))
    for i, (label, data, workers) in enumerate(cases):
        base = None
        for n in (1, 2):
            out = tmp / f"run-{i}-{n}"
            run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), "-m",
                 "ldmkit", "train", "unet", "--data", data, "--vae", str(tmp / "vae"), "--out", str(out),
                 "--data-workers", str(workers), "--total-steps", str(args.steps),
                 "--log-every", str(max(1, args.steps // 6)), *COMMON])
            r = rate(out)
            base = base or r
            print(f"| {label} | {n} | {r:.1f} | {r / n:.1f} | {r / base:.2f}x | |", flush=True)


if __name__ == "__main__":
    main()
