"""SDXL base U-Net, one step with CFG (batch 2) at 1024²: ldmkit vs diffusers on the same random full-size weights.

    flock /tmp/ldmkit-big.lock env OMP_NUM_THREADS=1 python bench/bench_sdxl.py            # 1024², ~10 GB a side
    python bench/bench_sdxl.py --config tiny-sdxl --size 64                                  # smoke run
    flock /tmp/ldmkit-big.lock env OMP_NUM_THREADS=1 python bench/bench_sdxl.py --generate  # whole 1024² image

Each library runs in a fresh worker process (peak RSS is the process's own): the U-Net is built on the meta
device and every weight drawn from a generator seeded by its diffusers name, so both hold identical values
(ldmkit's through its diffusers -> LDM key table) without a 10 GB file on disk. A small warm-up call, then
``--repeats`` timed calls at ``--size``; the two libraries run one after the other (each needs ~10 GB, so
they cannot alternate in one process): read the load average beside each result. Both outputs are saved
and compared (max |a - b| / max |b|).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import RESULT_TAG, Table, machine, peak_rss_bytes, rel_err, run_worker  # noqa: E402


def _weight(name: str, shape: torch.Size) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    r = torch.randn(shape, generator=g)
    if "norm" in name:
        return (1 + 0.1 * r) if name.endswith("weight") else 0.1 * r
    return r / max(1, r[0].numel()) ** 0.5 if r.ndim > 1 else 0.1 * r


def _inputs(cfg, latent: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.unet.in_channels, latent, latent, generator=g)
    ctx = torch.randn(2, 77, cfg.unet.context_dim, generator=g)
    n_ids = 5 if cfg.family == "sdxl-refiner" else 6
    pooled = torch.randn(2, cfg.unet.adm_in_channels - 256 * n_ids, generator=g)
    side = float(8 * latent)
    ids = torch.tensor([side, side, 0.0, 0.0, side, side][:n_ids]).expand(2, -1)
    return x, torch.full((2,), 499.0), ctx, pooled, ids


def work_unet(spec: dict[str, Any]) -> dict[str, Any]:
    from ldmkit import convert
    from ldmkit.config import PRESETS
    from ldmkit.models.unet import UNetModel, sdxl_vector

    cfg = PRESETS[spec["config"]]
    dcfg = convert.diffusers_unet_config(cfg.unet)
    if spec["lib"] == "diffusers":
        from diffusers import UNet2DConditionModel
    t0 = time.perf_counter()
    if spec["lib"] == "diffusers":
        with torch.device("meta"):
            net = UNet2DConditionModel(**dcfg)
        sd = {k: _weight(k, v.shape) for k, v in net.state_dict().items()}

        def call(x, t, ctx, pooled, ids):
            return net(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
    else:
        with torch.device("meta"):
            net = UNetModel(cfg.unet)
        ours = net.state_dict()
        names = {id(v): k for k, v in ours.items()}
        to_diffusers = {names[id(v)]: dk for dk, v in convert.unet_ldm_to_diffusers(ours, cfg.unet).items()}
        sd = {k: _weight(to_diffusers[k], v.shape) for k, v in ours.items()}

        def call(x, t, ctx, pooled, ids):
            return net(x, t, ctx, y=sdxl_vector(pooled, ids))
    net.load_state_dict(sd, strict=True, assign=True)
    del sd
    net.eval().requires_grad_(False)
    load_s = time.perf_counter() - t0
    with torch.inference_mode():
        call(*_inputs(cfg, 16))  # warm-up at a small size: kernels chosen, allocator primed
        inputs = _inputs(cfg, spec["size"] // 8)
        times = []
        for _ in range(spec["repeats"]):
            t1 = time.perf_counter()
            out = call(*inputs)
            times.append(time.perf_counter() - t1)
    torch.save(out, spec["out"])
    return {"load_s": load_s, "times": times, "rss_peak": peak_rss_bytes()}


def work_file(spec: dict[str, Any]) -> dict[str, Any]:
    """A random full SDXL model written once as an fp16 single file (weights drawn by name, as above)."""
    from ldmkit import checkpoint_sdxl, convert
    from ldmkit.config import PRESETS
    from ldmkit.sdxl import StableDiffusionXL

    t0 = time.perf_counter()
    cfg = PRESETS[spec["config"]]
    with torch.device("meta"):
        model = StableDiffusionXL(cfg)
    unet = model.unet.state_dict()
    names = {id(v): k for k, v in unet.items()}
    to_diffusers = {names[id(v)]: dk for dk, v in convert.unet_ldm_to_diffusers(unet, cfg.unet).items()}
    for part, module in model.parts().items():
        key = (lambda k: to_diffusers[k]) if part == "unet" else (lambda k, p=part: f"{p}.{k}")
        module.load_state_dict({k: _weight(key(k), v.shape).half() for k, v in module.state_dict().items()},
                               strict=True, assign=True)
    checkpoint_sdxl.save_sdxl_single_file(model, spec["file"])
    return {"seconds": time.perf_counter() - t0}


def work_generate(spec: dict[str, Any]) -> dict[str, Any]:
    """Load + one whole txt2img (encoders, ``steps`` CFG steps, VAE decode) in a fresh process: peak RSS."""
    from ldmkit import api
    from ldmkit.pipeline import GenerationParams, txt2img

    t0 = time.perf_counter()
    pipe = api.load(spec["file"], low_memory=spec["low_memory"], vae_tiling=spec["vae_tiling"])
    load_s = time.perf_counter() - t0
    params = GenerationParams("a photograph of an astronaut riding a horse", negative_prompt="blurry",
                              steps=spec["steps"], sampler="Euler", seed=1, width=spec["size"], height=spec["size"])
    t1 = time.perf_counter()
    txt2img(pipe.model, params)
    return {"load_s": load_s, "gen_s": time.perf_counter() - t1, "rss_peak": peak_rss_bytes()}


WORKERS = {"unet": work_unet, "file": work_file, "generate": work_generate}


def worker_main(spec: dict[str, Any]) -> None:
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    print(RESULT_TAG + json.dumps(WORKERS[spec["kind"]](spec)), flush=True)


def generate_rss(args: argparse.Namespace) -> None:
    """ldmkit's whole 1024² generation from an fp16 SDXL file: peak RSS, plain and --low-memory (+ tiling)."""
    file = Path(args.file)
    if not file.exists():
        print(f"writing random {args.config} fp16 weights to {file} (once)", file=sys.stderr, flush=True)
        run_worker({"kind": "file", "config": args.config, "file": str(file), "threads": args.threads}, __file__)
    print(f"# whole txt2img at {args.size}², {args.steps} Euler step(s) with CFG, from {file.name} (fp16), "
          f"{machine()}")
    print("| mode | load s | generate s | peak RSS GiB | load avg |\n|---|--:|--:|--:|--:|")
    modes = {"lowmem-tiled": ("low-memory + VAE tiling", True, True), "lowmem": ("low-memory", True, False),
             "fp32": ("fp32 weights", False, False)}
    for name, low, tiling in (modes[m] for m in args.modes.split(",")):
        r = run_worker({"kind": "generate", "file": str(file), "low_memory": low, "vae_tiling": tiling,
                        "steps": args.steps, "size": args.size, "threads": args.threads}, __file__)
        print(f"| {name} | {r['load_s']:.0f} | {r['gen_s']:.0f} | {r['rss_peak'] / 2**30:.2f} | "
              f"{r['loadavg_before']:.1f} |", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="sdxl-base", help="ldmkit preset (sdxl-base, sdxl-refiner, tiny-sdxl)")
    ap.add_argument("--size", type=int, default=1024, help="image side; the latent is size / 8")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--generate", action="store_true",
                    help="instead: peak RSS of ldmkit's whole generation from an fp16 file (written once to --file)")
    ap.add_argument("--file", default="/tmp/ldmkit-bench/sdxl-random-fp16.safetensors")
    ap.add_argument("--steps", type=int, default=1, help="--generate: sampling steps")
    ap.add_argument("--modes", default="lowmem-tiled,lowmem", help="--generate: lowmem-tiled, lowmem, fp32 (~15 GB)")
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return
    if args.generate:
        generate_rss(args)
        return
    print(f"# SDXL U-Net step with CFG (batch 2), {args.config} at {args.size}², {machine()}, "
          f"{torch.get_num_threads() if args.threads is None else args.threads} threads")
    results, outs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for lib in ("diffusers", "ldmkit"):
            outs[lib] = f"{tmp}/{lib}.pt"
            spec = {"kind": "unet", "lib": lib, "config": args.config, "size": args.size, "repeats": args.repeats,
                    "threads": args.threads, "out": outs[lib]}
            results[lib] = run_worker(spec, __file__)
            print(f"  {lib}: {json.dumps(results[lib])}", file=sys.stderr, flush=True)
        err = rel_err(torch.load(outs["ldmkit"]), torch.load(outs["diffusers"]))
    table = Table()
    ours, theirs = results["ldmkit"], results["diffusers"]
    table.add(f"U-Net step with CFG at {args.size}² (best of {args.repeats})", min(ours["times"]),
              min(theirs["times"]), "s", ours["loadavg_before"])
    table.add("peak RSS of the worker", ours["rss_peak"] / 2**20, theirs["rss_peak"] / 2**20, "MiB",
              ours["loadavg_before"])
    table.add("build + random weights", ours["load_s"], theirs["load_s"], "s", ours["loadavg_before"])
    print(table.markdown())
    print(f"outputs: max |ldmkit - diffusers| / max |diffusers| = {err:.1e}")


if __name__ == "__main__":
    main()
