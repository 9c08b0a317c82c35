"""Inference speed and memory: ldmkit against diffusers on the same random SD1.5 weights, in one run.

    python bench/bench_inference.py                  # U-Net step, VAE decode, txt2img 256² x 10 steps
    python bench/bench_inference.py --size 512       # txt2img at 512²
    python bench/bench_inference.py --quick          # tiny model: a smoke run of every path in ~1 minute
    python bench/bench_inference.py --only unet --repeats 9

Every ratio is ldmkit / diffusers: below 1 means ldmkit is faster or smaller. The weights are
random (``StableDiffusion(SD15)`` after ``torch.manual_seed(0)``), written once as a diffusers
folder into ``--cache`` and loaded from there by both libraries, so both run the same numbers
(checked: the U-Nets' relative error and the txt2img images' pixel difference are printed).

Each measurement runs in a fresh worker process (this file, ``--worker``), so one library's
allocations never count against the other and the parent stays small. Speed repeats alternate
ldmkit/diffusers (ABBA order) inside one worker so that drift in machine load hits both alike.
Peak memory is ``ru_maxrss`` of a worker that only imports, loads and generates with one library.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULT_TAG = "BENCH_RESULT "
DEFAULT_CACHE = Path(__file__).resolve().parent / ".cache"
PROMPT, NEGATIVE, SEED, CFG_SCALE = "a photograph of an astronaut riding a horse", "blurry, low quality", 1234, 7.0


# ---------------------------------------------------------------- helpers (both sides of the process boundary)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, the measure tests/ states parity targets in."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def alternate(fns: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Wall times of ``repeats`` calls of each function, in ABBA order after ``warmup`` untimed calls each."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


# ---------------------------------------------------------------- workers (each runs in its own process)


def work_weights(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the random model and write it as a diffusers folder."""
    from ldmkit import checkpoint
    from ldmkit.config import PRESETS
    from ldmkit.model import StableDiffusion

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = StableDiffusion(PRESETS[spec["config"]]).eval()
    checkpoint.save_diffusers(model, spec["folder"])
    return {"seconds": time.perf_counter() - t0}


def _load_ldmkit(folder: str):
    from ldmkit import checkpoint

    return checkpoint.load(folder)


def work_unet(spec: dict[str, Any]) -> dict[str, Any]:
    """One U-Net call on a CFG batch (uncond + cond = 2) per latent size, both libraries, same inputs."""
    from diffusers import UNet2DConditionModel

    model = _load_ldmkit(spec["folder"])
    f, ctx_dim, ours = model.cfg.vae.downscale, model.cfg.unet.context_dim, model.unet
    del model  # the VAE and text encoder are not needed here
    theirs = UNet2DConditionModel.from_pretrained(spec["folder"], subfolder="unet").eval()
    cl_ours, cl_theirs = spec["channels_last"] in ("ldmkit", "both"), spec["channels_last"] == "both"
    if cl_ours:
        ours = ours.to(memory_format=torch.channels_last)
    if cl_theirs:
        theirs = theirs.to(memory_format=torch.channels_last)
    out = []
    for size in spec["sizes"]:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 4, size // f, size // f, generator=g)
        ctx = torch.randn(2, 77, ctx_dim, generator=g)
        t = torch.full((2,), 499.5)  # samplers feed fractional timesteps
        xo = x.contiguous(memory_format=torch.channels_last) if cl_ours else x
        xt = x.contiguous(memory_format=torch.channels_last) if cl_theirs else x
        with torch.inference_mode():
            # the parity check is also the warm-up call (oneDNN sets up its kernels on first use of a shape)
            err = rel_err(ours(xo, t, ctx), theirs(xt, t, encoder_hidden_states=ctx).sample)
            times = alternate({
                "ldmkit": lambda: ours(xo, t, ctx),  # noqa: B023 - called before the loop moves on
                "diffusers": lambda: theirs(xt, t, encoder_hidden_states=ctx, return_dict=False),  # noqa: B023
            }, spec["repeats"], spec["warmup"])
        out.append({"size": size, "rel_err": err, "times": times})
    return {"sizes": out}


def work_vae(spec: dict[str, Any]) -> dict[str, Any]:
    """Decoding one latent to pixels, both libraries, same latent."""
    from diffusers import AutoencoderKL

    model = _load_ldmkit(spec["folder"])
    f, ours = model.cfg.vae.downscale, model.vae
    del model
    theirs = AutoencoderKL.from_pretrained(spec["folder"], subfolder="vae").eval()
    size = spec["size"]
    z = torch.randn(1, 4, size // f, size // f, generator=torch.Generator().manual_seed(0)) / 0.18215
    zo, zt = z, z
    if spec["channels_last"] in ("ldmkit", "both"):
        ours, zo = ours.to(memory_format=torch.channels_last), z.contiguous(memory_format=torch.channels_last)
    if spec["channels_last"] == "both":
        theirs, zt = theirs.to(memory_format=torch.channels_last), z.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        err = rel_err(ours.decode(zo), theirs.decode(zt).sample)
        times = alternate({
            "ldmkit": lambda: ours.decode(zo),
            "diffusers": lambda: theirs.decode(zt, return_dict=False),
        }, spec["repeats"], spec["warmup"])
    return {"size": size, "rel_err": err, "times": times}


def work_pipeline(spec: dict[str, Any]) -> dict[str, Any]:
    """Load + one txt2img with ONE library (the other is never imported); peak RSS of this process."""
    size, steps, impl = spec["size"], spec["steps"], spec["impl"]
    t0 = time.perf_counter()
    if impl == "ldmkit":
        from ldmkit.pipeline import GenerationParams, txt2img

        import_s = time.perf_counter() - t0
        rss_import = peak_rss_bytes()
        t0 = time.perf_counter()
        model = _load_ldmkit(spec["folder"])
        load_s = time.perf_counter() - t0
        if spec["channels_last"] in ("ldmkit", "both"):
            model.unet.to(memory_format=torch.channels_last)
            model.vae.to(memory_format=torch.channels_last)

        def generate(n: int):
            # "Euler" with the uniform schedule == diffusers EulerDiscreteScheduler(timestep_spacing="linspace")
            params = GenerationParams(PROMPT, negative_prompt=NEGATIVE, steps=n, cfg_scale=CFG_SCALE, sampler="Euler",
                                      scheduler="uniform", seed=SEED, width=size, height=size)
            return txt2img(model, params)[0]
    else:
        from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

        import_s = time.perf_counter() - t0
        rss_import = peak_rss_bytes()
        t0 = time.perf_counter()
        pipe = StableDiffusionPipeline.from_pretrained(spec["folder"], safety_checker=None,
                                                       requires_safety_checker=False)
        load_s = time.perf_counter() - t0
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
        pipe.set_progress_bar_config(disable=True)
        if spec["channels_last"] == "both":
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)

        def generate(n: int):
            return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=n, guidance_scale=CFG_SCALE,
                        generator=torch.Generator().manual_seed(SEED), height=size, width=size).images[0]
    rss_load = peak_rss_bytes()
    # Warm-up at the same shapes: one-off kernel setup is not timed, and both libraries map the
    # weight files lazily (safetensors mmap), so this first call also pages the weights in.
    t0 = time.perf_counter()
    generate(1)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    image = generate(steps)
    gen_s = time.perf_counter() - t0
    image.save(spec["image"])
    return {"import_s": import_s, "load_s": load_s, "warmup_s": warmup_s, "gen_s": gen_s,
            "rss_import": rss_import, "rss_load": rss_load, "rss_peak": peak_rss_bytes()}


WORKERS = {"weights": work_weights, "unet": work_unet, "vae": work_vae, "pipeline": work_pipeline}


def worker_main(spec: dict[str, Any]) -> None:
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    result = WORKERS[spec["kind"]](spec)
    print(RESULT_TAG + json.dumps(result), flush=True)


# ---------------------------------------------------------------- parent: orchestration and report


def run_worker(spec: dict[str, Any], script: str = __file__) -> dict[str, Any]:
    """Run one worker process of ``script`` (this file by default; other bench scripts pass their own, with the
    same ``--worker SPEC`` convention); its stderr passes through, its last tagged stdout line is the result."""
    load = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, script, "--worker", json.dumps(spec)], stdout=subprocess.PIPE,
                          text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        sys.exit(f"worker {spec['kind']} failed (exit code {proc.returncode}); its error is printed above")
    result = json.loads(lines[-1][len(RESULT_TAG):])
    result["loadavg_before"] = load
    return result


def ensure_weights(config: str, cache: Path) -> Path:
    folder = cache / f"{config}-seed0"
    if (folder / "model_index.json").exists():  # save_diffusers writes it last
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    (cache / ".gitignore").write_text("*\n")
    print(f"writing random {config} weights to {folder} (once)", file=sys.stderr, flush=True)
    r = run_worker({"kind": "weights", "config": config, "folder": str(folder)})
    print(f"  done in {r['seconds']:.0f} s", file=sys.stderr, flush=True)
    return folder


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import diffusers

    import ldmkit

    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
            f"(threads = {torch.get_num_threads()}, CPU capability {torch.backends.cpu.get_cpu_capability()}), "
            f"diffusers {diffusers.__version__}, ldmkit {ldmkit.__version__}, Python {platform.python_version()}")


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str, str]] = []

    def add(self, what: str, ours: float, theirs: float, unit: str, load: float) -> None:
        fmt = (lambda v: f"{v:.3f} {unit}") if unit == "s" else (lambda v: f"{v:.0f} {unit}")
        self.rows.append((what, fmt(ours), fmt(theirs), f"{ours / theirs:.2f}", f"{load:.2f}"))

    def markdown(self) -> str:
        head = ("what", "ldmkit", "diffusers", "ratio", "load avg")
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---", "--:", "--:", "--:", "--:"]) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines)


def fmt_times(times: list[float]) -> str:
    return "[" + ", ".join(f"{t:.3f}" for t in times) + "]"


def speed_note(what: str, err: float, t: dict[str, list[float]]) -> str:
    """Raw times and the ratio of minima: noise on a shared machine only ever adds time."""
    return (f"{what}: rel. error ldmkit vs diffusers {err:.1e}; ratio of minima "
            f"{min(t['ldmkit']) / min(t['diffusers']):.2f}; ldmkit {fmt_times(t['ldmkit'])} s, "
            f"diffusers {fmt_times(t['diffusers'])} s")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model and sizes: a smoke run of every path")
    ap.add_argument("--size", type=int, default=None, help="txt2img width = height (default 256; quick: 32)")
    ap.add_argument("--steps", type=int, default=None, help="txt2img sampling steps (default 10; quick: 3)")
    ap.add_argument("--repeats", type=int, default=None, help="timed U-Net/VAE calls per library (default 5)")
    ap.add_argument("--warmup", type=int, default=0,
                    help="untimed U-Net/VAE calls per library before timing, besides the parity check's call")
    ap.add_argument("--pipeline-runs", type=int, default=2,
                    help="txt2img worker pairs (each: load, warm-up, one timed generation); medians are reported")
    ap.add_argument("--only", action="append", choices=["unet", "vae", "pipeline"],
                    help="run only this benchmark (repeatable)")
    ap.add_argument("--channels-last", choices=["off", "ldmkit", "both"], default="off",
                    help="experiment: convert the U-Net and VAE (and inputs) to channels_last memory format")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the workers")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the random weights are written")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(json.loads(args.worker))

    config = "tiny" if args.quick else "sd15"
    f = 2 if args.quick else 8  # VAE downscale of the config
    unet_sizes = [16 * f, 32 * f] if args.quick else [256, 512]
    vae_size = 32 * f if args.quick else 512
    size = args.size or (16 * f if args.quick else 256)
    steps = args.steps or (3 if args.quick else 10)
    repeats = args.repeats or (3 if args.quick else 5)
    only = set(args.only or ["unet", "vae", "pipeline"])
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = ensure_weights(config, args.cache)
    common = {"folder": str(folder), "repeats": repeats, "warmup": args.warmup, "threads": args.threads,
              "channels_last": args.channels_last}
    table, notes = Table(), []

    if "unet" in only:
        r = run_worker({**common, "kind": "unet", "sizes": unet_sizes})
        for s in r["sizes"]:
            t = s["times"]
            what = f"U-Net step, CFG batch 2, {s['size']}² ({s['size'] // f}² latent)"
            table.add(what, statistics.median(t["ldmkit"]), statistics.median(t["diffusers"]), "s",
                      r["loadavg_before"])
            notes.append(speed_note(what, s["rel_err"], t))
    if "vae" in only:
        r = run_worker({**common, "kind": "vae", "size": vae_size})
        t = r["times"]
        what = f"VAE decode, 1 image, {vae_size}²"
        table.add(what, statistics.median(t["ldmkit"]), statistics.median(t["diffusers"]), "s", r["loadavg_before"])
        notes.append(speed_note(what, r["rel_err"], t))
    if "pipeline" in only:
        runs: dict[str, list[dict[str, Any]]] = {"ldmkit": [], "diffusers": []}
        for i in range(args.pipeline_runs):
            for impl in ("ldmkit", "diffusers") if i % 2 == 0 else ("diffusers", "ldmkit"):
                image = args.cache / f"txt2img-{impl}.png"
                runs[impl].append(run_worker({**common, "kind": "pipeline", "impl": impl, "size": size,
                                              "steps": steps, "image": str(image)}))
        load = statistics.mean(r["loadavg_before"] for rs in runs.values() for r in rs)

        def med(impl: str, key: str) -> float:
            return statistics.median(r[key] for r in runs[impl])

        mib = 2.0**20
        table.add(f"txt2img {size}², {steps} steps Euler, CFG (wall, excl. load)", med("ldmkit", "gen_s"),
                  med("diffusers", "gen_s"), "s", load)
        table.add("library import (torch already imported)", med("ldmkit", "import_s"), med("diffusers", "import_s"),
                  "s", load)
        table.add("model load (diffusers folder; weights mmapped lazily)", med("ldmkit", "load_s"),
                  med("diffusers", "load_s"), "s", load)
        table.add("first txt2img, 1 step (pages the weights in)", med("ldmkit", "warmup_s"),
                  med("diffusers", "warmup_s"), "s", load)
        table.add("peak RSS, fresh process: load + txt2img", med("ldmkit", "rss_peak") / mib,
                  med("diffusers", "rss_peak") / mib, "MiB", load)
        table.add("  of which: RSS after imports", med("ldmkit", "rss_import") / mib,
                  med("diffusers", "rss_import") / mib, "MiB", load)
        table.add("  peak RSS after load", med("ldmkit", "rss_load") / mib, med("diffusers", "rss_load") / mib,
                  "MiB", load)
        import numpy as np
        from PIL import Image

        a, b = (np.asarray(Image.open(args.cache / f"txt2img-{i}.png"), dtype=np.int16) for i in runs)
        notes.append(f"txt2img: max pixel difference ldmkit vs diffusers {np.abs(a - b).max()}/255; "
                     + "; ".join(f"{impl} generate {fmt_times([r['gen_s'] for r in rs])} s, "
                                 f"load {fmt_times([r['load_s'] for r in rs])} s"
                                 for impl, rs in runs.items()))

    cmd = "python bench/bench_inference.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    print(f"\n`{cmd}`  (weights: random {config}, fp32, torch.inference_mode for U-Net/VAE)\n")
    print(table.markdown())
    print(f"\nmachine: {machine()}")
    print("ratio = ldmkit / diffusers (< 1: ldmkit faster or smaller); times are medians; "
          "load avg = 1-minute load average before the measurement\n")
    for n in notes:
        print(f"- {n}")


if __name__ == "__main__":
    main()
