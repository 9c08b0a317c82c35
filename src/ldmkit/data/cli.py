"""``ldmkit data ...``: dataset builders (a plug-in of ``ldmkit.cli``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

EXAMPLES = """examples:
  ldmkit data emoji --out data/emoji                 # ~3,770 emoji at 64 px, captions, holdout.json
  ldmkit data emoji --out data/emoji32 --size 32 --font ~/fonts/NotoColorEmoji.ttf
  ldmkit data emoji --out /tmp/few --limit 50        # a quick subset (holdout chosen within it)
  ldmkit data emoji --out data/emoji128 --size 128 --augment-captions --balance   # aliases, groups, weights
  ldmkit data shards data/my_images --out shards/ --shard-size 1000   # WebDataset tar shards, for streaming
  ldmkit train unet --data "shards/{00000..00009}.tar" --vae runs/vae --out runs/ldm
needs: pip install emoji; sudo apt-get install fonts-noto-color-emoji"""


def _emoji(args: argparse.Namespace) -> None:
    from ldmkit.data.emoji import build_emoji_dataset

    try:
        b = build_emoji_dataset(args.out, args.size, args.font, limit=args.limit, holdout=args.holdout,
                                seed=args.seed, augment=args.augment_captions, balance=args.balance,
                                emoji_test=args.emoji_test)
    except ImportError as e:  # the `emoji` package: a setup problem, not a bug
        print(f"ldmkit: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {b.count} emoji images ({args.size}x{args.size}) to {b.out}: {b.holdout} held out "
          f"(holdout.json), {b.count - b.holdout} for training; {b.missing} not drawn by the font, "
          f"{b.duplicates} duplicate renders dropped; {b.seconds:.1f} s")


def _shards(args: argparse.Namespace) -> None:
    from ldmkit.data.shards import write_shards

    # a missing folder, no images, a bad metadata line: a ValueError naming it, one line from ldmkit.cli.main
    w = write_shards(args.folder, args.out, args.shard_size, size=args.size, include_holdout=args.include_holdout)
    held = f"; {w.held_out} held-out images left out (holdout.json; --include-holdout keeps them)" if w.held_out else ""
    print(f"wrote {w.samples} samples in {w.shards} shard(s) to {w.out}{held}\n"
          f"train with: ldmkit train unet --data \"{w.pattern}\" ...")


def register(add: Callable[..., argparse.ArgumentParser]) -> None:
    data = add("data", "build training datasets", EXAMPLES)
    sub = data.add_subparsers(dest="data_command", required=True, metavar="DATASET")
    e = sub.add_parser("emoji", help="render Noto Color Emoji with their English names as captions",
                       description="Render every emoji the Noto Color Emoji font draws as one glyph, centred on "
                                   "white, with its English name as caption; writes images/NNNN.png, "
                                   "metadata.jsonl and holdout.json.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    e.add_argument("--font", default=None,
                   help="NotoColorEmoji.ttf (default /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf)")
    e.add_argument("--holdout", type=int, default=128, help="how many variants to hold out (default 128)")
    e.add_argument("--seed", type=int, default=0, help="seed of the holdout choice (default 0)")
    e.add_argument("--limit", type=int, default=None, help="only the first N emoji, for a quick test")
    e.add_argument("--augment-captions", action="store_true",
                   help="also write each emoji's Unicode group and a 'captions' list: its name, the emoji "
                        "package's aliases ('apple') and the name with its group ('red apple, food & drink')")
    e.add_argument("--balance", action="store_true",
                   help="also write class-balanced sampling weights ('weight': each Unicode group the same total)")
    e.add_argument("--emoji-test", default=None, help="Unicode's emoji-test.txt for the groups (default "
                   "/usr/share/unicode/emoji/emoji-test.txt: apt-get install unicode-data)")
    e.set_defaults(func=_emoji)
    s = sub.add_parser("shards", help="pack an image-caption folder into WebDataset tar shards (streamed training)",
                       description="Write FOLDER's images and captions (any layout `ldmkit train` reads) as "
                                   "WebDataset tar shards OUT/00000.tar, ...: per sample KEY.png|jpg|webp, KEY.txt "
                                   "(caption) and KEY.json (its metadata.jsonl fields), in the folder's order, each "
                                   "shard written atomically.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("folder", help="image-caption folder (images + metadata.jsonl, or images with name.txt)")
    s.add_argument("--out", required=True, help="output folder for the shards")
    s.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    s.add_argument("--size", type=int, default=None,
                   help="resize and centre-crop to SIZE px, stored as PNG (default: the files as they are)")
    s.add_argument("--include-holdout", action="store_true", help="also pack the images holdout.json lists")
    s.set_defaults(func=_shards)
