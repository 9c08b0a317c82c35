"""Does the caption pick the content while the map picks the shape? The issue's demo, measured.

    python bench/eval_controlnet_caption.py --controlnet emoji-silhouette [--seeds 8] [--out DIR]

"red heart" drawn in each of bench/eval_controlnet.py's geometric shapes (star, circle, square, triangle), seeds
0..N-1, with and without the ControlNet; per shape: the IoU of the output's foreground with the shape (the
dataset's foreground definition) and the share of foreground pixels that are red (R >= 150, R - G >= 80,
R - B >= 80; the dataset's own "red heart" is the reference). Also the built-in test's case (seed 3, 12 steps,
the star of tests/test_controlnet_train.py) through the CLI's defaults.

Colour retrieval (shape-free): bench/eval_controlnet.py's retrieval captions and seeds (the first --captions of
bench/eval_emoji.py's sample), drawn without the ControlNet, with the caption's own image's silhouette and with
the next caption's image's silhouette (bench/eval_controlnet.py's "another's"); each output and each dataset
image is described by the histogram of its foreground colours (4 bins per channel, sums to 1), and the caption's
own image is ranked among all dataset images by Euclidean distance (top-1 / top-5). Unlike the 16x16 RGB
retrieval it does not punish an output for having the map's shape instead of its emoji's own.
Prints markdown tables and writes a json and a contact sheet to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from eval_controlnet import SHAPES, as_maps, shape_map
from eval_emoji import contact_sheet, generate, load_dataset, retrieval
from PIL import Image

from ldmkit import api
from ldmkit.controlnet import load_controlnet
from ldmkit.preprocess import foreground_mask
from ldmkit.train.controlnet import iou

PROMPT = "red heart"


def red_share(image: Image.Image) -> float:
    """Share of the foreground's pixels that are red (0 when nothing is drawn)."""
    fg = foreground_mask(image)
    a = np.asarray(image.convert("RGB"), dtype=np.int16)[fg]
    if not len(a):
        return 0.0
    r, g, b = a[:, 0], a[:, 1], a[:, 2]
    return float(((r >= 150) & (r - g >= 80) & (r - b >= 80)).mean())


def colour_features(images: list[Image.Image], bins: int = 4) -> np.ndarray:
    """(N, bins**3) histograms of each image's foreground colours, normalised to sum 1 (zeros when empty)."""
    out = np.zeros((len(images), bins**3), np.float64)
    for i, im in enumerate(images):
        a = np.asarray(im.convert("RGB"), dtype=np.int64)[foreground_mask(im)] * bins // 256
        if len(a):
            out[i] = np.bincount((a[:, 0] * bins + a[:, 1]) * bins + a[:, 2], minlength=bins**3) / len(a)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="emoji")
    ap.add_argument("--controlnet", default="emoji-silhouette")
    ap.add_argument("--data", default="data/emoji")
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg-scale", type=float, default=5.0)
    ap.add_argument("--captions", type=int, default=64, help="training captions for the colour retrieval (0: skip)")
    ap.add_argument("--control-mode", default="balanced", choices=("balanced", "prompt", "controlnet", "guess"),
                    help="the A1111 control mode (prompt: soft per-skip weights 0.825^(K-k); controlnet: soft and "
                         "conditional rows only) or diffusers' guess mode, for the shapes and the CLI case")
    ap.add_argument("--out", default="/tmp/eval_controlnet_caption")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    model = api.load(args.model).model
    net = load_controlnet(args.controlnet, model.cfg.unet)
    size = model.cfg.native_size
    rows = [json.loads(line) for line in (Path(args.data) / "metadata.jsonl").read_text().splitlines() if line]
    ref = next((r for r in rows if r["text"] == PROMPT), None)
    res: dict[str, float] = {}
    if ref is not None:
        res["reference_red_share"] = red_share(Image.open(Path(args.data) / ref["file_name"]).convert("RGB"))
    seeds = list(range(args.seeds))
    mode = [("guess_mode", True)] if args.control_mode == "guess" else [("control_mode", args.control_mode)]
    tiles, labels = [], []
    for s in SHAPES:
        m = shape_map(s, size)
        target = np.asarray(m.convert("L")) > 127
        plain = generate(model, [PROMPT] * len(seeds), seeds, args.steps, args.cfg_scale, size)
        ctl = generate(model, [PROMPT] * len(seeds), seeds, args.steps, args.cfg_scale, size,
                       control=(net, as_maps([m] * len(seeds)), *mode))
        for name, outs in (("without", plain), ("with", ctl)):
            res[f"{s}_iou_{name}"] = float(np.mean([iou(foreground_mask(o), target) for o in outs]))
            res[f"{s}_red_{name}"] = float(np.mean([red_share(o) for o in outs]))
        tiles += [m, *ctl[:4]]
        labels += [s, *[f"seed {i}" for i in seeds[:4]]]
    for name in ("iou", "red"):
        for w in ("without", "with"):
            res[f"mean_{name}_{w}"] = float(np.mean([res[f"{s}_{name}_{w}"] for s in SHAPES]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # the built-in test's case, through the CLI and its defaults
    from PIL import ImageDraw

    from ldmkit import cli

    star = Image.new("L", (size, size), 0)
    pts = [(32 + r * np.sin(k * np.pi / 5), 32 - r * np.cos(k * np.pi / 5))
           for k, r in enumerate([23 if k % 2 == 0 else 10 for k in range(10)])]
    ImageDraw.Draw(star).polygon(pts, fill=255)
    star.save(out / "star_shape.png")
    cli.main(["generate", PROMPT, "--model", args.model, "--seed", "3", "--steps", "12", "--controlnet",
              args.controlnet, "--control-image", str(out / "star_shape.png"), "--control-mode", args.control_mode,
              "-o", str(out / "cli_heart_star.png")])
    cli_out = Image.open(out / "cli_heart_star.png").convert("RGB")
    fg = foreground_mask(cli_out)
    res["cli_star_iou"] = iou(fg, np.asarray(star) > 127)
    res["cli_star_red"] = red_share(cli_out)
    rgb = np.asarray(cli_out, dtype=np.float64)[fg].mean(0) if fg.any() else np.full(3, 255.0)
    res["cli_star_mean_r"], res["cli_star_mean_g"], res["cli_star_mean_b"] = rgb.tolist()
    contact_sheet(tiles, labels, out / "red-heart-shapes.png", cols=5)
    if args.captions:
        import random

        from ldmkit.preprocess import silhouette

        root = Path(args.data)
        drows, holdout = load_dataset(root)
        index = {r["key"]: i for i, r in enumerate(drows)}
        images = [Image.open(root / r["file_name"]).convert("RGB") for r in drows]
        data_feats = colour_features(images)
        train_rows = [r for r in drows if r["key"] not in holdout]
        sample = random.Random(0).sample(train_rows, min(args.captions, len(train_rows)))
        caps, true = [r["text"] for r in sample], [index[r["key"]] for r in sample]
        cseeds = list(range(1000, 1000 + len(sample)))
        own_maps = [silhouette(images[i]) for i in true]
        shifted = own_maps[1:] + own_maps[:1]
        for name, maps in (("without", None), ("own", own_maps), ("another", shifted)):
            control = None if maps is None else (net, as_maps(maps))
            outs = generate(model, caps, cseeds, args.steps, args.cfg_scale, size, control=control)
            res[f"colour_top1_{name}"], res[f"colour_top5_{name}"] = retrieval(colour_features(outs), data_feats, true)
            if name == "another":
                contact_sheet([x for i in range(8) for x in (shifted[i], outs[i])],
                              [c for i in range(8) for c in ("map", caps[i])], out / "another-silhouette.png", cols=8)
    res["seconds"] = time.time() - t0
    (out / "red-heart.json").write_text(json.dumps({**res, "args": vars(args)}, indent=2))
    lines = [f"| \"{PROMPT}\" in a shape ({args.seeds} seeds, {args.steps} steps, CFG {args.cfg_scale:g}) | "
             "IoU without | IoU with | red share without | red share with |", "|---|---|---|---|---|"]
    for s in (*SHAPES, "mean"):
        lines.append(f"| {s} | {res[f'{s}_iou_without']:.3f} | {res[f'{s}_iou_with']:.3f} | "
                     f"{res[f'{s}_red_without']:.1%} | {res[f'{s}_red_with']:.1%} |")
    if "reference_red_share" in res:
        lines.append(f"\nThe dataset's own \"{PROMPT}\": red share {res['reference_red_share']:.1%}.")
    lines.append(f"CLI, seed 3, 12 steps, the built-in test's star: IoU {res['cli_star_iou']:.3f}, red share "
                 f"{res['cli_star_red']:.1%}, mean foreground RGB {res['cli_star_mean_r']:.0f}/"
                 f"{res['cli_star_mean_g']:.0f}/{res['cli_star_mean_b']:.0f}.")
    if args.captions:
        lines += ["", f"| colour retrieval ({args.captions} captions) | without ControlNet | with (own silhouette) | "
                  "with (another's) |", "|---|---|---|---|"]
        for k in ("top1", "top5"):
            lines.append(f"| {k} | {res[f'colour_{k}_without']:.1%} | {res[f'colour_{k}_own']:.1%} | "
                         f"{res[f'colour_{k}_another']:.1%} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
