"""Low-memory mode: ldmkit ``--low-memory`` against diffusers in fp32, peak memory and time, in one run.

    flock /tmp/ldmkit-big.lock env OMP_NUM_THREADS=1 python bench/bench_lowmem.py --threads 1
    python bench/bench_lowmem.py --quick             # tiny model: a smoke run of every path
    python bench/bench_lowmem.py --only pipeline --steps 4

The weights are bench_inference.py's random SD1.5 (``StableDiffusion(SD15)`` after
``torch.manual_seed(0)``, a diffusers folder in ``--cache``), which diffusers loads in fp32;
ldmkit loads the same weights stored once as an fp16 single file (``--fp16-file``, written on
first use), as a user of ``--low-memory`` would. Targets (issue 12): peak RSS <= 0.6x diffusers'
fp32 peak at <= 1.15x its time.

Workers run in fresh processes (bench_inference.run_worker), one library each for memory:
- ``pipeline``: load + one txt2img (Euler, CFG), peak RSS (``ru_maxrss``) of the whole process;
  ldmkit with and without ``--vae-tiling``.
- ``unet``: one U-Net call on a CFG batch, ldmkit low-memory vs diffusers fp32, alternating (ABBA).
- ``upcast``: how low-memory mode upcasts, measured: the module class swap ldmkit uses, forward
  pre-/post-hooks that swap the parameters, and plain fp32 weights, on the same U-Net.
- ``load``: a low-memory load alone, from the fp16 file and from the fp32 folder (converted once).
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
import bench_inference as bi  # noqa: E402
from bench_inference import DEFAULT_CACHE, RESULT_TAG, Table, alternate, fmt_times, peak_rss_bytes, rel_err  # noqa: E402

PROMPT, NEGATIVE, SEED, CFG_SCALE = "a photograph of an astronaut riding a horse", "blurry, low quality", 1234, 7.0
DEFAULT_FP16 = Path("/tmp/ldmkit-bench")


# ---------------------------------------------------------------- workers (each in its own process)


def work_fp16file(spec: dict[str, Any]) -> dict[str, Any]:
    """The diffusers folder's weights written once as an fp16 LDM single file."""
    from ldmkit import checkpoint

    t0 = time.perf_counter()
    model = checkpoint.load(spec["folder"])
    Path(spec["fp16_file"]).parent.mkdir(parents=True, exist_ok=True)
    checkpoint.save_single_file(model, spec["fp16_file"], dtype=torch.float16)
    return {"seconds": time.perf_counter() - t0}


def _ctx_inputs(latent: int, ctx_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, latent, latent, generator=g), torch.full((2,), 499.5),
            torch.randn(2, 77, ctx_dim, generator=g))


def work_unet(spec: dict[str, Any]) -> dict[str, Any]:
    """One U-Net call on a CFG batch: ldmkit low-memory (fp16 file) vs diffusers fp32 (folder), same inputs."""
    from diffusers import UNet2DConditionModel

    from ldmkit import api

    model = api.load(spec["fp16_file"], low_memory=True).model
    ours, ctx_dim = model.unet, model.cfg.unet.context_dim
    theirs = UNet2DConditionModel.from_pretrained(spec["folder"], subfolder="unet").eval()
    x, t, ctx = _ctx_inputs(spec["latent"], ctx_dim)
    with torch.inference_mode():
        err = rel_err(ours(x, t, ctx), theirs(x, t, encoder_hidden_states=ctx).sample)  # also the warm-up
        times = alternate({"ldmkit": lambda: ours(x, t, ctx),
                           "diffusers": lambda: theirs(x, t, encoder_hidden_states=ctx, return_dict=False)},
                          spec["repeats"], spec["warmup"])
    return {"rel_err": err, "times": times}


def _hooked(unet: torch.nn.Module) -> torch.nn.Module:
    """The alternative to the class swap: pre-hooks put fp32 copies in ``_parameters``, post-hooks put fp16 back."""
    from torch import nn

    def pre(mod: nn.Module, args: tuple) -> None:
        mod._stored = dict(mod._parameters)
        for name, p in mod._stored.items():
            if p is not None:
                mod._parameters[name] = p.float()

    def post(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        mod._parameters.update(mod._stored)
        del mod._stored

    for mod in unet.modules():
        if type(mod) in (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm):
            mod.register_forward_pre_hook(pre)
            mod.register_forward_hook(post)
    return unet


def _fresh(unet: torch.nn.Module) -> torch.nn.Module:
    """ldmkit's class swap, but with a fresh ``weight.to(fp32)`` per call instead of the reused buffer."""
    import torch.nn.functional as F

    from ldmkit import lowmem

    class FreshLinear(lowmem.UpcastLinear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    class FreshConv2d(lowmem.UpcastConv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self._conv_forward(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    for mod in unet.modules():
        if type(mod) is lowmem.UpcastLinear:
            mod.__class__ = FreshLinear
        elif type(mod) is lowmem.UpcastConv2d:
            mod.__class__ = FreshConv2d
    return unet


def work_upcast(spec: dict[str, Any]) -> dict[str, Any]:
    """Class swap (ldmkit: reused buffer; and with fresh copies) vs forward hooks vs plain fp32, same U-Net."""
    from ldmkit import api, checkpoint

    swap = api.load(spec["fp16_file"], low_memory=True).model.unet
    fresh = _fresh(api.load(spec["fp16_file"], low_memory=True).model.unet)  # maps the same file: no copy
    hooks = _hooked(checkpoint.load(spec["fp16_file"], dtype=torch.float16).unet)
    plain = checkpoint.load(spec["fp16_file"]).unet  # fp32 (the fp16 values, upcast once at load)
    x, t, ctx = _ctx_inputs(spec["latent"], swap.cfg.context_dim)
    fns = {"swap": lambda: swap(x, t, ctx), "fresh": lambda: fresh(x, t, ctx), "hooks": lambda: hooks(x, t, ctx),
           "fp32": lambda: plain(x, t, ctx)}
    with torch.inference_mode():
        ref = plain(x, t, ctx)
        errs = {k: rel_err(fn(), ref) for k, fn in fns.items() if k != "fp32"}
        times = alternate(fns, spec["repeats"], spec["warmup"])
    return {"rel_err": errs, "times": times}


def work_pipeline(spec: dict[str, Any]) -> dict[str, Any]:
    """Load + one txt2img with ONE library (the other is never imported); peak RSS of this process."""
    size, steps, impl = spec["size"], spec["steps"], spec["impl"]
    if impl.startswith("ldmkit"):
        from ldmkit import api
        from ldmkit.pipeline import GenerationParams, txt2img

        rss_import = peak_rss_bytes()
        t0 = time.perf_counter()
        model = api.load(spec["fp16_file"], low_memory=True, vae_tiling=impl == "ldmkit-tiled").model
        load_s = time.perf_counter() - t0

        def generate():
            # "Euler" with the uniform schedule == diffusers EulerDiscreteScheduler(timestep_spacing="linspace")
            params = GenerationParams(PROMPT, negative_prompt=NEGATIVE, steps=steps, cfg_scale=CFG_SCALE,
                                      sampler="Euler", scheduler="uniform", seed=SEED, width=size, height=size)
            return txt2img(model, params)[0]
    else:
        from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

        rss_import = peak_rss_bytes()
        t0 = time.perf_counter()
        pipe = StableDiffusionPipeline.from_pretrained(spec["folder"], safety_checker=None,
                                                       requires_safety_checker=False)
        load_s = time.perf_counter() - t0
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
        pipe.set_progress_bar_config(disable=True)

        def generate():
            return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=CFG_SCALE,
                        generator=torch.Generator().manual_seed(SEED), height=size, width=size).images[0]
    rss_load = peak_rss_bytes()
    # no warm-up: both libraries map the weight files lazily and page them in during this first image
    t0 = time.perf_counter()
    image = generate()
    gen_s = time.perf_counter() - t0
    image.save(spec["image"])
    return {"load_s": load_s, "gen_s": gen_s, "rss_import": rss_import, "rss_load": rss_load,
            "rss_peak": peak_rss_bytes()}


def work_load(spec: dict[str, Any]) -> dict[str, Any]:
    """Only a low-memory load, from the fp16 file or the fp32 folder (converted once): its time and peak RSS."""
    from ldmkit import api

    t0 = time.perf_counter()
    api.load(spec["source"], low_memory=True)
    return {"load_s": time.perf_counter() - t0, "rss_peak": peak_rss_bytes()}


WORKERS = {"fp16file": work_fp16file, "unet": work_unet, "upcast": work_upcast, "pipeline": work_pipeline,
           "load": work_load}


def worker_main(spec: dict[str, Any]) -> None:
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    print(RESULT_TAG + json.dumps(WORKERS[spec["kind"]](spec)), flush=True)


# ---------------------------------------------------------------- parent


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model and sizes: a smoke run of every path")
    ap.add_argument("--size", type=int, default=None, help="txt2img and U-Net width = height (default 512)")
    ap.add_argument("--steps", type=int, default=None, help="txt2img steps (default 2)")
    ap.add_argument("--repeats", type=int, default=None, help="timed U-Net calls per variant (default 3)")
    ap.add_argument("--warmup", type=int, default=0, help="untimed U-Net calls per variant besides the first")
    ap.add_argument("--upcast-size", type=int, default=None, help="image size of the upcast comparison (256)")
    ap.add_argument("--only", action="append", choices=["pipeline", "unet", "upcast", "load"], help="repeatable")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the workers")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="bench_inference.py's random weights")
    ap.add_argument("--fp16-file", type=Path, default=None, help="where the fp16 single file is written")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(json.loads(args.worker))

    config = "tiny" if args.quick else "sd15"
    f = 2 if args.quick else 8
    size = args.size or (32 if args.quick else 512)
    steps = args.steps or 2
    repeats = args.repeats or 3
    upcast_size = args.upcast_size or (32 if args.quick else 256)
    only = set(args.only or ["pipeline", "unet", "upcast", "load"])
    folder = bi.ensure_weights(config, args.cache)
    fp16_file = args.fp16_file or DEFAULT_FP16 / f"{config}-seed0-fp16.safetensors"
    if not fp16_file.exists():
        print(f"writing {fp16_file} (once)", file=sys.stderr, flush=True)
        bi.run_worker({"kind": "fp16file", "folder": str(folder), "fp16_file": str(fp16_file)}, __file__)
    common = {"folder": str(folder), "fp16_file": str(fp16_file), "threads": args.threads,
              "repeats": repeats, "warmup": args.warmup}
    table, upcast, notes, mib = Table(), Table(), [], 2.0**20

    if "pipeline" in only:
        runs = {}
        for impl in ("diffusers", "ldmkit", "ldmkit-tiled"):
            runs[impl] = bi.run_worker({**common, "kind": "pipeline", "impl": impl, "size": size, "steps": steps,
                                     "image": str(fp16_file.parent / f"lowmem-{impl}.png")}, __file__)
        d = runs["diffusers"]
        for impl, label in (("ldmkit", "--low-memory"), ("ldmkit-tiled", "--low-memory --vae-tiling")):
            r = runs[impl]
            table.add(f"peak RSS, fresh process: load + txt2img {size}², ldmkit {label} vs diffusers fp32",
                      r["rss_peak"] / mib, d["rss_peak"] / mib, "MiB", r["loadavg_before"])
        for impl, label in (("ldmkit", "--low-memory"), ("ldmkit-tiled", "--low-memory --vae-tiling")):
            r = runs[impl]
            table.add(f"txt2img {size}², {steps} steps Euler, CFG (first image, excl. load), ldmkit {label}",
                      r["gen_s"], d["gen_s"], "s", r["loadavg_before"])
        r = runs["ldmkit"]
        table.add("  RSS after load", r["rss_load"] / mib, d["rss_load"] / mib, "MiB", r["loadavg_before"])
        table.add("  model load", r["load_s"], d["load_s"], "s", r["loadavg_before"])
        import numpy as np
        from PIL import Image

        imgs = {i: np.asarray(Image.open(fp16_file.parent / f"lowmem-{i}.png"), dtype=np.int16) for i in runs}
        notes.append(f"txt2img max pixel difference: ldmkit --low-memory vs diffusers fp32 "
                     f"{np.abs(imgs['ldmkit'] - imgs['diffusers']).max()}/255 (fp16-rounded weights); "
                     f"--vae-tiling vs untiled {np.abs(imgs['ldmkit'] - imgs['ldmkit-tiled']).max()}/255")
        notes.append("pipeline raw: " + "; ".join(
            f"{i}: load {r['load_s']:.1f} s, generate {r['gen_s']:.1f} s, RSS import/load/peak "
            f"{r['rss_import'] / mib:.0f}/{r['rss_load'] / mib:.0f}/{r['rss_peak'] / mib:.0f} MiB"
            for i, r in runs.items()))
    if "unet" in only:
        r = bi.run_worker({**common, "kind": "unet", "latent": size // f}, __file__)
        t = r["times"]
        what = f"U-Net step, CFG batch 2, {size}² ({size // f}² latent), ldmkit --low-memory"
        table.add(what, statistics.median(t["ldmkit"]), statistics.median(t["diffusers"]), "s", r["loadavg_before"])
        notes.append(f"{what}: rel. error vs diffusers fp32 {r['rel_err']:.1e} (fp16 weight rounding); ratio of "
                     f"minima {min(t['ldmkit']) / min(t['diffusers']):.2f}; ldmkit {fmt_times(t['ldmkit'])} s, "
                     f"diffusers {fmt_times(t['diffusers'])} s")
    if "upcast" in only:
        r = bi.run_worker({**common, "kind": "upcast", "latent": upcast_size // f}, __file__)
        t = r["times"]
        m = {k: statistics.median(v) for k, v in t.items()}
        for k, label in (("swap", "class swap + reused buffer (ldmkit)"), ("fresh", "class swap + fresh copies"),
                         ("hooks", "forward pre/post hooks")):
            upcast.add(f"U-Net step, CFG batch 2, {upcast_size}², upcast by {label}", m[k], m["fp32"], "s",
                       r["loadavg_before"])
        notes.append(f"upcast variants, U-Net CFG step {upcast_size}²: rel. error vs fp32 of the same fp16 values "
                     + ", ".join(f"{k} {v:.1e}" for k, v in r["rel_err"].items()) + "; raw "
                     + ", ".join(f"{k} {fmt_times(v)}" for k, v in t.items()))

    if "load" in only:
        for what, source in (("fp16 file", fp16_file), ("fp32 diffusers folder", folder)):
            r = bi.run_worker({**common, "kind": "load", "source": str(source)}, __file__)
            notes.append(f"low-memory load from the {what}: {r['load_s']:.1f} s, "
                         f"peak RSS {r['rss_peak'] / mib:.0f} MiB")

    cmd = "python bench/bench_lowmem.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    print(f"\n`{cmd}`  (weights: random {config}; ldmkit from an fp16 file, diffusers fp32 from the folder)\n")
    print(table.markdown().replace("| ldmkit | diffusers |", "| ldmkit --low-memory | diffusers fp32 |"))
    if upcast.rows:
        print("\nHow the upcast is done, all in ldmkit (ratio: variant / the same U-Net with fp32 weights):\n")
        print(upcast.markdown().replace("| ldmkit | diffusers |", "| low-memory variant | fp32 weights |"))
    print(f"\nmachine: {bi.machine()}")
    print("ratio = ldmkit / diffusers (< 1: ldmkit faster or smaller); load avg = 1-minute load average before\n")
    for n in notes:
        print(f"- {n}")


if __name__ == "__main__":
    main()
