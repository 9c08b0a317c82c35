"""Issue 12 part 7: the generic speed levers, each against the plain fp32 path in the same run.

    python bench/bench_levers.py                     # SD1.5 U-Net CFG step at 256², every lever
    python bench/bench_levers.py --size 512 --only channels_last --only int8
    python bench/bench_levers.py --quick             # tiny model: a smoke run of every lever
    python bench/bench_levers.py --model emoji       # every lever on the built-in model's U-Net step (8² latent)

Levers (each in its own worker process, the plain path measured beside it in ABBA order):

- ``channels_last``: the U-Net's weights and input in NHWC memory format.
- ``channels_last_txt2img``: a whole generation (text encoder, ``--steps`` sampler steps, decoder) of
  ``ldmkit.load(...)`` (channels_last, the default) against ``ldmkit.load(..., channels_last=False)``, wall
  and CPU time (``--recipe lcm``: LCM 4 steps CFG 1; ``dpm``: DPM++ 2M Karras CFG 7; ``--vae`` e.g.
  emoji-taesd); ``channels_last_vae``: the autoencoder's decode alone (``--vae`` for a tiny one).
- ``int8``: ``torch.ao.quantization.quantize_dynamic`` of every ``nn.Linear`` (weights int8,
  activations quantised per call); the output change is printed as well as the time.
- ``threads``: ``torch.set_num_threads(1)`` against 2, toggled between calls of one process, on
  the SD1.5 U-Net step; ``builtin_threads``: the same on the built-in model's whole 20-step txt2img.
- ``interop``: ``torch.set_num_interop_threads(1)`` against the default (a per-process setting,
  so alternate worker processes).
- ``compile``: ``torch.compile`` (inductor, CPU) on the built-in emoji model's U-Net (and on the
  SD1.5 U-Net with ``--compile-sd15``: about ten minutes of compiling), with the compile time and
  whether the state-dict keys change.

The SD1.5 weights are random (bench_inference.py writes them once into ``--cache``); every ratio
is lever / plain: below 1 means the lever is faster.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import DEFAULT_CACHE, RESULT_TAG, alternate, ensure_weights, machine, rel_err  # noqa: E402

LEVERS = ("channels_last", "channels_last_txt2img", "channels_last_vae", "int8", "threads", "builtin_threads",
          "interop", "compile")


# ---------------------------------------------------------------- workers (each runs in its own process)


def _unet(spec: dict[str, Any]) -> torch.nn.Module:
    """The ldmkit U-Net of the random SD1.5 folder (or the built-in model), in eval mode.

    ``ctx_shape`` (text positions, width) is attached for _inputs."""
    from ldmkit import api
    from ldmkit.checkpoint import load

    model = api.load(None).model if spec["model"] == "emoji" else load(spec["folder"])
    unet = model.unet.eval()
    unet.ctx_shape = (model.cfg.text.max_positions, model.cfg.unet.context_dim)
    return unet


def _inputs(unet: torch.nn.Module, latent: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A CFG batch (uncond + cond = 2) at one latent size, as the samplers call the U-Net."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, latent, latent, generator=g)
    return x, torch.full((2,), 499.5), torch.randn(2, *unet.ctx_shape, generator=g)


def _calls_per_sample(fn, min_s: float = 0.25) -> int:
    """How many calls make one timed sample last min_s (the small model's step is milliseconds)."""
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    return max(1, int(min_s / max(dt, 1e-6)))


def _repeat(fn, n: int):
    def run() -> None:
        for _ in range(n):
            fn()
    return run


def work_lever(spec: dict[str, Any]) -> dict[str, Any]:
    """Plain fp32 U-Net against one in-process lever (channels_last, int8, threads), same inputs."""
    lever = spec["lever"]
    plain = _unet(spec)
    x, t, ctx = _inputs(plain, spec["latent"])
    extra: dict[str, Any] = {}
    with torch.inference_mode():
        ref = plain(x, t, ctx)
        if lever == "threads":
            def with_threads(n: int):
                def run():
                    torch.set_num_threads(n)
                    return plain(x, t, ctx)
                return run
            fns = {"plain": with_threads(1), "lever": with_threads(2)}
            out = fns["lever"]()
        else:
            other = _unet(spec)  # a second copy: both map the same file, only converted tensors are new
            xo = x
            if lever == "channels_last":
                other = other.to(memory_format=torch.channels_last)
                xo = x.contiguous(memory_format=torch.channels_last)
            elif lever == "int8":
                from torch.ao.quantization import quantize_dynamic

                t0 = time.perf_counter()
                other = quantize_dynamic(other, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
                extra["quantize_s"] = time.perf_counter() - t0
                extra["linear_params"] = sum(m.weight.numel() for m in plain.modules()
                                             if isinstance(m, torch.nn.Linear))
                extra["all_params"] = sum(p.numel() for p in plain.parameters())
            else:
                raise ValueError(lever)
            fns = {"plain": lambda: plain(x, t, ctx), "lever": lambda: other(xo, t, ctx)}
            out = fns["lever"]()
        n = _calls_per_sample(fns["plain"])
        times = alternate({k: _repeat(f, n) for k, f in fns.items()}, spec["repeats"], spec["warmup"])
    return {"rel_err": rel_err(out, ref), "calls_per_sample": n,
            "times": {k: [v / n for v in vs] for k, vs in times.items()}, **extra}


def work_interop(spec: dict[str, Any]) -> dict[str, Any]:
    """U-Net step times in a process whose inter-op pool was set before any parallel work."""
    if spec["interop"]:
        torch.set_num_interop_threads(spec["interop"])
    unet = _unet(spec)
    x, t, ctx = _inputs(unet, spec["latent"])
    with torch.inference_mode():
        fn = lambda: unet(x, t, ctx)  # noqa: E731
        fn()
        n = _calls_per_sample(fn)
        times = alternate({"run": _repeat(fn, n)}, spec["repeats"], spec["warmup"])["run"]
    return {"times": [v / n for v in times], "interop": torch.get_num_interop_threads()}


def work_compile(spec: dict[str, Any]) -> dict[str, Any]:
    """torch.compile (inductor) against eager on the same module: compile time, speed, keys, output."""
    eager = _unet(spec)
    x, t, ctx = _inputs(eager, spec["latent"])
    compiled = torch.compile(eager)  # wraps the same parameters: no copy
    keys_eager, keys_compiled = list(eager.state_dict()), list(compiled.state_dict())
    with torch.no_grad():  # inductor traces under no_grad; inference_mode tensors cannot enter some passes
        ref = eager(x, t, ctx)
        t0 = time.perf_counter()
        eager(x, t, ctx)
        eager_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = compiled(x, t, ctx)
        first_s = time.perf_counter() - t0
        fns = {"plain": lambda: eager(x, t, ctx), "lever": lambda: compiled(x, t, ctx)}
        n = _calls_per_sample(fns["plain"])
        times = alternate({k: _repeat(f, n) for k, f in fns.items()}, spec["repeats"], spec["warmup"])
    return {"rel_err": rel_err(out, ref), "calls_per_sample": n, "compile_s": first_s - eager_s,
            "times": {k: [v / n for v in vs] for k, vs in times.items()},
            "keys_same": keys_eager == keys_compiled, "key_example": [keys_eager[0], keys_compiled[0]]}


def work_emoji_threads(spec: dict[str, Any]) -> dict[str, Any]:
    """The built-in model's whole txt2img (20 steps, its native size) at 1 against 2 threads."""
    import numpy as np

    from ldmkit import api

    pipe = api.load(None)

    def gen(n: int):
        def run():
            torch.set_num_threads(n)
            return pipe.txt2img("a red apple", seed=1)[0]
        return run

    a, b = np.asarray(gen(1)(), dtype=np.int16), np.asarray(gen(2)(), dtype=np.int16)
    times = alternate({"plain": gen(1), "lever": gen(2)}, spec["repeats"], spec["warmup"])
    return {"max_pixel_diff": int(np.abs(a - b).max()), "times": times}


def _alternate_cpu(fns: dict[str, Any], repeats: int, warmup: int) -> tuple[dict, dict]:
    """Wall and CPU (process) seconds of each function, ABBA order after ``warmup`` untimed calls each."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for i in range(repeats):
        for k in names if i % 2 == 0 else names[::-1]:
            t0, c0 = time.perf_counter(), time.process_time()
            fns[k]()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    return wall, cpu


def _load_pair(spec: dict[str, Any]):
    """The same model loaded twice by ldmkit.load: channels_last (the default) and NCHW (the opt-out)."""
    from ldmkit import api

    name = None if spec["model"] == "emoji" else spec.get("model_name") or spec["folder"]
    kw = {"vae": spec.get("vae")}
    return {"plain": api.load(name, channels_last=False, **kw), "lever": api.load(name, channels_last=True, **kw)}


def work_cl_txt2img(spec: dict[str, Any]) -> dict[str, Any]:
    """Whole txt2img: ldmkit.load's channels_last default against the opt-out, same seed, ABBA in one process."""
    import numpy as np

    pipes = _load_pair(spec)
    kw: dict[str, Any] = {"seed": 1}
    if spec["steps"] or spec["recipe"] != "default":
        kw["steps"] = spec["steps"] or (4 if spec["recipe"] == "lcm" else 20)
    if spec["recipe"] == "lcm":
        kw.update(sampler="LCM", cfg_scale=1.0)
    elif spec["recipe"] == "dpm":
        kw.update(sampler="DPM++ 2M", scheduler="karras", cfg_scale=7.0)
    if spec["size"]:
        kw.update(width=spec["size"], height=spec["size"])

    def gen(side: str):
        return lambda: pipes[side].txt2img("a photograph of an astronaut riding a horse", **kw)[0]

    t0 = time.perf_counter()
    first = {k: np.asarray(gen(k)(), dtype=np.int16) for k in ("plain", "lever")}  # the lever's includes converting
    first_s = time.perf_counter() - t0
    wall, cpu = _alternate_cpu({k: gen(k) for k in ("plain", "lever")}, spec["repeats"], spec["warmup"])
    return {"times": wall, "cpu": cpu, "first_pair_s": first_s,
            "max_pixel_diff": int(np.abs(first["plain"] - first["lever"]).max())}


def work_cl_vae(spec: dict[str, Any]) -> dict[str, Any]:
    """The autoencoder's decode alone (one latent of the size), channels_last against NCHW."""
    from ldmkit import channels_last

    pipes = _load_pair(spec)
    lever = pipes["lever"].model
    channels_last.prepare(lever, "vae")
    f = lever.cfg.vae.downscale
    lat = (spec["size"] or 64 * f) // f
    z = torch.randn(1, lever.cfg.unet.out_channels, lat, lat, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        fns = {k: (lambda m=pipes[k].model: m.vae.decode(z)) for k in ("plain", "lever")}
        ref, out = fns["plain"](), fns["lever"]()
        n = _calls_per_sample(fns["plain"])
        wall, cpu = _alternate_cpu({k: _repeat(fn, n) for k, fn in fns.items()}, spec["repeats"], spec["warmup"])
    return {"rel_err": rel_err(out, ref), "calls_per_sample": n,
            "times": {k: [v / n for v in vs] for k, vs in wall.items()},
            "cpu": {k: [v / n for v in vs] for k, vs in cpu.items()}}


WORKERS = {"cl_txt2img": work_cl_txt2img, "cl_vae": work_cl_vae, "lever": work_lever, "interop": work_interop,
           "compile": work_compile, "emoji_threads": work_emoji_threads}


def worker_main(spec: dict[str, Any]) -> None:
    torch.set_num_threads(spec.get("threads") or 1)
    print(RESULT_TAG + json.dumps(WORKERS[spec["kind"]](spec)), flush=True)


# ---------------------------------------------------------------- parent: orchestration and report


def run_worker(spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any] | None:
    """One worker process; None (with the reason printed) if it failed or ran past ``timeout`` seconds."""
    load = os.getloadavg()[0]
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], stdout=subprocess.PIPE,
                              text=True, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"worker {spec['kind']} ran past its budget of {timeout:.0f} s", file=sys.stderr)
        return None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        print(f"worker {spec['kind']} failed (exit code {proc.returncode}); its error is printed above",
              file=sys.stderr)
        return None
    result = json.loads(lines[-1][len(RESULT_TAG):])
    result["loadavg_before"] = load
    return result


def fmt(ts: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in ts) + "]"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random model: a smoke run of every lever")
    ap.add_argument("--size", type=int, default=256, help="image size of the SD1.5 U-Net step (latent = size/8)")
    ap.add_argument("--model", choices=["sd15", "emoji"], default="sd15",
                    help="whose U-Net step the in-process levers time: random SD1.5 (default) or the built-in emoji "
                         "model at its 8² latent (small: no lock needed)")
    ap.add_argument("--repeats", type=int, default=3, help="timed samples per side (ABBA order)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed samples per side before timing")
    ap.add_argument("--only", action="append", choices=LEVERS, help="run only this lever (repeatable)")
    ap.add_argument("--compile-sd15", action="store_true",
                    help="also compile the full SD1.5 U-Net (minutes of compiling; see --compile-budget)")
    ap.add_argument("--compile-skip-emoji", action="store_true",
                    help="with --compile-sd15: compile only the SD1.5 U-Net (the emoji row is in docs/benchmarks.md)")
    ap.add_argument("--compile-budget", type=float, default=1800,
                    help="seconds before a compile worker is abandoned (contended 2-core machine: emoji took > 600)")
    ap.add_argument("--recipe", choices=["lcm", "dpm", "default"], default="lcm",
                    help="channels_last_txt2img: LCM 4 steps CFG 1, DPM++ 2M Karras CFG 7, or the model's own")
    ap.add_argument("--steps", type=int, default=None,
                    help="channels_last_txt2img: sampler steps (default: 4 for lcm, 20 for dpm, the model's own)")
    ap.add_argument("--image-size", type=int, default=None,
                    help="channels_last_txt2img/_vae: image size (default: --size for SD1.5, native for emoji)")
    ap.add_argument("--model-name", default=None, help="channels_last_*: a built-in name (emoji-lcm) or path instead")
    ap.add_argument("--vae", default=None, help="channels_last_*: autoencoder for ldmkit.load, e.g. emoji-taesd")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the random weights are written")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(json.loads(args.worker))

    config = "tiny" if args.quick else args.model
    latent = 8 if args.quick or config == "emoji" else args.size // 8
    folder = "" if config == "emoji" else ensure_weights(config, args.cache)
    common = {"folder": str(folder), "model": config, "latent": latent, "repeats": args.repeats,
              "warmup": args.warmup}
    only = args.only or list(LEVERS)
    step = f"{config} U-Net CFG step (batch 2, {latent}² latent)"
    rows: list[tuple[str, str, float, float, str, float]] = []
    notes: list[str] = []

    def add(lever: str, what: str, r: dict[str, Any], change: str) -> None:
        p, q = statistics.median(r["times"]["plain"]), statistics.median(r["times"]["lever"])
        rows.append((lever, what, p, q, change, r["loadavg_before"]))
        notes.append(f"{lever} / {what}: plain {fmt(r['times']['plain'])} s, lever {fmt(r['times']['lever'])} s"
                     f" (ratio of minima {min(r['times']['lever']) / min(r['times']['plain']):.2f})")

    for lever in ("channels_last", "int8"):
        if lever in only:
            r = run_worker({**common, "kind": "lever", "lever": lever})
            if r:
                add(lever, step, r, f"rel. err {r['rel_err']:.1e}")
                if lever == "int8":
                    notes.append(f"int8: quantize_dynamic took {r['quantize_s']:.1f} s; Linear weights are "
                                 f"{r['linear_params'] / r['all_params']:.0%} of the U-Net's parameters")
    size = args.image_size or (None if config == "emoji" else args.size)
    cl_spec = {**common, "recipe": args.recipe, "steps": args.steps, "size": size, "vae": args.vae,
               "model_name": args.model_name}
    if args.model_name:
        cl_spec["model"] = "named"
    where = f"{args.model_name or config}{' + ' + args.vae if args.vae else ''}, {size or 'native'}²"

    def cpu_note(lever: str, r: dict[str, Any]) -> None:
        p, q = statistics.median(r["cpu"]["plain"]), statistics.median(r["cpu"]["lever"])
        notes.append(f"{lever}: CPU plain {fmt(r['cpu']['plain'])} s, lever {fmt(r['cpu']['lever'])} s "
                     f"(CPU ratio of medians {q / p:.2f})")

    if "channels_last_txt2img" in only:
        r = run_worker({**cl_spec, "kind": "cl_txt2img"})
        if r:
            n_steps = args.steps or {"lcm": 4, "dpm": 20}.get(args.recipe, "its")
            add("channels_last, whole txt2img", f"{where}, {args.recipe} recipe, {n_steps} steps", r,
                f"max pixel diff {r['max_pixel_diff']}/255")
            cpu_note("channels_last_txt2img", r)
            notes.append(f"channels_last_txt2img: first generation of each (lever's includes converting) "
                         f"{r['first_pair_s']:.1f} s together")
    if "channels_last_vae" in only:
        r = run_worker({**cl_spec, "kind": "cl_vae"})
        if r:
            add("channels_last, decoder", f"{where} decode", r, f"rel. err {r['rel_err']:.1e}")
            cpu_note("channels_last_vae", r)
    if "threads" in only:
        r = run_worker({**common, "kind": "lever", "lever": "threads"})
        if r:
            add("threads 2 (vs 1)", step, r, f"rel. err {r['rel_err']:.1e}")
    if "builtin_threads" in only:
        r = run_worker({**common, "kind": "emoji_threads", "repeats": max(args.repeats, 3)})
        if r:
            add("threads 2 (vs 1)", "built-in emoji txt2img, 20 steps DPM++ 2M, 64²", r,
                f"max pixel diff {r['max_pixel_diff']}/255")
    if "interop" in only:
        runs: dict[str, list[float]] = {"plain": [], "lever": []}
        loads = []
        for i in range(2):
            for side in ("plain", "lever") if i == 0 else ("lever", "plain"):
                r = run_worker({**common, "kind": "interop", "interop": 1 if side == "lever" else 0,
                                "repeats": max(1, args.repeats // 2 + 1)})
                if r:
                    runs[side] += r["times"]
                    loads.append(r["loadavg_before"])
        if runs["plain"] and runs["lever"]:
            add("interop threads 1 (vs default)", step, {"times": runs, "loadavg_before": statistics.mean(loads)},
                "same kernels")
    if "compile" in only:
        targets = [] if args.compile_skip_emoji else [("emoji", 8)] if not args.quick else [("tiny", 8)]
        if args.compile_sd15:
            targets.append(("sd15", latent))
        for model, lat in targets:
            budget = args.compile_budget
            r = run_worker({**common, "kind": "compile", "model": model, "latent": lat}, timeout=budget)
            if r:
                add("torch.compile (inductor)", f"{model} U-Net CFG step ({lat}² latent)", r,
                    f"rel. err {r['rel_err']:.1e}")
                notes.append(f"torch.compile on {model}: compile time (first call minus an eager call) "
                             f"{r['compile_s']:.1f} s; state-dict keys "
                             + ("unchanged" if r["keys_same"] else f"change ({r['key_example'][0]} -> "
                                                                   f"{r['key_example'][1]})"))
            else:
                notes.append(f"torch.compile on {model}: no result within {budget:.0f} s")

    cmd = "python bench/bench_levers.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    weights = "the built-in emoji model's" if config == "emoji" else f"random {config}"
    print(f"\n`{cmd}`  ({weights} weights, fp32, 1 thread unless the lever sets threads)\n")
    print("| lever | measured on | plain fp32 | with lever | ratio | output change | load avg |")
    print("|---|---|--:|--:|--:|---|--:|")
    for lever, what, p, q, change, load in rows:
        print(f"| {lever} | {what} | {p:.4g} s | {q:.4g} s | {q / p:.2f} | {change} | {load:.2f} |")
    print(f"\nmachine: {machine()}")
    print("ratio = with lever / plain (< 1: the lever is faster); medians of the timed samples\n")
    for n in notes:
        print(f"- {n}")


if __name__ == "__main__":
    main()
