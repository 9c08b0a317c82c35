"""SDXL base U-Net, one step with CFG (batch 2) at 1024²: ldmkit vs diffusers on the same random full-size weights.

    flock /tmp/ldmkit-big.lock env OMP_NUM_THREADS=1 python bench/bench_sdxl.py            # 1024², ~10 GB a side
    python bench/bench_sdxl.py --config tiny-sdxl --size 64                                  # smoke run
    flock /tmp/ldmkit-big.lock env OMP_NUM_THREADS=1 python bench/bench_sdxl.py --generate --file-dtype fp32 \
        --file /tmp/ldmkit-bench/sdxl-random-fp32.safetensors --threads 1 --modes fp32    # then diffusers, lowmem

Each library runs in a fresh worker process (peak RSS is the process's own): the U-Net is built on the meta
device and every weight drawn from a generator seeded by its diffusers name, so both hold identical values
(ldmkit's through its diffusers -> LDM key table) without a 10 GB file on disk. A small warm-up call, then
``--repeats`` timed calls at ``--size``; the two libraries run one after the other (each needs ~10 GB, so
they cannot alternate in one process): read the load average beside each result. Both outputs are saved
and compared (max |a - b| / max |b|).

``--generate``: a whole txt2img at ``--size`` (both encoders, ``--steps`` Euler steps with CFG, trailing spacing so
one step starts at pure noise, VAE decode) from one random single file written once, streamed one tensor at a time
(``--file-dtype`` fp16 or fp32); each mode in a fresh process, one at a time: ``fp32`` (ldmkit.load), ``diffusers``
(StableDiffusionXLPipeline.from_single_file with a weightless config folder, fp32), ``lowmem`` / ``lowmem-tiled``
(ldmkit --low-memory [--vae-tiling]). Peak RSS is the worker's ru_maxrss; the images are kept beside the file and
compared with the fp32 one (also across invocations, so each mode can run under its own lock).
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


def _stream_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
                        metadata: dict[str, str], draw) -> None:
    """A safetensors file written one tensor at a time (``draw(name, shape)``), so a 14 GB fp32 model never sits
    in memory whole; the header is the format's (8-byte length, JSON of dtype/shape/offsets)."""
    names = sorted(shapes)
    size = torch.empty((), dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for k in names:
        n = size * int(torch.Size(shapes[k]).numel())
        header[k] = {"dtype": {torch.float16: "F16", torch.float32: "F32"}[dtype], "shape": list(shapes[k]),
                     "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_suffix(".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for k in names:
            f.write(draw(k, shapes[k]).to(dtype).contiguous().numpy().tobytes())
    tmp.replace(path)


def work_file(spec: dict[str, Any]) -> dict[str, Any]:
    """A random full SDXL model written once as a single file (fp16 or fp32), one tensor in memory at a time:
    every weight drawn from a generator seeded by its single-file name (norm weights near 1, biases small)."""
    from ldmkit import convert_sdxl
    from ldmkit.checkpoint import CONFIG_METADATA_KEY
    from ldmkit.config import PRESETS
    from ldmkit.sdxl import StableDiffusionXL

    t0 = time.perf_counter()
    cfg = PRESETS[spec["config"]]
    with torch.device("meta"):
        model = StableDiffusionXL(cfg)
        layouts = ["openclip" if enc.cfg.projection_dim else "hf" for enc in model.encoders]
        sd = convert_sdxl.join_sdxl_checkpoint(model.unet.state_dict(), model.vae.state_dict(),
                                               [enc.state_dict() for enc in model.encoders], layouts)

    def draw(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        w = _weight(name, torch.Size(shape))
        if len(shape) == 1 and name.endswith("weight") and "norm" not in name:  # GroupNorm/LayerNorm by LDM names
            w = 1 + w
        return w

    dtype = torch.float32 if spec.get("dtype") == "fp32" else torch.float16
    _stream_safetensors(Path(spec["file"]), {k: tuple(v.shape) for k, v in sd.items()}, dtype,
                        {CONFIG_METADATA_KEY: cfg.to_json()}, draw)
    return {"seconds": time.perf_counter() - t0}


def work_diffusers_config(spec: dict[str, Any]) -> dict[str, Any]:
    """A diffusers folder with the configs only (no weights) of ``spec["config"]``: what from_single_file needs
    offline (``config=``) to build StableDiffusionXLPipeline around a single file."""
    import sys as _sys

    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from ldmkit import convert
    from ldmkit.config import PRESETS

    _sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from reference import hf_tokenizer_files

    cfg = PRESETS[spec["config"]]
    folder = Path(spec["folder"])
    hf_tokenizer_files(folder / "tokenizer", pad_with_eos=True)
    hf_tokenizer_files(folder / "tokenizer_2", pad_with_eos=False)
    with torch.device("meta"):
        parts = dict(
            unet=UNet2DConditionModel(**convert.diffusers_unet_config(cfg.unet)),
            vae=AutoencoderKL(**convert.diffusers_vae_config(cfg.vae)),
            text_encoder=CLIPTextModel(CLIPTextConfig(**convert.hf_text_config(cfg.text))),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(
                **{**convert.hf_text_config(cfg.text2), "architectures": ["CLIPTextModelWithProjection"]},
                projection_dim=cfg.text2.projection_dim)))
    sched = EulerDiscreteScheduler(beta_start=cfg.beta_start, beta_end=cfg.beta_end, beta_schedule="scaled_linear",
                                   timestep_spacing="linspace")
    for name in ("unet", "vae"):
        parts[name].save_config(folder / name)
    for name in ("text_encoder", "text_encoder_2"):
        parts[name].config.save_pretrained(folder / name)
    sched.save_config(folder / "scheduler")
    pipe = StableDiffusionXLPipeline(**parts, scheduler=sched, tokenizer=CLIPTokenizer.from_pretrained(
        folder / "tokenizer"), tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"))
    pipe.save_config(folder)
    return {}


PROMPT = "a photograph of an astronaut riding a horse"


def work_generate(spec: dict[str, Any]) -> dict[str, Any]:
    """Load + one whole txt2img (encoders, ``steps`` CFG steps, VAE decode) in a fresh process: peak RSS."""
    from ldmkit import api
    from ldmkit.pipeline import GenerationParams, txt2img

    t0 = time.perf_counter()
    pipe = api.load(spec["file"], low_memory=spec["low_memory"], vae_tiling=spec["vae_tiling"])
    load_s = time.perf_counter() - t0
    params = GenerationParams(PROMPT, negative_prompt="blurry", steps=spec["steps"], sampler="Euler",
                              scheduler="trailing", seed=1, width=spec["size"], height=spec["size"])
    t1 = time.perf_counter()
    image = txt2img(pipe.model, params)[0]
    gen_s = time.perf_counter() - t1
    image.save(spec["out"])
    return {"load_s": load_s, "gen_s": gen_s, "rss_peak": peak_rss_bytes()}


def work_generate_diffusers(spec: dict[str, Any]) -> dict[str, Any]:
    """The same generation with diffusers' StableDiffusionXLPipeline.from_single_file (fp32), Euler (linspace, as
    ldmkit's "trailing"), the same seed's starting noise: peak RSS of the process."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    t0 = time.perf_counter()
    pipe = StableDiffusionXLPipeline.from_single_file(spec["file"], config=spec["config_folder"],
                                                      local_files_only=True, torch_dtype=torch.float32)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    with torch.inference_mode():
        image = pipe(PROMPT, negative_prompt="blurry", num_inference_steps=spec["steps"], guidance_scale=7.0,
                     height=spec["size"], width=spec["size"], generator=torch.Generator().manual_seed(1)).images[0]
    gen_s = time.perf_counter() - t1
    image.save(spec["out"])
    return {"load_s": load_s, "gen_s": gen_s, "rss_peak": peak_rss_bytes()}


WORKERS = {"unet": work_unet, "file": work_file, "generate": work_generate,
           "generate-diffusers": work_generate_diffusers, "diffusers-config": work_diffusers_config}


def worker_main(spec: dict[str, Any]) -> None:
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    print(RESULT_TAG + json.dumps(WORKERS[spec["kind"]](spec)), flush=True)


def generate_rss(args: argparse.Namespace) -> None:
    """A whole generation at --size from one single file: peak RSS of each mode's fresh process, ldmkit (plain,
    --low-memory, + VAE tiling) and diffusers' StableDiffusionXLPipeline, one process at a time."""
    import numpy as np
    from PIL import Image

    file = Path(args.file)
    if not file.exists():
        print(f"writing random {args.config} {args.file_dtype} weights to {file} (once)", file=sys.stderr, flush=True)
        run_worker({"kind": "file", "config": args.config, "file": str(file), "dtype": args.file_dtype,
                    "threads": args.threads}, __file__)
    print(f"# whole txt2img at {args.size}², {args.steps} Euler step(s) with CFG, from {file.name} "
          f"({args.file_dtype}), {machine()}, {args.threads or torch.get_num_threads()} threads")
    print("| mode | load s | generate s | peak RSS GiB | load avg |\n|---|--:|--:|--:|--:|")
    modes = {"lowmem-tiled": ("ldmkit --low-memory --vae-tiling", True, True),
             "lowmem": ("ldmkit --low-memory", True, False), "fp32": ("ldmkit (fp32)", False, False),
             "diffusers": ("diffusers StableDiffusionXLPipeline (fp32)", None, None)}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            name, low, tiling = modes[mode]
            spec = {"kind": "generate", "file": str(file), "low_memory": low, "vae_tiling": tiling,
                    "steps": args.steps, "size": args.size, "threads": args.threads,
                    "out": str(file.with_name(f"{file.stem}-{args.size}-{args.steps}-{mode}.png"))}
            if mode == "diffusers":
                folder = Path(tmp) / "config"
                run_worker({"kind": "diffusers-config", "config": args.config, "folder": str(folder)}, __file__)
                spec |= {"kind": "generate-diffusers", "config_folder": str(folder)}
            r = run_worker(spec, __file__)
            print(f"| {name} | {r['load_s']:.0f} | {r['gen_s']:.0f} | {r['rss_peak'] / 2**30:.2f} | "
                  f"{r['loadavg_before']:.1f} |", flush=True)
    # the images of every mode run so far on this file (also by earlier invocations, one mode each)
    images = {m: np.asarray(Image.open(f)).astype(np.int16) for m in modes
              if (f := file.with_name(f"{file.stem}-{args.size}-{args.steps}-{m}.png")).exists()}
    for mode, img in images.items():
        if mode != "fp32" and "fp32" in images:
            print(f"max pixel difference {mode} vs fp32: {np.abs(img - images['fp32']).max()}/255")


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
    ap.add_argument("--modes", default="fp32,diffusers,lowmem", help="--generate: comma-separated, each in its own "
                    "process: fp32 (~14 GB), diffusers (~14 GB), lowmem, lowmem-tiled")
    ap.add_argument("--file-dtype", default="fp16", choices=["fp16", "fp32"], help="--generate: dtype of the file")
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
