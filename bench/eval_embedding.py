"""Does a trained textual-inversion word retrieve its group? (issue 14, ``ldmkit train embedding``)

    python bench/eval_embedding.py --model emoji --data data/emoji --embedding runs/felix/felix.safetensors \
        --group "cat face,grinning cat,cat with,smiling cat,kissing cat,pouting cat,crying cat,weary cat"

Generates "a photo of <word>" over N seeds with the embedding, and without it (the untrained word, which a
compact-vocabulary model reads as blank), and reports how often the group's images are the nearest (top-1)
or among the 5 nearest (top-5) dataset images, in ``bench/eval_emoji.py``'s feature space.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from eval_emoji import features, generate, load_dataset  # noqa: E402

from ldmkit import api  # noqa: E402
from ldmkit.embeddings import EmbeddingTable  # noqa: E402


def group_hits(gen: np.ndarray, data: np.ndarray, in_group: np.ndarray) -> tuple[float, float]:
    d = ((gen[:, None, :] - data[None, :, :]) ** 2).sum(-1)
    order = np.argsort(d, axis=1)
    return float(in_group[order[:, 0]].mean()), float(in_group[order[:, :5]].any(axis=1).mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="emoji")
    ap.add_argument("--data", default="data/emoji")
    ap.add_argument("--embedding", required=True, help="the trained <word>.safetensors")
    ap.add_argument("--group", required=True, help="comma-separated caption prefixes of the group's images")
    ap.add_argument("--prompt", default="a photo of {word}")
    ap.add_argument("--words", default="", help="a text baseline, e.g. 'a photo of a cat face' (the group's own words)")
    ap.add_argument("--seeds", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg-scale", type=float, default=5.0)
    args = ap.parse_args(argv)

    rows, _ = load_dataset(Path(args.data))
    prefixes = [p.strip() for p in args.group.split(",") if p.strip()]
    in_group = np.array([any(r["text"].startswith(p) for p in prefixes) for r in rows])
    from PIL import Image

    data = features([Image.open(Path(args.data) / r["file_name"]) for r in rows])
    word = Path(args.embedding).stem
    prompt = args.prompt.format(word=word)
    pipe = api.load(args.model)
    size = pipe.model.cfg.native_size
    seeds = list(range(args.seeds))
    results = {"prompt": prompt, "group_images": int(in_group.sum()), "dataset_images": len(rows),
               "seeds": args.seeds}
    results["untrained"] = group_hits(features(generate(pipe.model, [prompt] * len(seeds), seeds, args.steps,
                                                        args.cfg_scale, size)), data, in_group)
    if args.words:
        results["words"] = [args.words, *group_hits(features(generate(pipe.model, [args.words] * len(seeds), seeds,
                                                                      args.steps, args.cfg_scale, size)),
                                                     data, in_group)]
    with tempfile.TemporaryDirectory() as d:
        shutil.copy(args.embedding, d)
        pipe.model.embedding_table = EmbeddingTable(d)
        results["trained"] = group_hits(features(generate(pipe.model, [prompt] * len(seeds), seeds, args.steps,
                                                          args.cfg_scale, size)), data, in_group)
    pipe.model.embedding_table = None
    results["chance_top5"] = float(1 - np.prod([(len(rows) - in_group.sum() - i) / (len(rows) - i)
                                                for i in range(5)]))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
