"""Evaluate the emoji model and write its numbers into docs/models/emoji.md.

    python bench/eval_emoji.py --model emoji --data data/emoji [--captions 200] [--quick]

Metrics (the "default model" issue):
1. prompt adherence: generate from N random training captions (fixed seeds), rank every dataset
   image by distance to the generated one, report how often the caption's own image is nearest
   (top-1) and among the 5 nearest (top-5);
   1b. the same captions phrased as people type them ("a red apple", "an apple"), and the issue's
   headline prompt "a red apple" over 16 seeds;
2. generalisation: the same retrieval for held-out variants generated from their own caption, with
   the baseline of generating from the base emoji's caption;
3. autoencoder reconstruction PSNR on held-out images;
4. a contact sheet of 64 prompts, and the effect of the CFG scale on metric 1.

    python bench/eval_emoji.py --model emoji --data data/emoji --balanced 20    # issue 17's metric
    python bench/eval_emoji.py --model emoji --data data/emoji --contact-sheet sheet.png

--balanced N: top-1/top-5 per Unicode emoji group, N bare names per group, seeds 0-3, the settings
`ldmkit generate` uses for the model. --contact-sheet PATH: one row per group (group name on the left),
--sheet-names K names each (the same seeded draw of bare names), each drawn as `ldmkit generate NAME
--seed 0` draws it (the model's default settings and native size); with --balanced, its seed-0 images.

Feature space (fixed, model-independent): the image downsampled to 16x16 by area averaging, RGB in
[0, 1], compared by Euclidean distance.
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
from PIL import Image

from ldmkit import api, latent_norm
from ldmkit import pipeline as P
from ldmkit.checkpoint import atomic_write_text
from ldmkit.train.unet import apply_template

FEATURE_SIZE = 16
CARD = Path("docs/models/emoji.md")
BEGIN, END = "<!-- eval:begin -->", "<!-- eval:end -->"


def features(images: list[Image.Image]) -> np.ndarray:
    arr = [np.asarray(im.convert("RGB").resize((FEATURE_SIZE, FEATURE_SIZE), Image.Resampling.BOX),
                      dtype=np.float32).reshape(-1) / 255.0 for im in images]
    return np.stack(arr)


def load_dataset(root: Path) -> tuple[list[dict], set[str]]:
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines() if line.strip()]
    holdout = set(json.loads((root / "holdout.json").read_text())["keys"])
    for r in rows:
        r["key"] = Path(r["file_name"]).stem
    return rows, holdout


def generate(model, prompts: list[str], seeds: list[int], steps: int, cfg_scale: float, size: int,
             sampler: str = "DPM++ 2M", deepcache: int = 1, batch: int = 32, control=None,
             start: torch.Tensor | None = None) -> list[Image.Image]:
    """Many different prompts, one seed each, batched through the generation core (ldmkit.core).
    ``control``: (a loaded ControlNet, its maps (N, 3, size, size) in [0, 1]), one map per prompt, then any
    (ControlUnit field, value) pairs, e.g. ("control_mode", "prompt")
    ``start``: a latent (1, C, 1, 1) the first noise is centred on (img2img from it at strength 1; see
    :func:`latent_mean`) instead of 0."""
    from ldmkit.controlnet import ControlUnit

    out: list[Image.Image] = []
    for i in range(0, len(prompts), batch):
        ps, ss = prompts[i:i + batch], seeds[i:i + batch]
        units = () if control is None else (ControlUnit(control[0], control[1][i:i + batch], **dict(control[2:])),)
        params = P.GenerationParams(ps[0], steps=steps, cfg_scale=cfg_scale, sampler=sampler, width=size,
                                    height=size, seed=ss[0], deepcache=deepcache, controlnets=units)
        job = P.prepare(model, params, prompts=ps, seeds=ss)
        init = None if start is None else start.to(job.noise)
        out.extend(P.decode_latents(model, P.sample(model, job.plan, job.cond, job.uncond, job.noise,
                                                    init_latent=init)))
    return out


def latent_mean(model, data: Path, n: int = 512) -> torch.Tensor:
    """The mean (1, C, 1, 1) of the U-Net's (scaled) latents: the posterior means of ``n`` training images,
    evenly spaced. A U-Net trained on latents far from zero mean under SD's schedule (whose last noise
    level still keeps 6.8% of the signal) learns to read that offset from its input and draws from
    zero-mean noise as if the image were that far off; starting from noise centred on the mean fixes it."""
    rows, holdout = load_dataset(data)
    rows = [r for r in rows if r["key"] not in holdout]
    rows = rows[:: max(1, len(rows) // n)][:n]
    size = model.cfg.native_size
    x = torch.cat([P.image_to_tensor(Image.open(data / r["file_name"]), size, size) for r in rows])
    with torch.inference_mode():
        means = [model.vae.encode(c.to(model.device, model.dtype))[0].float() for c in x.split(64)]
    return latent_norm.to_unet(model.cfg.vae, torch.cat(means).mean((0, 2, 3), keepdim=True))


def plan_schedule(sampler: str) -> str:
    """The schedule the pipeline picks for ``sampler`` (its default), as the infotext names it."""
    from ldmkit.samplers import sampler_spec
    from ldmkit.schedules import SCHEDULE_DISPLAY_NAMES

    name = sampler_spec(sampler).schedule
    return SCHEDULE_DISPLAY_NAMES.get(name, name)


def retrieval(gen_feats: np.ndarray, data_feats: np.ndarray, true_idx: list[int]) -> tuple[float, float]:
    # 16 rows at a time: the whole (captions x images x features) difference is 11.6 GB at 1000 captions
    d = np.concatenate([((gen_feats[i:i + 16, None, :] - data_feats[None, :, :]) ** 2).sum(-1)
                        for i in range(0, len(gen_feats), 16)])
    ranks = [(d[i] < d[i, t]).sum() for i, t in enumerate(true_idx)]
    return float(np.mean([r < 1 for r in ranks])), float(np.mean([r < 5 for r in ranks]))


def psnr(model, images: list[Image.Image], size: int) -> float:
    x = torch.cat([P.image_to_tensor(im, size, size) for im in images])
    vals = []
    with torch.inference_mode():
        for chunk in x.split(32):
            mean, _ = model.vae.encode(chunk.to(model.device, model.dtype))
            rec = model.vae.decode(mean).float().clamp(-1, 1)
            # PSNR on 8-bit-quantised [0, 1] images, per image, then averaged
            a = ((chunk + 1) * 127.5).round() / 255
            b = ((rec.cpu() + 1) * 127.5).round() / 255
            mse = ((a - b) ** 2).flatten(1).mean(1)
            vals.extend((10 * torch.log10(1 / mse.clamp_min(1e-10))).tolist())
    return float(np.mean(vals))


def contact_sheet(images: list[Image.Image], captions: list[str], path: Path, cols: int = 8) -> None:
    from PIL import ImageDraw

    s = images[0].size[0]
    cell_h = s + 24
    rows = math.ceil(len(images) / cols)
    sheet = Image.new("RGB", (cols * (s + 8), rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (im, cap) in enumerate(zip(images, captions, strict=True)):
        x, y = (i % cols) * (s + 8), (i // cols) * cell_h
        sheet.paste(im, (x + 4, y))
        draw.text((x + 2, y + s + 2), cap[:14], fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def group_sheet(rows: list[tuple[str, list[Image.Image], list[str]]], path: Path, label_width: int = 116,
                colors: int = 0) -> None:
    """A contact sheet with one row per (label, images, captions): the label (a group's name) on the left,
    each image with its caption under it; ``colors``: quantised to that many colours (0: full colour)."""
    from PIL import ImageDraw

    s = rows[0][1][0].size[0]
    cell_w, cell_h = s + 8, s + 24
    cols = max(len(images) for _, images, _ in rows)
    sheet = Image.new("RGB", (label_width + cols * cell_w, len(rows) * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, images, captions) in enumerate(rows):
        y = r * cell_h
        draw.text((4, y + s // 2 - 6), label, fill=(0, 0, 0))  # Pillow's default font: ~6 px a character
        for i, (im, cap) in enumerate(zip(images, captions, strict=True)):
            x = label_width + i * cell_w
            sheet.paste(im.convert("RGB"), (x + 4, y))
            draw.text((x + 2, y + s + 2), cap[:14], fill=(0, 0, 0))
    if colors:
        sheet = sheet.quantize(colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, optimize=True)


def group_setup(args: argparse.Namespace, per_group: int):
    """What --contact-sheet and --balanced share: the model, its size and default settings, the dataset's rows and
    ``per_group`` bare names from each Unicode group (balanced_captions' seeded draw, holdout excluded)."""
    from ldmkit.data.emoji_groups import balanced_captions, load_emoji_groups

    torch.set_num_threads(1)
    groups = load_emoji_groups(args.emoji_test)
    model = api.load(args.model).model
    size = args.size or model.cfg.native_size
    rows, holdout = load_dataset(Path(args.data))
    chosen = balanced_captions(rows, groups, per_group, seed=0, exclude=holdout)
    return model, size, default_settings(model), rows, chosen


def sheet_main(args: argparse.Namespace) -> int:
    """--contact-sheet PATH alone: one row per Unicode group, --sheet-names bare names each (balanced_captions'
    seeded draw, holdout excluded), seed 0, the settings and size `ldmkit generate` uses for the model."""
    from ldmkit.data.emoji_groups import GROUPS

    if args.sheet_names < 1:
        raise SystemExit("--sheet-names K: names per group, at least 1")
    t0 = time.time()
    model, size, (sampler, steps, cfg), rows, chosen = group_setup(args, args.sheet_names)
    prompts = [r["text"] for g in GROUPS for r in chosen[g]]
    start = latent_mean(model, Path(args.data)) if args.start_mean else None
    images = generate(model, prompts, [0] * len(prompts), steps, cfg, size, sampler, start=start)
    k = args.sheet_names
    group_sheet([(g, images[i * k:(i + 1) * k], prompts[i * k:(i + 1) * k]) for i, g in enumerate(GROUPS)],
                Path(args.contact_sheet), colors=args.sheet_colors)
    print(f"{args.contact_sheet}: {len(GROUPS)} groups x {k} names, seed 0, {sampler}, {steps} steps, CFG {cfg:g}, "
          f"{size}x{size} ({time.time() - t0:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="emoji")
    ap.add_argument("--data", default="data/emoji")
    ap.add_argument("--captions", type=int, default=200)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg-scale", type=float, default=5.0)
    ap.add_argument("--sampler", default="DPM++ 2M", help="e.g. LCM for a consistency-distilled model (emoji-lcm)")
    ap.add_argument("--deepcache", type=int, default=1, metavar="N",
                    help="DeepCache interval for every generation (1 = off); compare against a run without")
    ap.add_argument("--cfg-sweep", default="1,3,5,7", help="CFG scales for the sweep on metric 1")
    ap.add_argument("--sweep-captions", type=int, default=100)
    ap.add_argument("--card", default=str(CARD))
    ap.add_argument("--outputs", default=str(CARD.parent), help="folder for the contact sheets and emoji-eval.json")
    ap.add_argument("--marker", default="eval", help="the card section rewritten: between <!-- MARKER:begin --> "
                    "and <!-- MARKER:end --> (e.g. eval-lcm for the distilled model)")
    ap.add_argument("--size", type=int, default=None, help="image size (default: the model's native size)")
    ap.add_argument("--quick", action="store_true", help="small numbers, for a smoke run")
    ap.add_argument("--balanced", type=int, default=None, metavar="N",
                    help="only the category-balanced metric: N bare names from each of Unicode's nine emoji groups, "
                    "seeds 0-3, the settings `ldmkit generate` uses for the model (its recommended ones, else the "
                    "CLI's defaults); writes emoji-balanced.json (and the card's <!-- balanced --> section)")
    ap.add_argument("--emoji-test", default=None, help="Unicode's emoji-test.txt (default: Debian unicode-data's)")
    ap.add_argument("--contact-sheet", default=None, metavar="PATH",
                    help="a PNG with one row per Unicode group: --sheet-names bare names each, seed 0, the model's "
                    "default settings and native size (only this, unless --balanced: then its seed-0 images)")
    ap.add_argument("--sheet-names", type=int, default=8, metavar="K", help="names per group on the contact sheet")
    ap.add_argument("--start-mean", action="store_true",
                    help="--balanced/--contact-sheet: start from noise centred on the mean training latent instead of "
                    "0 (see latent_mean; not what `ldmkit generate` does today)")
    ap.add_argument("--sheet-colors", type=int, default=0, metavar="N",
                    help="quantise the contact sheet to N colours (256 keeps a 9x8 sheet under 200 KB for docs/; "
                    "default: full colour)")
    args = ap.parse_args(argv)
    if args.balanced is not None:
        return balanced_main(args)
    if args.contact_sheet is not None:
        return sheet_main(args)
    if args.quick:
        args.captions, args.sweep_captions, args.steps = 16, 8, 4
    torch.set_num_threads(1)  # on a shared 2-core machine one thread is faster than two fighting
    t0 = time.time()
    pipe = api.load(args.model)
    model = pipe.model
    size = args.size or model.cfg.native_size
    rows, holdout = load_dataset(Path(args.data))
    keys = [r["key"] for r in rows]
    index = {k: i for i, k in enumerate(keys)}
    data_images = [Image.open(Path(args.data) / r["file_name"]).convert("RGB") for r in rows]
    data_feats = features(data_images)
    train_rows = [r for r in rows if r["key"] not in holdout]
    held_rows = [r for r in rows if r["key"] in holdout]
    rng = random.Random(0)
    sample = rng.sample(train_rows, min(args.captions, len(train_rows)))
    caps = [r["text"] for r in sample]
    seeds = list(range(1000, 1000 + len(sample)))

    results: dict[str, object] = {}
    gen = generate(model, caps, seeds, args.steps, args.cfg_scale, size, args.sampler, args.deepcache)
    results["train_top1"], results["train_top5"] = retrieval(features(gen), data_feats,
                                                             [index[r["key"]] for r in sample])
    phrased = [apply_template("{a} {caption}", c) for c in caps]
    gen_p = generate(model, phrased, seeds, args.steps, args.cfg_scale, size, args.sampler, args.deepcache)
    results["phrased_top1"], results["phrased_top5"] = retrieval(features(gen_p), data_feats,
                                                                 [index[r["key"]] for r in sample])
    apple_seeds = list(range(16))
    gen_a = generate(model, ["a red apple"] * 16, apple_seeds, args.steps, args.cfg_scale, size, args.sampler,
                     args.deepcache)
    apple = [index[r["key"]] for r in rows if r["text"] == "red apple"]
    results["apple_top1"], results["apple_top5"] = retrieval(features(gen_a), data_feats, apple * 16)
    held_seeds = list(range(5000, 5000 + len(held_rows)))
    gen_h = generate(model, [r["text"] for r in held_rows], held_seeds, args.steps, args.cfg_scale, size,
                     args.sampler, args.deepcache)
    true_h = [index[r["key"]] for r in held_rows]
    results["held_top1"], results["held_top5"] = retrieval(features(gen_h), data_feats, true_h)
    gen_b = generate(model, [r["base"] for r in held_rows], held_seeds, args.steps, args.cfg_scale, size,
                     args.sampler, args.deepcache)
    results["base_top1"], results["base_top5"] = retrieval(features(gen_b), data_feats, true_h)
    results["psnr_holdout"] = psnr(model, [data_images[i] for i in true_h], size)
    results["psnr_train"] = psnr(model, [data_images[index[r["key"]]] for r in sample], size)
    sweep = {}
    sub = sample[: args.sweep_captions]
    for s in [float(v) for v in args.cfg_sweep.split(",")]:
        g = generate(model, [r["text"] for r in sub], seeds[: len(sub)], args.steps, s, size, args.sampler,
                     args.deepcache)
        sweep[s] = retrieval(features(g), data_feats, [index[r["key"]] for r in sub])
    sheet_rows = sample[:64]
    outputs = Path(args.outputs)
    contact_sheet(gen[:64], [r["text"] for r in sheet_rows], outputs / "emoji-sheet.png")
    contact_sheet(gen_a, [f"seed {i}" for i in apple_seeds], outputs / "emoji-a-red-apple.png")
    contact_sheet([data_images[index[r["key"]]] for r in sheet_rows], [r["text"] for r in sheet_rows],
                  outputs / "emoji-sheet-truth.png")
    elapsed = time.time() - t0

    table = [
        "| metric | value | target |", "|---|---|---|",
        f"| 1. training captions, top-1 ({len(sample)} captions, CFG {args.cfg_scale:g}) | "
        f"{results['train_top1']:.1%} | |",
        f"| 1. training captions, top-5 | {results['train_top5']:.1%} | ≥ 60% |",
        f"| 1b. the same captions phrased \"a/an …\", top-1 | {results['phrased_top1']:.1%} | |",
        f"| 1b. the same captions phrased \"a/an …\", top-5 | {results['phrased_top5']:.1%} | |",
        f"| 1b. \"a red apple\", 16 seeds: the red-apple image nearest (top-1) | {results['apple_top1']:.1%} | |",
        f"| 1b. \"a red apple\", 16 seeds: the red-apple image among the 5 nearest | {results['apple_top5']:.1%} | |",
        f"| 2. held-out variants, top-1 ({len(held_rows)} variants) | {results['held_top1']:.1%} | |",
        f"| 2. held-out variants, top-5 | {results['held_top5']:.1%} | ≥ 40% |",
        f"| 2. baseline: base emoji's caption, top-5 of the held-out image | {results['base_top5']:.1%} | |",
        f"| 3. autoencoder PSNR, held-out images | {results['psnr_holdout']:.2f} dB | ≥ 28 dB |",
        f"| 3. autoencoder PSNR, training images | {results['psnr_train']:.2f} dB | |",
        "", f"CFG scale and metric 1 ({len(sub)} captions):", "",
        "| CFG scale | top-1 | top-5 |", "|---|---|---|",
        *[f"| {s:g} | {a:.1%} | {b:.1%} |" for s, (a, b) in sweep.items()],
        "",
        f"Sampler {args.sampler} ({plan_schedule(args.sampler)}), {args.steps} steps, {size}x{size}, seeds 1000+i "
        f"(training captions) and "
        f"5000+i (held out); feature space: {FEATURE_SIZE}x{FEATURE_SIZE} area-downsampled RGB, Euclidean; "
        f"retrieval among all {len(rows)} dataset images. Evaluation took {elapsed / 60:.1f} min.",
        "", f"Command: `python bench/eval_emoji.py --model {args.model} --data {args.data} --captions "
        f"{args.captions} --steps {args.steps} --cfg-scale {args.cfg_scale:g}"
        + (f" --sampler {args.sampler}`" if args.sampler != "DPM++ 2M" else "`"),
    ]
    if args.deepcache > 1:
        table.append(f"\nWith DeepCache N = {args.deepcache} (`--deepcache {args.deepcache}` added to the command).")
    text = "\n".join(table)
    print(text)
    card = Path(args.card)
    begin, end = BEGIN.replace("eval", args.marker), END.replace("eval", args.marker)
    if card.exists() and begin in card.read_text():
        body = card.read_text()
        body = re.sub(re.escape(begin) + ".*?" + re.escape(end), begin + "\n" + text + "\n" + end, body, flags=re.S)
        atomic_write_text(card, body)
    atomic_write_text(outputs / "emoji-eval.json", json.dumps(
        {**results, "cfg_sweep": {str(k): v for k, v in sweep.items()}, "args": vars(args)}, indent=2))
    return 0


def default_settings(model) -> tuple[str, int, float]:
    """(sampler, steps, CFG scale) that `ldmkit generate` uses for ``model`` when none is given."""
    from ldmkit.recommended import apply_recommended

    chosen = apply_recommended(dict(sampler=None, scheduler=None, steps=None, cfg_scale=None),
                               getattr(model, "recommended", None))
    params = P.GenerationParams("x", **{k: v for k, v in chosen.items() if v is not None})
    return params.sampler, params.steps, params.cfg_scale


def balanced_main(args: argparse.Namespace) -> int:
    """Goal 1 of issue 17: top-1/top-5 retrieval per Unicode emoji group, the same number of bare
    names from each (non-variant, not held out), each generated with seeds 0-3."""
    from ldmkit.data.emoji_groups import GROUPS

    if args.balanced < 1:
        raise SystemExit("--balanced N: N captions per group, at least 1")
    t0 = time.time()
    model, size, (sampler, steps, cfg), rows, chosen = group_setup(args, args.balanced)
    index = {r["key"]: i for i, r in enumerate(rows)}
    data_feats = features([Image.open(Path(args.data) / r["file_name"]).convert("RGB") for r in rows])
    seeds = [0, 1, 2, 3]
    per: dict[str, tuple[float, float]] = {}
    sheet = []
    prompts = [r["text"] for g in GROUPS for r in chosen[g] for _ in seeds]  # one list: full batches
    start = latent_mean(model, Path(args.data)) if args.start_mean else None
    images = generate(model, prompts, seeds * (len(prompts) // len(seeds)), steps, cfg, size, sampler, start=start)
    n = len(seeds) * args.balanced
    for gi, g in enumerate(GROUPS):
        sel, gen = chosen[g], images[gi * n:(gi + 1) * n]
        per[g] = retrieval(features(gen), data_feats, [index[r["key"]] for r in sel for _ in seeds])
        k = min(args.sheet_names, args.balanced)  # seed 0 of the first K names: one row per group
        sheet.append((g, gen[0:len(gen):len(seeds)][:k], [r["text"] for r in sel[:k]]))
        print(f"{g}: top-1 {per[g][0]:.1%} top-5 {per[g][1]:.1%} ({time.time() - t0:.0f} s)", flush=True)
    overall = (float(np.mean([v[0] for v in per.values()])), float(np.mean([v[1] for v in per.values()])))
    outputs = Path(args.outputs)
    stem = f"emoji-balanced-{Path(args.model).stem}" if args.model != "emoji" else "emoji-balanced"
    stem += "-start-mean" if args.start_mean else ""
    group_sheet(sheet, Path(args.contact_sheet) if args.contact_sheet else outputs / f"{stem}.png",
                colors=args.sheet_colors)
    elapsed = time.time() - t0
    table = ["| group | top-1 | top-5 | target |", "|---|---|---|---|",
             *[f"| {g} | {a:.1%} | {b:.1%} | ≥ 60% |" for g, (a, b) in per.items()],
             f"| **overall** (mean of the groups) | {overall[0]:.1%} | {overall[1]:.1%} | ≥ 70% |", "",
             f"{args.balanced} bare names per group (non-variant emoji, holdout excluded, drawn with seed 0), "
             f"seeds 0-3 each: {args.balanced * 4} images per group; {sampler}, {steps} steps, CFG {cfg:g}, "
             f"{size}x{size} (`ldmkit generate`'s settings for {args.model}); retrieval among all {len(rows)} "
             f"dataset images, {FEATURE_SIZE}x{FEATURE_SIZE} area-downsampled RGB, Euclidean; groups from "
             f"Unicode's emoji-test.txt. Took {elapsed / 60:.1f} min on one thread."
             + (" Started from noise centred on the mean training latent (--start-mean)." if args.start_mean else ""),
             "", f"Command: `python bench/eval_emoji.py --model {args.model} --data {args.data} "
             f"--balanced {args.balanced}" + (" --start-mean`" if args.start_mean else "`")]
    text = "\n".join(table)
    print(text)
    card = Path(args.card)
    begin, end = BEGIN.replace("eval", f"balanced-{args.model}"), END.replace("eval", f"balanced-{args.model}")
    if card.exists() and begin in card.read_text():
        body = re.sub(re.escape(begin) + ".*?" + re.escape(end), begin + "\n" + text + "\n" + end,
                      card.read_text(), flags=re.S)
        atomic_write_text(card, body)
    atomic_write_text(outputs / f"{stem}.json", json.dumps(
        {"groups": {g: {"top1": a, "top5": b} for g, (a, b) in per.items()},
         "overall": {"top1": overall[0], "top5": overall[1]},
         "captions": {g: [r["text"] for r in chosen[g]] for g in GROUPS},
         "settings": {"sampler": sampler, "steps": steps, "cfg_scale": cfg, "size": size, "seeds": seeds,
                      "start_mean": None if start is None else start.flatten().tolist()},
         "per_group": args.balanced, "model": args.model, "seconds": elapsed}, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
