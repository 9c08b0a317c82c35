"""The explain page for SDXL (tiny random SDXL): both encoders' tokens (against transformers' CLIPTokenizer with
each encoder's padding), the added conditioning (the size/crop ids against diffusers' _get_add_time_ids, the
pooled vector), cross-attention maps at the concatenated context width (the captured probabilities are what the
layer used), and the page through the server's /explain with an SDXL model loaded."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from reference import hf_tokenizer_files

from ldmkit.config import TINY_SDXL
from ldmkit.explain import CrossAttentionMaps, explain, write_page
from ldmkit.models.unet import sdxl_vector
from ldmkit.pipeline import GenerationParams
from ldmkit.sdxl import StableDiffusionXL, micro_ids

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT, W, H = "a red apple on a table", 32, 24


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return StableDiffusionXL(TINY_SDXL).eval()


@pytest.fixture(scope="module")
def ex(model):
    return explain(model, GenerationParams(PROMPT, negative_prompt="blurry", steps=3, seed=5, width=W, height=H,
                                           sampler="Euler"))


def test_both_encoders_tokens_match_transformers(ex, tmp_path):
    from transformers import CLIPTokenizer

    for rows, pad_eos, name in ((ex.tokens, True, "l"), (ex.tokens2, False, "g")):
        hf_tokenizer_files(tmp_path / name, pad_with_eos=pad_eos)
        want = CLIPTokenizer.from_pretrained(tmp_path / name)(PROMPT, padding="max_length", max_length=77).input_ids
        assert [r.id for r in rows] == want
    assert [r.kind for r in ex.tokens] == [r.kind for r in ex.tokens2]
    assert {r.id for r in ex.tokens2 if r.kind == "padding"} == {0}  # bigG pads with 0, CLIP-L with the end token
    assert {r.id for r in ex.tokens if r.kind == "padding"} == {49407}


def test_added_conditioning_is_diffusers_add_time_ids(model, ex):
    from diffusers import StableDiffusionXLPipeline

    proj = TINY_SDXL.text2.projection_dim
    fake = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(addition_time_embed_dim=256),
                                                add_embedding=SimpleNamespace(linear_1=SimpleNamespace(
                                                    in_features=TINY_SDXL.unet.adm_in_channels))))
    want = StableDiffusionXLPipeline._get_add_time_ids(fake, (H, W), (0, 0), (H, W), torch.float32, proj)
    a = ex.added
    assert a["ids"] == want[0].tolist() and a["neg_ids"] == want[0].tolist()  # A1111: the same for the negative
    assert a["names"][:2] == ["original height", "original width"] and a["adm"] == TINY_SDXL.unet.adm_in_channels
    _, pooled = model.encode([PROMPT])
    assert a["pooled_dim"] == proj and a["pooled_norm"] == pytest.approx(float(pooled[0].norm()), rel=1e-5)
    assert a["neg_pooled_norm"] > 0  # "blurry" is encoded, not zeros
    assert a["widths"] == [TINY_SDXL.text.width, TINY_SDXL.text2.width]
    assert ex.attention.shape[0] == 77 and torch.allclose(ex.attention.sum(0), torch.ones(()), atol=1e-4)


def test_attention_at_the_concatenated_context(model):
    """The captured probabilities of an SDXL cross-attention read both encoders' 2048-wide (tiny: 80) context and
    reproduce the layer's output."""
    name = next(n for n, _ in model.unet.named_modules() if n.endswith("transformer_blocks.0.attn2"))
    attn = model.unet.get_submodule(name)
    ctx, pooled = model.encode([PROMPT, ""])
    y = sdxl_vector(pooled, micro_ids(model.cfg, W, H).expand(2, -1))
    x = torch.randn(2, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(), CrossAttentionMaps(model.unet, (H // 2, W // 2), keep=name) as cap:
        model.unet(x, torch.tensor([500.0, 500.0]), ctx.flip(0), y=y.flip(0))
    kept = cap.kept[0]
    assert kept["context"].shape[-1] == TINY_SDXL.text.width + TINY_SDXL.text2.width == model.cfg.unet.context_dim
    torch.testing.assert_close(kept["context"], ctx[:1])  # the last row of the batch: the prompt's
    probs = kept["probs"]
    with torch.no_grad():
        v = attn.to_v(kept["context"]).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
        torch.testing.assert_close(attn.to_out((probs @ v).transpose(1, 2).flatten(2)), kept["output"],
                                   atol=1e-5, rtol=1e-5)


def test_page_shows_both_encoders_and_the_added_conditioning(model, ex, tmp_path):
    text = write_page(ex, tmp_path, model.tokenizer).read_text()
    assert "<th>CLIP-L id</th><th>bigG id</th>" in text and 'href="#added"' in text
    assert "What SDXL adds" in text and "original height" in text and "target width" in text
    assert f"side by side that is {model.cfg.unet.context_dim} numbers per position" in text


def test_explain_through_the_server_with_sdxl(tmp_path):
    pytest.importorskip("fastapi", reason="server extra not installed")
    from fastapi.testclient import TestClient
    from test_sdxl_server import write_models

    from ldmkit.server.app import create_app

    write_models(tmp_path)
    client = TestClient(create_app(tmp_path / "xl.safetensors", models_dir=tmp_path, preview_interval=0,
                                   explain_dir=tmp_path / "explain"))
    r = client.get("/explain", params={"prompt": "an apple", "steps": 2, "width": 32, "height": 24})
    assert r.status_code == 200, r.text[:300]
    assert "bigG id" in r.text and "What SDXL adds" in r.text
