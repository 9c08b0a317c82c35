"""Command line: ``ldmkit generate | img2img | inpaint | convert | info``.

User errors (bad files, bad settings) print one line and exit 2; only bugs show a traceback.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ldmkit.guards import finite_float

# OpenMP threads sleep at barriers instead of spinning. libgomp reads this once, when torch loads it, so it is
# set here, before the CLI imports torch (unless the user set it). With any other busy process on the cores,
# spinning threads waited for descheduled partners at each of thousands of barriers: the built-in model's
# first image took 7-69 s instead of ~2 s (docs/benchmarks.md, "The built-in model's first image").
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

EXAMPLES = {
    "generate": """examples:
  ldmkit generate "a red apple"                       # built-in model, 20 steps
  ldmkit generate "a red apple on a wooden table" --model v1-5-pruned-emaonly.safetensors \\
      --sampler "DPM++ 2M" --scheduler karras --steps 20 --cfg-scale 7 --seed 42 \\
      --negative-prompt "blurry" --width 512 --height 512 --batch-size 1 -o apple.png
  ldmkit generate --from-png apple.png -o again.png   # reproduce an image from its parameters
  ldmkit generate "a red apple" --model sd15.safetensors --lora lcm-lora-sdv1-5.safetensors \\
      --sampler LCM --steps 4 --cfg-scale 1             # few-step: LCM (or TCD with a TCD-LoRA, --eta = gamma)
  ldmkit generate "a red apple" --model sd_turbo.safetensors --sampler "Euler a" --scheduler sgm_uniform \\
      --steps 1 --cfg-scale 1                           # SD-Turbo/Hyper-SD/Lightning (or --scheduler trailing)
  ldmkit generate "a red apple" --model sd15.safetensors --deepcache 3   # DeepCache: deep features reused""",
    "img2img": """examples:
  ldmkit img2img "a watercolor apple" --init-image apple.png --strength 0.6 --model sd15.safetensors -o out.png""",
    "inpaint": """examples:
  ldmkit inpaint "a green pear" --init-image apple.png --mask mask.png --model sd15-inpainting.safetensors -o out.png
  (white in the mask is repainted; ordinary models work too, keeping the original outside the mask)""",
    "convert": """examples:
  ldmkit convert model.safetensors out_dir --to diffusers
  ldmkit convert diffusers_dir model.safetensors --to ldm --half""",
    "info": """examples:
  ldmkit info apple.png            # prints the image's generation parameters
  ldmkit info model.safetensors    # prints the detected architecture""",
}


# modules with a register(add) function contributing subcommands (data, train, export, serve, explain)
PLUGIN_MODULES: list[str] = ["ldmkit.data.cli", "ldmkit.train.cli", "ldmkit.explain", "ldmkit.server.cli",
                             "ldmkit.upscale", "ldmkit.preprocess", "ldmkit.batch"]


def _add_generation_args(p: argparse.ArgumentParser, prompt_required: bool = True) -> None:
    p.add_argument("prompt", nargs=None if prompt_required else "?", default="", help="the text prompt")
    p.add_argument("--model", default=None, help="checkpoint file, diffusers folder, or built-in name (default: emoji)")
    p.add_argument("--vae", default=None,
                   help="autoencoder to use instead of the model's: a standalone VAE file, or a tiny one (TAESD "
                        "file or folder, diffusers AutoencoderTiny folder, built-in emoji-taesd): faster decoding")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="LoRA merged into the model, e.g. style.safetensors:0.8 (repeatable): kohya/A1111 or "
                        "diffusers/PEFT file (LCM-LoRA, TCD-LoRA, DoRA), a PEFT folder, or LyCORIS (LoCon, LoHa, "
                        "LoKr, (IA)3, full diff)")
    p.add_argument("--lora-dir", default=None, metavar="DIR",
                   help="folder where <lora:NAME:WEIGHT> (or <lyco:...>) in the prompt finds NAME.safetensors; "
                        "applied for this image only (LoRA, LoCon, LoHa, LoKr, (IA)3, full diff, DoRA)")
    p.add_argument("--lora-strict", action="store_true",
                   help="an unknown or unreadable <lora:NAME> is an error (default: a warning, generation goes on)")
    p.add_argument("--embeddings-dir", default=None, metavar="DIR",
                   help="textual-inversion embeddings (.pt/.safetensors/.bin); a file's name is a word of the prompt")
    p.add_argument("--model-type", default=None, choices=["sd1", "sd2", "sd2-v", "sdxl", "sdxl-refiner",
                                                           "sdxl-inpainting", "sdxl-turbo"],
                   help="override the detected model family / prediction type")
    p.add_argument("--negative-prompt", default="", help="what the image should not look like")
    # sampler, scheduler, steps and CFG scale default to what the model file recommends, else the
    # values shown (None here so that "not given" is visible)
    p.add_argument("--sampler", default=None,
                   help='e.g. "Euler a", "DPM++ 2M", dpmpp_2m, "DPM++ 2M Karras", LCM, TCD (default: the '
                        'model\'s recommended sampler, else "DPM++ 2M")')
    p.add_argument("--scheduler", default=None,
                   help="uniform, karras, exponential, polyexponential, ddim_uniform, sgm_uniform, simple, normal, "
                        "beta, align_your_steps, trailing or lcm (default: the model's recommended one, else "
                        "the sampler's)")
    p.add_argument("--steps", type=int, default=None, help="default: the model's recommended steps, else 20")
    p.add_argument("--cfg-scale", type=finite_float, default=None,
                   help="classifier-free guidance scale (default: the model's recommended one, else 7)")
    p.add_argument("--seed", type=int, default=-1, help="-1 for random; image i of a batch uses seed+i")
    p.add_argument("--width", type=int, default=None, help="multiple of 8 (default: the model's native size)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--clip-skip", type=int, default=None, help="use the text encoder's n-th last layer")
    p.add_argument("--eta", type=finite_float, default=None,
                   help="noise amount for DDIM / ancestral samplers; gamma in [0, 1] for TCD (default 0.3)")
    p.add_argument("--deepcache", type=int, default=None, metavar="N",
                   help="DeepCache: run the full U-Net every N-th call and only its shallow branch in between, "
                        "reusing the deep features (3: about 2x faster, slightly different image; default: off)")
    p.add_argument("--deepcache-branch", type=int, default=None, metavar="B",
                   help="with --deepcache: skip levels the in-between calls recompute (0, the default, the fewest)")
    p.add_argument("--tiling", action="store_true",
                   help="seamless texture: the image continues across its left/right and top/bottom edges "
                        "(circular padding in the U-Net and VAE, as A1111's Tiling)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--low-memory", action="store_true",
                   help="CPU: keep the weights in fp16 (memory-mapped from fp16 .safetensors) and compute in fp32 "
                        "one layer at a time; idle networks are paged out. Same image, under half the memory "
                        "(SD1.5 at 512²: 2.4 GB peak vs 5.4 GB), ~8%% slower per step: use it when RAM is short, "
                        "otherwise leave it off (the default is the faster one)")
    p.add_argument("--no-channels-last", action="store_true",
                   help="CPU: keep the U-Net's and VAE's weights in PyTorch's default NCHW layout instead of "
                        "channels_last (NHWC, the default: 6-8%% less time per SD1.5 U-Net step, 20-40%% per "
                        "decode, the same image to 1/255; docs/benchmarks.md); LDMKIT_CHANNELS_LAST=0 in the "
                        "environment does the same for every command and the server")
    p.add_argument("--vae-tiling", action="store_true",
                   help="decode the image in tiles: the same image (no seams), far less memory for large "
                        "images; slightly slower, so worth it above ~768x768 or with --low-memory")
    p.add_argument("-o", "--output", default=None, help="output PNG (with several images, -SEED is appended)")
    p.add_argument("--preview", default=None, metavar="PNG",
                   help="write a live preview of the first image here after every step (open it in a viewer "
                        "that reloads)")
    p.add_argument("--preview-vae", default=None, metavar="PATH",
                   help="tiny autoencoder (TAESD file or AutoencoderTiny folder) for --preview; default: "
                        "A1111's 'Approx cheap' linear map (free, 1/8 of the image size)")
    importlib.import_module("ldmkit.controlnet").add_controlnet_args(p)  # --controlnet, --control-image, ...
    importlib.import_module("ldmkit.t2i_adapter").add_adapter_args(p)  # --adapter: a unit like --controlnet
    importlib.import_module("ldmkit.depth").add_depth_args(p)  # --depth-map, --depth-model (512-depth-ema)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; ``command``: the command the line names, when known. For one of the built-in
    commands (generate, img2img, ...) the feature modules' subcommands are left out: importing them (training,
    server, data, ...) was ~0.1 s of every first image."""
    parser = argparse.ArgumentParser(prog="ldmkit", description="Stable Diffusion from the model up.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, epilog=EXAMPLES.get(name),
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    g = add("generate", "text to image")
    _add_generation_args(g, prompt_required=False)
    g.add_argument("--from-png", default=None, help="take all settings from a PNG's parameters text")
    importlib.import_module("ldmkit.hires").add_hires_args(g)  # --hires-scale/-upscaler/-steps/-denoise
    importlib.import_module("ldmkit.sdxl").add_refiner_args(g)  # --refiner, --refiner-switch-at
    i = add("img2img", "image to image")
    _add_generation_args(i)
    i.add_argument("--init-image", required=True)
    i.add_argument("--strength", type=finite_float, default=0.75, help="0..1: how much to change the image")
    importlib.import_module("ldmkit.sdxl").add_refiner_args(i)  # A1111's img2img refiner
    n = add("inpaint", "repaint the masked part of an image")
    _add_generation_args(n)
    n.add_argument("--init-image", required=True)
    n.add_argument("--mask", required=True, help="white = repaint, black = keep")
    n.add_argument("--strength", type=finite_float, default=1.0)
    # A1111's inpainting settings (ldmkit.inpaint_a1111); its UI's defaults
    n.add_argument("--mask-blur", type=int, default=4, help="Gaussian blur of the mask in pixels (0: none)")
    n.add_argument("--masked-content", default="original", choices=["fill", "original", "latent-noise",
                                                                     "latent-nothing"])
    n.add_argument("--invert-mask", action="store_true", help="repaint the black part instead")
    n.add_argument("--only-masked", action="store_true",
                   help="repaint the mask's region (plus padding) at the full size, then paste it back")
    n.add_argument("--only-masked-padding", type=int, default=32)
    n.add_argument("--noise-multiplier", type=finite_float, default=1.0, help="scales the starting noise")
    c = add("convert", "convert a model between single-file (ldm) and diffusers formats")
    c.add_argument("source")
    c.add_argument("dest")
    c.add_argument("--to", required=True, choices=["diffusers", "ldm"])
    c.add_argument("--half", action="store_true", help="store weights as float16")
    c.add_argument("--model-type", default=None,
                   choices=["sd1", "sd2", "sd2-v", "sdxl", "sdxl-refiner", "sdxl-inpainting", "sdxl-turbo"])
    f = add("info", "show an image's generation parameters or a model's architecture")
    f.add_argument("path")
    for module in PLUGIN_MODULES if command not in COMMANDS else []:
        # each feature package adds its own subcommands: register(add) -> None, where
        # add(name, help, examples) returns an ArgumentParser; it sets `func=handler(args)`
        importlib.import_module(module).register(
            lambda name, help, examples=None: sub.add_parser(
                name, help=help, description=help, epilog=examples,
                formatter_class=argparse.RawDescriptionHelpFormatter))
    return parser


def _progress(total: int, desc: str):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)

    def callback(info: dict) -> None:
        bar.update(1)

    return bar, callback


def _preview_writer(args: argparse.Namespace, model):
    """--preview: a step callback writing the denoised estimate's preview (no output: the progress line stays
    one line); None without --preview."""
    if not args.preview:
        return None
    from ldmkit import previews

    decoder = previews.tiny_decoder(args.preview_vae, model) if args.preview_vae else previews.approx_cheap_for(model)
    return previews.preview_writer(args.preview, decoder)


def _params_from_args(args: argparse.Namespace, model) -> object:
    from ldmkit.pipeline import GenerationParams
    from ldmkit.recommended import apply_recommended

    native = model.cfg.native_size
    chosen = apply_recommended(dict(sampler=args.sampler, scheduler=args.scheduler, steps=args.steps,
                                    cfg_scale=args.cfg_scale), model.recommended)
    kw = dict(
        prompt=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed,
        width=args.width or native, height=args.height or native, batch_size=args.batch_size,
        clip_skip=args.clip_skip, eta=args.eta, **{k: v for k, v in chosen.items() if v is not None},
    )
    if hasattr(args, "strength"):
        kw["strength"] = args.strength
    if getattr(args, "tiling", False):
        kw["tiling"] = True
    if args.command == "inpaint":
        from ldmkit.inpaint_a1111 import FILL_MODES, InpaintSettings

        kw["inpaint"] = InpaintSettings(args.mask_blur, None, FILL_MODES.index(args.masked_content.replace("-", " ")),
                                        args.invert_mask, args.only_masked, args.only_masked_padding,
                                        args.noise_multiplier)
    if args.deepcache_branch is not None and args.deepcache is None:
        raise ValueError("--deepcache-branch needs --deepcache N (the interval), e.g. --deepcache 3")
    if args.deepcache is not None:
        kw["deepcache"] = args.deepcache
    if args.deepcache_branch is not None:
        kw["deepcache_branch"] = args.deepcache_branch
    return GenerationParams(**kw)


def _apply_png(args: argparse.Namespace) -> None:
    """--from-png: settings from the image's infotext, unless given on the command line."""
    from ldmkit.infotext import parse_infotext, read_parameters

    text = read_parameters(args.from_png)
    if not text:
        raise ValueError(f"{args.from_png}: the image has no generation parameters")
    p = parse_infotext(text)
    args.prompt = args.prompt or p["Prompt"]
    args.negative_prompt = args.negative_prompt or p["Negative prompt"]
    if "Steps" in p:
        args.steps = int(p["Steps"])
    if "Sampler" in p:
        args.sampler = p["Sampler"]
    if "Schedule type" in p and args.scheduler is None:
        args.scheduler = p["Schedule type"].lower()
    if "CFG scale" in p:
        args.cfg_scale = float(p["CFG scale"])
    if "Seed" in p and args.seed == -1:
        args.seed = int(p["Seed"])
    if "Size" in p and args.width is None:
        args.width, args.height = (int(v) for v in p["Size"].split("x"))
    if "Clip skip" in p and args.clip_skip is None:
        args.clip_skip = int(p["Clip skip"])
    if "Eta" in p and args.eta is None:
        args.eta = float(p["Eta"])
    if "DeepCache" in p and args.deepcache is None:
        args.deepcache = int(p["DeepCache"])
        if args.deepcache_branch is None:
            args.deepcache_branch = int(p.get("DeepCache branch", 0))
    if p.get("Tiling") == "True":
        args.tiling = True
    if "Refiner" in p and getattr(args, "refiner", None) is None:  # "name [hash]": the name, as --refiner reads it
        args.refiner = _beside_model(p["Refiner"].rsplit(" [", 1)[0], args.model)
        args.refiner_switch_at = float(p.get("Refiner switch at", args.refiner_switch_at))
    from ldmkit.hires import apply_png

    apply_png(args, p)


def _beside_model(name: str, model: str | None) -> str:
    """A model named in an infotext (a file's stem): the file or folder of that name beside --model, if any."""
    if Path(name).exists() or not model or not Path(model).exists():
        return name
    folder = Path(model).parent
    found = [c for c in (folder / name, *(folder / (name + s) for s in (".safetensors", ".ckpt"))) if c.exists()]
    return str(found[0]) if found else name


def _outputs(args: argparse.Namespace, images: list) -> list[Path]:
    from ldmkit.infotext import save_png

    base = Path(args.output) if args.output else Path("ldmkit.png")
    paths = []
    for img in images:
        path = base if len(images) == 1 and args.output else base.with_name(f"{base.stem}-{img.info['seed']}.png")
        paths.append(save_png(img, path))
    return paths


def _open_image(path: str):
    from ldmkit.pipeline import open_image

    return open_image(path)


@dataclass
class PreparedGeneration:
    """A generate command's settings, checked against its loaded model: what :func:`run_generation` runs."""

    params: object  # ldmkit.core.GenerationParams
    steps: int  # model calls per image (the progress bar's length)
    hires: object = None  # ldmkit.hires.HiresParams
    upscaler: object = None  # the hires fix's loaded image upscaler
    refiner: object = None  # the SDXL refiner model


def load_pipeline(args: argparse.Namespace):
    """The model of a generate/img2img/inpaint command line (or an ``ldmkit batch`` job), LoRAs merged."""
    from ldmkit import api
    from ldmkit.lora import parse_lora_arg

    loras = [parse_lora_arg(spec) for spec in args.lora]
    pipe = api.load(args.model, vae=args.vae, model_type=args.model_type, device=args.device, loras=loras,
                    low_memory=args.low_memory, vae_tiling=args.vae_tiling, lora_dir=args.lora_dir,
                    embeddings_dir=args.embeddings_dir,
                    channels_last=False if getattr(args, "no_channels_last", False) else None)
    pipe.model.lora_strict = args.lora_strict
    return pipe


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def prepare_generation(args: argparse.Namespace, pipe, note=_note) -> PreparedGeneration:
    """The command line's GenerationParams (and hires fix, refiner), checked against ``pipe``'s model."""
    from ldmkit import pipeline as P

    params = _params_from_args(args, pipe.model)
    if getattr(args, "controlnet", None) or getattr(args, "adapter", None):
        from ldmkit.controlnet import units_from_args

        params = params.replace(controlnets=units_from_args(args, pipe.model, params.width, params.height, log=note))
    from ldmkit.depth import depth_from_args

    depth = depth_from_args(args, pipe.model, params.width, params.height,
                            log=lambda m: print(f"note: {m}", file=sys.stderr))
    params = params.replace(depth_map=depth) if depth is not None else params
    P.validate(params, pipe.model)
    refiner = None
    if args.command == "generate":
        from ldmkit.sdxl import check_txt2img, refiner_from_args

        check_txt2img(pipe.model)  # before the progress bar: an SDXL refiner cannot start from noise
        refiner = refiner_from_args(args, pipe.model)
    elif args.command == "img2img":
        from ldmkit.sdxl import refiner_from_args

        refiner = refiner_from_args(args, pipe.model)
    from ldmkit.prompt import unknown_words

    unknown = unknown_words(pipe.model, params.prompt)
    if unknown:
        note(f"{pipe.model.source_name} was trained on a small vocabulary and has never seen: "
             f"{', '.join(unknown)} (read as blank)")
    steps = params.steps if args.command == "generate" else max(1, int(params.steps * params.strength))
    from ldmkit.hires import hires_from_args

    hires, upscaler = hires_from_args(args, args.device) if args.command == "generate" else (None, None)
    steps += (hires.steps or params.steps) if hires else 0
    return PreparedGeneration(params, steps, hires, upscaler, refiner)


def run_generation(args: argparse.Namespace, pipe, gen: PreparedGeneration, init=None, mask=None,
                   callback=None) -> list:
    """The images of a prepared command line (txt2img with hires fix or refiner, img2img, inpaint)."""
    from ldmkit import pipeline as P

    if gen.hires is not None:
        from ldmkit.hires import txt2img_hires

        return txt2img_hires(pipe.model, gen.params, gen.hires, gen.upscaler, callback=callback, refiner=gen.refiner,
                             switch_at=getattr(args, "refiner_switch_at", 0.8))  # the refiner: second pass (A1111)
    if gen.refiner is not None and args.command == "img2img":
        from ldmkit.sdxl import img2img_refined

        return img2img_refined(pipe.model, gen.refiner, gen.params, init, args.refiner_switch_at, callback=callback)
    if gen.refiner is not None:
        from ldmkit.sdxl import txt2img_refined

        return txt2img_refined(pipe.model, gen.refiner, gen.params, args.refiner_switch_at, callback=callback)
    if args.command == "generate":
        return P.txt2img(pipe.model, gen.params, callback=callback)
    if args.command == "img2img":
        return P.img2img(pipe.model, gen.params, init, callback=callback)
    return P.inpaint(pipe.model, gen.params, init, mask, callback=callback)


def cmd_generate(args: argparse.Namespace) -> None:
    if args.command == "generate":
        if args.from_png:
            _apply_png(args)
        if not args.prompt:
            raise ValueError("no prompt given: ldmkit generate \"a red apple\"")
    importlib.import_module("ldmkit.controlnet").check_args(args)  # unpaired --controlnet: before any loading
    if args.preview_vae and not args.preview:
        raise ValueError("--preview-vae needs --preview FILE.png (where to write the preview)")
    init = _open_image(args.init_image) if args.command in ("img2img", "inpaint") else None
    mask = _open_image(args.mask) if args.command == "inpaint" else None
    t0 = time.perf_counter()
    pipe = load_pipeline(args)
    gen = prepare_generation(args, pipe)
    preview = _preview_writer(args, pipe.model)  # before the bar: a bad --preview-vae fails on a clean line
    bar, progress = _progress(gen.steps, args.command)

    def cb(d: dict) -> None:
        if preview is not None:
            preview(d)
        progress(d)
    try:
        images = run_generation(args, pipe, gen, init, mask, callback=cb)
    finally:
        bar.close()
    from ldmkit.networks import last_report

    for warning in last_report(pipe.model).warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for path in _outputs(args, images):
        print(path)
    print(f"done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


def cmd_convert(args: argparse.Namespace) -> None:
    import torch

    from ldmkit.checkpoint import load, save_diffusers, save_single_file

    model = load(args.source, model_type=args.model_type)
    if model.cfg.is_sdxl:
        from ldmkit import checkpoint_sdxl

        if args.to == "diffusers":
            checkpoint_sdxl.save_sdxl_diffusers(model.half() if args.half else model, args.dest)
        else:
            checkpoint_sdxl.save_sdxl_single_file(model, args.dest, dtype=torch.float16 if args.half else None)
        print(args.dest)
        return
    if args.to == "diffusers":
        if args.half:
            model = model.half()
        save_diffusers(model, args.dest)
    else:
        save_single_file(model, args.dest, dtype=torch.float16 if args.half else None)
    print(args.dest)


def cmd_info(args: argparse.Namespace) -> None:
    path = Path(args.path)
    if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
        from ldmkit.infotext import read_parameters

        _open_image(args.path)
        text = read_parameters(path)
        print(text or f"{path}: no generation parameters in this image")
        return
    from ldmkit.file_kind import read_header, usage
    from ldmkit.upscale import describe_file

    header = read_header(path)  # read once; each question below asks it, not the file
    upscaler = describe_file(header)  # ESRGAN-family files (ldmkit upscale) say what they are
    if upscaler:
        print(upscaler)
        return
    from ldmkit.controlnet import describe_file as describe_controlnet
    from ldmkit.t2i_adapter import describe_file as describe_adapter

    controlnet = describe_controlnet(header) or describe_adapter(header)  # --controlnet/--adapter files and folders
    if controlnet:
        print(controlnet)
        return
    if line := usage(header):  # a LoRA or autoencoder file: what it is and the option that takes it
        print(line)
        return
    from ldmkit.checkpoint import CheckpointError, load
    from ldmkit.file_kind import config_problem

    if path.is_dir() and not (path / "model_index.json").exists() and (why := config_problem(path)):
        raise CheckpointError(f"{path}: {why}, and its weights say no kind ldmkit knows: fix or replace config.json")
    model = load(path)
    c = model.cfg
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in model.parts().items()}
    family = c.family
    if c.is_sdxl:
        from ldmkit.checkpoint_sdxl import describe

        family = f"{c.family} ({describe(c)})"
    print(f"model: {c.name}  family: {family}  prediction: {c.prediction}  inpainting: {c.is_inpainting}")
    for k, n in counts.items():
        print(f"  {k}: {n / 1e6:.1f}M parameters")
    print(f"  unet: {c.unet}\n  vae: {c.vae}\n  text: {c.text}" + (f"\n  text2: {c.text2}" if c.text2 else ""))
    if getattr(model, "recommended", None) is not None:
        print(f"  recommended settings (used unless given): {model.recommended.to_json()}")


COMMANDS = {"generate": cmd_generate, "img2img": cmd_generate, "inpaint": cmd_generate,
            "convert": cmd_convert, "info": cmd_info}


_startup_frozen = False


def _parse_args_without_gc(argv: list[str] | None) -> argparse.Namespace:
    """build_parser imports torch and every feature's modules: some 170,000 long-lived container objects,
    which the cyclic garbage collector would scan over and over (0.2-0.5 s of the first image). It
    stays off while they are made, and gc.freeze() exempts them from later scans; the objects a
    command makes afterwards are collected as usual. Done once per process (tests call main often)."""
    global _startup_frozen
    words = sys.argv[1:] if argv is None else argv
    command = words[0] if words else None  # a built-in command needs no feature modules (build_parser)
    if _startup_frozen or not gc.isenabled():
        return build_parser(command).parse_args(argv)
    gc.disable()
    try:
        return build_parser(command).parse_args(argv)
    finally:
        gc.freeze()
        gc.enable()
        _startup_frozen = True


def main(argv: list[str] | None = None) -> int:
    args = _parse_args_without_gc(argv)
    try:
        handler = getattr(args, "func", None) or COMMANDS[args.command]
        handler(args)
    except KeyboardInterrupt:
        print("ldmkit: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, TypeError) as e:
        if isinstance(e, TypeError) and not str(e).startswith("unknown generation option"):
            raise
        print(f"ldmkit: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
