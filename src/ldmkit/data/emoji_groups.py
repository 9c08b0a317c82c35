"""Unicode's emoji groups (Smileys & Emotion, People & Body, ..., Flags) for the emoji dataset, and
a category-balanced choice of captions for evaluation and class-balanced sampling weights for training.

The `emoji` package (2.x) has names and aliases but no groups. Unicode publishes them in
``emoji-test.txt`` (``# group: ...`` headers above each emoji's line); Debian ships it in the
``unicode-data`` package as /usr/share/unicode/emoji/emoji-test.txt (``apt-get install unicode-data``).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

EMOJI_TEST_PATH = Path("/usr/share/unicode/emoji/emoji-test.txt")
# the nine groups a user types names from; "Component" (skin tone and hair swatches) is left out
GROUPS = ("Smileys & Emotion", "People & Body", "Animals & Nature", "Food & Drink", "Travel & Places",
          "Activities", "Objects", "Symbols", "Flags")
COMPONENT = "Component"
ZWJ, VS16 = "\u200d", "\ufe0f"
SKIN_TONES = frozenset(chr(c) for c in range(0x1F3FB, 0x1F400))


def parse_emoji_test(text: str) -> dict[str, str]:
    """{emoji: group} for every sequence in an emoji-test.txt text (every qualification status).

    A data line is ``1F600 ; fully-qualified # 😀 E1.0 grinning face``; the group is the last
    ``# group: NAME`` line above it."""
    groups: dict[str, str] = {}
    group = None
    for line in text.splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
            continue
        if not line.strip() or line.startswith("#") or ";" not in line:
            continue
        if group is None:
            raise ValueError(f"emoji-test.txt: a data line before any '# group:' header: {line!r}")
        codes = line.split(";", 1)[0].split()
        try:
            groups["".join(chr(int(c, 16)) for c in codes)] = group
        except ValueError:
            raise ValueError(f"emoji-test.txt: bad code points in {line!r}") from None
    return groups


def load_emoji_groups(path: str | Path | None = None) -> dict[str, str]:
    p = Path(path) if path else EMOJI_TEST_PATH
    if not p.is_file():
        raise FileNotFoundError(f"Unicode's emoji-test.txt not found at {p}: install it with "
                                "`apt-get install unicode-data` (Debian/Ubuntu) or pass its path")
    return parse_emoji_test(p.read_text(encoding="utf-8"))


def group_of(e: str, groups: Mapping[str, str]) -> str | None:
    """The group of emoji ``e``: its own entry; else without variation selectors or skin tones (a
    newer tone variant of a known emoji); else its first ZWJ part (a newer sequence of a known
    emoji, e.g. a family or a profession). None when nothing matches."""
    if e in groups:
        return groups[e]
    for cand in (e.replace(VS16, ""), "".join(c for c in e if c not in SKIN_TONES)):
        if cand in groups:
            return groups[cand]
        if cand.replace(VS16, "") in groups:
            return groups[cand.replace(VS16, "")]
    if ZWJ in e:
        first = e.split(ZWJ)[0]
        for cand in (first, first + VS16, first.replace(VS16, "")):
            if cand in groups:
                return groups[cand]
    return None


def balanced_captions(rows: Sequence[Mapping], groups: Mapping[str, str], per_group: int, seed: int = 0,
                      exclude: Iterable[str] = (), variants: bool = False) -> dict[str, list[Mapping]]:
    """``per_group`` dataset rows from each of the nine groups, drawn without replacement by a seeded
    generator from the rows sorted by ``text`` (so the choice does not depend on row order).

    Rows are metadata.jsonl rows (``emoji``, ``text``, ``variant``); rows whose ``key`` or
    ``file_name`` is in ``exclude`` (the holdout) are skipped, and so are variants (skin tones,
    colours, ZWJ sequences) unless ``variants``: the bare names a new user types. Raises ValueError
    naming the group when one has fewer than ``per_group`` rows."""
    excluded = set(exclude)
    pools: dict[str, list[Mapping]] = {g: [] for g in GROUPS}
    for r in rows:
        if r.get("key") in excluded or r.get("file_name") in excluded or (r.get("variant") and not variants):
            continue
        g = group_of(r["emoji"], groups)
        if g in pools:
            pools[g].append(r)
    out = {}
    for g in GROUPS:
        pool = sorted(pools[g], key=lambda r: (r["text"], r["emoji"]))
        if len(pool) < per_group:
            raise ValueError(f"group {g!r} has only {len(pool)} captions; ask for at most that many per group")
        out[g] = random.Random(f"{seed}:{g}").sample(pool, per_group)
    return out


def balanced_weights(emojis: Sequence[str], groups: Mapping[str, str]) -> list[float]:
    """Sampling weights that give each group the same total weight (each emoji 1 / its group's size,
    scaled so that the weights average 1). Emoji of no known group form one group of their own."""
    labels = [group_of(e, groups) or "(none)" for e in emojis]
    counts: dict[str, int] = {}
    for g in labels:
        counts[g] = counts.get(g, 0) + 1
    raw = [1.0 / counts[g] for g in labels]
    scale = len(raw) / sum(raw) if raw else 1.0
    return [w * scale for w in raw]
