"""The built-in model's first image in a new process, load included: ldmkit's CLI against diffusers.

    python bench/bench_first_image.py                    # emoji model, 5 runs each, torch's default threads
    python bench/bench_first_image.py --threads 1        # OMP_NUM_THREADS=1 in the runs
    python bench/bench_first_image.py --model emoji-lcm  # another built-in model (its recommended settings)
    python bench/bench_first_image.py --lcm              # the LCM recipe (4 steps, CFG 1) on the emoji model:
                                                         # the time an LCM-distilled emoji model would take
    python bench/bench_first_image.py --model emoji-lcm --vae emoji-taesd   # + the tiny decoder (ldmkit only;
                                                         # diffusers keeps the model's own VAE)

Each run is a whole new process, timed from the parent: ``ldmkit generate "a red apple" --seed 1
-o FILE`` (what a user types), and a Python script doing the same with diffusers on the same model
written as a diffusers folder (``ldmkit convert``) with the same recipe (DPMSolverMultistepScheduler
with Karras sigmas, 20 steps, CFG 7 for the emoji model; LCMScheduler 4 steps, guidance 1 for an
LCM model). ``python -c "import torch"`` is timed too: the floor any PyTorch program pays.

Threads and load: ``--busy N`` keeps N other processes busy (a pure-Python spin loop each) during the
timed runs, a machine that is not idle, reproducibly. ``ldmkit generate`` sets ``OMP_WAIT_POLICY=PASSIVE``
before torch is imported unless the variable is set (OpenMP threads sleep at barriers instead of
spinning); ``--wait-policy`` adds "ldmkit, OpenMP default wait": the same command with torch imported
before the CLI, so that libgomp keeps its default (spin, then sleep). ``--env NAME=VALUE`` sets a
variable in every run. The table gives the median and the best wall time of the runs.

Byte code: these sessions run with PYTHONDONTWRITEBYTECODE=1 and ldmkit is an editable install, so
every process would compile ldmkit's sources again, which an installed package never does (pip
compiles on install; diffusers' and torch's .pyc files exist). The runs therefore drop that
variable and keep byte code under ``--cache``/pycache (PYTHONPYCACHEPREFIX); ``--no-pyc`` measures
the compile-every-time case. One untimed run of each command comes first (byte code, the page
cache, ldmkit's vocabulary cache), then the runs alternate in ABBA order; medians are reported.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import DEFAULT_CACHE, machine  # noqa: E402

PROMPT = "a red apple"

DIFFUSERS_SCRIPT = """
import sys
import torch
from diffusers import DPMSolverMultistepScheduler, LCMScheduler, StableDiffusionPipeline
prompt, folder, out, size, lcm = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"
pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
if lcm:
    pipe.scheduler, steps, guidance = LCMScheduler.from_config(pipe.scheduler.config), 4, 1.0
else:
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    steps, guidance = 20, 7.0
pipe.set_progress_bar_config(disable=True)
pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
     generator=torch.Generator().manual_seed(1)).images[0].save(out)
"""


def commands(model: str, folder: Path, out: Path, size: int, lcm: bool, vae: str | None = None
             ) -> dict[str, list[str]]:
    ldmkit_args = [sys.executable, "-m", "ldmkit", "generate", PROMPT, "--seed", "1", "-o", str(out / "ldmkit.png")]
    if model != "emoji":
        ldmkit_args += ["--model", model]
    if vae:
        ldmkit_args += ["--vae", vae]
    return {
        "import torch": [sys.executable, "-c", "import torch"],
        "ldmkit": ldmkit_args,
        "diffusers": [sys.executable, "-c", DIFFUSERS_SCRIPT, PROMPT, str(folder), str(out / "diffusers.png"),
                      str(size), "1" if lcm else "0"],
    }


# `ldmkit generate` with torch imported first: libgomp reads OMP_WAIT_POLICY when torch loads it, so the CLI's
# PASSIVE default (set when ldmkit.cli is imported) does not apply: OpenMP's default wait policy
DEFAULT_WAIT = "import sys, torch; from ldmkit.cli import main; sys.argv[0] = 'ldmkit'; sys.exit(main(sys.argv[1:]))"

BUSY = "while True: pass"


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system) of one run of ``cmd``.

    On a shared machine the wall time carries other processes' load; the CPU time is what the
    command itself spent (with one thread and an idle machine, about its wall time)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    dt = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"{cmd[:4]} failed (exit code {proc.returncode}):\n{proc.stderr[-2000:]}")
    return dt, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="emoji", help="built-in model name (default: emoji)")
    ap.add_argument("--lcm", action="store_true",
                    help="use the LCM recipe (ldmkit --sampler LCM --steps 4 --cfg-scale 1; diffusers LCMScheduler)")
    ap.add_argument("--vae", default=None,
                    help="ldmkit's --vae (e.g. emoji-taesd); diffusers keeps the model's own VAE")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per command")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the runs (default: unset)")
    ap.add_argument("--no-pyc", action="store_true", help="keep PYTHONDONTWRITEBYTECODE: compile sources every run")
    ap.add_argument("--only", action="append", choices=["import torch", "ldmkit", "diffusers"])
    ap.add_argument("--baseline-src", type=Path, default=None,
                    help="also time `ldmkit generate` from another copy of ldmkit's src/ (e.g. before a change)")
    ap.add_argument("--wait-policy", action="store_true",
                    help="also time ldmkit with OpenMP's default wait policy (torch imported before the CLI)")
    ap.add_argument("--busy", type=int, default=0, help="keep N other processes busy during the timed runs")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="set in every run")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = ap.parse_args(argv)

    from ldmkit import api, checkpoint
    from ldmkit.checkpoint import read_safetensors
    from ldmkit.recommended import read_recommended

    path = api.resolve_model_path(args.model)
    rec = read_recommended(read_safetensors(path)[1])
    lcm = args.lcm or (rec is not None and rec.sampler == "LCM")
    folder = args.cache / f"{args.model}-diffusers"
    if not (folder / "model_index.json").exists():
        checkpoint.save_diffusers(api.load(args.model).model, folder)  # what `ldmkit convert` writes
    out = args.cache / "first-image"
    out.mkdir(parents=True, exist_ok=True)

    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    if not args.no_pyc:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(args.cache / "pycache")
    env.update(kv.split("=", 1) for kv in args.env)
    size = checkpoint.load(path).cfg.native_size
    all_cmds = commands(args.model, folder, out, size, lcm, args.vae)
    if args.lcm:
        all_cmds["ldmkit"] += ["--sampler", "LCM", "--steps", "4", "--cfg-scale", "1"]
    if args.baseline_src:
        # the same command with the other copy of ldmkit first on the path, writing its own image
        code = (f"import runpy, sys; sys.path.insert(0, {str(args.baseline_src)!r}); sys.argv[0] = 'ldmkit'; "
                "runpy.run_module('ldmkit', run_name='__main__')")
        rest = [str(out / "baseline.png") if a.endswith("ldmkit.png") else a for a in all_cmds["ldmkit"][3:]]
        all_cmds["ldmkit (baseline src)"] = [sys.executable, "-c", code, *rest]
    if args.wait_policy:
        all_cmds["ldmkit, OpenMP default wait"] = [sys.executable, "-c", DEFAULT_WAIT, *all_cmds["ldmkit"][3:]]
    # --only ldmkit keeps its variants (OpenMP default wait, baseline src)
    cmds = {k: v for k, v in all_cmds.items()
            if not args.only or k in args.only or (k.startswith("ldmkit") and "ldmkit" in args.only)}
    for cmd in cmds.values():
        timed(cmd, env)  # untimed: byte code, page cache, vocabulary cache
    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(args.busy)]
    times: dict[str, list[float]] = {k: [] for k in cmds}
    cpu: dict[str, list[float]] = {k: [] for k in cmds}
    loads = []
    for i in range(args.runs):
        for name in list(cmds) if i % 2 == 0 else list(cmds)[::-1]:
            loads.append(os.getloadavg()[0])
            wall, used = timed(cmds[name], env)
            times[name].append(wall)
            cpu[name].append(used)
    for p in busy:
        p.kill()
        p.wait()

    cmd = "python bench/bench_first_image.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    recipe = "LCM 4 steps, CFG 1" if lcm else "DPM++ 2M Karras 20 steps, CFG 7"
    if args.vae:
        recipe += f", ldmkit decodes with {args.vae!r}"
    extra = "".join(f", {kv}" for kv in args.env) + (f", {args.busy} busy process(es) beside" if args.busy else "")
    print(f"\n`{cmd}`  (built-in {args.model!r}, {recipe}, OMP_NUM_THREADS={args.threads or 'unset'}{extra}, "
          f"{'no byte code' if args.no_pyc else 'byte code kept'}; medians of {args.runs} new processes)\n")
    print("| command | first image, wall (median) | best | CPU time (median) | wall of each run |")
    print("|---|--:|--:|--:|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.2f} s | {min(ts):.2f} s | {statistics.median(cpu[name]):.2f} s | "
              f"{', '.join(f'{t:.2f}' for t in ts)} |")
    if "ldmkit" in times and "diffusers" in times:
        ratio = statistics.median(times["ldmkit"]) / statistics.median(times["diffusers"])
        cpu_ratio = statistics.median(cpu["ldmkit"]) / statistics.median(cpu["diffusers"])
        print(f"\n- ratio ldmkit / diffusers: {ratio:.2f} (wall), {cpu_ratio:.2f} (CPU time)")
        import numpy as np
        from PIL import Image

        a, b = (np.asarray(Image.open(out / f"{k}.png"), dtype=np.int16) for k in ("ldmkit", "diffusers"))
        what = "different decoders" if args.vae else "same recipe check"
        note = (" (LCM's fresh noise per step comes from different generators in the two libraries: the images "
                "need not match; sampler parity with the same noise: tests/test_fewstep.py)") if lcm else ""
        print(f"- {what}: max pixel difference of the two images {np.abs(a - b).max()}/255{note}")
    print(f"- mean 1-minute load average during the runs: {statistics.mean(loads):.2f}")
    print(f"- machine: {machine()}")


if __name__ == "__main__":
    main()
