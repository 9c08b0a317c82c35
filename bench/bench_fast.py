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

On a shared machine the wall time carries other processes' load, so the CPU time of the
generation (``time.process_time``; one thread) is reported beside it. diffusers' usual recipe at
512² is 20 CFG steps of the full U-Net (over 11 minutes on one idle core, far more when the core
is shared): ``--usual-budget S`` stops that worker after S seconds of generating and reports what
it had spent by then, a lower bound, which is enough to show (b) when the bound already exceeds 5x.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import DEFAULT_CACHE, RESULT_TAG, ensure_weights, machine, peak_rss_bytes  # noqa: E402

PROMPT, SEED = "a photograph of an astronaut riding a horse", 1234
GEN_TAG = "BENCH_GENERATING "  # printed by a worker when its timed generation starts
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
        print(GEN_TAG + json.dumps({"cpu_s": time.process_time()}), flush=True)
        c0, t0 = time.process_time(), time.perf_counter()
        image = generate(steps, size)
        gen_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    image.save(spec["image"])
    return {"import_s": import_s, "load_s": load_s - import_s, "warm_s": warm_s, "gen_s": gen_s, "cpu_s": cpu_s,
            "rss_peak": peak_rss_bytes(), "complete": True}


def worker_main(spec: dict[str, Any]) -> None:
    torch.set_num_threads(spec.get("threads") or 1)
    print(RESULT_TAG + json.dumps(work_generate(spec)), flush=True)


# ---------------------------------------------------------------- parent


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_worker(spec: dict[str, Any], budget: float | None = None) -> dict[str, Any]:
    """One worker process; with ``budget``, stopped after that many seconds of generating, and what it had
    spent by then returned as a lower bound (``complete`` False)."""
    load = os.getloadavg()[0]
    proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    result: dict[str, Any] | None = None
    started: tuple[float, float] | None = None  # (wall, worker CPU seconds) when the timed generation began
    buf = b""
    while True:
        if select.select([fd], [], [], 0.5)[0]:
            chunk = os.read(fd, 1 << 16)
            if not chunk:  # the worker closed its stdout: it has exited
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for ln in (x.decode() for x in lines):
                if ln.startswith(GEN_TAG):
                    started = (time.perf_counter(), json.loads(ln[len(GEN_TAG):])["cpu_s"])
                elif ln.startswith(RESULT_TAG):
                    result = json.loads(ln[len(RESULT_TAG):])
        if budget is not None and started is not None and time.perf_counter() - started[0] > budget:
            cpu = _cpu_seconds(proc.pid) - started[1]
            proc.kill()
            result = {"gen_s": time.perf_counter() - started[0], "cpu_s": cpu, "complete": False,
                      "import_s": float("nan"), "load_s": float("nan"), "warm_s": float("nan"),
                      "rss_peak": float("nan")}
            break
    proc.wait()
    if result is None or (result["complete"] and proc.returncode != 0):
        sys.exit(f"worker {spec['recipe']} failed (exit code {proc.returncode}); its error is printed above")
    result["loadavg_before"] = load
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the built-in emoji model at 64²: a smoke run")
    ap.add_argument("--size", type=int, default=None, help="width = height (default 512; quick: 64)")
    ap.add_argument("--runs", type=int, default=1, help="fresh-process generations per recipe (ABBA order)")
    ap.add_argument("--only", action="append", choices=["a", "b"], help="run only this comparison (repeatable)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in the workers")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the random weights are written")
    ap.add_argument("--usual-budget", type=float, default=None,
                    help="stop diffusers' usual recipe after this many seconds of generating; report a lower bound")
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
                            "image": str(image)}, budget=args.usual_budget if recipe == "diffusers-usual" else None)
            print(f"{recipe}: generate {r['gen_s']:.2f} s{'' if r['complete'] else ' (stopped: at least)'}, "
                  f"CPU {r['cpu_s']:.2f} s, load {r['load_s']:.2f} s, warm-up {r['warm_s']:.2f} s, "
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
    def bound(recipe: str) -> str:  # a stopped run's time is a lower bound
        return "" if all(r["complete"] for r in runs[recipe]) else "≥ "

    print("| recipe | generate, wall (excl. load) | generate, CPU | import | load | peak RSS | ldmkit fast path / "
          "this (wall) | (CPU) |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|")
    ours, ours_cpu = med("ldmkit-fast", "gen_s"), med("ldmkit-fast", "cpu_s")
    for recipe in recipes:
        g, c, b = med(recipe, "gen_s"), med(recipe, "cpu_s"), bound(recipe)
        print(f"| {RECIPES[recipe]} | {b}{g:.2f} s | {b}{c:.2f} s | {med(recipe, 'import_s'):.2f} s | "
              f"{med(recipe, 'load_s'):.2f} s | {med(recipe, 'rss_peak') / 2**20:.0f} MiB | "
              f"{'≤ ' if b else ''}{ours / g:.2f} | {'≤ ' if b else ''}{ours_cpu / c:.2f} |")
    print()
    for recipe in recipes:
        print(f"- {recipe}: wall {[round(r['gen_s'], 2) for r in runs[recipe]]} s, "
              f"CPU {[round(r['cpu_s'], 2) for r in runs[recipe]]} s, "
              f"load avg {[round(r['loadavg_before'], 2) for r in runs[recipe]]}")
    if "a" in only:
        a, b = (np.asarray(Image.open(args.cache / f"fast-{r}.png"), dtype=np.int16)
                for r in ("ldmkit-fast", "diffusers-fast"))
        print(f"- (a) ldmkit / diffusers, same recipe: {ours / med('diffusers-fast', 'gen_s'):.2f}x wall time, "
              f"{ours_cpu / med('diffusers-fast', 'cpu_s'):.2f}x CPU time (target <= 1.0); "
              f"max pixel difference of the two images {np.abs(a - b).max()}/255 (LCM adds fresh noise each step, "
              "which ldmkit draws from its own seed+1 generator and diffusers from the continued initial one, so "
              "the images need not match; sampler parity with the same noise: tests/test_fewstep.py)")
    if "b" in only:
        b = bound("diffusers-usual")
        print(f"- (b) diffusers' usual recipe / ldmkit fast path: {b}{med('diffusers-usual', 'gen_s') / ours:.1f}x "
              f"faster in wall time, {b}{med('diffusers-usual', 'cpu_s') / ours_cpu:.1f}x in CPU time (target >= 5)"
              + (" (diffusers' run stopped by --usual-budget: lower bounds)" if b else ""))
    load = statistics.mean(r["loadavg_before"] for rs in runs.values() for r in rs)
    print(f"- mean 1-minute load average before the workers: {load:.2f}")
    print(f"- machine: {machine()}")


if __name__ == "__main__":
    main()
