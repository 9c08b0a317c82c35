"""Start-up shortcuts of the first image (issue 12): each must leave results unchanged.

- ftfy is imported only for prompts it could change; for the rest, ftfy.fix_text itself (the reference)
  must return the text unchanged.
- The parsed CLIP vocabulary is cached; read back it must equal a fresh parse of the file.
"""

from __future__ import annotations

import html
import random
import string

import ftfy
import pytest

from ldmkit.models import tokenizer as T


def _reference_clean(text: str) -> str:
    """OpenAI CLIP's basic_clean + whitespace_clean + lower, written out from simple_tokenizer.py."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).strip().lower()


FAST_ALPHABET = "".join(c for c in string.printable if c not in "&\r\x0b\x0c") + "\t\n"


def test_ftfy_skipped_only_where_ftfy_changes_nothing():
    rng = random.Random(0)
    samples = ["a red apple", "A photo of an astronaut, 4k; (masterpiece:1.2) <lora:x:0.8> [cat|dog] #1 ~ 'q' \"r\"",
               "tab\tand\nnewline", "<b>bold</b> &lt; not here", ""]
    samples += ["".join(rng.choice(FAST_ALPHABET) for _ in range(rng.randint(1, 80))) for _ in range(2000)]
    for s in samples:
        if T._FTFY_IDENTITY.fullmatch(s):
            assert ftfy.fix_text(s) == s, repr(s)
    assert sum(bool(T._FTFY_IDENTITY.fullmatch(s)) for s in samples) >= 2000  # the fast path is the common one


@pytest.mark.parametrize("text", ["a red apple", "caf\u00e9 \ufb01sh", "mojibake: Ã©", "&amp;amp; rock &lt;3",
                                  "line\r\nbreak", "ctrl\x07bell", "\uff21\uff22 wide", "curly \u201cquotes\u201d",
                                  "tab\tnew\nline  spaced"])
def test_clean_text_matches_clip_reference(text):
    assert T.clean_text(text) == _reference_clean(text)


def test_bpe_cache_equals_fresh_parse(tmp_path, monkeypatch):
    monkeypatch.setenv("LDMKIT_CACHE_DIR", str(tmp_path))
    path = T._default_bpe_path()
    fresh = T._parse_bpe_gz(path)
    T.load_bpe_gz.cache_clear()
    try:
        first = T.load_bpe_gz(path)  # parses and writes the cache
        cache = T._bpe_cache_file(path)
        assert cache.parent == tmp_path and cache.is_file()
        T.load_bpe_gz.cache_clear()
        again = T.load_bpe_gz(path)  # read back from the cache
        assert first == fresh and again == fresh
        cache.write_bytes(b"not marshal data")  # a damaged cache falls back to the file
        T.load_bpe_gz.cache_clear()
        assert T.load_bpe_gz(path) == fresh
    finally:
        T.load_bpe_gz.cache_clear()
