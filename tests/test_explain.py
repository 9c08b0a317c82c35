"""The explain page: every section present, its numbers checked against independent computations."""

from __future__ import annotations

import argparse
import re

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit import api, checkpoint, cli
from ldmkit.config import TINY, TINY_SD2
from ldmkit.explain import (
    CrossAttentionMaps,
    build_explain_page,
    explain,
    heatmaps,
    token_rows,
    write_page,
)
from ldmkit.model import StableDiffusion
from ldmkit.models.tokenizer import CLIPTokenizer
from ldmkit.models.unet import BasicTransformerBlock
from ldmkit.pipeline import GenerationParams, encode_prompt, plan, txt2img

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a red apple"
W, H, STEPS = 24, 16, 3
N_ATTN2 = sum(isinstance(m, BasicTransformerBlock) for m in StableDiffusion(TINY).unet.modules())
SECTIONS = ("parameters", "tokens", "noise", "steps", "forward", "attention", "latent")




@pytest.fixture(scope="module")
def model() -> StableDiffusion:
    torch.manual_seed(0)
    return StableDiffusion(TINY).eval()


@pytest.fixture(scope="module")
def params() -> GenerationParams:
    return GenerationParams(PROMPT, steps=STEPS, sampler="Euler", cfg_scale=7.0, seed=42, width=W, height=H)


@pytest.fixture(scope="module")
def ex(model, params):
    return explain(model, params)


@pytest.fixture(scope="module")
def page(ex, model, tmp_path_factory):
    return write_page(ex, tmp_path_factory.mktemp("explain"), model.tokenizer)


def _srcs(text: str) -> list[str]:
    return sorted(set(re.findall(r'(?:src|href)="([^"#]+)"', text)))


def test_page_has_every_section_and_only_local_images(page):
    text = page.read_text(encoding="utf-8")
    for sid in SECTIONS:
        assert f'<section id="{sid}">' in text and f'href="#{sid}"' in text
    assert text.count("<h2>") == len(SECTIONS)
    # self-contained: no scripts, stylesheets or anything fetched from elsewhere
    assert "<script" not in text and "<link" not in text and "http" not in text
    srcs = set(_srcs(text))
    assert srcs and all(s.endswith(".png") and "/" not in s for s in srcs)
    for s in srcs:
        with Image.open(page.parent / s) as img:
            img.verify()
    assert "final.png" in srcs


def test_token_table_matches_tokenizer(model, ex, page):
    tok = model.tokenizer
    ids = tok(PROMPT)[0].tolist()
    rows = ex.tokens
    assert [r.id for r in rows] == ids and [r.position for r in rows] == list(range(len(ids)))
    n = len(tok.encode(PROMPT))
    assert [r.token for r in rows[1:n + 1]] == tok.tokens(PROMPT) == ["a</w>", "red</w>", "apple</w>"]
    assert [r.kind for r in rows] == ["start"] + ["prompt"] * n + ["end"] + ["padding"] * (len(ids) - n - 2)
    text = page.read_text(encoding="utf-8")
    table = text[text.index('<section id="tokens">'):text.index('<section id="noise">')]
    for r in rows[: n + 2]:
        assert f"<td>{r.id}</td>" in table and f"<code>{r.token.replace('<', '&lt;').replace('>', '&gt;')}" in table
    assert f"padding ×{len(ids) - n - 2}" in table


def test_token_rows_sd2_padding_and_long_prompts():
    tok = CLIPTokenizer.default(pad_with_eos=False)
    rows = token_rows(tok, "a cat")
    assert [r.id for r in rows] == tok("a cat")[0].tolist()
    assert rows[3].kind == "end" and rows[3].id == tok.eos_id
    assert {r.id for r in rows[4:]} == {0} and {r.kind for r in rows[4:]} == {"padding"}
    long = " ".join(["cat"] * 80)  # two 77-token chunks, positions continue across them
    rows = token_rows(tok, long)
    assert len(rows) == 154 and [r.position for r in rows] == list(range(154))
    assert sum(r.kind == "prompt" for r in rows) == 80 and rows[77].kind == "start"


def test_one_heatmap_per_prompt_token(model, ex, page):
    prompt_rows = [r for r in ex.tokens if r.kind == "prompt"]
    maps = heatmaps(ex)
    assert [r for r, _ in maps] == prompt_rows
    assert all(img.size == (W, H) for _, img in maps)
    f = TINY.vae.downscale
    assert ex.attention.shape == (len(ex.tokens), H // f, W // f)
    # averaged attention: every latent pixel's weights over the tokens still sum to 1
    torch.testing.assert_close(ex.attention.sum(0), torch.ones(H // f, W // f))
    assert ex.attention_layers == N_ATTN2 == 7  # TINY: 2 down, 1 middle, 4 up
    assert ex.unet_calls == STEPS  # Euler: one (batched CFG) U-Net call per step
    text = page.read_text(encoding="utf-8")
    attention = text[text.index('<section id="attention">'):text.index('<section id="latent">')]
    assert _srcs(attention) == sorted({f"attn{r.position}.png" for r in prompt_rows})
    assert len(list(page.parent.glob("attn*.png"))) == len(prompt_rows)


def test_captured_attention_is_softmax_and_what_the_layer_used(model, params):
    name = "output_blocks.1.1.transformer_blocks.0.attn2"
    attn = model.unet.get_submodule(name)
    cond, uncond = encode_prompt(model, [PROMPT], ["blurry"])
    x = torch.randn(2, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(), CrossAttentionMaps(model.unet, (H // 2, W // 2), keep=name) as cap:
        model.unet(x, torch.tensor([500.0, 500.0]), torch.cat([uncond, cond]))
    (kept,) = cap.kept
    probs, xin, ctx = kept["probs"], kept["x"], kept["context"]
    torch.testing.assert_close(ctx, cond)  # the conditional half of the [uncond | cond] batch
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
    # by hand from the layer's weights: softmax(q k^T / sqrt(d)) per head
    heads = attn.heads
    with torch.no_grad():
        q = (xin @ attn.to_q.weight.T).unflatten(-1, (heads, -1))  # (1, N, heads, d)
        k = (ctx @ attn.to_k.weight.T).unflatten(-1, (heads, -1))  # (1, T, heads, d)
        logits = torch.einsum("bnhd,bthd->bhnt", q, k) / q.shape[-1] ** 0.5
        e = (logits - logits.amax(-1, keepdim=True)).exp()
        torch.testing.assert_close(probs, e / e.sum(-1, keepdim=True))
        # and they are the probabilities scaled_dot_product_attention applied: they reproduce the layer's output
        v = (ctx @ attn.to_v.weight.T).unflatten(-1, (heads, -1)).transpose(1, 2)  # (1, heads, T, d)
        mixed = (probs @ v).transpose(1, 2).flatten(2)
        torch.testing.assert_close(attn.to_out(mixed), kept["output"], atol=1e-5, rtol=1e-5)


def test_x0_strip_has_one_image_per_step(model, params, ex, page):
    p = plan(model, params)
    assert [s.i for s in ex.steps] == list(range(STEPS))
    assert [s.sigma for s in ex.steps] == pytest.approx(p.sigmas[:-1].tolist())
    assert ex.steps[0].t == pytest.approx(999, abs=0.5)
    text = page.read_text(encoding="utf-8")
    strip = text[text.index('<section id="steps">'):text.index('<section id="forward">')]
    assert _srcs(strip) == [f"step{i}.png" for i in range(STEPS)]
    assert all(s.image.size == (W, H) for s in ex.steps)


def test_forward_strip_and_latent_numbers(ex, page):
    assert [s.t for s in ex.forward] == [0, 100, 250, 500, 750, 999]
    ab = [s.alpha_bar for s in ex.forward]
    assert ab == sorted(ab, reverse=True) and len(set(ab)) == len(ab)
    c, h, w = ex.latent.shape
    assert (c, h, w) == (TINY.unet.out_channels, H // 2, W // 2)
    assert ex.compression == W * H * 3 / (c * h * w) == 3.0
    text = page.read_text(encoding="utf-8")
    assert "3× fewer numbers" in text
    assert len(re.findall(r'src="latent\d\.png"', text)) == c and len(re.findall(r'src="noise\d\.png"', text)) == c


def test_capture_leaves_generation_unchanged(model, params, page):
    plain = np.asarray(txt2img(model, params)[0])
    with CrossAttentionMaps(model.unet, (H // 2, W // 2)) as cap:
        captured = np.asarray(txt2img(model, params)[0])
    assert cap.count == STEPS * N_ATTN2
    assert np.array_equal(plain, captured)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.unet.modules())
    # the page shows the very image txt2img makes
    assert np.array_equal(np.asarray(Image.open(page.parent / "final.png").convert("RGB")), plain)


def test_sd2_style_model(tmp_path):
    # v-prediction, linear proj_in/out, head_dim instead of num_heads, padding with id 0
    torch.manual_seed(0)
    sd2 = StableDiffusion(TINY_SD2).eval()
    params = GenerationParams(PROMPT, steps=2, sampler="DPM++ 2M", cfg_scale=5.0, seed=3, width=W, height=H)
    ex = explain(sd2, params)
    torch.testing.assert_close(ex.attention.sum(0), torch.ones(H // 2, W // 2))
    assert ex.tokens[5].kind == "padding" and ex.tokens[5].id == 0 and len(heatmaps(ex)) == 3
    assert np.array_equal(np.asarray(ex.image), np.asarray(txt2img(sd2, params)[0]))
    assert (write_page(ex, tmp_path, sd2.tokenizer).parent / "attn3.png").exists()


def test_init_image_feeds_the_forward_strip(model, tmp_path):
    red = Image.new("RGB", (W, H), (220, 20, 20))
    page = build_explain_page(model, "", tmp_path, steps=1, width=W, height=H, init_image=red)
    text = page.read_text(encoding="utf-8")
    assert "here the image you gave" in text and "The prompt has no tokens" in text


def test_cli_explain(model, tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "tiny.safetensors"
    checkpoint.save_single_file(model, ckpt)
    assert "ldmkit.explain" in cli.PLUGIN_MODULES
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    p = sub.choices["explain"]
    assert "ldmkit explain" in p.epilog
    assert (p.get_default("seed"), p.get_default("sampler"), p.get_default("cfg_scale")) == (42, "Euler", 7.0)
    out = tmp_path / "out"
    argv = ["explain", PROMPT, "--model", str(ckpt), "-o", str(out), "--steps", "2", "--width", str(W),
            "--height", str(H), "--device", "cpu"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.strip() == str(out / "index.html") and (out / "step1.png").exists()
    assert cli.main([*argv, "--init-image", str(tmp_path / "missing.png")]) == 2
    assert "missing.png: no such image file" in capsys.readouterr().err


@pytest.mark.skipif(api.builtin_model_path("emoji") is None,
                    reason="the default model (src/ldmkit/assets/emoji.safetensors) is not shipped yet")
def test_explain_page_for_the_default_model(tmp_path):
    model = checkpoint.load(api.resolve_model_path(None))
    page = build_explain_page(model, "a red apple", tmp_path, steps=2)
    text = page.read_text(encoding="utf-8")
    assert all(f'<section id="{sid}">' in text for sid in SECTIONS)
    assert all((tmp_path / s).exists() for s in _srcs(text))
