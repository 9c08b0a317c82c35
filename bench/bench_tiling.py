"""Tiled vs untiled VAE decode of the built-in model: wall time and peak RSS at 1024^2 and 2048^2.

    flock /tmp/ldmkit-big.lock python bench/bench_tiling.py                  # 1024 and 2048, one thread
    python bench/bench_tiling.py --sizes 512 1024 --modes tiled untiled --threads 2

Each row runs in a fresh interpreter (peak RSS is per process): load the model, decode one random
latent of the size, report the time of the decode and the process's peak RSS (ru_maxrss, which
includes the ~0.4 GB of the interpreter, torch and the model). Untiled rows of the old decoder (its
attention on transposed views) are reproduced with ``--modes old``; they need ~23 GiB at 2048^2, so
that row is skipped unless ``--old-max`` allows it. The tiled output is compared with the untiled one
(max abs difference, in [-1, 1] units).

    flock /tmp/ldmkit-big.lock python bench/bench_tiling.py --server 2048   # the issue's request, end to end

``--server SIZE`` starts ``ldmkit serve`` (built-in model, default settings) and sends
``POST /sdapi/v1/txt2img {"width": SIZE, "height": SIZE, "steps": 1}``; it reports the status, the
request's wall time and the server process's peak RSS (VmHWM from /proc, read before it stops).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch
import torch.nn.functional as F
from ldmkit import api
from ldmkit.models import vae as V
from ldmkit.vae_tiling import tiled_decode
size, mode, threads = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
torch.set_num_threads(threads)
if mode == "old":  # the attention as it was: q, k, v as transposed views -> SDPA's math path
    def old_forward(self, x):
        b, c, h, w = x.shape
        hn = self.norm(x)
        q, k, v = (t(hn).flatten(2).transpose(1, 2).unsqueeze(1) for t in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(out.squeeze(1).transpose(1, 2).reshape(b, c, h, w))
    V.AttnBlock.forward = old_forward
vae = api.load("emoji").model.vae
z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
t0 = time.perf_counter()
with torch.inference_mode():
    x = tiled_decode(vae, z) if mode == "tiled" else vae.decode(z)
dt = time.perf_counter() - t0
torch.save(x, sys.argv[4]) if len(sys.argv) > 4 else None
print(json.dumps({"size": size, "mode": mode, "seconds": dt,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def serve_once(size: int, threads: int) -> None:
    """One txt2img request of ``size``^2 against a fresh ``ldmkit serve``; prints status, time and peak RSS."""
    import os
    import socket
    import time
    import urllib.error
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "ldmkit", "serve", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"{url}/sdapi/v1/options", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        body = json.dumps({"prompt": "a red apple", "width": size, "height": size, "steps": 1, "seed": 1}).encode()
        req = urllib.request.Request(f"{url}/sdapi/v1/txt2img", body, {"Content-Type": "application/json"})
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=3600) as r:
                status, detail = r.status, f"{len(json.load(r)['images'])} image"
        except urllib.error.HTTPError as e:
            status, detail = e.code, e.read().decode()[:200]
        dt = time.perf_counter() - t0
        hwm = next(int(line.split()[1]) for line in open(f"/proc/{proc.pid}/status") if line.startswith("VmHWM"))
        print(f"| server txt2img {size}² steps 1 | HTTP {status} ({detail}) | {dt:.0f} s | "
              f"peak RSS {hwm / 2**20:.2f} GiB |", flush=True)
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--modes", nargs="+", default=["untiled", "tiled", "old"], choices=["tiled", "untiled", "old"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--old-max", type=int, default=1024, help="largest size to run the old untiled decoder at")
    ap.add_argument("--server", type=int, default=None, metavar="SIZE",
                    help="instead: one SIZE^2 txt2img request to a fresh `ldmkit serve`, its peak RSS")
    args = ap.parse_args()
    if args.server:
        serve_once(args.server, args.threads)
        return
    print(f"# {platform.processor() or platform.machine()}, torch threads {args.threads}")
    print("| size | decode | time (s) | peak RSS (GiB) | max abs diff vs untiled |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        outs = {}
        for mode in args.modes:
            if mode == "old" and size > args.old_max:
                print(f"| {size}² | old untiled | skipped (~23 GiB at 2048², issue 15) | | |")
                continue
            path = f"/tmp/bench_tiling_{os.getpid()}_{size}_{mode}.pt"
            r = subprocess.run([sys.executable, "-c", CHILD, str(size), mode, str(args.threads), path],
                               capture_output=True, text=True)
            if r.returncode:
                print(f"| {size}² | {mode} | failed: {r.stderr.strip().splitlines()[-1:]} | | |")
                continue
            row = json.loads(r.stdout.strip().splitlines()[-1])
            import torch

            outs[mode] = torch.load(path)
            os.remove(path)
            diff = ""
            if mode != "untiled" and "untiled" in outs:
                diff = f"{(outs[mode] - outs['untiled']).abs().max().item():.1e}"
            elif mode == "untiled":
                diff = "-"
            print(f"| {size}² | {mode} | {row['seconds']:.1f} | {row['peak_rss_gib']:.2f} | {diff} |", flush=True)


if __name__ == "__main__":
    main()
