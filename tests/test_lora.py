"""LoRA files in the kohya/A1111 layout: ldmkit's files load back, in ldmkit and in diffusers."""

from __future__ import annotations

import copy

import pytest
import torch
from reference import rel_err
from shapes import assert_merge_delta

from ldmkit import checkpoint
from ldmkit.config import TINY
from ldmkit.lora import (
    apply_lora,
    inject_lora,
    lora_delta,
    lora_names,
    parse_lora_arg,
    read_lora,
    remove_lora,
    save_lora,
)
from ldmkit.model import StableDiffusion


@pytest.fixture()
def trained_lora(tmp_path):
    torch.manual_seed(0)
    base = StableDiffusion(TINY).eval()
    model = copy.deepcopy(base)
    injected = inject_lora(model, rank=4, alpha=2.0)
    g = torch.Generator().manual_seed(1)
    for m in injected.values():  # as if trained: up is no longer zero
        m.lora_up.weight.data.normal_(0, 0.1, generator=g)
    path = tmp_path / "style.safetensors"
    save_lora(injected, path)
    return base, model, injected, path


def _unet_out(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, TINY.unet.context_dim, generator=g)
    with torch.no_grad():
        return model.unet(x, torch.tensor([10.0, 700.0]), ctx)


def test_file_layout_is_kohya(trained_lora):
    _, _, injected, path = trained_lora
    groups = read_lora(path)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in groups
    assert "lora_unet_mid_block_attentions_0_proj_in" in groups
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in groups
    g = groups["lora_te_text_model_encoder_layers_0_mlp_fc1"]
    assert g["lora_down.weight"].shape == (4, TINY.text.width) and g["alpha"].item() == 2.0


@pytest.mark.parametrize("multiplier", [1.0, 0.5])
def test_merge_changes_weights_by_exactly_the_delta(trained_lora, multiplier):
    base, _, injected, path = trained_lora
    merged = copy.deepcopy(base)
    assert apply_lora(merged, path, multiplier) == len(injected)
    pairs = {where + ".weight": (injected[name].lora_down.weight, injected[name].lora_up.weight)
             for name, (_, where) in lora_names(base).items() if name in injected}
    assert_merge_delta(base, merged, pairs, multiplier * 2.0 / 4)


def test_merged_equals_unmerged_forward(trained_lora):
    base, wrapped, _, path = trained_lora
    merged = copy.deepcopy(base)
    apply_lora(merged, path, 1.0)
    assert rel_err(_unet_out(merged), _unet_out(wrapped)) < 1e-5
    ids = torch.randint(0, 49408, (1, 77), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel_err(merged.text_encoder(ids), wrapped.text_encoder(ids)) < 1e-5


def test_remove_restores_the_base(trained_lora):
    base, wrapped, injected, _ = trained_lora
    remove_lora(wrapped, injected)
    assert torch.equal(_unet_out(wrapped), _unet_out(base))


def test_diffusers_loads_our_lora(trained_lora, tmp_path):
    """The independent reference: diffusers' kohya-LoRA loader gives the same U-Net output as our merge."""
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline
    from reference import save_diffusers_pipeline

    base, _, _, path = trained_lora
    folder = tmp_path / "pipe"
    checkpoint.save_diffusers(base, folder)
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    merged = copy.deepcopy(base)
    apply_lora(merged, path, 1.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, TINY.unet.context_dim, generator=g)
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        ref = pipe.unet(x, t, ctx).sample
        ours = merged.unet(x, t, ctx)
    assert rel_err(ours, ref) < 1e-4
    ids = torch.randint(0, 49408, (1, 77), generator=g)
    with torch.no_grad():
        assert rel_err(merged.text_encoder(ids), pipe.text_encoder(ids).last_hidden_state) < 1e-4
    del save_diffusers_pipeline


def test_bad_lora_files(tmp_path, trained_lora):
    base, _, _, _ = trained_lora
    from ldmkit.config import TINY_SD2

    other = StableDiffusion(TINY_SD2.replace(unet=TINY_SD2.unet.__class__(**{**TINY_SD2.unet.__dict__,
                                                                           "model_channels": 16})))
    injected = inject_lora(other, rank=2, alpha=2)
    wrong = tmp_path / "wrong.safetensors"
    save_lora(injected, wrong)
    with pytest.raises(checkpoint.CheckpointError, match="don't fit|match no module"):
        apply_lora(copy.deepcopy(base), wrong)
    assert parse_lora_arg("style.safetensors:0.8") == ("style.safetensors", 0.8)
    assert parse_lora_arg("style.safetensors") == ("style.safetensors", 1.0)


def test_delta_for_conv_kernels():
    down = torch.randn(3, 5, 3, 3)
    up = torch.randn(7, 3, 1, 1)
    d = lora_delta(down, up, 3.0, torch.Size([7, 5, 3, 3]))
    x = torch.randn(1, 5, 9, 9)
    ref = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, down, padding=1), up)
    torch.testing.assert_close(torch.nn.functional.conv2d(x, d, padding=1), ref, rtol=1e-4, atol=1e-4)
