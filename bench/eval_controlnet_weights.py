"""Control weight against shape and caption for a silhouette ControlNet, on a validation set of training images
(not the model card's test sets), to choose the weight a file ships at (``ldmkit export --scale``).

    python bench/eval_controlnet_weights.py --controlnet emoji-silhouette --weights 1,2,3

For each weight: mean silhouette IoU (bench/eval_controlnet.py's definition) of 16 training images' silhouettes
drawn with another of the 16 captions (iou_other) and with their own (iou_own), and caption retrieval top-5 of
the own-caption outputs (bench/eval_emoji.py's).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
from eval_controlnet import as_maps, mean_iou
from eval_emoji import features, generate, load_dataset, retrieval
from PIL import Image

from ldmkit import api
from ldmkit.controlnet import load_controlnet
from ldmkit.preprocess import silhouette


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="emoji")
    ap.add_argument("--controlnet", default="emoji-silhouette")
    ap.add_argument("--data", default="data/emoji")
    ap.add_argument("--weights", default="1,2,3")
    ap.add_argument("--images", type=int, default=16)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = api.load(args.model).model
    net = load_controlnet(args.controlnet, model.cfg.unet)
    root = Path(args.data)
    rows, held = load_dataset(root)
    index = {r["key"]: i for i, r in enumerate(rows)}
    images = [Image.open(root / r["file_name"]).convert("RGB") for r in rows]
    feats = features(images)
    val = random.Random(123).sample([r for r in rows if r["key"] not in held], args.images)
    caps = [r["text"] for r in val]
    maps = [silhouette(images[index[r["key"]]]) for r in val]
    half = len(caps) // 2
    other = caps[half:] + caps[:half]
    seeds = list(range(9000, 9000 + len(val)))
    forward = net.forward
    for w in [float(x) for x in args.weights.split(",")]:
        net.forward = lambda *a, w=w, **k: forward(*a, **k).scaled(w)  # type: ignore[method-assign]
        o = generate(model, other, seeds, 20, 5.0, 64, control=(net, as_maps(maps)))
        own = generate(model, caps, seeds, 20, 5.0, 64, control=(net, as_maps(maps)))
        _, top5 = retrieval(features(own), feats, [index[r["key"]] for r in val])
        row = {"weight": w, "iou_other": round(mean_iou(o, maps), 3), "iou_own": round(mean_iou(own, maps), 3),
               "top5_own": top5}
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
