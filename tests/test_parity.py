"""Each network against its reference implementation, weights moved through real on-disk formats.

Direction 1: a folder written by diffusers/transformers ``save_pretrained`` loads into ldmkit.
Direction 2: ldmkit's single-file (LDM layout) checkpoint, read back by diffusers' own converter.
Target: max relative error <= 1e-4 in fp32.
"""

from __future__ import annotations

import dataclasses
import gc
import json

import pytest
import torch
from reference import diffusers_unet, diffusers_vae, hf_text_encoder, rel_err
from safetensors.torch import load_file

from ldmkit import checkpoint, convert
from ldmkit.config import SD15, SD15_INPAINT, SD21, TINY, TINY_SD2, ModelConfig

TOL = 1e-4
TINY_CONFIGS = [TINY, TINY_SD2, TINY.replace(name="tiny-inpaint", unet=TINY.unet.__class__(
    **{**TINY.unet.__dict__, "in_channels": 9}))]
FULL_CONFIGS = [pytest.param(SD15, marks=pytest.mark.slow), pytest.param(SD21, marks=pytest.mark.slow)]


def _unet_inputs(cfg: ModelConfig, size: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.unet.in_channels, size, size, generator=g)
    t = torch.tensor([981.0, 24.5])  # fractional timesteps happen with interpolated schedules
    ctx = torch.randn(2, 77, cfg.unet.context_dim, generator=g)
    return x, t, ctx


@pytest.mark.parametrize("cfg", TINY_CONFIGS + FULL_CONFIGS, ids=lambda c: getattr(c, "name", str(c)))
def test_unet_parity(cfg: ModelConfig, tmp_path):
    ref = diffusers_unet(cfg)
    ref.save_pretrained(tmp_path / "unet")
    x, t, ctx = _unet_inputs(cfg, 16 if cfg.name.startswith("tiny") else 32)
    with torch.no_grad():
        expected = ref(x, t, ctx).sample
    del ref
    gc.collect()

    # diffusers folder -> ldmkit
    from ldmkit.models.unet import UNetModel

    ucfg = convert.unet_config_from_diffusers(
        json.loads((tmp_path / "unet" / "config.json").read_text()))
    assert ucfg == cfg.unet
    sd = load_file(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    with torch.device("meta"):
        ours = UNetModel(ucfg)
    checkpoint.load_strict(ours, convert.unet_diffusers_to_ldm(sd, ucfg), "unet")
    del sd
    with torch.no_grad():
        got = ours(x, t, ctx)
    assert rel_err(got, expected) <= TOL

    # ldmkit single file -> diffusers' own converter -> diffusers model
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    path = tmp_path / "unet.safetensors"
    checkpoint.atomic_save_safetensors({f"model.diffusion_model.{k}": v for k, v in ours.state_dict().items()}, path)
    del ours
    gc.collect()
    dcfg = convert.diffusers_unet_config(cfg.unet)
    with torch.device("meta"):
        back = UNet2DConditionModel(**dcfg)
    back.load_state_dict(convert_ldm_unet_checkpoint(load_file(path), dcfg), strict=True, assign=True)
    with torch.no_grad():
        again = back.eval()(x, t, ctx).sample
    assert rel_err(again, expected) <= TOL


@pytest.mark.parametrize("cfg", [TINY] + FULL_CONFIGS[:1], ids=lambda c: getattr(c, "name", str(c)))
def test_vae_parity(cfg: ModelConfig, tmp_path):
    ref = diffusers_vae(cfg)
    ref.save_pretrained(tmp_path / "vae")
    size = 32 if cfg.name.startswith("tiny") else 64
    img = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        dist = ref.encode(img).latent_dist
        z = dist.mean
        expected_dec = ref.decode(z).sample
    from ldmkit.models.vae import AutoencoderKL

    vcfg = convert.vae_config_from_diffusers(json.loads((tmp_path / "vae" / "config.json").read_text()))
    assert vcfg == cfg.vae
    ours = AutoencoderKL(vcfg)
    sd = load_file(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    checkpoint.load_strict(ours, convert.vae_diffusers_to_ldm(sd, vcfg), "vae")
    with torch.no_grad():
        mean, logvar = ours.encode(img)
        dec = ours.decode(z)
    assert rel_err(mean, dist.mean) <= TOL
    assert rel_err(logvar, dist.logvar) <= TOL
    assert rel_err(dec, expected_dec) <= TOL

    from diffusers import AutoencoderKL as DAutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    path = tmp_path / "vae.safetensors"
    checkpoint.atomic_save_safetensors({f"first_stage_model.{k}": v for k, v in ours.state_dict().items()}, path)
    dcfg = convert.diffusers_vae_config(cfg.vae)
    back = DAutoencoderKL(**dcfg).eval()
    back.load_state_dict(convert_ldm_vae_checkpoint(load_file(path), dcfg), strict=True)
    with torch.no_grad():
        assert rel_err(back.decode(z).sample, expected_dec) <= TOL


TEXT_CONFIGS = [TINY, TINY_SD2, pytest.param(SD15, marks=pytest.mark.slow),
                pytest.param(SD21.replace(text=SD21.text.__class__(**{**SD21.text.__dict__, "layers": 23})),
                             marks=pytest.mark.slow)]


@pytest.mark.parametrize("cfg", TEXT_CONFIGS, ids=lambda c: getattr(c, "name", str(c)))
def test_text_encoder_parity(cfg: ModelConfig, tmp_path):
    ref = hf_text_encoder(cfg)
    ref.save_pretrained(tmp_path / "te")
    ids = torch.randint(0, cfg.text.vocab_size, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
    from ldmkit.models.clip import CLIPTextModel

    tcfg = convert.text_config_from_hf(json.loads((tmp_path / "te" / "config.json").read_text()))
    assert tcfg == cfg.text
    ours = CLIPTextModel(tcfg)
    checkpoint.load_strict(ours, convert.normalize_hf_text(load_file(tmp_path / "te" / "model.safetensors")), "text")
    final_norm = ref.text_model.final_layer_norm if hasattr(ref, "text_model") else ref.final_layer_norm
    with torch.no_grad():
        assert rel_err(ours(ids), out.last_hidden_state) <= TOL
        assert rel_err(ours(ids, clip_skip=2), final_norm(out.hidden_states[-2])) <= TOL

    # SD2 single files store the text encoder in OpenCLIP's layout: through it and back
    if cfg.family == "sd2":
        oc = convert.hf_text_to_openclip(ours.state_dict(), tcfg)
        assert any("in_proj_weight" in k for k in oc)
        hf, _extras = convert.openclip_to_hf_text(oc, tcfg)
        ours2 = CLIPTextModel(tcfg)
        checkpoint.load_strict(ours2, hf, "text")
        with torch.no_grad():
            assert rel_err(ours2(ids), out.last_hidden_state) <= TOL


def test_inpainting_config_detected():
    # the 9-channel model is a config away; make sure the preset is what SD's inpainting files hold
    assert SD15_INPAINT.unet.in_channels == 9 and SD15_INPAINT.is_inpainting


@pytest.mark.parametrize("hw", [(9, 13), (7, 10)])
def test_unet_parity_odd_latent_sizes(hw):
    """Widths that are multiples of 8 but not of 64 (e.g. 520 px) give odd latent sides mid-U-Net;
    diffusers then upsamples to the skip connection's size, and so must we."""
    from ldmkit.models.unet import UNetModel

    cfg = dataclasses.replace(TINY.unet, channel_mult=(1, 2, 2), attention_levels=(True, False, True))
    ref = diffusers_unet(TINY.replace(unet=cfg))
    ours = UNetModel(cfg).eval()
    checkpoint.load_strict(ours, convert.unet_diffusers_to_ldm(ref.state_dict(), cfg), "unet")
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, *hw, generator=g), torch.randn(1, 77, cfg.context_dim, generator=g)
    with torch.no_grad():
        assert rel_err(ours(x, torch.tensor([321.0]), ctx), ref(x, torch.tensor([321.0]), ctx).sample) <= TOL
