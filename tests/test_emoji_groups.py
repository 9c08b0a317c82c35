"""Unicode emoji groups for the category-balanced metric (bench/eval_emoji.py --balanced) and the
class-balanced sampling weights of `ldmkit data emoji --balance`. Reference: the emoji-test.txt format
of Unicode TS #51 (the excerpt below is copied from Unicode 15.0's file, as Debian's unicode-data ships it)."""

from __future__ import annotations

import pytest

from ldmkit.data.emoji_groups import (
    EMOJI_TEST_PATH,
    GROUPS,
    balanced_captions,
    balanced_weights,
    group_of,
    parse_emoji_test,
)

EXCERPT = """\
# emoji-test.txt
# Version: 15.0

# group: Smileys & Emotion

# subgroup: face-smiling
1F600                                                  ; fully-qualified     # 😀 E1.0 grinning face
263A FE0F                                              ; fully-qualified     # ☺️ E0.6 smiling face
263A                                                   ; unqualified         # ☺ E0.6 smiling face

# group: People & Body

# subgroup: hand-fingers-closed
1F44D                                                  ; fully-qualified     # 👍 E0.6 thumbs up
1F44D 1F3FD                                            ; fully-qualified     # 👍🏽 E1.0 thumbs up: medium skin tone
1F469                                                  ; fully-qualified     # 👩 E0.6 woman

# group: Component
1F3FB                                                  ; component           # 🏻 E1.0 light skin tone

# group: Animals & Nature
1F408                                                  ; fully-qualified     # 🐈 E0.7 cat
1F408 200D 2B1B                                        ; fully-qualified     # 🐈‍⬛ E13.0 black cat

# group: Food & Drink
1F34E                                                  ; fully-qualified     # 🍎 E0.6 red apple
1F350                                                  ; fully-qualified     # 🍐 E1.0 pear

# group: Travel & Places
1F680                                                  ; fully-qualified     # 🚀 E0.6 rocket

# group: Activities
26BD                                                   ; fully-qualified     # ⚽ E0.6 soccer ball

# group: Objects
1F4A1                                                  ; fully-qualified     # 💡 E0.6 light bulb

# group: Symbols
2764 FE0F                                              ; fully-qualified     # ❤️ E0.6 red heart

# group: Flags
1F1EF 1F1F5                                            ; fully-qualified     # 🇯🇵 E0.6 flag: Japan

#EOF
"""


def test_parse_every_status_and_group():
    g = parse_emoji_test(EXCERPT)
    assert g["😀"] == "Smileys & Emotion"
    assert g["\u263a\ufe0f"] == g["\u263a"] == "Smileys & Emotion"  # fully and unqualified both listed
    assert g["👍🏽"] == "People & Body" and g["🏻"] == "Component"
    assert g["🐈\u200d⬛"] == "Animals & Nature" and g["🇯🇵"] == "Flags"
    assert len(g) == 16


def test_parse_rejects_data_before_a_group():
    with pytest.raises(ValueError, match="before any"):
        parse_emoji_test("1F600 ; fully-qualified # 😀 E1.0 grinning face\n")


def test_group_of_falls_back_for_newer_sequences():
    g = parse_emoji_test(EXCERPT)
    assert group_of("👍🏿", g) == "People & Body"  # a tone not listed: the toneless emoji's group
    assert group_of("👩\u200d🚀", g) == "People & Body"  # an unlisted ZWJ sequence: its first part's group
    assert group_of("\u263a", g) == "Smileys & Emotion"
    assert group_of("🦖", g) is None


def _rows():
    g = parse_emoji_test(EXCERPT)
    rows = [{"key": f"{i:04d}", "emoji": e, "text": f"name {i}", "variant": any(0x1F3FB <= ord(c) <= 0x1F3FF for c in e)
             or "\u200d" in e} for i, e in enumerate(e for e, s in g.items() if s != "Component" and e != "\u263a")]
    return g, rows


def test_balanced_captions_equal_per_group_deterministic_and_bare():
    g, rows = _rows()
    chosen = balanced_captions(rows, g, 1, seed=0)
    assert list(chosen) == list(GROUPS) and all(len(v) == 1 for v in chosen.values())
    assert all(not r["variant"] for v in chosen.values() for r in v)  # bare names only
    assert {r["emoji"] for r in chosen["People & Body"]} <= {"👍", "👩"}
    again = balanced_captions(list(reversed(rows)), g, 1, seed=0)  # row order does not matter
    assert {k: [r["key"] for r in v] for k, v in again.items()} == {k: [r["key"] for r in v] for k, v in chosen.items()}
    with pytest.raises(ValueError, match="'Smileys & Emotion' has only 2"):
        balanced_captions(rows, g, 3)


def test_balanced_captions_excludes_holdout():
    g, rows = _rows()
    apple = next(r["key"] for r in rows if r["emoji"] == "🍎")
    for seed in range(5):
        assert balanced_captions(rows, g, 1, seed=seed, exclude={apple})["Food & Drink"][0]["emoji"] == "🍐"


def test_balanced_weights_give_each_group_equal_mass():
    g = parse_emoji_test(EXCERPT)
    emojis = ["👍", "👍🏽", "👩", "👍🏿", "🍎", "🍐", "🚀", "🦖"]
    w = balanced_weights(emojis, g)
    assert sum(w) == pytest.approx(len(emojis))
    mass = {}
    for e, x in zip(emojis, w, strict=True):
        k = group_of(e, g) or "(none)"
        mass[k] = mass.get(k, 0) + x
    assert len(set(round(v, 9) for v in mass.values())) == 1 and len(mass) == 4


@pytest.mark.skipif(not EMOJI_TEST_PATH.is_file(), reason="Debian's unicode-data is not installed")
def test_system_emoji_test_has_the_nine_groups():
    from ldmkit.data.emoji_groups import load_emoji_groups

    g = load_emoji_groups()
    assert set(GROUPS) <= set(g.values())
    assert g["🍎"] == "Food & Drink" and g["⚽"] == "Activities" and g["🇯🇵"] == "Flags"


def test_alias_captions_from_the_emoji_package():
    from ldmkit.data.emoji import alias_captions

    assert alias_captions("🍎") == ["apple"]
    assert alias_captions("🇯🇵") == ["flag for Japan"]  # ':jp:' is a code, not a caption
    assert "car" in alias_captions("🚗")


@pytest.mark.skipif(not __import__("pathlib").Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf").is_file(),
                    reason="fonts-noto-color-emoji is not installed")
def test_emoji_dataset_writes_groups_captions_and_weights(tmp_path):
    import json

    from ldmkit.data.emoji import build_emoji_dataset

    test_file = tmp_path / "emoji-test.txt"
    test_file.write_text(EXCERPT, encoding="utf-8")
    names = ["red apple", "pear", "rocket", "soccer ball", "light bulb", "grinning face"]
    build_emoji_dataset(tmp_path / "ds", 16, names=names, holdout=0, augment=True, balance=True, emoji_test=test_file)
    rows = {r["text"]: r for r in map(json.loads, (tmp_path / "ds" / "metadata.jsonl").read_text().splitlines())}
    assert rows["red apple"]["captions"] == ["red apple", "apple", "red apple, food & drink"]
    assert rows["rocket"]["group"] == "Travel & Places"
    # five groups, Food & Drink has two images: each group's weights sum to 6 / 5
    assert rows["red apple"]["weight"] == rows["pear"]["weight"] == pytest.approx(0.6, abs=1e-6)
    assert rows["rocket"]["weight"] == pytest.approx(1.2, abs=1e-6)
