"""``ldmkit batch`` throughput: the local backend against Ray Data with 1 and 2 workers, on this machine.

    flock /tmp/ldmkit-big.lock python bench/bench_batch.py                  # 40 jobs, emoji model, 20 steps
    flock /tmp/ldmkit-big.lock python bench/bench_batch.py --jobs 16 --steps 8 --only local,ray1

Each run is a fresh ``ldmkit batch`` process on a fresh output folder, timed from the parent (Python start,
Ray start, model loads and all). From the manifest's images' file times it also reports the steady rate (images
per minute between the first and the last image), the start-up (wall time minus the images at that rate), and the
generation time per image each worker measured (the manifest's ``seconds``), so Ray's overhead is split into a
one-off start and a per-image cost. The images of every run are compared by their
pixel hashes with the first run's (the same jobs and seeds: equal on equal thread counts).

Backends: ``local1``/``local2`` (one process, OMP_NUM_THREADS 1 / 2), ``ray1``/``ray2`` (``--ray --workers N``,
1 CPU and 1 thread per worker, Ray started by the command); OMP_WAIT_POLICY=PASSIVE in all.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = ["a red apple", "a smiling face", "a cat", "a dog", "a green tree", "a blue car", "a star", "a heart"]
BACKENDS = {"local1": ([], 1), "local2": ([], 2), "ray1": (["--ray", "--workers", "1"], 1),
            "ray2": (["--ray", "--workers", "2"], 1)}


def run(name: str, jobs: Path, root: Path, model: str) -> dict:
    flags, threads = BACKENDS[name]
    out = root / name
    # passive OpenMP waits: with 2 threads and any other busy process, spinning threads collapse 5-30x
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE", "RAY_DEDUP_LOGS": "0"}
    cmd = [sys.executable, "-m", "ldmkit", "batch", str(jobs), "--out", str(out), "--model", model, *flags]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    rows = [json.loads(s) for s in (out / "manifest.jsonl").read_text().splitlines()]
    times = sorted((out / r["file"]).stat().st_mtime for r in rows)
    n = len(rows)
    rate = (n - 1) / (times[-1] - times[0]) * 60 if n > 1 and times[-1] > times[0] else float("nan")
    return {"backend": name, "images": n, "wall_s": wall, "per_min": n / wall * 60, "steady_per_min": rate,
            "startup_s": wall - n / rate * 60, "first_image_s": times[0] - t0,
            "gen_s": sum(r["seconds"] for r in rows) / n,  # generation time per image, measured where it ran
            "hashes": {(r["line"], r["index"]): r["sha256"] for r in rows}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=40)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--model", default="emoji")
    ap.add_argument("--only", default="local1,ray1,ray2,local2", help="comma-separated backends, run in order")
    args = ap.parse_args()
    names = args.only.split(",")
    with tempfile.TemporaryDirectory(prefix="bench_batch_") as tmp:
        root = Path(tmp)
        jobs = root / "jobs.jsonl"
        jobs.write_text("".join(json.dumps({"prompt": PROMPTS[i % len(PROMPTS)], "seed": i, "steps": args.steps})
                                + "\n" for i in range(args.jobs)))
        print(f"{args.jobs} jobs, {args.model}, {args.steps} steps; {os.cpu_count()} CPUs; "
              f"load average {os.getloadavg()[0]:.1f}")
        results = []
        for name in names:
            r = run(name, jobs, root, args.model)
            results.append(r)
            same = sum(r["hashes"][k] == v for k, v in results[0]["hashes"].items())
            print(f"{name:7s} {r['images']:3d} img  wall {r['wall_s']:6.1f} s  {r['per_min']:6.1f} img/min  "
                  f"steady {r['steady_per_min']:6.1f} img/min  start-up {r['startup_s']:5.1f} s  first image "
                  f"{r['first_image_s']:5.1f} s  {r['gen_s']:.2f} s/img in its worker  "
                  f"same pixels as {names[0]}: {same}/{len(results[0]['hashes'])}  "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
        print("\n| backend | threads | wall (s) | images/min (whole run) | images/min (steady) | start-up (s) | "
              "s/image in its process |")
        print("|---|---|---|---|---|---|---|")
        for r in results:
            print(f"| {r['backend']} | {BACKENDS[r['backend']][1]} per process/worker | {r['wall_s']:.1f} | "
                  f"{r['per_min']:.1f} | {r['steady_per_min']:.1f} | {r['startup_s']:.1f} | {r['gen_s']:.2f} |")


if __name__ == "__main__":
    main()
