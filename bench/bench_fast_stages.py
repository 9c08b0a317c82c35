"""Issue 12 benchmark (a) stage by stage: where ldmkit's and diffusers' fast path spend their time.

    python bench/bench_fast_stages.py                 # random SD1.5 + random TAESD, 512², 2 runs per library
    python bench/bench_fast_stages.py --size 256 --runs 4
    python bench/bench_fast_stages.py --quick         # the built-in emoji model at 64²: a smoke run

Both libraries are loaded in ONE process (same weights: the random SD1.5 folder that bench_inference.py
writes and the random TAESD of bench_fast.py), so they share the machine's state, thread count and load;
after an untimed 64² generation each (pages the weights in), they generate in alternating order (ABBA).
The recipe is benchmark (a)'s: LCM 4 steps, guidance 1, the tiny autoencoder as decoder. Each stage is
timed by wrapping the module or function that does it (wall time and this process's CPU time):
text encoder, each U-Net call, the decoder, and the rest of the generation (scheduler, noise, image
conversion). Peak memory is about both models together (~9 GB at SD1.5 size): run it under the lock.
"""

from __future__ import annotations

import argparse
import collections
import functools
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fast import PROMPT, SEED, ensure_taesd  # noqa: E402
from bench_inference import DEFAULT_CACHE, ensure_weights, machine  # noqa: E402

STAGES = ("text encoder", "U-Net", "decoder")


class Clock:
    """Wall and CPU seconds per (library, stage), accumulated over calls."""

    def __init__(self) -> None:
        self.acc: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0])

    def wrap(self, lib: str, stage: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def timed(*a: Any, **k: Any) -> Any:
            c0, t0 = time.process_time(), time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                s = self.acc[lib, stage]
                s[0] += time.perf_counter() - t0
                s[1] += time.process_time() - c0
                s[2] += 1

        return timed

    def snapshot(self) -> dict[tuple[str, str], tuple[float, float, int]]:
        return {k: (v[0], v[1], int(v[2])) for k, v in self.acc.items()}


def load_ldmkit(model: str, taesd: str, clock: Clock):
    import ldmkit

    pipe = ldmkit.load(model, vae=taesd)
    m = pipe.model
    m.text_encoder.forward = clock.wrap("ldmkit", "text encoder", m.text_encoder.forward)
    m.unet.forward = clock.wrap("ldmkit", "U-Net", m.unet.forward)
    m.vae.decode = clock.wrap("ldmkit", "decoder", m.vae.decode)
    return lambda px: pipe.txt2img(PROMPT, sampler="LCM", steps=4, cfg_scale=1.0, seed=SEED, width=px, height=px)[0]


def load_diffusers(model: str, taesd: str, clock: Clock):
    from diffusers import AutoencoderTiny, LCMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, vae=AutoencoderTiny.from_pretrained(taesd),
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.text_encoder.forward = clock.wrap("diffusers", "text encoder", pipe.text_encoder.forward)
    pipe.unet.forward = clock.wrap("diffusers", "U-Net", pipe.unet.forward)
    pipe.vae.decode = clock.wrap("diffusers", "decoder", pipe.vae.decode)
    return lambda px: pipe(PROMPT, num_inference_steps=4, guidance_scale=1.0, height=px, width=px,
                           generator=torch.Generator().manual_seed(SEED)).images[0]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=None, help="width = height (default 512; quick: 64)")
    ap.add_argument("--runs", type=int, default=2, help="timed generations per library (ABBA order)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="the built-in emoji model at 64²: a smoke run")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        folder = args.cache / "emoji-diffusers"
        if not (folder / "model_index.json").exists():
            from ldmkit import api, checkpoint

            checkpoint.save_diffusers(api.load(None).model, folder)
    else:
        folder = ensure_weights("sd15", args.cache)
    size = args.size or (64 if args.quick else 512)
    taesd = str(ensure_taesd(args.cache))
    clock = Clock()
    gens = {"ldmkit": load_ldmkit(str(folder), taesd, clock), "diffusers": load_diffusers(str(folder), taesd, clock)}
    with torch.inference_mode():
        for g in gens.values():
            g(64)  # pages the weights in; not timed
    clock.acc.clear()
    per_run: dict[str, list[dict[str, tuple[float, float]]]] = {k: [] for k in gens}
    for i in range(args.runs):
        for lib in list(gens) if i % 2 == 0 else list(gens)[::-1]:
            before = clock.snapshot()
            c0, t0 = time.process_time(), time.perf_counter()
            with torch.inference_mode():
                gens[lib](size)
            total = (time.perf_counter() - t0, time.process_time() - c0)
            after = clock.snapshot()
            row = {"total": total}
            for stage in STAGES:
                a, b = after.get((lib, stage), (0.0, 0.0, 0)), before.get((lib, stage), (0.0, 0.0, 0))
                row[stage] = (a[0] - b[0], a[1] - b[1])
                row[stage + " calls"] = (a[2] - b[2], a[2] - b[2])
            row["rest"] = tuple(total[j] - sum(row[s][j] for s in STAGES) for j in (0, 1))
            per_run[lib].append(row)
            print(f"{lib} run {len(per_run[lib])}: wall {total[0]:.2f} s, CPU {total[1]:.2f} s, "
                  + ", ".join(f"{s} CPU {row[s][1]:.3f} s" for s in (*STAGES, "rest")), file=sys.stderr, flush=True)

    def med(lib: str, stage: str, j: int) -> float:
        return statistics.median(r[stage][j] for r in per_run[lib])

    cmd = "python bench/bench_fast_stages.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    what = "built-in emoji model" if args.quick else "random SD1.5 + random TAESD"
    print(f"\n`{cmd}`  ({what}, {size}², LCM 4 steps, guidance 1, tiny decoder, fp32, {args.threads} thread(s), "
          f"both libraries in one process, medians of {args.runs} run(s) each, ABBA)\n")
    print("| stage | calls | ldmkit wall | ldmkit CPU | diffusers wall | diffusers CPU | ratio wall | ratio CPU |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|")
    for stage in (*STAGES, "rest", "total"):
        calls = f"{med('ldmkit', stage + ' calls', 0):.0f} / {med('diffusers', stage + ' calls', 0):.0f}" \
            if stage in STAGES else ""
        lw, lc, dw, dc = (med(lib, stage, j) for lib in ("ldmkit", "diffusers") for j in (0, 1))
        bold = "**" if stage == "total" else ""
        print(f"| {bold}{stage}{bold} | {calls} | {lw:.3f} s | {lc:.3f} s | {dw:.3f} s | {dc:.3f} s | "
              f"{bold}{lw / dw:.2f}{bold} | {bold}{lc / dc:.2f}{bold} |")
    for lib, rows in per_run.items():
        walls, cpus = ([round(r["total"][j], 2) for r in rows] for j in (0, 1))
        print(f"- {lib}: wall {walls} s, CPU {cpus} s")
    print(f"- machine: {machine()}")


if __name__ == "__main__":
    main()
