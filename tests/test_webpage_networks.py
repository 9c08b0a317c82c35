"""The web page's LoRA and Embeddings panels and its Tiling checkbox in a real browser (Debian's chromium through
Playwright), on the built-in emoji model served with --lora-dir / --embeddings-dir: the panels list the folders'
files (names as text, never markup), a click puts ``<lora:NAME:1>`` or the embedding's word into the prompt, the
refresh buttons pick up new files, and a generation with the tag and Tiling checked records both in its infotext."""

from __future__ import annotations

import json

import pytest
import torch
from browser import require_browser

require_browser()

from safetensors.torch import save_file  # noqa: E402

from ldmkit.server.app import BackgroundServer, create_app  # noqa: E402

EVIL = "<img src=x onerror=alert(1)>"  # a legal file name on Linux: must show as text, never become an element
TEXT_WIDTH = 256  # the emoji model's text encoder


def _lora(seed: int) -> dict[str, torch.Tensor]:
    """A kohya LoRA for the emoji model: one text-encoder and one U-Net attention projection (rank 4)."""
    g = torch.Generator().manual_seed(seed)
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # emoji: 64 channels there
    return {f"{te}.lora_down.weight": torch.randn(4, TEXT_WIDTH, generator=g) * 0.3,
            f"{te}.lora_up.weight": torch.randn(TEXT_WIDTH, 4, generator=g) * 0.3,
            f"{q}.lora_down.weight": torch.randn(4, 64, generator=g) * 0.3,
            f"{q}.lora_up.weight": torch.randn(64, 4, generator=g) * 0.3, f"{q}.alpha": torch.tensor(2.0)}


def _embedding(width: int, n: int, seed: int) -> dict[str, torch.Tensor]:
    """A1111's .safetensors embedding layout: ``emb_params`` of shape (vectors, width)."""
    return {"emb_params": torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.02}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    loras = tmp_path_factory.mktemp("loras")
    save_file(_lora(0), loras / "style.safetensors")
    save_file(_lora(1), loras / f"{EVIL}.safetensors")
    emb = tmp_path_factory.mktemp("embeddings")
    save_file(_embedding(TEXT_WIDTH, 2, 2), emb / "mystyle.safetensors")
    save_file(_embedding(1024, 1, 3), emb / "sd2word.safetensors")  # another model's width: listed, not usable
    return loras, emb


@pytest.fixture(scope="module")
def page(dirs, one_thread, open_page):
    loras, emb = dirs
    app = create_app("emoji", lora_dir=loras, embeddings_dir=emb, preview_interval=None)
    with BackgroundServer(app) as url:
        page = open_page(url, "document.querySelectorAll('#embedding-list button').length > 1 && "
                              "document.querySelectorAll('#lora-list button').length > 1")
        yield page
        page.close()


def _names(page, list_id: str) -> list[str]:
    return page.eval_on_selector_all(f"#{list_id} button", "bs => bs.map(b => b.textContent)")


def test_panels_list_the_folders(page):
    assert sorted(_names(page, "lora-list")) == sorted(["style", EVIL])
    assert page.eval_on_selector("#lora-list", "el => el.querySelectorAll('img').length") == 0  # text, not markup
    assert _names(page, "embedding-list") == ["mystyle", "sd2word"]
    assert not page.is_disabled("#embedding-list button[data-name=mystyle]")
    assert page.is_disabled("#embedding-list button[data-name=sd2word]")  # 1024 wide: not for this model
    assert "1024" in page.get_attribute("#embedding-list button[data-name=sd2word]", "title")
    page.fill("#network-filter", "STY")  # case-insensitive, over both panels
    assert page.is_visible("#lora-list button[data-name=style]")
    assert page.is_visible("#embedding-list button[data-name=mystyle]")
    assert page.is_hidden("#embedding-list button[data-name=sd2word]")
    assert page.eval_on_selector_all("#lora-list button", "bs => bs.filter(b => !b.hidden).length") == 1
    page.fill("#network-filter", "")
    assert page.is_visible("#embedding-list button[data-name=sd2word]")


def test_click_inserts_at_the_cursor(page):
    # never focused: a click appends
    page.evaluate("() => { const t = document.querySelector('#prompt'); t.value = 'a cat'; }")
    page.click("#lora-list button[data-name=style]")
    assert page.input_value("#prompt") == "a cat <lora:style:1>"
    # after the user put the cursor somewhere, a click inserts there
    page.evaluate("() => document.querySelector('#prompt').setSelectionRange(1, 1)")
    page.click("#embedding-list button[data-name=mystyle]")
    assert page.input_value("#prompt") == "a mystyle cat <lora:style:1>"
    assert page.evaluate("() => document.querySelector('#prompt').selectionStart") == len("a mystyle")
    page.click("#embedding-list button[data-name=sd2word]", force=True)  # disabled: nothing happens
    assert page.input_value("#prompt") == "a mystyle cat <lora:style:1>"


def test_refresh_buttons_pick_up_new_files(page, dirs):
    loras, emb = dirs
    save_file(_lora(4), loras / "later.safetensors")
    save_file(_embedding(TEXT_WIDTH, 1, 5), emb / "newword.safetensors")
    assert "later" not in _names(page, "lora-list")
    page.click("#refresh-loras")
    page.wait_for_selector("#lora-list button[data-name=later]")
    page.click("#refresh-embeddings")
    page.wait_for_selector("#embedding-list button[data-name=newword]")
    assert page.get_attribute("#lora-section", "open") is not None  # the refresh button did not fold the panel
    (loras / "later.safetensors").unlink()
    page.click("#refresh-loras")
    page.wait_for_selector("#lora-list button[data-name=later]", state="detached")


def test_generate_with_lora_and_tiling(page):
    sent: dict[str, list[dict]] = {"txt2img": [], "img2img": []}

    def record(request):
        route = request.url.rsplit("/", 1)[-1]
        if route in sent:
            sent[route].append(json.loads(request.post_data))

    page.on("request", record)
    page.fill("#prompt", "a cat")
    page.click("#lora-list button[data-name=style]")
    for name, value in {"steps": 2, "width": 32, "height": 32, "seed": 5}.items():
        page.fill(f"#{name}", str(value))
    page.check("#tiling")
    page.click("#generate")
    fig = page.wait_for_selector("#gallery figure.result")
    caption = fig.text_content()
    assert "a cat <lora:style:1>" in caption and 'Lora hashes: "style: ' in caption and "Tiling: True" in caption
    assert sent["txt2img"][-1]["tiling"] is True and sent["txt2img"][-1]["prompt"] == "a cat <lora:style:1>"
    assert fig.query_selector(".warning") is None
    # unchecked: the request says so and the infotext has no Tiling; an unknown name is a warning on the result
    page.uncheck("#tiling")
    page.fill("#prompt", "a cat <lora:nosuch:1>")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#gallery figure.result').length == 2")
    newest = page.query_selector("#gallery figure.result")
    caption = newest.text_content()
    assert "Tiling" not in caption and "Lora hashes" not in caption and sent["txt2img"][-1]["tiling"] is False
    assert "nosuch" in newest.query_selector(".warning").text_content()
    # img2img carries the checkbox too
    newest.query_selector("button:text('use as init image')").click()
    page.wait_for_selector("#canvas-wrap:not([hidden])")
    page.fill("#prompt", "a cat")
    page.check("#tiling")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#gallery figure.result').length == 3")
    assert "Tiling: True" in page.text_content("#gallery figure.result")
    assert sent["img2img"][-1]["tiling"] is True
