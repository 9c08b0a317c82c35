"""``ldmkit train vae | unet | lora`` and ``ldmkit export``: registered into ``ldmkit.cli`` as a plug-in.

Every :class:`TrainConfig` field a kind uses is a flag (``batch_size`` -> ``--batch-size``); a flag
left out keeps the value from ``--config``, the resumed run, or the default. New trainers add an
entry to ``TRAINERS``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ldmkit.guards import finite_float
from ldmkit.train.config import (
    KINDS,
    TrainConfig,
    TrainError,
    defaults,
    field_help,
    field_types,
    load_toml,
    parse_arch_override,
)

TRAIN_EXAMPLES = """examples:
  ldmkit data emoji --out data/emoji --size 64
  ldmkit train vae  --data data/emoji --out runs/vae
  ldmkit train unet --data data/emoji --vae runs/vae --out runs/ldm
  ldmkit train unet --resume runs/ldm                      # continue exactly where it stopped
  torchrun --nproc-per-node 2 -m ldmkit train unet --data data/emoji --vae runs/vae --out runs/ldm
  ldmkit export runs/ldm model.safetensors && ldmkit generate --model model.safetensors "a smiling cat"
  ldmkit train unet --init-from sd15.safetensors --data my_images --size 512 --out runs/ft   # fine-tune
  ldmkit train lora --model sd15.safetensors --data my_images --out runs/lora
  ldmkit generate --model sd15.safetensors --lora runs/lora/lora.safetensors:0.8 "a photo of sks dog"
"""

VAE_EXAMPLES = """examples:
  ldmkit train vae --data data/emoji --out runs/vae
  ldmkit train vae --data data/emoji --out runs/vae --size 64 --batch-size 16 --total-steps 20000 \\
      --disc-start 10000 --arch vae.ch=64 --arch vae.ch_mult=1,2,4
  ldmkit train vae --resume runs/vae --total-steps 30000   # continue, with a longer schedule
  ldmkit export runs/vae vae.safetensors                    # standalone VAE file (LDM layout)
  ldmkit train vae --init-from runs/vae --freeze-encoder --data data/emoji --out runs/vae-decoder \
      --total-steps 5000   # decoder-only fine-tune: a U-Net trained on runs/vae's latents still fits
"""

UNET_EXAMPLES = """examples:
  ldmkit train unet --data data/emoji --vae runs/vae --out runs/ldm     # text encoder trained jointly
  ldmkit train unet --data data/emoji --vae runs/vae --text-encoder v1-5-pruned-emaonly.safetensors \\
      --out runs/ldm-clip                                              # SD1's CLIP, frozen
  ldmkit train unet --config my.toml --out runs/ldm2 --objective v --batch-size 32 --grad-accum 2
  ldmkit train unet --resume runs/ldm
  ldmkit train unet --init-from sd15.safetensors --data my_images --size 512 --holdout 0 --lr 1e-5 \\
      --out runs/ft                            # fine-tune all of SD1.5's U-Net and text encoder
  ldmkit train unet --init-from sd15.safetensors --text-encoder sd15.safetensors --data my_images \\
      --size 512 --out runs/ft-unet            # ... its U-Net only (its text encoder frozen)
  torchrun --nproc-per-node 2 -m ldmkit train unet --data data/emoji --vae runs/vae --out runs/ldm
  ldmkit data shards my_images --out shards/ --shard-size 1000     # then stream them (memory stays flat):
  ldmkit train unet --data "shards/{00000..00099}.tar" --data-workers 2 --vae runs/vae --out runs/big
  torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 --rdzv-id run1 \\
      -m ldmkit train unet --data "shards/{00000..00099}.tar" --vae runs/vae --out /shared/runs/big
                                               # on each of two machines; run folder on a shared filesystem
  (a run folder's config.toml lists every setting; metrics.jsonl and samples/ show progress)
"""

LORA_EXAMPLES = """examples:
  ldmkit train lora --model sd15.safetensors --data my_images --out runs/lora
  ldmkit train lora --model sd15.safetensors --data my_images --out runs/lora --rank 16 --alpha 8 \\
      --no-text-encoder-lora --conv-lora --size 512 --total-steps 3000
  ldmkit train lora --resume runs/lora --model /new/place/sd15.safetensors   # the model file moved
  ldmkit generate --model sd15.safetensors --lora runs/lora/lora.safetensors:0.8 "a photo of sks dog"
  (runs/lora/lora.safetensors is rewritten at every checkpoint; kohya layout, loads in A1111 and diffusers)
"""

LCM_EXAMPLES = """examples:
  ldmkit train lcm --model emoji --data data/emoji --out runs/emoji-lcm --w-min 4 --w-max 4
  ldmkit export runs/emoji-lcm emoji-lcm.safetensors --half
  ldmkit generate --model emoji-lcm.safetensors --sampler LCM --steps 4 --cfg-scale 1 "a red apple"
  ldmkit train lcm --model sd15.safetensors --data my_images --size 512 --lora-rank 64 --out runs/lcm-lora
  ldmkit generate --model sd15.safetensors --lora runs/lcm-lora/lcm_lora.safetensors --sampler LCM --steps 4 \
      --cfg-scale 1 "a red apple"
  ldmkit train lcm --resume runs/emoji-lcm                # continue exactly where it stopped
  (--lora-rank 0, the default, distils the whole U-Net; the teacher's guidance scale is 1 + w)
"""

TAESD_EXAMPLES = """examples:
  ldmkit train taesd --model emoji --data data/emoji --out runs/emoji-taesd --total-steps 3000
  ldmkit train taesd --model sd15.safetensors --data my_images --size 256 --out runs/taesd
  ldmkit train taesd --model emoji --data data/emoji --taesd-parts decoder --width 32 --out runs/tiny-dec
  ldmkit train taesd --resume runs/emoji-taesd            # continue exactly where it stopped
  ldmkit export runs/emoji-taesd emoji-taesd.safetensors --half
  ldmkit generate --model emoji --vae emoji-taesd.safetensors "a red apple"
  (metrics.jsonl: psnr_vs_kl, the tiny decoder against the model's own decoder on held-out latents)
"""

EMBEDDING_EXAMPLES = """examples:
  ldmkit train embedding --model sd15.safetensors --data my_cat/ --token mycat --vectors 4 --out runs/mycat
  ldmkit train embedding --resume runs/mycat              # continue exactly where it stopped
  cp runs/mycat/mycat.safetensors embeddings/ && ldmkit generate --model sd15.safetensors \
      --embeddings-dir embeddings/ "a photo of mycat on a sofa"
  (runs/mycat/mycat.safetensors is rewritten at every checkpoint, A1111's emb_params layout)
  ldmkit train embedding --model sd15.safetensors --data my_cat/ --token mycat --vectors 4 \
      --out embeddings/mycat.safetensors     # writes that file; the run folder is embeddings/.mycat.run
"""

CONTROLNET_EXAMPLES = """examples:
  ldmkit train controlnet --model emoji --data data/emoji --condition silhouette --out runs/cn
  ldmkit train controlnet --model emoji --data data/emoji --condition canny --out runs/cn-canny
  ldmkit train controlnet --resume runs/cn                 # continue exactly where it stopped
  ldmkit train controlnet --config recipes/emoji/controlnet_shapes.toml --out runs/cn-shapes  # from runs/cn,
      # images cut into random shapes (--init-controlnet runs/cn --shape-augment 0.6); then
      # recipes/emoji/controlnet_outlines.toml (--shape-augment-silhouettes): the shipped emoji-silhouette
  torchrun --nproc-per-node 2 -m ldmkit train controlnet --model emoji --data data/emoji --out runs/cn
  ldmkit export runs/cn emoji-silhouette.safetensors --half   # the original ControlNet layout (control_model.*)
  ldmkit generate "red heart" --model emoji --controlnet emoji-silhouette.safetensors --control-image star.png
  (metrics.jsonl: silhouette_iou of held-out silhouettes; samples/: map | output pairs)
"""

EXPORT_EXAMPLES = """examples:
  ldmkit export runs/ldm model.safetensors           # EMA weights + VAE + text encoder, one file
  ldmkit export runs/ldm model-fp16.safetensors --half
  ldmkit generate --model model.safetensors "a smiling cat"
  ldmkit export runs/vae vae.safetensors             # a VAE run: standalone VAE file
  ldmkit export runs/ldm model.safetensors --vae runs/vae-decoder   # ship a decoder fine-tune of the run's VAE
  ldmkit export runs/lora style.safetensors --half   # a LoRA run: its EMA LoRA weights, kohya layout
  ldmkit export runs/lora style.safetensors --layout peft   # diffusers/PEFT keys (load_lora_weights)
  ldmkit export runs/cn emoji-silhouette.safetensors --half  # a ControlNet run: original layout, EMA weights
  ldmkit export emoji emoji-ft.safetensors --half --vae runs/vae-decoder2   # a model file or built-in name:
                                                     # rewritten with a decoder fine-tune of its VAE
"""


@dataclass(frozen=True)
class Trainer:
    """One `ldmkit train KIND` subcommand: its help, examples, flags and handler."""

    help: str
    examples: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], None]


def _config_trainer(kind: str, help: str, examples: str) -> Trainer:
    """A trainer driven by TrainConfig: run flags plus one flag per relevant setting."""
    def add_arguments(p: argparse.ArgumentParser) -> None:
        _add_run_flags(p)
        add_config_flags(p, kind)

    return Trainer(help, examples, add_arguments, cmd_train)


# flags set by hand below, or not settable on the command line
_SPECIAL = {"kind", "arch"}
_METAVARS = {"data": "DIR", "model": "PRESET", "vae": "RUN_DIR|MODEL", "text_encoder": "MODEL", "device": "DEVICE",
             "init_from": "MODEL"}
# shorter spellings: `train lora --model sd15.safetensors --rank 8 --alpha 8` (lora has no preset --model)
_ALIASES = {("lora", "init_from"): "--model", ("lora", "lora_rank"): "--rank", ("lora", "lora_alpha"): "--alpha",
            ("lcm", "init_from"): "--model", ("taesd", "init_from"): "--model", ("taesd", "taesd_width"): "--width",
            ("embedding", "init_from"): "--model", ("controlnet", "init_from"): "--model"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def applies_to(help_: str, kind: str) -> bool:
    """Whether a setting matters for ``kind``: its help may start with the kinds that use it (``unet/lora: ``)."""
    prefix, sep, _ = help_.partition(":")
    kinds = prefix.split("/")
    return not sep or not set(kinds) <= set(KINDS) or kind in kinds


def add_config_flags(p: argparse.ArgumentParser, kind: str) -> None:
    """One flag per TrainConfig field that matters for ``kind``; all default to None (= unset)."""
    types_, helps, base = field_types(), field_help(), defaults(kind)  # type: ignore[arg-type]
    for f in dataclasses.fields(TrainConfig):
        help_ = helps[f.name]
        if f.name in _SPECIAL or not applies_to(help_, kind):
            continue
        tp, default = types_[f.name], getattr(base, f.name)
        help_ = f"{help_} (default: {default!r})" if default not in ("", []) else help_
        kw: dict[str, Any] = {"default": None, "help": help_, "dest": f.name}
        flags = [_flag(f.name)]
        if (kind, f.name) in _ALIASES:
            flags.insert(0, _ALIASES[kind, f.name])
        if tp is bool:
            p.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(tp) is Literal:
            p.add_argument(*flags, choices=typing.get_args(tp), **kw)
        elif typing.get_origin(tp) is list:
            p.add_argument(*flags, nargs="+", metavar="TEXT", **kw)
        else:
            p.add_argument(*flags, type=finite_float if tp is float else tp,
                           metavar=_METAVARS.get(f.name, tp.__name__.upper()), **kw)
    if kind not in ("lora", "lcm", "taesd", "embedding", "controlnet"):  # these take their model's architecture
        p.add_argument("--arch", action="append", default=[], metavar="PART.FIELD=VALUE",
                       help="architecture override, repeatable: unet.model_channels=64, vae.ch_mult=1,2,4, "
                            "text.layers=6")


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=None, help="run folder for checkpoints, samples and metrics")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a run exactly from its checkpoint")
    p.add_argument("--config", default=None, metavar="FILE", help="settings from a TOML file, e.g. a run's config.toml")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop (with a checkpoint) after N steps of this invocation; resume later")


def config_from_args(args: argparse.Namespace, kind: str) -> tuple[TrainConfig, Path, bool]:
    """(settings, run folder, resume?) from the flags, a --config file and a resumed run's config.toml."""
    cfg = defaults(kind)  # type: ignore[arg-type]
    if args.resume:
        run_dir = Path(args.resume)
        if args.out and Path(args.out).resolve() != run_dir.resolve():
            raise TrainError("--out and --resume name different folders; --resume RUN_DIR continues in RUN_DIR")
        if not (run_dir / "config.toml").exists():
            raise TrainError(f"--resume {run_dir}: no config.toml there; is it a training run folder?")
        cfg = load_toml(run_dir / "config.toml", cfg)
        if cfg.kind != kind:
            raise TrainError(f"{run_dir} is a {cfg.kind} run; continue it with `ldmkit train {cfg.kind} "
                             f"--resume {run_dir}`")
    elif args.out and kind == "embedding" and Path(args.out).suffix.lower() in (".safetensors", ".pt"):
        # `--out embeddings/mycat.safetensors` (A1111's habit): the file is the product, rewritten at every
        # checkpoint; the run (checkpoint, samples, metrics) goes to a hidden folder beside it, which an
        # --embeddings-dir scan skips
        out = Path(args.out)
        if out.suffix.lower() != ".safetensors":
            raise TrainError(f"--out {out}: ldmkit writes embeddings as .safetensors; "
                             f"use {out.with_suffix('.safetensors')}")
        run_dir = out.parent / f".{out.stem}.run"
        cfg = cfg.replace(embedding_file=str(out))
    elif args.out:
        run_dir = Path(args.out)
    else:
        raise TrainError(f"no run folder: pass --out RUN_DIR (or --resume RUN_DIR), e.g. --out runs/{kind}")
    if args.config:
        cfg = load_toml(args.config, cfg)
    if cfg.kind != kind:
        raise TrainError(f"the settings are for a {cfg.kind} run, but `ldmkit train {kind}` was called")
    changes = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
               if f.name not in _SPECIAL and getattr(args, f.name, None) is not None}
    if getattr(args, "arch", None):
        arch = {part: dict(o) for part, o in cfg.arch.items()}
        for text in args.arch:
            part, name, value = parse_arch_override(text)
            arch.setdefault(part, {})[name] = value
        changes["arch"] = arch
    return cfg.replace(**changes), run_dir, bool(args.resume)


def cmd_train(args: argparse.Namespace) -> None:
    from ldmkit.train import train

    kind = args.train_kind
    cfg, run_dir, resume = config_from_args(args, kind)
    try:
        out = train(cfg, run_dir, resume=resume, stop_after=args.stop_after)
    except KeyboardInterrupt:
        print(f"stopped; continue from the last checkpoint with: ldmkit train {kind} --resume {run_dir}",
              file=sys.stderr)
        raise
    print(out)


def cmd_export(args: argparse.Namespace) -> None:
    from ldmkit.train import export_run

    print(export_run(args.run_dir, args.output, half=args.half, vae=args.vae, layout=args.layout, scale=args.scale))


# `ldmkit train KIND`; a new trainer (e.g. LoRA) adds an entry here
TRAINERS: dict[str, Trainer] = {
    "vae": _config_trainer("vae", "train the autoencoder (images <-> latents)", VAE_EXAMPLES),
    "unet": _config_trainer("unet", "train the latent diffusion U-Net (and a text encoder), from scratch or "
                            "fine-tuning a model (--init-from)", UNET_EXAMPLES),
    "lora": _config_trainer("lora", "train LoRA modules on a Stable Diffusion model (a kohya-format file)",
                            LORA_EXAMPLES),
    "lcm": _config_trainer("lcm", "latent consistency distillation of a model: a few-step model (sampler LCM, "
                           "4 steps, CFG 1) or an LCM-LoRA (--lora-rank R)", LCM_EXAMPLES),
    "taesd": _config_trainer("taesd", "distil a tiny autoencoder (TAESD) from a model's VAE: a fast decoder "
                             "for --vae and live previews", TAESD_EXAMPLES),
    "embedding": _config_trainer("embedding", "textual inversion: vectors for a new word on a frozen model (an "
                                 "embedding file for --embeddings-dir)", EMBEDDING_EXAMPLES),
    "controlnet": _config_trainer("controlnet", "train a ControlNet for a model (frozen) on maps made from the "
                                  "training images: silhouettes or Canny edges", CONTROLNET_EXAMPLES),
}


def register(add: Callable[..., argparse.ArgumentParser]) -> None:
    t = add("train", "train a VAE, a latent diffusion U-Net or a LoRA from images and captions", TRAIN_EXAMPLES)
    sub = t.add_subparsers(dest="train_kind", required=True, metavar="KIND")
    for name, trainer in TRAINERS.items():
        p = sub.add_parser(name, help=trainer.help, description=trainer.help, epilog=trainer.examples,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        trainer.add_arguments(p)
        p.set_defaults(func=trainer.handler)
    e = add("export", "write a training run's EMA weights as one .safetensors model (VAE, LoRA) file",
            EXPORT_EXAMPLES)
    e.add_argument("run_dir", help="a `ldmkit train` run folder, or a model (file or built-in name) to rewrite")
    e.add_argument("output", help="the .safetensors file to write")
    e.add_argument("--half", action="store_true", help="store weights as float16")
    e.add_argument("--vae", default="", metavar="RUN_DIR|MODEL",
                   help="U-Net runs: ship this decoder fine-tune of the run's VAE (train vae --freeze-encoder)")
    e.add_argument("--layout", choices=("kohya", "peft"), default="kohya",
                   help="LoRA runs: kohya/A1111 keys (lora_unet_...) or diffusers/PEFT keys (unet....lora_A)")
    e.add_argument("--scale", type=finite_float, default=1.0, metavar="S",
                   help="ControlNet runs: multiply its residuals by S (its zero convolutions), as --control-weight S "
                        "would at generation; a file's weight 1 is then the run's S")
    e.set_defaults(func=cmd_export)

