"""Parity of ldmkit's CLIP tokenizer with transformers.CLIPTokenizer (SD1 and SD2 padding)."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
import torch

from ldmkit.models.tokenizer import (
    DEFAULT_BPE_FILE,
    CLIPTokenizer,
    bytes_to_unicode,
    clean_text,
    load_bpe_gz,
)

transformers = pytest.importorskip("transformers")

BPE_GZ = Path(__file__).resolve().parents[1] / "src" / "ldmkit" / "assets" / DEFAULT_BPE_FILE

# Text on which compat="clip" (OpenAI/open_clip behaviour) and compat="transformers" agree.
PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "A Beautiful Landscape, Trending on ArtStation, 8k, (masterpiece:1.2)",
    "Hello, world... what? #hashtag @user c++ __init__.py 50% off",
    "1234567 3.14159 1e-5 2nd 100,000",
    "🚀🔥 an emoji party ✨ 日本語 中文 한국어 ΑΒΓ дя",
    "café naïve résumé Ångström Zürich",
    "cafe\u0301 decomposed accent",
    "   lots   of\t\twhite\nspace   ",
    "MiXeD CaSe TeXt SHOUTING",
    "don't it's we're I've I'm you'll he'd DON'T",
    "<|endoftext|> special tokens written in the prompt <|startoftext|>",
    "...'s '''quotes''' \"double\"",
    "",
    "ok",
]
# Text that CLIP's clean-up (ftfy, html.unescape) changes but transformers>=5 (NFC only) does not.
CLEANUP_PROMPTS = [
    "tom &amp; jerry &lt;3 &amp;amp;",
    "\u2019curly\u2019 \u201cquotes\u201d",
    "\ufb01 ligature and \uff26\uff55\uff4c\uff4c width",
]
LONG_PROMPT = ", ".join(f"detail number {i}" for i in range(60))  # ~240 tokens


def write_reference_files(folder: Path) -> None:
    """vocab.json + merges.txt built from OpenAI's merges file, the way openai/clip-vit-* HF files were made."""
    lines = gzip.open(BPE_GZ, "rt", encoding="utf-8").read().split("\n")
    merges = [line.split() for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("clip_ref")
    write_reference_files(folder)
    return folder


@pytest.fixture(scope="module")
def ref_sd1(ref_dir: Path):
    return transformers.CLIPTokenizer(vocab=str(ref_dir / "vocab.json"), merges=str(ref_dir / "merges.txt"))


@pytest.fixture(scope="module")
def ref_sd2(ref_dir: Path):
    return transformers.CLIPTokenizer(
        vocab=str(ref_dir / "vocab.json"), merges=str(ref_dir / "merges.txt"), pad_token="!"
    )


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer.default()


@pytest.fixture(scope="module")
def tok_hf() -> CLIPTokenizer:
    return CLIPTokenizer.default(compat="transformers")


def ref_ids(ref, text: str) -> list[int]:
    return ref(text, add_special_tokens=False)["input_ids"]


def test_reference_vocab(ref_sd1, ref_sd2, tok: CLIPTokenizer) -> None:
    assert len(ref_sd1) == 49408
    assert (ref_sd1.bos_token_id, ref_sd1.eos_token_id, ref_sd1.pad_token_id) == (49406, 49407, 49407)
    assert ref_sd2.pad_token_id == 0
    assert ref_sd1.get_vocab() == tok.encoder
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.context_length) == (49406, 49407, 49407, 77)
    assert CLIPTokenizer.default(pad_with_eos=False).pad_id == 0


def test_known_ids(tok: CLIPTokenizer) -> None:
    # Ids of openai/clip-vit-large-patch14 on the hub, independent of how this test builds its reference.
    assert tok("a photo of a cat")[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]


@pytest.mark.parametrize("text", PROMPTS + [LONG_PROMPT])
def test_encode_matches_reference(ref_sd1, tok: CLIPTokenizer, tok_hf: CLIPTokenizer, text: str) -> None:
    expected = ref_ids(ref_sd1, text)
    assert tok.encode(text) == expected
    assert tok_hf.encode(text) == expected


@pytest.mark.parametrize("text", CLEANUP_PROMPTS)
def test_cleanup_modes(ref_sd1, tok: CLIPTokenizer, tok_hf: CLIPTokenizer, text: str) -> None:
    # transformers>=5 only NFC-normalises; CLIP/open_clip also run ftfy and unescape HTML (twice).
    assert tok_hf.encode(text) == ref_ids(ref_sd1, text)
    assert tok.encode(text) == ref_ids(ref_sd1, clean_text(text))
    assert tok.encode(text) != ref_ids(ref_sd1, text)


def test_html_unescaped_twice(tok: CLIPTokenizer) -> None:
    assert clean_text("Tom &amp;amp; Jerry") == "tom & jerry"
    assert tok.encode("tom &amp; jerry") == tok.encode("tom & jerry")
    assert tok.tokens("tom &amp; jerry") == ["tom</w>", "&</w>", "jerry</w>"]


def test_tokens_match_reference(ref_sd1, tok: CLIPTokenizer) -> None:
    text = "An astronaut's 🚀 over Zürich"
    assert tok.tokens(text) == ref_sd1.convert_ids_to_tokens(ref_ids(ref_sd1, text))


def test_sd1_batch_padding_and_truncation(ref_sd1, tok: CLIPTokenizer) -> None:
    texts = [*PROMPTS, LONG_PROMPT]
    expected = ref_sd1(texts, padding="max_length", max_length=77, truncation=True)["input_ids"]
    ids = tok(texts)
    assert ids.dtype == torch.long and ids.shape == (len(texts), 77)
    assert ids.tolist() == expected
    long_row = ids[-1].tolist()
    assert long_row == [49406, *tok.encode(LONG_PROMPT)[:75], 49407]
    assert tok("").tolist() == [[49406] + [49407] * 76]


@pytest.mark.parametrize("compat", ["clip", "transformers"])
def test_sd2_padding(ref_sd2, compat: str) -> None:
    tok2 = CLIPTokenizer.default(pad_with_eos=False, compat=compat)
    texts = [*PROMPTS, LONG_PROMPT]
    expected = ref_sd2(texts, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert tok2(texts).tolist() == expected
    row = tok2("a photo of a cat")[0].tolist()
    assert row == [49406, 320, 1125, 539, 320, 2368, 49407] + [0] * 70


def test_exactly_75_tokens_fill_the_context(tok: CLIPTokenizer) -> None:
    text = " ".join(["cat"] * 75)
    assert tok(text)[0].tolist() == [49406] + [2368] * 75 + [49407]
    assert tok(text + " dog")[0].tolist() == [49406] + [2368] * 75 + [49407]


def test_transformers_exclamation_quirk(ref_sd1, ref_sd2) -> None:
    # transformers registers SD2's pad "!" as a special token and splits it out of the raw text, so
    # diffusers' SD2 sees id 0 for every "!"; open_clip (SD2's training tokenizer) gives "!</w>" = 256.
    text = "wow! so cool!!! (really)!"
    sd2_hf = CLIPTokenizer.default(pad_with_eos=False, compat="transformers")
    sd2_clip = CLIPTokenizer.default(pad_with_eos=False)
    assert sd2_hf.encode(text) == ref_ids(ref_sd2, text)
    assert sd2_clip.encode(text) == ref_ids(ref_sd1, text)
    assert sd2_hf.encode("wow!") == [2781, 0]
    assert sd2_clip.encode("wow!") == [2781, 256]


def test_special_tokens_in_text(ref_sd1, tok: CLIPTokenizer, tok_hf: CLIPTokenizer) -> None:
    # Exact special tokens become their ids in both modes; only CLIP also matches them case-insensitively.
    for text in ["a<|endoftext|>b", "<|startoftext|><|endoftext|>", "<|ENDOFTEXT|>"]:
        assert tok_hf.encode(text) == ref_ids(ref_sd1, text)
    assert tok.encode("a<|endoftext|>b") == [320, 49407, 321]
    assert tok.encode("<|ENDOFTEXT|>") == [49407]


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_from_dir_save_pretrained(ref_dir: Path, tmp_path: Path, pad: str) -> None:
    ref = transformers.CLIPTokenizer(
        vocab=str(ref_dir / "vocab.json"), merges=str(ref_dir / "merges.txt"), pad_token=pad
    )
    ref.save_pretrained(tmp_path / "tokenizer")
    for folder in (tmp_path / "tokenizer", tmp_path):  # the tokenizer/ folder or the model root
        tok = CLIPTokenizer.from_dir(folder, compat="transformers")
        assert tok.pad_id == ref.pad_token_id
        texts = [*PROMPTS, *CLEANUP_PROMPTS, "wow!!", LONG_PROMPT]
        expected = ref(texts, padding="max_length", max_length=77, truncation=True)["input_ids"]
        assert tok(texts).tolist() == expected


@pytest.mark.parametrize(("pad", "pad_id"), [("<|endoftext|>", 49407), ("!", 0)])
def test_from_dir_diffusers_layout(ref_dir: Path, tmp_path: Path, pad: str, pad_id: int) -> None:
    # Hub diffusers repos ship vocab.json, merges.txt, special_tokens_map.json and tokenizer_config.json.
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(ref_dir / name, tmp_path / name)
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    pad_entry = {"content": pad, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({**special, "pad_token": pad_entry}))
    tok = CLIPTokenizer.from_dir(tmp_path)
    assert tok.pad_id == pad_id
    assert tok.encode(PROMPTS[1]) == CLIPTokenizer.default().encode(PROMPTS[1])


@pytest.mark.parametrize("pad_with_eos", [True, False])
def test_save_loads_in_transformers(tmp_path: Path, pad_with_eos: bool) -> None:
    tok = CLIPTokenizer.default(pad_with_eos=pad_with_eos, compat="transformers")
    tok.save(tmp_path / "tokenizer")
    ref = transformers.CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    texts = [*PROMPTS, *CLEANUP_PROMPTS, "wow!!", LONG_PROMPT]
    expected = ref(texts, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert ref.pad_token_id == tok.pad_id
    assert tok(texts).tolist() == expected
    reloaded = CLIPTokenizer.from_dir(tmp_path, compat="transformers")
    assert reloaded.pad_id == tok.pad_id and reloaded.merges == tok.merges
    assert reloaded(texts).tolist() == expected


def test_decode(ref_sd1, tok: CLIPTokenizer) -> None:
    for text in ["a photo of a cat", "café 🚀 日本語 ok"]:
        assert tok.decode(tok.encode(text)) == text
    # Every piece ends a "word", so punctuation and digits come back space-separated, as in CLIP.
    assert tok.decode(tok.encode("don't stop, 3.14!")) == "don 't stop , 3 . 1 4 !"
    ids = tok("a photo of a cat")[0].tolist()
    assert tok.decode(ids) == ref_sd1.decode(ids)
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of a cat"
    assert tok.decode(torch.tensor(ids[:7])) == "<|startoftext|>a photo of a cat <|endoftext|>"


def test_missing_vocab_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.txt.gz"):
        load_bpe_gz(tmp_path / "missing.txt.gz")
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer.from_dir(tmp_path)


def test_corrupt_vocab_file(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.txt.gz"
    garbage.write_bytes(b"this is not gzip")
    with pytest.raises(ValueError, match="garbage.txt.gz"):
        load_bpe_gz(garbage)
    truncated = tmp_path / "truncated.txt.gz"
    with gzip.open(truncated, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\ni n\nt h\n")
    with pytest.raises(ValueError, match="truncated"):
        load_bpe_gz(truncated)
    (tmp_path / "vocab.json").write_text("{not json")
    (tmp_path / "merges.txt").write_text("#version: 0.2\ni n\n")
    with pytest.raises(ValueError, match="vocab.json"):
        CLIPTokenizer.from_dir(tmp_path)


def test_bad_arguments() -> None:
    encoder, merges = load_bpe_gz(BPE_GZ)
    with pytest.raises(ValueError, match="compat"):
        CLIPTokenizer(encoder, merges, compat="html")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="missing tokens"):
        CLIPTokenizer({"a": 0}, [])
