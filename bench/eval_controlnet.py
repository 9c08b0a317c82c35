"""Evaluate a silhouette ControlNet for the emoji model and write its numbers into its model card.

    python bench/eval_controlnet.py --controlnet emoji-silhouette --data data/emoji [--quick]

Metrics (issue 16, part 6), each with and without the ControlNet (same prompts, seeds and sampler):
1. silhouette IoU: the output's foreground against the given silhouette (mean over images), for
   a. the held-out images' silhouettes (holdout.json), each with its own caption;
   b. the same silhouettes, each with the caption of the held-out image half the list away (the map, not the
      caption, must give the shape);
   c. geometric shapes (star, circle, square, triangle) drawn in white on black, each with training captions.
   Foreground of an output = what the dataset calls foreground (ldmkit.preprocess.foreground_mask): the
   images are drawn on white, so background = pixels within 24 (of 255) of white in every channel that are
   4-connected to the image border; everything else is foreground.
2. caption retrieval (bench/eval_emoji.py's): generate from training captions, rank every dataset image by
   distance to the output (16x16 area-downsampled RGB), top-1 / top-5; with the ControlNet the map is the
   caption's own image's silhouette (and, for contrast, another image's).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from eval_emoji import contact_sheet, features, generate, load_dataset, retrieval
from PIL import Image, ImageDraw

from ldmkit import api
from ldmkit.checkpoint import atomic_write_text
from ldmkit.controlnet import load_controlnet
from ldmkit.preprocess import foreground_mask, silhouette
from ldmkit.train.controlnet import iou

CARD = Path("docs/models/emoji-silhouette.md")
BEGIN, END = "<!-- eval:begin -->", "<!-- eval:end -->"
SHAPES = ("star", "circle", "square", "triangle")


def shape_map(name: str, size: int = 64) -> Image.Image:
    """A white ``name`` on black, about 70% of the image wide."""
    im = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(im)
    c, r = size / 2, size * 0.36
    if name == "circle":
        d.ellipse([c - r, c - r, c + r, c + r], fill=255)
    elif name == "square":
        d.rectangle([c - r * 0.85, c - r * 0.85, c + r * 0.85, c + r * 0.85], fill=255)
    elif name == "triangle":
        d.polygon([(c, c - r), (c + r, c + r * 0.75), (c - r, c + r * 0.75)], fill=255)
    elif name == "star":
        pts = [(c + (r if k % 2 == 0 else r * 0.42) * math.sin(k * math.pi / 5),
                c - (r if k % 2 == 0 else r * 0.42) * math.cos(k * math.pi / 5)) for k in range(10)]
        d.polygon(pts, fill=255)
    else:
        raise ValueError(f"unknown shape {name!r}; choose one of {', '.join(SHAPES)}")
    return im.convert("RGB")


def as_maps(images: list[Image.Image]) -> torch.Tensor:
    """(N, 3, H, W) control maps in [0, 1] from white-on-black PIL maps."""
    return torch.stack([torch.from_numpy(np.asarray(m.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
                        for m in images])


def mean_iou(outputs: list[Image.Image], maps: list[Image.Image]) -> float:
    return float(np.mean([iou(foreground_mask(o), np.asarray(m.convert("L")) > 127)
                          for o, m in zip(outputs, maps, strict=True)]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="emoji")
    ap.add_argument("--controlnet", default="emoji-silhouette", help="a ControlNet file or built-in name")
    ap.add_argument("--data", default="data/emoji")
    ap.add_argument("--held", type=int, default=128, help="held-out silhouettes (of holdout.json's images)")
    ap.add_argument("--per-shape", type=int, default=16, help="captions drawn in each geometric shape")
    ap.add_argument("--captions", type=int, default=100, help="training captions for retrieval")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg-scale", type=float, default=5.0)
    ap.add_argument("--sampler", default="DPM++ 2M")
    ap.add_argument("--card", default=str(CARD))
    ap.add_argument("--outputs", default=str(CARD.parent), help="folder for the contact sheets and the json")
    ap.add_argument("--quick", action="store_true", help="small numbers, for a smoke run")
    args = ap.parse_args(argv)
    if args.quick:
        args.held, args.per_shape, args.captions, args.steps = 8, 2, 8, 4
    torch.set_num_threads(1)
    t0 = time.time()
    model = api.load(args.model).model
    net = load_controlnet(args.controlnet, model.cfg.unet)
    size = model.cfg.native_size
    root = Path(args.data)
    rows, holdout = load_dataset(root)
    index = {r["key"]: i for i, r in enumerate(rows)}
    images = [Image.open(root / r["file_name"]).convert("RGB") for r in rows]
    data_feats = features(images)
    rng = random.Random(0)
    held = sorted((r for r in rows if r["key"] in holdout), key=lambda r: r["key"])[: args.held]
    train_rows = [r for r in rows if r["key"] not in holdout]
    results: dict[str, float] = {}

    def both(name: str, prompts: list[str], maps: list[Image.Image], seed0: int) -> tuple[list, list]:
        seeds = list(range(seed0, seed0 + len(prompts)))
        plain = generate(model, prompts, seeds, args.steps, args.cfg_scale, size, args.sampler)
        ctl = generate(model, prompts, seeds, args.steps, args.cfg_scale, size, args.sampler,
                       control=(net, as_maps(maps)))
        results[f"{name}_iou_without"], results[f"{name}_iou_with"] = mean_iou(plain, maps), mean_iou(ctl, maps)
        return plain, ctl

    # 1a / 1b: held-out silhouettes with their own and with another image's caption
    held_maps = [silhouette(images[index[r["key"]]]) for r in held]
    own = [r["text"] for r in held]
    both("held_own", own, held_maps, 5000)
    half = len(own) // 2  # sorted by key, neighbours are siblings (skin tones): pair across the list instead
    other = own[half:] + own[:half]
    other_plain, other_ctl = both("held_other", other, held_maps, 6000)
    # 1c: geometric shapes with training captions
    shape_caps = [r["text"] for r in rng.sample(train_rows, args.per_shape)]
    shape_maps, shape_prompts = [], []
    for s in SHAPES:
        shape_maps += [shape_map(s, size)] * len(shape_caps)
        shape_prompts += shape_caps
    shape_plain, shape_ctl = both("shapes", shape_prompts, shape_maps, 7000)
    for k, s in enumerate(SHAPES):
        sl = slice(k * len(shape_caps), (k + 1) * len(shape_caps))
        results[f"{s}_iou_with"] = mean_iou(shape_ctl[sl], shape_maps[sl])
        results[f"{s}_iou_without"] = mean_iou(shape_plain[sl], shape_maps[sl])
    # 2: retrieval, bench/eval_emoji.py's metric 1 on the first N of its caption sample (random.Random(0))
    sample = random.Random(0).sample(train_rows, min(args.captions, len(train_rows)))
    caps, true = [r["text"] for r in sample], [index[r["key"]] for r in sample]
    seeds = list(range(1000, 1000 + len(sample)))
    plain = generate(model, caps, seeds, args.steps, args.cfg_scale, size, args.sampler)
    results["retrieval_top1_without"], results["retrieval_top5_without"] = retrieval(features(plain), data_feats, true)
    own_maps = [silhouette(images[i]) for i in true]
    ctl = generate(model, caps, seeds, args.steps, args.cfg_scale, size, args.sampler, control=(net, as_maps(own_maps)))
    results["retrieval_top1_with"], results["retrieval_top5_with"] = retrieval(features(ctl), data_feats, true)
    results["retrieval_iou_with"] = mean_iou(ctl, own_maps)
    shifted = own_maps[1:] + own_maps[:1]
    ctl_o = generate(model, caps, seeds, args.steps, args.cfg_scale, size, args.sampler,
                     control=(net, as_maps(shifted)))
    top1, top5 = retrieval(features(ctl_o), data_feats, true)
    results["retrieval_top1_other_map"], results["retrieval_top5_other_map"] = top1, top5
    elapsed = time.time() - t0

    outputs = Path(args.outputs)
    n = min(16, len(shape_caps)) if len(shape_caps) else 0
    pick = [k * len(shape_caps) + j for k in range(len(SHAPES)) for j in range(min(4, n))]
    contact_sheet([x for i in pick for x in (shape_maps[i], shape_plain[i], shape_ctl[i])],
                  [c for i in pick for c in ("map", "without", shape_prompts[i])],
                  outputs / "emoji-silhouette-shapes.png", cols=6)
    m = min(8, len(held))
    contact_sheet([x for i in range(m) for x in (held_maps[i], other_plain[i], other_ctl[i])],
                  [c for i in range(m) for c in ("map", "without", other[i])],
                  outputs / "emoji-silhouette-held.png", cols=6)

    def row(label: str, key: str, target: str = "") -> str:
        return f"| {label} | {results[key + '_without']:.3f} | {results[key + '_with']:.3f} | {target} |"

    table = [
        "| silhouette IoU (mean) | without ControlNet | with | target |", "|---|---|---|---|",
        row(f"1a. {len(held)} held-out silhouettes, own caption", "held_own_iou", "≥ 0.8"),
        row(f"1b. {len(held)} held-out silhouettes, another held-out caption", "held_other_iou", "≥ 0.8"),
        row(f"1c. shapes ({', '.join(SHAPES)}) x {len(shape_caps)} training captions", "shapes_iou", "≥ 0.8"),
        *[row(f"1c. {s}", f"{s}_iou") for s in SHAPES],
        "",
        "| caption retrieval (training captions) | without ControlNet | with (own silhouette) | with (another's) |",
        "|---|---|---|---|",
        f"| top-1 ({len(sample)} captions) | {results['retrieval_top1_without']:.1%} | "
        f"{results['retrieval_top1_with']:.1%} | {results['retrieval_top1_other_map']:.1%} |",
        f"| top-5 (target: with ≥ without − 5 points) | {results['retrieval_top5_without']:.1%} | "
        f"{results['retrieval_top5_with']:.1%} | {results['retrieval_top5_other_map']:.1%} |",
        "",
        f"Sampler {args.sampler}, {args.steps} steps, CFG {args.cfg_scale:g}, {size}x{size}; seeds 5000+i (1a), "
        f"6000+i (1b), 7000+i (1c), 1000+i (retrieval, the captions of "
        f"bench/eval_emoji.py's metric 1); one thread; evaluation took {elapsed / 60:.1f} min.",
        "", f"Command: `python bench/eval_controlnet.py --model {args.model} --controlnet {args.controlnet} --data "
        f"{args.data} --held {args.held} --per-shape {args.per_shape} --captions {args.captions} --steps {args.steps} "
        f"--cfg-scale {args.cfg_scale:g}`",
    ]
    text = "\n".join(table)
    print(text)
    card = Path(args.card)
    if card.exists() and BEGIN in card.read_text():
        body = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), BEGIN + "\n" + text + "\n" + END, card.read_text(),
                      flags=re.S)
        atomic_write_text(card, body)
    atomic_write_text(outputs / "emoji-silhouette-eval.json", json.dumps({**results, "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
