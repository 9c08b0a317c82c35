"""Issue 12 part 4: DeepCache's speed-up of a whole txt2img, against the same txt2img without it, in one run.

    python bench/bench_deepcache.py                          # SD1.5 (random weights), 512², 20 steps, N = 3
    python bench/bench_deepcache.py --size 256 --steps 10    # shorter
    python bench/bench_deepcache.py --quick                  # tiny model: a smoke run in seconds
    python bench/bench_deepcache.py --diffusers              # also diffusers' plain txt2img, same recipe
    python bench/bench_deepcache.py --model emoji --repeats 5   # the built-in model at its native 64²

The recipe is the issue's: CFG 7, Euler (uniform schedule, = diffusers' EulerDiscreteScheduler with
linspace spacing), one image. One worker process loads ldmkit's model once, pages the weights in with a
1-step generation, then times the full txt2img (text encoding, sampling, VAE decode) with and without
DeepCache, alternating (ABBA) over ``--repeats``; it also times single U-Net calls (full and shallow).
Ratio = without / with: above 1 means DeepCache is faster. With ``--diffusers``, bench_inference.py's
pipeline worker times diffusers' own txt2img of the same recipe in a separate process.

The weights are random (bench_inference.py writes them once into ``--cache``), so the images say
nothing about quality; bench/eval_emoji.py --deepcache N measures that on the built-in model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_inference as BI  # noqa: E402

INFERENCE_SCRIPT = str(Path(__file__).resolve().parent / "bench_inference.py")


def work_ldmkit(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    from ldmkit import checkpoint
    from ldmkit import pipeline as P
    from ldmkit.deepcache import DeepCacheUNet

    model = checkpoint.load(spec["folder"])  # the random weights' diffusers folder or a --model file
    size, steps, n, branch = spec["size"], spec["steps"], spec["interval"], spec["branch"]

    def params(deepcache: int, k: int = steps) -> P.GenerationParams:
        return P.GenerationParams(BI.PROMPT, negative_prompt=BI.NEGATIVE, steps=k, cfg_scale=BI.CFG_SCALE,
                                  sampler="Euler", scheduler="uniform", seed=BI.SEED, width=size, height=size,
                                  deepcache=deepcache, deepcache_branch=branch)

    t0 = time.perf_counter()
    P.txt2img(model, params(1, 1))  # pages the mmapped weights in; kernels set up at these shapes
    warmup_s = time.perf_counter() - t0
    images: dict[str, Any] = {}

    def run(name: str, deepcache: int) -> None:
        images[name] = P.txt2img(model, params(deepcache))[0]

    times = BI.alternate({"plain": lambda: run("plain", 1), "deepcache": lambda: run("deepcache", n)},
                      spec["repeats"], 0)
    # one U-Net call of the CFG batch: full, and the shallow branch on the cached feature
    f = model.cfg.vae.downscale
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, model.cfg.unet.in_channels, size // f, size // f, generator=g)
    ctx = torch.randn(2, 77, model.cfg.unet.context_dim, generator=g)
    t = torch.tensor([500.0, 500.0])
    net = DeepCacheUNet(model.unet, interval=10**9, branch=branch)  # call 0 full, the rest shallow
    calls: list[float] = []
    with torch.inference_mode():
        for _ in range(1 + spec["call_repeats"]):
            t0 = time.perf_counter()
            net(x, t, ctx)
            calls.append(time.perf_counter() - t0)
    a, b = (np.asarray(images[k], dtype=np.int16) for k in ("plain", "deepcache"))
    images["plain"].save(spec["image_prefix"] + "-plain.png")
    images["deepcache"].save(spec["image_prefix"] + f"-deepcache{n}.png")
    return {"warmup_s": warmup_s, "times": times, "full_call_s": calls[0], "shallow_call_s": calls[1:],
            "mean_abs_diff": float(np.abs(a - b).mean()), "infotext": images["deepcache"].info["parameters"]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, 32², 6 steps: a smoke run")
    ap.add_argument("--size", type=int, default=None, help="width = height (default 512; quick: 32)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default 20; quick: 6)")
    ap.add_argument("--deepcache", type=int, default=3, help="DeepCache interval N (default 3)")
    ap.add_argument("--branch", type=int, default=0, help="DeepCache branch (default 0)")
    ap.add_argument("--repeats", type=int, default=1, help="timed txt2img runs of each kind, ABBA order")
    ap.add_argument("--call-repeats", type=int, default=3, help="timed shallow U-Net calls")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in the workers (default 1)")
    ap.add_argument("--diffusers", action="store_true", help="also time diffusers' plain txt2img (another process)")
    ap.add_argument("--cache", type=Path, default=BI.DEFAULT_CACHE, help="where the random weights are written")
    ap.add_argument("--model", default=None,
                    help="a model file or built-in name (emoji) instead of the random weights; --size defaults to "
                         "its native size")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        torch.set_num_threads(spec["threads"])
        print(BI.RESULT_TAG + json.dumps(work_ldmkit(spec)), flush=True)
        return

    config = "tiny" if args.quick else "sd15"
    size = args.size or (32 if args.quick else 512)
    steps = args.steps or (6 if args.quick else 20)
    torch.set_num_threads(args.threads)
    if args.model and args.diffusers:
        sys.exit("--diffusers times diffusers on the random SD1.5 weights; leave out --model")
    if args.model:
        from ldmkit import api, checkpoint

        config, folder = args.model, api.resolve_model_path(args.model)
        size = args.size or checkpoint.load(folder).cfg.native_size
    else:
        folder = BI.ensure_weights(config, args.cache)
    common = {"folder": str(folder), "size": size, "steps": steps, "threads": args.threads}
    r = BI.run_worker({**common, "kind": "ldmkit", "interval": args.deepcache, "branch": args.branch,
                    "repeats": args.repeats, "call_repeats": args.call_repeats,
                    "image_prefix": str(args.cache / "deepcache")}, script=__file__)
    plain, cached = statistics.median(r["times"]["plain"]), statistics.median(r["times"]["deepcache"])
    shallow = statistics.median(r["shallow_call_s"])
    rows = [
        ("txt2img without DeepCache (wall, excl. load)", f"{plain:.2f} s", ""),
        (f"txt2img with DeepCache N = {args.deepcache}, branch {args.branch}", f"{cached:.2f} s",
         f"**{plain / cached:.2f}x faster**"),
        ("U-Net call, CFG batch 2: full", f"{r['full_call_s']:.3f} s", ""),
        (f"U-Net call, CFG batch 2: shallow branch {args.branch} on the cache", f"{shallow:.3f} s",
         f"{shallow / r['full_call_s']:.3f} of a full call"),
    ]
    if args.diffusers:
        d = BI.run_worker({**common, "kind": "pipeline", "impl": "diffusers", "channels_last": "off",
                        "image": str(args.cache / "deepcache-diffusers.png")}, script=INFERENCE_SCRIPT)
        rows.append(("diffusers txt2img, same recipe, no caching (wall, excl. load)", f"{d['gen_s']:.2f} s",
                     f"ldmkit+DeepCache {d['gen_s'] / cached:.2f}x faster"))
    cmd = "python bench/bench_deepcache.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    weights = config if args.model else f"random {config}"
    print(f"\n`{cmd}`  (weights: {weights}, fp32; {size}², {steps} steps Euler, CFG {BI.CFG_SCALE:g}, "
          f"threads {args.threads}; load avg before {r['loadavg_before']:.2f})\n")
    print("| what | time | ratio |\n|---|--:|--:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nmachine: {BI.machine()}\n")
    n_full = len(range(0, steps, args.deepcache))
    print(f"- U-Net calls: {steps} plain; with DeepCache {n_full} full + {steps - n_full} shallow")
    print(f"- raw: plain {BI.fmt_times(r['times']['plain'])} s, DeepCache {BI.fmt_times(r['times']['deepcache'])} s, "
          f"shallow calls {BI.fmt_times(r['shallow_call_s'])} s, warm-up (1 step) {r['warmup_s']:.1f} s")
    what = "images" if args.model else "images (random weights)"
    print(f"- {what}: mean |pixel difference| {r['mean_abs_diff']:.1f}/255; infotext: "
          f"{r['infotext'].splitlines()[-1]}")


if __name__ == "__main__":
    main()
