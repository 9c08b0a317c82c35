"""Prompt syntax as AUTOMATIC1111 users write it, and prompts of any length.

- ``(word)`` multiplies the attention weight of its tokens by 1.1, ``[word]`` divides by 1.1,
  ``(word:1.3)`` sets a factor of 1.3; brackets nest and multiply. ``\\(`` is a literal bracket.
- ``BREAK`` ends the current 75-token chunk.
- Prompts longer than 75 tokens are split into chunks of 75 (breaking at the last comma within
  20 tokens, as A1111 does); each chunk becomes ``<start> 75 tokens <end>``, is encoded on its own,
  and the chunks' embeddings are concatenated along the sequence axis.

- ``<lora:NAME:W>`` / ``<lyco:NAME:W>`` (A1111's extra-network tags) name a LoRA to apply; they are
  taken out of the text before tokenizing (:func:`extract_network_tags`, used by ``ldmkit.networks``).
- A word that is the name of a textual-inversion embedding (``ldmkit.embeddings``) becomes that
  embedding's vectors, which count against the 75-token chunks as A1111 counts them.

Weighting maths (A1111's): with ``z`` the (77, D) embeddings of a chunk and ``w`` its per-token
weights, ``z' = z * w[:, None] * (mean(z) / mean(z * w[:, None]))``: the weighted embeddings are
rescaled so their overall mean stays that of the unweighted ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ldmkit.model import StableDiffusion
from ldmkit.models.tokenizer import CLIPTokenizer

if TYPE_CHECKING:
    from ldmkit.embeddings import EmbeddingMatcher

COMMA_BACKTRACK = 20  # A1111: words after a comma this near a 75-token chunk end move to the next chunk
_RE_ATTENTION = re.compile(
    r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:
""",
    re.X,
)
_RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
ROUND, SQUARE = 1.1, 1 / 1.1


# A1111's extra-network syntax: <type:arg:arg...>; the types ldmkit applies are lora and lyco (its alias)
_RE_NETWORK = re.compile(r"<(lora|lyco):([^>]+)>", re.I)


@dataclass(frozen=True)
class NetworkTag:
    """``<lora:name:te:unet>`` (or ``te=``/``unet=`` named): multipliers for the text encoder and U-Net parts."""

    name: str
    te: float = 1.0
    unet: float | None = None  # None: the same as te


def extract_network_tags(prompt: str) -> tuple[str, list[NetworkTag], list[str]]:
    """(prompt without its LoRA tags, the tags, warnings for tags that could not be read).

    A1111's argument rules: ``<lora:name>`` is weight 1; ``<lora:name:w>`` weighs both parts w;
    ``<lora:name:te:unet>`` or ``te=``/``unet=`` weigh them apart.
    """
    tags: list[NetworkTag] = []
    warnings: list[str] = []

    def found(m: re.Match) -> str:
        items = m[2].split(":")
        positional = [i.strip() for i in items if "=" not in i]
        named = dict(i.split("=", 1) for i in items if "=" in i)
        try:
            te = float(positional[1]) if len(positional) > 1 else 1.0
            te = float(named.get("te", te))
            unet = float(positional[2]) if len(positional) > 2 else None
            unet = float(named["unet"]) if "unet" in named else unet
        except ValueError:
            warnings.append(f"{m[0]}: the weights must be numbers, as in <lora:name:0.8>; tag ignored")
            return ""
        if positional and positional[0]:
            tags.append(NetworkTag(positional[0], te, unet))
        return ""

    return _RE_NETWORK.sub(found, prompt), tags, warnings


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) runs; ("BREAK", -1) marks a forced chunk break."""
    res: list[list] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, factor: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= factor

    for m in _RE_ATTENTION.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):
            res.append([piece[1:], 1.0])
        elif piece == "(":
            round_brackets.append(len(res))
        elif piece == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif piece == ")" and round_brackets:
            multiply_range(round_brackets.pop(), ROUND)
        elif piece == "]" and square_brackets:
            multiply_range(square_brackets.pop(), SQUARE)
        else:
            for i, part in enumerate(_RE_BREAK.split(piece)):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])
    # unclosed brackets still apply
    for pos in round_brackets:
        multiply_range(pos, ROUND)
    for pos in square_brackets:
        multiply_range(pos, SQUARE)
    if not res:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):  # merge neighbours of equal weight
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return [(t, float(w)) for t, w in res]


@dataclass
class Chunk:
    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    # textual inversion: (offset among the chunk's tokens, (n, D) vectors) replacing n placeholder tokens
    fixes: list[tuple[int, Tensor]] = field(default_factory=list)


def tokenize_chunks(tok: CLIPTokenizer, prompt: str, embeddings: EmbeddingMatcher | None = None) -> list[Chunk]:
    """A prompt as chunks of the text encoder's length (77 for SD: start, 75 tokens, end) with
    per-token weights (start/end/padding weigh 1).

    ``embeddings``: names of textual-inversion embeddings become placeholder tokens (id 0) with a fix
    that puts the vectors there; an embedding that does not fit in what is left of a chunk starts the
    next one (A1111's ``tokenize_line``)."""
    size = tok.context_length - 2
    backtrack = COMMA_BACKTRACK * size // 75
    comma = tok.encode(",")[0]
    chunks: list[Chunk] = []
    cur = Chunk()
    last_comma = -1

    def close(is_last: bool = False) -> None:
        nonlocal cur, last_comma
        pad = size - len(cur.tokens)
        tokens = [tok.bos_id, *cur.tokens, *[tok.eos_id] * pad, tok.eos_id]
        if tok.pad_id != tok.eos_id:  # OpenCLIP: one end token, then padding
            end = len(cur.tokens) + 1
            tokens = tokens[: end + 1] + [tok.pad_id] * (len(tokens) - end - 1)
        chunks.append(Chunk(tokens, [1.0, *cur.weights, *[1.0] * (pad + 1)], cur.fixes))
        cur, last_comma = Chunk(), -1

    # <lora:...> tags are instructions, never text (ldmkit.networks applies them before encoding)
    for text, weight in parse_prompt_attention(extract_network_tags(prompt)[0]):
        if text == "BREAK" and weight == -1:
            close()
            continue
        ids = tok.encode(text)
        pos = 0
        while pos < len(ids):
            t = ids[pos]
            if t == comma:
                last_comma = len(cur.tokens)
            elif len(cur.tokens) == size and last_comma != -1 and len(cur.tokens) - last_comma <= backtrack:
                # move the words after the last comma to the next chunk rather than cut one mid-phrase
                # (an embedding among them moves with its vectors; A1111 leaves its fix behind)
                k = last_comma + 1
                rest = Chunk(cur.tokens[k:], cur.weights[k:], [(o - k, v) for o, v in cur.fixes if o >= k])
                cur = Chunk(cur.tokens[:k], cur.weights[:k], [(o, v) for o, v in cur.fixes if o < k])
                close()
                cur = rest
            if len(cur.tokens) == size:
                close()
            found = embeddings.match(ids, pos) if embeddings is not None else None
            if found is None:
                cur.tokens.append(t)
                cur.weights.append(weight)
                pos += 1
                continue
            vec, spans, _ = found
            n = min(vec.shape[0], size)
            if len(cur.tokens) + n > size:
                close()
            cur.fixes.append((len(cur.tokens), vec[:n]))
            cur.tokens += [0] * n
            cur.weights += [weight] * n
            pos += spans
    if cur.tokens or not chunks:
        close(is_last=True)
    return chunks


def unknown_words(model: StableDiffusion, prompt: str) -> list[str]:
    """Words of ``prompt`` a compact-vocabulary model (``TextEncoderConfig.token_rows``) has no embedding
    for: it reads them all as one blank token. Empty for models with CLIP's full vocabulary."""
    emb = model.text_encoder.text_model.embeddings
    if not hasattr(emb, "token_map"):
        return []
    tok = model.tokenizer
    table = getattr(model, "embedding_table", None)
    named = {e.name.lower() for e in table.embeddings} if hasattr(table, "embeddings") else set()
    words = []
    for text, _ in parse_prompt_attention(extract_network_tags(prompt)[0]):
        for word in re.findall(r"[^\s,.;:!?]+", text):
            if word.lower() in named:  # a textual-inversion word: its vectors stand in for it
                continue
            ids = tok.encode(word)
            if ids and bool((emb.token_map[torch.tensor(ids, device=emb.token_map.device)] == 0).any()):
                words.append(word)
    return list(dict.fromkeys(words))


def encode_chunks(model: StableDiffusion, chunks: list[Chunk], clip_skip: int) -> Tensor:
    """Chunks -> (1, 77 * len(chunks), D), weighted with the mean-preserving rescale."""
    enc = model.text_encoder
    device = next(enc.parameters()).device
    ids = torch.tensor([c.tokens for c in chunks], device=device)
    w = torch.tensor([c.weights for c in chunks], device=device, dtype=torch.float32)
    with torch.inference_mode():
        z = enc(ids, clip_skip=clip_skip, embeddings=token_embeddings(enc, ids, chunks)).float()  # (chunks, 77, D)
    return reweight(z, w).reshape(1, -1, z.shape[-1])


def token_embeddings(enc: torch.nn.Module, ids: Tensor, chunks: list[Chunk]) -> Tensor | None:
    """The encoder's token embeddings (chunks, 77, D) with the chunks' textual-inversion vectors in place
    (after the start token), or None when no chunk has any (the encoder looks the ids up itself)."""
    if not any(c.fixes for c in chunks):
        return None
    x = enc.text_model.embeddings.lookup(ids).clone()
    for i, c in enumerate(chunks):
        for offset, vec in c.fixes:
            n = min(vec.shape[0], x.shape[1] - offset - 1)
            x[i, offset + 1: offset + 1 + n] = vec[:n].to(x)
    return x


def embedding_matcher(model: StableDiffusion, tok: CLIPTokenizer, width: int,
                      prefer: str = "") -> EmbeddingMatcher | None:
    """The matcher of the model's embeddings folder (``model.embedding_table``) for one encoder, if any."""
    table = getattr(model, "embedding_table", None)
    return None if table is None else table.matcher(tok, width, prefer)


def reweight(z: Tensor, w: Tensor) -> Tensor:
    """A1111's emphasis: hidden states (chunks, 77, D) times per-token weights (chunks, 77), each chunk
    rescaled to keep its mean."""
    if not bool((w != 1.0).any()):
        return z
    out = []
    for zc, wc in zip(z, w, strict=True):
        mean = zc.mean()
        zc = zc * wc[:, None]
        new_mean = zc.mean()
        # a final LayerNorm without bias gives mean 0 exactly: nothing to preserve then
        out.append(zc * (mean / new_mean) if new_mean.abs() > 1e-12 else zc)
    return torch.stack(out)


def encode_weighted(model: StableDiffusion, prompts: list[str], clip_skip: int) -> Tensor:
    """Prompts -> (B, 77 * k, D), every prompt padded with empty-prompt chunks to the longest."""
    cache: dict[str, Tensor] = {}
    matcher = embedding_matcher(model, model.tokenizer, model.text_encoder.cfg.width)
    for p in prompts:
        if p not in cache:
            cache[p] = encode_chunks(model, tokenize_chunks(model.tokenizer, p, matcher), clip_skip)
    longest = max(z.shape[1] for z in cache.values())
    if any(z.shape[1] != longest for z in cache.values()):
        empty = encode_chunks(model, tokenize_chunks(model.tokenizer, ""), clip_skip)
        cache = {p: pad_to(z, longest, empty) for p, z in cache.items()}
    return torch.cat([cache[p] for p in prompts])


def pad_to(z: Tensor, length: int, empty: Tensor) -> Tensor:
    """Append empty-prompt chunks until ``z`` has ``length`` tokens (A1111 does the same)."""
    repeats = (length - z.shape[1]) // empty.shape[1]
    return torch.cat([z, *[empty.expand(z.shape[0], -1, -1)] * repeats], dim=1)


def encode_pair(model: StableDiffusion, prompts: list[str], negatives: list[str],
                clip_skip: int, cond_only: bool = False) -> tuple[Tensor, Tensor]:
    """Conditional and unconditional embeddings of equal length, for one batched U-Net call.

    The LoRAs the first prompt names (``<lora:name:w>``) are put on the model first (``ldmkit.networks``),
    and their tags taken out of the text. ``cond_only``: nothing will read the unconditional half (CFG scale
    1, a guidance-embedded U-Net), so the negative prompts are not run through the text encoder and the
    conditional embeddings are returned in their place (the networks and the infotext's report still see them)."""
    from ldmkit.networks import apply_prompt_networks

    prompts, negatives, _ = apply_prompt_networks(model, list(prompts), list(negatives))
    if cond_only:
        z = encode_weighted(model, list(prompts), clip_skip)
        return z, z
    z = encode_weighted(model, list(prompts) + list(negatives), clip_skip)
    return z[: len(prompts)], z[len(prompts):]
