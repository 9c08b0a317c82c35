"""The emoji dataset: names as captions, one-glyph coverage, files written, and the holdout split."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("emoji", reason="the emoji dataset needs the `emoji` package: pip install emoji")

from ldmkit.data import ImageCaptionDataset  # noqa: E402
from ldmkit.data import emoji as E  # noqa: E402

needs_font = pytest.mark.skipif(
    not E.FONT_PATH.is_file(),
    reason=f"Noto Color Emoji not installed at {E.FONT_PATH}: sudo apt-get install fonts-noto-color-emoji")

APPLE, CAT, BLACK_CAT = "\U0001F34E", "\U0001F408", "\U0001F408\u200d\u2b1b"
TECHNOLOGIST = "\U0001F469\u200d\U0001F4BB"  # woman technologist
TECH_DARK = "\U0001F469\U0001F3FE\u200d\U0001F4BB"  # ... medium-dark skin tone
TECH_LIGHT = "\U0001F469\U0001F3FB\u200d\U0001F4BB"
BAGS = "\U0001FAE9"  # face with bags under eyes: Emoji 16, newer than Debian 12's font


def test_captions_from_names():
    assert E.caption_of(":red_apple:") == "red apple"
    assert E.caption_of(":woman_technologist_medium-dark_skin_tone:") == "woman technologist medium-dark skin tone"
    entries = {en.emoji: en for en in E.link_bases([APPLE, CAT, BLACK_CAT, TECHNOLOGIST, TECH_DARK])}
    assert entries[APPLE].caption == "red apple" and not entries[APPLE].variant
    assert (entries[TECH_DARK].caption, entries[TECH_DARK].base, entries[TECH_DARK].base_caption) == (
        "woman technologist medium-dark skin tone", TECHNOLOGIST, "woman technologist")
    assert (entries[BLACK_CAT].base, entries[BLACK_CAT].base_caption) == (CAT, "cat")
    assert entries[TECHNOLOGIST].variant and entries[TECHNOLOGIST].base is None  # "woman" is not in this list


def test_font_missing_message(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"not found at .*nope\.ttf.*apt-get install fonts-noto-color-emoji"):
        E.build_emoji_dataset(tmp_path / "out", font=tmp_path / "nope.ttf")


@needs_font
def test_build_subset(tmp_path):
    names = [APPLE, CAT, BLACK_CAT, TECHNOLOGIST, TECH_DARK, TECH_LIGHT, "\U0001F469", BAGS, "United States"]
    b = E.build_emoji_dataset(tmp_path / "emoji", size=32, names=names, holdout=5)
    assert (b.count, b.missing, b.duplicates) == (8, 1, 0)  # BAGS is not in the font
    meta = [json.loads(line) for line in (tmp_path / "emoji" / "metadata.jsonl").read_text("utf-8").splitlines()]
    by_emoji = {m["emoji"]: m for m in meta}
    assert BAGS not in by_emoji
    assert by_emoji[APPLE]["text"] == "red apple" and by_emoji[APPLE]["variant"] is False
    assert by_emoji[TECH_DARK] | {"file_name": ""} == {
        "file_name": "", "text": "woman technologist medium-dark skin tone", "emoji": TECH_DARK,
        "base": "woman technologist", "variant": True}
    img = Image.open(tmp_path / "emoji" / by_emoji[APPLE]["file_name"])
    a = np.asarray(img)
    assert img.size == (32, 32) and img.mode == "RGB"
    assert (a[0, 0] == 255).all() and a[16, 16, 0] > 150 and a[16, 16, 2] < 100  # white corner, red middle
    held = json.loads((tmp_path / "emoji" / "holdout.json").read_text("utf-8"))
    # the two skin tones share the base "woman technologist": one of them is held out
    assert len(held["emoji"]) == 1 and held["emoji"][0] in (TECH_DARK, TECH_LIGHT)
    train = ImageCaptionDataset(tmp_path / "emoji", 32, split="train")
    hold = ImageCaptionDataset(tmp_path / "emoji", 32, split="holdout")
    assert len(train) == 7 and hold.keys == held["keys"] and hold[0]["caption"] == held["text"][0]


@pytest.fixture(scope="module")
def full_list():
    """Every emoji the font shapes into one glyph (without drawing: the exact list is the slow test's)."""
    if not E.FONT_PATH.is_file():
        pytest.skip(f"Noto Color Emoji not installed at {E.FONT_PATH}: sudo apt-get install fonts-noto-color-emoji")
    return E.covered_emoji(render=False)


def _check_holdout(emojis: list[str]) -> list[str]:
    held = E.emoji_holdout(emojis)
    shuffled = list(emojis)
    random.Random(1).shuffle(shuffled)
    assert held == E.emoji_holdout(shuffled)  # a function of the set, not its order
    assert held != E.emoji_holdout(emojis, seed=1)
    assert len(held) >= 100
    entries = {en.emoji: en for en in E.link_bases(emojis)}
    held_set = set(held)
    for e in held:
        en = entries[e]
        assert en.variant and en.base is not None and en.base not in held_set, en.caption
        siblings = [s for s, x in entries.items() if x.base == en.base and x.variant and s != e]
        assert any(s not in held_set for s in siblings), en.caption
    return held


def test_holdout_on_full_list(full_list):
    assert 3700 <= len(full_list) <= 3900
    assert APPLE in full_list and TECH_DARK in full_list and BAGS not in full_list
    _check_holdout(full_list)


@pytest.mark.slow
@needs_font
def test_exact_coverage_and_holdout():
    emojis = E.covered_emoji()  # renders all ~4,000 (a few seconds)
    assert 3700 <= len(emojis) <= 3900  # Debian 12's font 2.042: 3,770 distinct one-glyph emoji
    assert "\U0001F1E8\U0001F1F6" not in emojis  # Sark (Emoji 16): drawn as the unknown-flag placeholder
    _check_holdout(emojis)


def test_cli(tmp_path, monkeypatch, capsys):
    import ldmkit.cli as cli

    assert "ldmkit.data.cli" in cli.PLUGIN_MODULES
    if not E.FONT_PATH.is_file():
        assert cli.main(["data", "emoji", "--out", str(tmp_path)]) == 2
        assert "apt-get install fonts-noto-color-emoji" in capsys.readouterr().err
        return
    assert cli.main(["data", "emoji", "--out", str(tmp_path / "e"), "--size", "16", "--limit", "12"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("wrote 12 emoji images (16x16)") and len(list((tmp_path / "e" / "images").iterdir())) == 12
