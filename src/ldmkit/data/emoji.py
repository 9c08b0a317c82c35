"""The emoji dataset: every emoji Noto Color Emoji draws as one glyph, captioned with its English name.

Writes ``out/images/NNNN.png`` (centred on white, square), ``out/metadata.jsonl`` (``file_name``,
``text``, ``emoji``, ``base``, ``variant``) and ``out/holdout.json``: variants (skin tones, colours,
joined sequences) held out of training such that each one's base emoji and at least one sibling
variant stay in training, to test whether a model composes what it has seen.

Needs the ``emoji`` package (names) and the font (``apt-get install fonts-noto-color-emoji``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, features

from ldmkit.atomic import replacing

log = logging.getLogger(__name__)

FONT_PATH = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
FONT_SIZE = 109  # the font is a CBDT bitmap font with one strike: FreeType accepts only this size
ZWJ, VS16 = "\u200d", "\ufe0f"
SKIN_TONES = frozenset(chr(c) for c in range(0x1F3FB, 0x1F400))
_TONE_NAME = re.compile(r"_(?:light|medium-light|medium|medium-dark|dark)_skin_tone")
UNKNOWN_FLAG = "\U0001F1FD\U0001F1FD"  # "XX": Noto draws unassigned flags as a white flag with "?"
HOLDOUT_COUNT = 128
HOLDOUT_RULE = ("one leaf variant per base group, groups in sha256(f'{seed}:{base}') order, leaf = min "
                "sha256(f'{seed}:{emoji}'); groups of >= 2 variants whose base is in the dataset")


def _emoji_package():
    try:
        import emoji
    except ImportError:
        raise ModuleNotFoundError("the emoji dataset needs the `emoji` package for names: pip install emoji") from None
    return emoji


def _emoji_data() -> dict:
    return _emoji_package().EMOJI_DATA


def caption_of(name: str) -> str:
    """The `emoji` package's name as a caption: ':red_apple:' -> 'red apple'."""
    return name.strip(":").replace("_", " ")


def all_emoji() -> list[str]:
    """Every fully-qualified emoji the `emoji` package knows, in code point order."""
    fully_qualified = 2  # emoji.STATUS["fully_qualified"]
    return sorted(e for e, d in _emoji_data().items() if d["status"] == fully_qualified)


# ---------------------------------------------------------------- bases and holdout


@dataclass(frozen=True)
class EmojiEntry:
    emoji: str
    caption: str
    base: str | None  # the base emoji when it is in the same list; the emoji itself when not a variant
    base_caption: str
    variant: bool


def link_bases(emojis: Sequence[str]) -> list[EmojiEntry]:
    """Entries with their base among ``emojis``: a skin-tone variant's base is the emoji without the
    tones ('woman technologist medium skin tone' -> 'woman technologist', 'handshake light skin tone
    dark skin tone' -> 'handshake'); another joined (ZWJ) sequence's base is its first part
    ('black cat' -> 'cat', 'woman technologist' -> 'woman'); anything else is its own base."""
    data = _emoji_data()
    present = set(emojis)
    by_name = {data[e]["en"]: e for e in emojis}
    out = []
    for e in emojis:
        name = data[e]["en"]
        if any(c in SKIN_TONES for c in e):
            base_name = _TONE_NAME.sub("", name)
            stripped = "".join(c for c in e if c not in SKIN_TONES)
            # 'kiss person person' with two tones has no toneless form; its neutral emoji is 'kiss'
            base = (by_name.get(base_name) or (stripped if stripped in present else None)
                    or by_name.get(base_name.replace("_person_person", "")))
            base_caption = caption_of(data[base]["en"] if base else base_name)
            out.append(EmojiEntry(e, caption_of(name), base, base_caption, True))
        elif ZWJ in e:
            first = e.split(ZWJ)[0]
            options = (first, first + VS16, first.rstrip(VS16))
            base = next((o for o in options if o in present), None)
            known = next((o for o in options if o in data), None)
            base_caption = caption_of(data[known]["en"]) if known else caption_of(name)
            out.append(EmojiEntry(e, caption_of(name), base, base_caption, True))
        else:
            out.append(EmojiEntry(e, caption_of(name), e, caption_of(name), False))
    return out


def _rank(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()


def select_holdout(entries: Sequence[EmojiEntry], count: int = HOLDOUT_COUNT, seed: int = 0) -> list[str]:
    """Held-out emoji, a pure function of the entries (not of their order): from each group of
    variants sharing a base (at least two variants, base present) one leaf -- an emoji that is no
    other's base -- so the base and a sibling stay in training. Groups are taken in seeded-hash
    order until ``count`` are chosen."""
    groups: dict[str, list[str]] = {}
    for en in entries:
        if en.variant and en.base is not None:
            groups.setdefault(en.base, []).append(en.emoji)
    bases = set(groups)
    held = []
    for base in sorted(groups, key=lambda b: _rank(seed, b)):
        if len(held) >= count:
            break
        leaves = [e for e in groups[base] if e not in bases]
        if len(groups[base]) >= 2 and leaves:
            held.append(min(leaves, key=lambda e: _rank(seed, e)))
    return sorted(held)


def emoji_holdout(emojis: Iterable[str], count: int = HOLDOUT_COUNT, seed: int = 0) -> list[str]:
    """``select_holdout`` for a plain emoji list (e.g. the ``emoji`` column of metadata.jsonl)."""
    return select_holdout(link_bases(sorted(set(emojis))), count, seed)


# ---------------------------------------------------------------- rendering


class EmojiRenderer:
    """Draws one emoji with the colour bitmap font; ``render`` is None unless it is exactly one glyph."""

    def __init__(self, font: str | Path | None = None):
        path = Path(font) if font else FONT_PATH
        if not path.is_file():
            raise FileNotFoundError(
                f"Noto Color Emoji font not found at {path}; install it with "
                "`sudo apt-get install fonts-noto-color-emoji` (Debian/Ubuntu) or pass --font PATH")
        raqm = features.check("raqm")
        if not raqm:
            log.warning("Pillow has no libraqm: joined sequences and skin tones cannot be shaped and are left out")
        layout = ImageFont.Layout.RAQM if raqm else ImageFont.Layout.BASIC
        try:
            self.font = ImageFont.truetype(str(path), FONT_SIZE, layout_engine=layout)
        except OSError as e:
            raise ValueError(f"{path}: cannot load as a colour bitmap emoji font at size {FONT_SIZE} ({e})") from None
        x0, y0, x1, y1 = self.font.getbbox("\U0001F600", mode="RGBA")  # one glyph's cell (136 x 128 for Noto)
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"{path}: has no glyph for U+1F600 (grinning face); is it an emoji font?")
        self.cell = (x1 - x0, y1 - y0)
        self.unknown: set[str] = set()  # renders that stand for "no such emoji"
        flag = self.render(UNKNOWN_FLAG)
        if flag is not None:
            self.unknown.add(self.digest(flag))

    def _glyph_box(self, text: str) -> tuple[int, int, int, int] | None:
        x0, y0, x1, y1 = self.font.getbbox(text, mode="RGBA")
        return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 and x1 - x0 <= 1.5 * self.cell[0] else None

    def one_glyph(self, text: str) -> bool:
        """Whether ``text`` shapes into one drawn glyph: a missing glyph has no height, a sequence the
        font does not know falls back to several glyphs side by side. Cheap: nothing is drawn."""
        return self._glyph_box(text) is not None

    def render(self, text: str) -> Image.Image | None:
        """RGBA image of ``text``'s glyph, or None unless ``one_glyph`` and something is drawn that is
        not the unknown-flag placeholder."""
        box = self._glyph_box(text)
        if box is None:
            return None
        x0, y0, x1, y1 = box
        im = Image.new("RGBA", (x1 - x0, y1 - y0), (255, 255, 255, 0))
        ImageDraw.Draw(im).text((-x0, -y0), text, font=self.font, embedded_color=True)
        if im.getchannel("A").getbbox() is None:
            return None
        if "\U0001F1E6" <= text[0] <= "\U0001F1FF" and self.digest(im) in self.unknown:
            return None
        return im

    @staticmethod
    def digest(im: Image.Image) -> str:
        return hashlib.sha256(f"{im.size}".encode() + im.tobytes()).hexdigest()

    def square(self, im: Image.Image, size: int) -> Image.Image:
        """The glyph's visible pixels centred on a white square one cell wide, resized to ``size``."""
        content = im.crop(im.getchannel("A").getbbox())
        side = max(*self.cell, *content.size)
        canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
        canvas.alpha_composite(content, ((side - content.width) // 2, (side - content.height) // 2))
        return canvas.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)


def covered(renderer: EmojiRenderer, emojis: Iterable[str]) -> tuple[list[tuple[str, Image.Image]], int, int]:
    """(emoji, render) for those the font draws as one glyph, in input order; also the number
    missing and the number of duplicates. Of identical renders (Noto draws every family as the same
    silhouettes, and Norway's flag for Bouvet Island) the oldest emoji, then the shortest name, stays."""
    data = _emoji_data()
    rendered, missing, best = [], 0, {}
    for e in emojis:
        im = renderer.render(e)
        if im is None:
            missing += 1
            continue
        d = renderer.digest(im)
        rank = (data[e]["E"], len(data[e]["en"]), e)
        if d not in best or rank < best[d]:
            best[d] = rank
        rendered.append((e, im, d))
    kept = [(e, im) for e, im, d in rendered if best[d][2] == e]
    return kept, missing, len(rendered) - len(kept)


def covered_emoji(font: str | Path | None = None, *, render: bool = True) -> list[str]:
    """The emoji the font draws as one distinct glyph: the list the dataset and its holdout are made
    of. ``render=False`` only checks shaping (about 5x faster: each render decodes a PNG strike), so
    unknown flags and identical renders stay in."""
    renderer = EmojiRenderer(font)
    if not render:
        return [e for e in all_emoji() if renderer.one_glyph(e)]
    return [e for e, _ in covered(renderer, all_emoji())[0]]


# ---------------------------------------------------------------- the builder


@dataclass(frozen=True)
class EmojiBuild:
    out: Path
    count: int
    holdout: int
    missing: int  # emoji the font does not draw as one glyph
    duplicates: int  # identical renders of different emoji, kept once
    seconds: float


def _select(candidates: list[str], names: Iterable[str] | None, limit: int | None) -> list[str]:
    if names is not None:
        data = _emoji_data()
        wanted = set(names)
        picked = [e for e in candidates if e in wanted or caption_of(data[e]["en"]) in wanted]
        unknown = wanted - set(picked) - {caption_of(data[e]["en"]) for e in picked}
        if unknown:
            raise ValueError(f"unknown emoji or names: {', '.join(sorted(unknown))}")
        candidates = picked
    return candidates[:limit] if limit is not None else candidates


def _write_atomic(path: Path, text: str) -> None:
    with replacing(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def alias_captions(e: str) -> list[str]:
    """The `emoji` package's aliases of ``e`` as captions, without codes of two letters or fewer and
    without the name itself: 🍎 -> ['apple'], 🇯🇵 -> ['flag for Japan'] (':jp:' dropped)."""
    d = _emoji_data()[e]
    name = caption_of(d["en"])
    out = []
    for a in d.get("alias", []):
        c = caption_of(a)
        if len(c) > 2 and re.search(r"[A-Za-z]{3}", c) and c != name and c not in out:
            out.append(c)
    return out


def build_emoji_dataset(out: str | Path, size: int = 64, font: str | Path | None = None, *,
                        names: Iterable[str] | None = None, limit: int | None = None,
                        holdout: int = HOLDOUT_COUNT, seed: int = 0, augment: bool = False,
                        balance: bool = False, emoji_test: str | Path | None = None) -> EmojiBuild:
    """Render the emoji dataset into ``out``. ``names`` (emoji or captions) or ``limit`` (the first n
    in code point order) build a subset; the holdout is then chosen within the subset.

    ``augment``: each metadata line also gets ``group`` (Unicode's emoji group) and ``captions``: the
    name, the `emoji` package's aliases, and the name with its group ('red apple, food & drink').
    ``balance``: each line gets ``group`` and ``weight``, class-balanced sampling weights that give each
    group the same total (mean 1). Groups come from Unicode's emoji-test.txt (``emoji_test``; default
    Debian unicode-data's)."""
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    t0 = time.perf_counter()
    package = _emoji_package()
    renderer = EmojiRenderer(font)
    candidates = _select(all_emoji(), names, limit)
    rendered, missing, dups = covered(renderer, candidates)
    if not rendered:
        raise ValueError(f"the font draws none of the {len(candidates)} emoji asked for as one glyph")
    entries = link_bases([e for e, _ in rendered])
    held = set(select_holdout(entries, holdout, seed))
    groups = weights = None
    if augment or balance:
        from ldmkit.data.emoji_groups import balanced_weights, group_of, load_emoji_groups

        table = load_emoji_groups(emoji_test)
        groups = [group_of(en.emoji, table) or "" for en in entries]
        # weights over the training images only: held-out images are never sampled
        train_w = iter(balanced_weights([en.emoji for en in entries if en.emoji not in held], table))
        weights = [0.0 if en.emoji in held else next(train_w) for en in entries] if balance else None

    out = Path(out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    width = max(4, len(str(len(rendered) - 1)))
    keys = [f"{i:0{width}d}" for i in range(len(rendered))]
    keep = set(keys)
    for stale in images.glob("*.png"):  # files of an earlier, larger build
        if re.fullmatch(r"\d+", stale.stem) and stale.stem not in keep:
            stale.unlink()
    lines = []
    for i, (key, (e, im), en) in enumerate(zip(keys, rendered, entries, strict=True)):
        renderer.square(im, size).save(images / f"{key}.png", optimize=False)
        row = {"file_name": f"images/{key}.png", "text": en.caption, "emoji": e, "base": en.base_caption,
               "variant": en.variant}
        if groups is not None:
            row["group"] = groups[i]
        if augment:
            extra = [f"{en.caption}, {groups[i].lower()}"] if groups[i] else []
            row["captions"] = [en.caption, *alias_captions(e), *extra]
        if weights is not None:
            row["weight"] = round(weights[i], 6)
        lines.append(json.dumps(row, ensure_ascii=False))
    _write_atomic(out / "metadata.jsonl", "\n".join(lines) + "\n")
    held_idx = [i for i, en in enumerate(entries) if en.emoji in held]
    _write_atomic(out / "holdout.json", json.dumps({
        "keys": [keys[i] for i in held_idx],
        "emoji": [entries[i].emoji for i in held_idx],
        "text": [entries[i].caption for i in held_idx],
        "seed": seed, "count": holdout, "rule": HOLDOUT_RULE,
        "emoji_package": package.__version__,
    }, ensure_ascii=False, indent=1) + "\n")
    return EmojiBuild(out, len(rendered), len(held_idx), missing, dups, time.perf_counter() - t0)
