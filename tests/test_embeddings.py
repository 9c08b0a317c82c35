"""Textual-inversion embeddings: every file kind people have gives diffusers' ``load_textual_inversion``
image on the same prompt (<= 2/255); multi-vector embeddings count against 75-token chunks as A1111's
``tokenize_line`` counts them; bad files are warnings, never crashes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import save_diffusers_pipeline
from test_lora_formats import _pipe

from ldmkit import checkpoint
from ldmkit.checkpoint import CheckpointError
from ldmkit.config import TINY
from ldmkit.embeddings import EmbeddingTable, load_embedding
from ldmkit.pipeline import GenerationParams, txt2img
from ldmkit.prompt import tokenize_chunks

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]
WIDTH = TINY.text.width
PROMPT = "a photo of mystyle, red apple"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe")
    save_diffusers_pipeline(TINY, path)
    return path


def _vectors(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, WIDTH, generator=torch.Generator().manual_seed(seed))


def _write(kind: str, path_dir, vec: torch.Tensor):
    """One embedding file of ``kind`` for the word "mystyle"."""
    from safetensors.torch import save_file

    if kind == "a1111-pt":
        path = path_dir / "mystyle.pt"
        torch.save({"string_to_param": {"*": vec.clone().requires_grad_(True)}, "name": "mystyle", "step": 500,
                    "sd_checkpoint": "abcdef12", "sd_checkpoint_name": "sd15"}, path)
    elif kind == "a1111-safetensors":
        path = path_dir / "mystyle.safetensors"
        save_file({"emb_params": vec.contiguous()}, path)
    elif kind == "diffusers-bin":  # learned_embeds.bin renamed to its word, one vector
        path = path_dir / "mystyle.bin"
        torch.save({"<mystyle>": vec[0].clone()}, path)
    elif kind == "sdxl":
        path = path_dir / "mystyle.safetensors"
        save_file({"clip_l": vec.contiguous(), "clip_g": torch.zeros(vec.shape[0], 1280)}, path)
    else:
        raise AssertionError(kind)
    return path


def _image(model, prompt: str) -> np.ndarray:
    params = GenerationParams(prompt, steps=6, cfg_scale=5.0, sampler="Euler", scheduler="uniform", seed=7,
                              width=24, height=16)
    return np.asarray(txt2img(model, params)[0]).astype(np.int16)


def _reference(folder, path, vec: torch.Tensor) -> np.ndarray:
    pipe = _pipe(folder)
    # diffusers reads A1111 .pt/.safetensors itself; the SDXL file is passed as the clip_l tensor, as
    # diffusers' SDXL docs show (load_textual_inversion(state_dict["clip_l"], ...))
    pipe.load_textual_inversion(vec if path.suffix == ".safetensors" and "sdxl" in path.parent.name else str(path),
                                token="mystyle")
    out = pipe(PROMPT, negative_prompt="", num_inference_steps=6, guidance_scale=5.0, height=16, width=24,
               generator=torch.Generator().manual_seed(7), output_type="np")
    return (out.images[0] * 255).round().astype(np.int16)


@pytest.mark.parametrize("kind,n", [("a1111-pt", 3), ("a1111-safetensors", 2), ("diffusers-bin", 1), ("sdxl", 2)])
def test_embedding_matches_diffusers_load_textual_inversion(folder, tmp_path, kind, n):
    emb_dir = tmp_path / kind.replace("sdxl", "sdxl-emb")
    emb_dir.mkdir()
    vec = _vectors(n)
    path = _write(kind, emb_dir, vec)
    emb = load_embedding(path)
    assert emb.name == "mystyle" and emb.n_vectors == n
    ref = _reference(folder, path, vec)
    model = checkpoint.load(folder)
    plain = _image(model, PROMPT)
    model.embedding_table = EmbeddingTable(emb_dir)
    ours = _image(model, PROMPT)
    diff = np.abs(ours - ref).max()
    assert diff <= 2, f"max pixel difference {diff}/255"
    assert np.abs(plain - ref).max() > 10  # the embedding does change the image
    assert ref.std() > 5


def test_multi_vector_embedding_counts_against_chunks_as_a1111(folder, tmp_path):
    """A1111 tokenize_line: an embedding that would overflow the 75 tokens left in a chunk starts the next
    chunk (the current one is padded); its vectors occupy as many positions as it has vectors."""
    (tmp_path / "e").mkdir()
    torch.save({"string_to_param": {"*": _vectors(5)}}, tmp_path / "e" / "mystyle.pt")
    model = checkpoint.load(folder)
    table = EmbeddingTable(tmp_path / "e")
    tok = model.tokenizer
    matcher = table.matcher(tok, WIDTH)
    filler = " ".join(["cat"] * 72)  # 72 tokens, no comma: 3 free places, 5 vectors don't fit
    chunks = tokenize_chunks(tok, f"{filler} mystyle dog", matcher)
    assert len(chunks) == 2
    cat = tok.encode("cat")[0]
    assert chunks[0].tokens[1:73] == [cat] * 72 and chunks[0].tokens[73] == tok.eos_id and not chunks[0].fixes
    assert chunks[1].tokens[1:7] == [0] * 5 + tok.encode("dog")
    (offset, vec), = chunks[1].fixes
    assert offset == 0 and torch.equal(vec, _vectors(5))
    # with room left it stays: 70 + 5 = 75 fills the chunk exactly
    chunks = tokenize_chunks(tok, " ".join(["cat"] * 70) + " mystyle", matcher)
    assert len(chunks) == 1 and chunks[0].fixes[0][0] == 70 and chunks[0].tokens[71:76] == [0] * 5
    # without the table the word is text
    assert not tokenize_chunks(tok, "mystyle")[0].fixes


class Pickled:
    """A class a pickle would have to import and run: weights_only refuses it."""


def test_bad_embedding_files_are_named_warnings(folder, tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    torch.save({"not": "an embedding"}, d / "strings.pt")
    torch.save({"string_to_param": {"*": _vectors(1)}, "hook": Pickled()}, d / "pickled.pt")  # code: refused
    torch.save({"string_to_param": {"*": _vectors(2)}}, d / "good.pt")
    table = EmbeddingTable(d)
    assert [e.name for e in table.embeddings] == ["good"]
    assert set(table.errors) == {"corrupt", "strings", "pickled"}
    assert "pickled code" in table.errors["pickled"] and "not a textual-inversion embedding" in table.errors["strings"]
    with pytest.raises(CheckpointError, match="corrupt"):
        load_embedding(d / "corrupt.safetensors")
    model = checkpoint.load(folder)
    model.embedding_table = table
    _image(model, "good and corrupt")  # generation goes on


def test_embedding_of_another_width_is_skipped(folder, tmp_path):
    d = tmp_path / "wide"
    d.mkdir()
    torch.save({"string_to_param": {"*": torch.randn(2, 768)}}, d / "mystyle.pt")
    model = checkpoint.load(folder)
    matcher = EmbeddingTable(d).matcher(model.tokenizer, WIDTH)
    assert matcher.skipped == ["mystyle"] and not tokenize_chunks(model.tokenizer, "mystyle", matcher)[0].fixes


def test_sdxl_embedding_matches_diffusers_on_both_encoders(tmp_path):
    """An SDXL file (clip_l for CLIP-L, clip_g for bigG) against diffusers' SDXL recipe: the two tensors
    loaded into text_encoder / text_encoder_2 with load_textual_inversion; the context and pooled vector."""
    from reference import rel_err
    from safetensors.torch import save_file
    from test_sdxl import _diffusers_sdxl_folder

    from ldmkit.config import TINY_SDXL

    pipe = _diffusers_sdxl_folder(TINY_SDXL, tmp_path)
    g = torch.Generator().manual_seed(3)
    vecs = {"clip_l": torch.randn(2, TINY_SDXL.text.width, generator=g),
            "clip_g": torch.randn(2, TINY_SDXL.text2.width, generator=g)}
    (tmp_path / "emb").mkdir()
    save_file(vecs, tmp_path / "emb" / "mystyle.safetensors")
    pipe.load_textual_inversion(vecs["clip_l"], token="mystyle", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(vecs["clip_g"], token="mystyle", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    model = checkpoint.load(tmp_path / "model")
    before, _ = model.encode([PROMPT])
    model.embedding_table = EmbeddingTable(tmp_path / "emb")
    with torch.no_grad():
        ctx, _, pooled, _ = pipe.encode_prompt(PROMPT, prompt_2=PROMPT, do_classifier_free_guidance=False)
    got, got_pooled = model.encode([PROMPT])
    assert rel_err(got, ctx) < 1e-4 and rel_err(before, ctx) > 1e-2
    assert rel_err(got_pooled, pooled) < 1e-4


def test_infotext_names_used_embeddings_and_broken_words(folder, tmp_path):
    """A1111's ``TI hashes`` (SHA-256 of the file, 12 digits) for the embeddings a prompt uses; a word whose
    file failed to load is a warning in the infotext, and the image is made without it."""
    import hashlib

    d = tmp_path / "e"
    d.mkdir()
    torch.save({"string_to_param": {"*": _vectors(2)}}, d / "good.pt")
    torch.save({"string_to_param": {"*": _vectors(1, seed=1)}}, d / "unused.pt")
    (d / "broken.safetensors").write_bytes(b"garbage")
    model = checkpoint.load(folder)
    model.embedding_table = EmbeddingTable(d)
    params = GenerationParams("a good apple, broken", steps=2, sampler="Euler", seed=1, width=16, height=16)
    text = txt2img(model, params)[0].info["parameters"]
    sha = hashlib.sha256((d / "good.pt").read_bytes()).hexdigest()[:12]
    assert f'TI hashes: "good: {sha}"' in text and "unused" not in text
    assert "Prompt warnings: " in text and "embedding 'broken' not used" in text
    plain = txt2img(model, params.replace(prompt="a red apple"))[0].info["parameters"]
    assert "TI hashes" not in plain and "broken" not in plain
