"""Issue 12 benchmarks (a) and (b): the fast path against diffusers, same weights, same run.

    python bench/bench_fast.py                  # random SD1.5 + random TAESD at 512²: (a) and (b)
    python bench/bench_fast.py --only a         # only the same-recipe comparison
    python bench/bench_fast.py --quick          # the built-in emoji model at 64²: a smoke run

(a) ldmkit's fast path, LCM 4 steps, guidance 1, tiny autoencoder (TAESD) as decoder, against
    diffusers' same recipe (StableDiffusionPipeline + LCMScheduler, guidance_scale 1,
    vae=AutoencoderTiny): target ratio <= 1.0.
(b) the same ldmkit path against diffusers' usual recipe (DPMSolverMultistepScheduler with Karras
    sigmas = DPM++ 2M Karras, 20 steps, CFG 7, the full KL VAE): target >= 5x faster.

Both models are random (speed does not depend on the values): the SD1.5 folder that
bench_inference.py writes, and a diffusers ``AutoencoderTiny()`` after ``torch.manual_seed(0)``
saved as a folder, read by both libraries. Each generation runs in a fresh worker process that
loads one library, pages the weights in with a one-step generation at 64² (not timed), then
generates once at the benchmark size; the workers alternate libraries (ABBA over --runs).
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
from bench_inference import DEFAULT_CACHE, RESULT_TAG, ensure_weights, machine, peak_rss_bytes  # noqa: E402
from bench_inference import run_worker as _run_worker  # noqa: E402

PROMPT, SEED = "a photograph of an astronaut riding a horse", 1234
RECIPES = {
    "ldmkit-fast": "ldmkit, LCM 4 steps, CFG 1, tiny decoder",
    "diffusers-fast": "diffusers, LCMScheduler 4 steps, guidance 1, AutoencoderTiny",
    "diffusers-usual": "diffusers, DPM++ 2M Karras 20 steps, CFG 7, full VAE",
}


def ensure_taesd(cache: Path) -> Path:
    """A random diffusers AutoencoderTiny folder (the published TAESD's configuration)."""
    folder = cache / "taesd-seed0"
    if not (folder / "config.json").exists():
        from diffusers import AutoencoderTiny

        torch.manual_seed(0)
        AutoencoderTiny().save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- worker (one library per process)


def work_generate(spec: dict[str, Any]) -> dict[str, Any]:
    recipe, size = spec["recipe"], spec["size"]
    t0 = time.perf_counter()
    if recipe == "ldmkit-fast":
        import ldmkit

        import_s = time.perf_counter() - t0
        pipe = ldmkit.load(spec["model"], vae=spec["taesd"])
        load_s = time.perf_counter() - t0

        def generate(steps: int, px: int):
            return pipe.txt2img(PROMPT, sampler="LCM", steps=steps, cfg_scale=1.0, seed=SEED, width=px,
                                height=px)[0]
    else:
        from diffusers import AutoencoderTiny, DPMSolverMultistepScheduler, LCMScheduler, StableDiffusionPipeline

        import_s = time.perf_counter() - t0

        kw: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False}
        if recipe == "diffusers-fast":
            kw["vae"] = AutoencoderTiny.from_pretrained(spec["taesd"])
        pipe = StableDiffusionPipeline.from_pretrained(spec["model"], **kw)
        if recipe == "diffusers-fast":
            pipe.scheduler, guidance = LCMScheduler.from_config(pipe.scheduler.config), 1.0
        else:
            pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
            guidance = 7.0
        pipe.set_progress_bar_config(disable=True)
        load_s = time.perf_counter() - t0

        def generate(steps: int, px: int):
            return pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, height=px, width=px,
                        generator=torch.Generator().manual_seed(SEED)).images[0]
    steps = spec["steps"]
    with torch.inference_mode():
        t0 = time.perf_counter()
        generate(1 if recipe != "diffusers-usual" else 2, spec["warm_size"])  # pages the weights in
        warm_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        image = generate(steps, size)
        gen_s = time.perf_counter() - t0
    image.save(spec["image"])
    return {"import_s": import_s, "load_s": load_s - import_s, "warm_s": warm_s, "gen_s": gen_s,
            "rss_peak": peak_rss_bytes()}


def worker_main(spec: dict[str, Any]) -> None:
    torch.set_num_threads(spec.get("threads") or 1)
    print(RESULT_TAG + json.dumps(work_generate(spec)), flush=True)


# ---------------------------------------------------------------- parent


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    return _run_worker(spec, script=__file__)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the built-in emoji model at 64²: a smoke run")
    ap.add_argument("--size", type=int, default=None, help="width = height (default 512; quick: 64)")
    ap.add_argument("--runs", type=int, default=1, help="fresh-process generations per recipe (ABBA order)")
    ap.add_argument("--only", action="append", choices=["a", "b"], help="run only this comparison (repeatable)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in the workers")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the random weights are written")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(json.loads(args.worker))

    only = set(args.only or ["a", "b"])
    if args.quick:
        folder = args.cache / "emoji-diffusers"
        if not (folder / "model_index.json").exists():
            from ldmkit import api, checkpoint

            checkpoint.save_diffusers(api.load(None).model, folder)
        size = args.size or 64
    else:
        folder = ensure_weights("sd15", args.cache)
        size = args.size or 512
    taesd = ensure_taesd(args.cache)
    common = {"model": str(folder), "taesd": str(taesd), "size": size, "warm_size": 64, "threads": args.threads}
    recipes = ["ldmkit-fast"] + (["diffusers-fast"] if "a" in only else []) + (
        ["diffusers-usual"] if "b" in only else [])
    steps = {"ldmkit-fast": 4, "diffusers-fast": 4, "diffusers-usual": 20}
    runs: dict[str, list[dict[str, Any]]] = {r: [] for r in recipes}
    for i in range(args.runs):
        for recipe in recipes if i % 2 == 0 else recipes[::-1]:
            image = args.cache / f"fast-{recipe}.png"
            r = run_worker({**common, "kind": "generate", "recipe": recipe, "steps": steps[recipe],
                            "image": str(image)})
            print(f"{recipe}: generate {r['gen_s']:.2f} s, load {r['load_s']:.2f} s, warm-up {r['warm_s']:.2f} s, "
                  f"load avg {r['loadavg_before']:.2f}", file=sys.stderr, flush=True)
            runs[recipe].append(r)

    def med(recipe: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[recipe])

    import numpy as np
    from PIL import Image

    cmd = "python bench/bench_fast.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    what = "built-in emoji model" if args.quick else "random SD1.5 + random TAESD"
    print(f"\n`{cmd}`  ({what}, {size}², fp32, {args.threads} thread(s), "
          f"medians of {args.runs} fresh-process run(s))\n")
    print("| recipe | generate (excl. load) | import | load | peak RSS | ldmkit fast path / this |")
    print("|---|--:|--:|--:|--:|--:|")
    ours = med("ldmkit-fast", "gen_s")
    for recipe in recipes:
        g = med(recipe, "gen_s")
        print(f"| {RECIPES[recipe]} | {g:.2f} s | {med(recipe, 'import_s'):.2f} s | {med(recipe, 'load_s'):.2f} s | "
              f"{med(recipe, 'rss_peak') / 2**20:.0f} MiB | {ours / g:.2f} |")
    print()
    if "a" in only:
        a, b = (np.asarray(Image.open(args.cache / f"fast-{r}.png"), dtype=np.int16)
                for r in ("ldmkit-fast", "diffusers-fast"))
        print(f"- (a) ldmkit / diffusers, same recipe: {ours / med('diffusers-fast', 'gen_s'):.2f}x time "
              f"(target <= 1.0); max pixel difference of the two images {np.abs(a - b).max()}/255")
    if "b" in only:
        print(f"- (b) diffusers' usual recipe / ldmkit fast path: {med('diffusers-usual', 'gen_s') / ours:.1f}x "
              "faster (target >= 5)")
    load = statistics.mean(r["loadavg_before"] for rs in runs.values() for r in rs)
    print(f"- mean 1-minute load average before the workers: {load:.2f}")
    print(f"- machine: {machine()}")


if __name__ == "__main__":
    main()
