"""CLIP byte-level BPE tokenizer, as used by SD1 (OpenAI CLIP ViT-L/14) and SD2 (OpenCLIP ViT-H/14).

Same algorithm as OpenAI's `simple_tokenizer.py`: clean the text, split it with CLIP's regex, map each
piece's UTF-8 bytes to printable characters (GPT-2's byte-level trick), then apply BPE merges in rank
order. SD1 and SD2 differ only in padding: SD1 pads with `<|endoftext|>`, OpenCLIP pads with id 0
(the byte token "!"), after one end token.

`compat` picks whose quirks to reproduce (defaults to "clip"):
- "clip": OpenAI CLIP / open_clip, what SD1 and SD2 were trained with (and transformers<5's slow tokenizer
  with ftfy installed): ftfy + HTML unescaping, and "!" is an ordinary character.
- "transformers": transformers>=5 `CLIPTokenizer` exactly, i.e. what diffusers feeds the text encoder: only
  NFC normalisation (`&amp;`, curly quotes, ligatures are kept), special tokens are matched case-sensitively
  in the raw text, and with SD2's pad token "!" every "!" in a prompt becomes id 0 rather than "!</w>" (256).
Ordinary prompts get the same ids either way.
"""

from __future__ import annotations

import functools
import gzip
import html
import itertools
import json
import marshal
import os
import sys
import unicodedata
import zlib
from importlib import resources
from pathlib import Path
from typing import Literal

import regex
import torch

from ldmkit.atomic import cache_file, replacing

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
SD2_PAD_TOKEN = "!"  # OpenCLIP pads with id 0, which is the byte token "!"
END_OF_WORD = "</w>"
VOCAB_SIZE = 49408
# The merges file holds more lines than CLIP uses; CLIP keeps exactly enough merges for a 49408-token vocab
# (256 bytes + 256 bytes with </w> + merges + 2 special tokens).
NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2
DEFAULT_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"

Compat = Literal["clip", "transformers"]

_SPLIT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
# transformers' byte-level pre-tokenizer re-splits "<|endoftext|>" into "<|", "endoftext", "|>", so for it
# only exact special tokens in the raw text count (`CLIPTokenizer._added`).
_SPLIT_NO_SPECIAL = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
_WHITESPACE = regex.compile(r"\s+")
# Text ftfy.fix_text returns unchanged: printable ASCII, tabs and newlines, no "&" (HTML entities). Every ftfy
# fix needs a non-ASCII character, a control character, "\r" or an entity, so typed prompts skip importing
# ftfy (and wcwidth), a tenth of a second of start-up.
_FTFY_IDENTITY = regex.compile(r"[\t\n\x20-\x25\x27-\x7e]*")


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable unicode character (no whitespace/control)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def clean_text(text: str, compat: Compat = "clip") -> str:
    """Normalise a prompt before splitting: ftfy + HTML unescape ("clip") or NFC ("transformers"), then
    collapse whitespace and lowercase."""
    if compat == "clip":
        if not _FTFY_IDENTITY.fullmatch(text):
            import ftfy

            text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text))
        return _WHITESPACE.sub(" ", text).strip().lower()
    if compat == "transformers":
        text = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text)).strip()
        # tokenizers lowercases char by char, so a word-final capital sigma becomes "σ", not Python's "ς".
        return "".join(c.lower() for c in text)
    raise ValueError(f"compat must be 'clip' or 'transformers', got {compat!r}")


def _default_bpe_path() -> Path:
    return Path(str(resources.files("ldmkit") / "assets" / DEFAULT_BPE_FILE))


@functools.lru_cache(maxsize=4)
def load_bpe_gz(path: str | os.PathLike) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Read OpenAI CLIP's gzipped merges file into (token -> id, merges), exactly as CLIP builds its vocab.

    The parse is kept in the user's cache folder (``_bpe_cache_file``): read back, it takes a fifth of
    the time, and every new process (the CLI's first image) pays it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"CLIP BPE vocabulary not found: {path}. It ships with ldmkit as ldmkit/assets/{DEFAULT_BPE_FILE}; "
            "reinstall ldmkit, or load a diffusers tokenizer folder with CLIPTokenizer.from_dir(...)."
        )
    cache = _bpe_cache_file(path)
    try:
        encoder, merges = marshal.loads(cache.read_bytes())
        if isinstance(encoder, dict) and isinstance(merges, tuple) and len(merges) == NUM_MERGES:
            return encoder, merges
    except (OSError, EOFError, ValueError, TypeError):
        pass  # no cache yet, or an unreadable one: parse the file
    encoder, merges = _parse_bpe_gz(path)
    try:
        with replacing(cache) as tmp:
            Path(tmp).write_bytes(marshal.dumps((encoder, merges)))
    except OSError:
        pass  # a read-only home: parse every time
    return encoder, merges


def _bpe_cache_file(path: Path) -> Path:
    """Where the parse of ``path`` is cached: keyed by the file's identity and the marshal format (Python's)."""
    st = path.stat()
    return cache_file("bpe", f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{sys.version}|{NUM_MERGES}", ".marshal")


def _parse_bpe_gz(path: Path) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise ValueError(
            f"CLIP BPE vocabulary {path} is not a readable gzipped UTF-8 merges file ({e}); "
            f"replace it with a fresh copy of {DEFAULT_BPE_FILE} (e.g. from the open_clip_torch package)."
        ) from e
    # Line 0 is a header ("#version: 0.2"); CLIP uses the next NUM_MERGES lines.
    merge_lines = lines[1 : NUM_MERGES + 1]
    pairs = [line.split() for line in merge_lines]
    # map/zip/set run in C: this parse is part of every first image's start-up
    if len(pairs) != NUM_MERGES or set(map(len, pairs)) != {2}:
        raise ValueError(
            f"CLIP BPE vocabulary {path} is truncated or malformed: expected {NUM_MERGES} merge lines of two "
            f"symbols after the header; replace it with a fresh copy of {DEFAULT_BPE_FILE}."
        )
    merges = tuple(map(tuple, pairs))
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + END_OF_WORD for c in byte_chars] + list(map("".join, merges))
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return dict(zip(tokens, range(len(tokens)), strict=True)), merges


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e}); re-download the tokenizer folder.") from e
    if not isinstance(data, dict):
        raise ValueError(f"{file} should hold a JSON object; re-download the tokenizer folder.")
    return data


def _special_token(value: object) -> str | None:
    """A special token as stored in tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_pad_token(folder: Path) -> str:
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        file = folder / name
        if file.is_file():
            pad = _special_token(_read_json(file).get("pad_token"))
            if pad is not None:
                return pad
    return EOS_TOKEN  # transformers' CLIPTokenizer default


class CLIPTokenizer:
    """CLIP BPE tokenizer giving the same ids as `transformers.CLIPTokenizer` (SD1 and SD2 variants).

    `pad_with_eos=True` pads like SD1 (`<|endoftext|>`, 49407); False pads like SD2/OpenCLIP (id 0, "!").
    `compat="transformers"` reproduces transformers' quirks, see the module docstring.
    """

    def __init__(
        self,
        encoder: dict[str, int],
        merges: list[tuple[str, str]] | tuple[tuple[str, str], ...],
        pad_with_eos: bool = True,
        context_length: int = 77,
        *,
        compat: Compat = "clip",
    ) -> None:
        clean_text("", compat)  # validates `compat`
        missing = [t for t in (BOS_TOKEN, EOS_TOKEN) if t not in encoder]
        missing += [c for c in bytes_to_unicode().values() if c not in encoder]
        if not pad_with_eos and SD2_PAD_TOKEN not in encoder:
            missing.append(SD2_PAD_TOKEN)
        if missing:
            raise ValueError(f"not a CLIP byte-level BPE vocabulary: missing tokens {missing[:8]}")
        if context_length < 2:
            raise ValueError(f"context_length must leave room for bos and eos, got {context_length}")
        self.encoder = dict(encoder)
        # a tuple of pairs (load_bpe_gz's) is kept as it is: rebuilding its 48,894 pairs was 11 ms of each load
        self.merges = merges if type(merges) is tuple else tuple((a, b) for a, b in merges)
        self.bpe_ranks = dict(zip(self.merges, range(len(self.merges)), strict=True))
        self._no_rank = len(self.bpe_ranks)
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.bos_id = self.encoder[BOS_TOKEN]
        self.eos_id = self.encoder[EOS_TOKEN]
        self.pad_id = self.eos_id if pad_with_eos else self.encoder[SD2_PAD_TOKEN]
        self.context_length = context_length
        self.compat = compat
        # transformers' added tokens: matched in the raw text before normalisation; SD2's pad "!" is one of them.
        added = [BOS_TOKEN, EOS_TOKEN] + ([] if pad_with_eos else [SD2_PAD_TOKEN])
        self._added = regex.compile("(" + "|".join(regex.escape(t) for t in added) + ")")
        # Per-instance cache keyed by the raw piece; lru_cache is thread-safe and bounded.
        self._bpe = functools.lru_cache(maxsize=1 << 16)(self._bpe_uncached)

    @functools.cached_property
    def decoder(self) -> dict[int, str]:
        """id -> token string; built when first needed (decoding), not at load."""
        return {i: t for t, i in self.encoder.items()}

    @classmethod
    def default(cls, pad_with_eos: bool = True, context_length: int = 77, *,
                compat: Compat = "clip") -> CLIPTokenizer:
        """The tokenizer from the vendored OpenAI merges file (SD1; SD2 with `pad_with_eos=False`).

        ``context_length`` is the text encoder's position count: 77 for SD, fewer for small models."""
        encoder, merges = load_bpe_gz(_default_bpe_path())
        return cls(encoder, merges, pad_with_eos=pad_with_eos, context_length=context_length, compat=compat)

    @classmethod
    def from_dir(cls, path: str | os.PathLike, *, compat: Compat = "clip") -> CLIPTokenizer:
        """Load a diffusers `tokenizer/` folder (vocab.json + merges.txt, or tokenizer.json).

        The pad token comes from special_tokens_map.json / tokenizer_config.json: "<|endoftext|>" (SD1) or "!"
        (SD2). A model root holding a `tokenizer/` subfolder is accepted too.
        """
        folder = Path(path)
        if (folder / "tokenizer").is_dir() and not (folder / "vocab.json").is_file():
            folder = folder / "tokenizer"
        vocab_file, merges_file, json_file = folder / "vocab.json", folder / "merges.txt", folder / "tokenizer.json"
        if vocab_file.is_file() and merges_file.is_file():
            encoder = _read_json(vocab_file)
            lines = merges_file.read_text(encoding="utf-8").splitlines()
            merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
        elif json_file.is_file():
            model = _read_json(json_file).get("model", {})
            encoder = model.get("vocab")
            # tokenizers writes merges as "a b" strings (old) or ["a", "b"] pairs (>=0.20).
            merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
            if not isinstance(encoder, dict):
                raise ValueError(f"{json_file} has no BPE model vocab; is this a CLIP tokenizer folder?")
        else:
            raise FileNotFoundError(
                f"no CLIP tokenizer files in {folder}: expected vocab.json + merges.txt (diffusers layout) or "
                "tokenizer.json. Point from_dir at a diffusers model's tokenizer/ folder, or use "
                "CLIPTokenizer.default()."
            )
        bad = [m for m in merges if len(m) != 2]
        if bad:
            raise ValueError(f"malformed merges in {folder}: {len(bad)} entries are not pairs, e.g. {bad[0]}")
        pad = _read_pad_token(folder)
        if pad not in (EOS_TOKEN, SD2_PAD_TOKEN):
            raise ValueError(
                f"unsupported pad token {pad!r} in {folder}: expected {EOS_TOKEN!r} (SD1) or {SD2_PAD_TOKEN!r} (SD2)"
            )
        return cls(encoder, merges, pad_with_eos=pad == EOS_TOKEN, compat=compat)

    def save(self, path: str | os.PathLike) -> None:
        """Write a diffusers/transformers `tokenizer/` folder (vocab.json, merges.txt and the two configs)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        pad = self.decoder[self.pad_id]
        special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad}
        config = {**special, "tokenizer_class": "CLIPTokenizer", "model_max_length": self.context_length}
        merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges)
        (folder / "vocab.json").write_text(json.dumps(self.encoder, ensure_ascii=False), encoding="utf-8")
        (folder / "merges.txt").write_text(merges, encoding="utf-8")
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")

    def _bpe_uncached(self, piece: str) -> tuple[str, ...]:
        """BPE of one pre-tokenized piece: repeatedly merge every occurrence of the lowest-ranked pair."""
        if self.compat == "clip" and piece in (BOS_TOKEN, EOS_TOKEN):
            return (piece,)
        chars = [self.byte_encoder[b] for b in piece.encode("utf-8")]
        word = chars[:-1] + [chars[-1] + END_OF_WORD]
        while len(word) > 1:
            pairs = list(itertools.pairwise(word))
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, self._no_rank))
            if best not in self.bpe_ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return tuple(word)

    def tokens(self, text: str) -> list[str]:
        """BPE token strings (byte-level characters, "</w>" marks a word end), without bos/eos."""
        if self.compat == "clip":
            return [tok for piece in _SPLIT.findall(clean_text(text, "clip")) for tok in self._bpe(piece)]
        out: list[str] = []
        # re.split with a group alternates plain text and added tokens: text, token, text, ...
        for i, segment in enumerate(self._added.split(text)):
            if i % 2:
                out.append(segment)
            else:
                pieces = _SPLIT_NO_SPECIAL.findall(clean_text(segment, "transformers"))
                out.extend(tok for piece in pieces for tok in self._bpe(piece))
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids without bos/eos and without truncation."""
        return [self.encoder[tok] for tok in self.tokens(text)]

    def decode(self, ids: list[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Ids back to text; word ends become spaces. `skip_special_tokens` drops bos/eos (and SD1 padding)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if skip_special_tokens:
            ids = [i for i in ids if i not in (self.bos_id, self.eos_id)]
        chars = "".join(self.decoder[i] for i in ids)
        text = bytes(self.byte_decoder[c] for c in chars).decode("utf-8", errors="replace")
        return text.replace(END_OF_WORD, " ").strip()

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """[B, context_length] int64 ids: bos, the first context_length-2 ids, eos, then pad_id."""
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.bos_id, *self.encode(text)[: self.context_length - 2], self.eos_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out
