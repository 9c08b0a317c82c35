"""A1111 prompt syntax: parsing against A1111's own documented examples, and the weighting maths."""

from __future__ import annotations

import pytest
import torch

from ldmkit.config import TINY
from ldmkit.model import StableDiffusion
from ldmkit.prompt import encode_chunks, encode_pair, parse_prompt_attention, tokenize_chunks


# the examples from the docstring of A1111's modules/prompt_parser.py::parse_prompt_attention
@pytest.mark.parametrize("text,expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
])
def test_parse_matches_a1111(text, expected):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], abs=1e-12)


def test_break_and_square_brackets():
    assert parse_prompt_attention("a cat BREAK a dog") == [("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)]
    assert parse_prompt_attention("[faint]") == [("faint", pytest.approx(1 / 1.1))]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = StableDiffusion(TINY).eval()
    # a trained final LayerNorm has a bias, so embeddings have a non-zero mean (fresh ones have exactly 0)
    torch.nn.init.normal_(m.text_encoder.text_model.final_layer_norm.bias, 0.1, 0.2)
    return m


def test_weight_changes_only_its_tokens(model):
    """(red:1.5): the red token's embedding gets 1.5x, then everything is rescaled by one constant."""
    plain = encode_chunks(model, tokenize_chunks(model.tokenizer, "a red apple"), 1)[0]
    chunks = tokenize_chunks(model.tokenizer, "a (red:1.5) apple")
    assert chunks[0].tokens == tokenize_chunks(model.tokenizer, "a red apple")[0].tokens
    red = chunks[0].tokens.index(model.tokenizer.encode("red")[0])
    assert chunks[0].weights[red] == 1.5 and sum(w != 1.0 for w in chunks[0].weights) == 1
    weighted = encode_chunks(model, chunks, 1)[0]
    w = torch.ones(77)
    w[red] = 1.5
    expected = plain * w[:, None] * (plain.mean() / (plain * w[:, None]).mean())
    torch.testing.assert_close(weighted, expected, rtol=1e-6, atol=1e-6)
    # the documented invariant: the mean is preserved
    assert weighted.mean().item() == pytest.approx(plain.mean().item(), rel=1e-5)


def test_long_prompt_chunks(model):
    tok = model.tokenizer
    words = " ".join(["apple"] * 200)
    assert len(tok.encode(words)) == 200
    chunks = tokenize_chunks(tok, words)
    assert len(chunks) == 3 and all(len(c.tokens) == 77 for c in chunks)
    assert [c.tokens[1:-1].count(tok.encode("apple")[0]) for c in chunks] == [75, 75, 50]
    assert all(c.tokens[0] == tok.bos_id and c.tokens[-1] == tok.eos_id for c in chunks)
    cond, uncond = encode_pair(model, [words], [""], 1)
    assert cond.shape == (1, 3 * 77, TINY.text.width) and uncond.shape == cond.shape
    # each chunk is encoded on its own: the first chunk equals a 75-word prompt's encoding
    first = encode_chunks(model, tokenize_chunks(tok, " ".join(["apple"] * 75)), 1)
    torch.testing.assert_close(cond[:, :77], first)


def test_comma_backtrack_and_break(model):
    tok = model.tokenizer
    text = " ".join(["apple"] * 70) + ", " + " ".join(["pear"] * 10)
    chunks = tokenize_chunks(tok, text)
    # the phrase after the last comma moves whole into the next chunk
    comma = tok.encode(",")[0]
    assert chunks[0].tokens[1:72][-1] == comma and tok.encode("pear")[0] not in chunks[0].tokens
    assert len(tokenize_chunks(tok, "a cat BREAK a dog")) == 2


def test_plain_prompt_is_standard_tokenization(model):
    tok = model.tokenizer
    assert tokenize_chunks(tok, "a red apple")[0].tokens == tok("a red apple")[0].tolist()
