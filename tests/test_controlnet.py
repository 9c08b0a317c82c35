"""ControlNet network and files against diffusers.ControlNetModel on random tiny configs (issue 16, part 1).

Residuals: relative error <= 1e-4. Layouts: a diffusers folder, a lone diffusers file in fp16, and the
original single file (``control_model.*`` cldm.py names), whose names diffusers' own converter checks.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from reference import _perturb_norms, rel_err
from safetensors.torch import save_file

from ldmkit import convert
from ldmkit.config import TINY, TINY_SD2
from ldmkit.controlnet import ControlNetError, diffusers_to_original, load_controlnet


def diffusers_controlnet_config(unet_cfg, hint=(16, 32, 96, 256)) -> dict:
    from diffusers import ControlNetModel

    accepted = set(inspect.signature(ControlNetModel.__init__).parameters)
    d = {k: v for k, v in convert.diffusers_unet_config(unet_cfg).items() if k in accepted}
    return d | {"conditioning_embedding_out_channels": list(hint)}


def diffusers_controlnet(unet_cfg, hint=(16, 32, 96, 256), seed=0):
    """A random diffusers ControlNetModel; its zero convolutions randomised too (zero would hide them)."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    net = ControlNetModel(**diffusers_controlnet_config(unet_cfg, hint)).eval()
    _perturb_norms(net)
    g = torch.Generator().manual_seed(seed + 5)
    for name, p in net.named_parameters():
        if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
            p.data.copy_(0.2 * torch.randn(p.shape, generator=g))
    return net


def _inputs(cfg, hint_factor=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 12, generator=g)
    hint = torch.rand(2, 3, 8 * hint_factor, 12 * hint_factor, generator=g)
    t = torch.tensor([999.0, 250.5])
    ctx = torch.randn(2, 7, cfg.unet.context_dim, generator=g)
    return x, hint, t, ctx


def _reference(net, x, hint, t, ctx, scale=1.0):
    with torch.no_grad():
        down, mid = net(x, t, encoder_hidden_states=ctx, controlnet_cond=hint, conditioning_scale=scale,
                        return_dict=False)
    return list(down), mid


def _check(ours, ref_down, ref_mid, tol=1e-4):
    assert len(ours.down) == len(ref_down)
    for a, b in zip(ours.down, ref_down, strict=True):
        assert rel_err(a, b) <= tol
    assert rel_err(ours.mid, ref_mid) <= tol


@pytest.fixture(scope="module", params=[TINY, TINY_SD2], ids=lambda c: c.name)
def saved(request, tmp_path_factory):
    cfg = request.param
    folder = tmp_path_factory.mktemp(f"cn-{cfg.name}")
    net = diffusers_controlnet(cfg.unet)
    net.save_pretrained(folder / "diffusers")
    return cfg, folder, net


def test_diffusers_folder_matches_diffusers(saved):
    cfg, folder, ref = saved
    ours = load_controlnet(folder / "diffusers", cfg.unet)
    x, hint, t, ctx = _inputs(cfg)
    with torch.no_grad():
        res = ours(x, hint, t, ctx)
    _check(res, *_reference(ref, x, hint, t, ctx))
    # and the weight scales every residual (controlnet_conditioning_scale)
    _check(res.scaled(0.6), *_reference(ref, x, hint, t, ctx, scale=0.6))


def test_original_layout_matches_its_diffusers_conversion(saved):
    """cldm.py names under control_model.: diffusers' own converter turns our original-layout file back into
    exactly the diffusers weights, and ldmkit loads it to the same residuals as the diffusers folder."""
    from diffusers.pipelines.stable_diffusion.convert_from_ckpt import convert_ldm_unet_checkpoint

    cfg, folder, ref = saved
    original = {f"control_model.{k}": v for k, v in diffusers_to_original(ref.state_dict()).items()}
    back = convert_ldm_unet_checkpoint(dict(original), dict(ref.config), controlnet=True)  # it pops its input
    assert set(back) == set(ref.state_dict())
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())

    save_file(original, folder / "control_tiny.safetensors")
    bare = {k.removeprefix("control_model."): v for k, v in original.items()}
    save_file(bare, folder / "bare.safetensors")
    x, hint, t, ctx = _inputs(cfg)
    with torch.no_grad():
        from_folder = load_controlnet(folder / "diffusers", cfg.unet)(x, hint, t, ctx)
        for name in ("control_tiny.safetensors", "bare.safetensors"):
            res = load_controlnet(folder / name, cfg.unet)(x, hint, t, ctx)
            assert all(torch.equal(a, b) for a, b in zip(res.down, from_folder.down, strict=True))
            assert torch.equal(res.mid, from_folder.mid)


def test_fp16_file(saved):
    """A lone fp16 diffusers file (no config.json): architecture from the weights, heads and groups from the
    model it controls."""
    cfg, folder, ref = saved
    half = {k: v.half() for k, v in ref.state_dict().items()}
    save_file(half, folder / "cn_fp16.safetensors")
    ours = load_controlnet(folder / "cn_fp16.safetensors", cfg.unet)
    assert ours.cfg.unet.context_dim == cfg.unet.context_dim
    assert ours.cfg.unet.use_linear_in_transformer == cfg.unet.use_linear_in_transformer
    ref16 = diffusers_controlnet(cfg.unet)
    ref16.load_state_dict({k: v.float() for k, v in half.items()})
    x, hint, t, ctx = _inputs(cfg)
    with torch.no_grad():
        _check(ours(x, hint, t, ctx), *_reference(ref16, x, hint, t, ctx))


def test_small_hint_encoder(tmp_path):
    """A hint encoder with one stride-2 stage (a VAE that halves the size, as the tiny test models)."""
    ref = diffusers_controlnet(TINY.unet, hint=(8, 16))
    ref.save_pretrained(tmp_path)
    ours = load_controlnet(tmp_path, TINY.unet)
    assert ours.cfg.hint_channels == (8, 16)
    x, hint, t, ctx = _inputs(TINY, hint_factor=2)
    with torch.no_grad():
        _check(ours(x, hint, t, ctx), *_reference(ref, x, hint, t, ctx))


def test_other_family_is_refused(saved):
    cfg, folder, _ = saved
    other = TINY_SD2 if cfg is TINY else TINY
    other_unet = dataclasses.replace(other.unet, context_dim=cfg.unet.context_dim + 8)
    with pytest.raises(ControlNetError, match="made for that model"):
        load_controlnet(folder / "diffusers", other_unet)


@pytest.mark.parametrize("preset", ["sd15", "sd21"])
def test_full_size_layout(preset):
    """The released SD1.5 / SD2.1 ControlNet architecture (diffusers' config of those files), on the meta device:
    every converted name and shape is a parameter of ldmkit's ControlNet, and the detected U-Net is the preset's."""
    from diffusers import ControlNetModel

    from ldmkit.config import PRESETS
    from ldmkit.controlnet import config_from_weights
    from ldmkit.models.controlnet import ControlNet

    unet = PRESETS[preset].unet
    with torch.device("meta"):
        ref = ControlNetModel(**diffusers_controlnet_config(unet))
    sd = diffusers_to_original(ref.state_dict())
    cfg = config_from_weights(sd)  # no base model: SD1/SD2 conventions from the context width
    for field in ("model_channels", "channel_mult", "num_res_blocks", "attention_levels", "num_heads", "head_dim",
                  "context_dim", "use_linear_in_transformer", "transformer_depth"):
        assert getattr(cfg.unet, field) == getattr(unet, field), field
    assert cfg.hint_channels == (16, 32, 96, 256)
    with torch.device("meta"):
        ours = ControlNet(cfg).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in sd.items()}
    assert len([k for k in sd if k.startswith("zero_convs.")]) == 2 * 12  # weight + bias per skip connection


def test_difference_controlnet_and_adapter_are_refused(saved, tmp_path):
    """A1111's "difference" files and other networks (here a T2I-Adapter's names) are refused by name."""
    cfg, folder, ref = saved
    original = {f"control_model.{k}": v for k, v in diffusers_to_original(ref.state_dict()).items()}
    save_file({**original, "difference": torch.tensor([1.0])}, tmp_path / "diff_control.safetensors")
    with pytest.raises(ControlNetError, match="'difference' ControlNet"):
        load_controlnet(tmp_path / "diff_control.safetensors", cfg.unet)
    save_file({"adapter.body.0.block1.weight": torch.zeros(1)}, tmp_path / "t2iadapter.safetensors")
    with pytest.raises(ControlNetError, match="a T2I-Adapter, not a ControlNet: pass it as --adapter"):
        load_controlnet(tmp_path / "t2iadapter.safetensors", cfg.unet)
