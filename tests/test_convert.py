"""Key maps in ldmkit.convert, checked against diffusers' own single-file converters.

Random tiny diffusers/transformers models give the weights; full-size key sets are built on the
meta device (shapes only, no memory).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    create_unet_diffusers_config_from_ldm,
)
from transformers import CLIPTextConfig, CLIPTextModel

from ldmkit import convert as C
from ldmkit.config import (
    SD2_INPAINT,
    SD15,
    SD15_INPAINT,
    SD21,
    SD21_BASE,
    TINY,
    TINY_SD2,
    ModelConfig,
    TextEncoderConfig,
    UNetConfig,
    VAEConfig,
)

TINY_INPAINT_UNET = dataclasses.replace(TINY.unet, in_channels=9)
# three levels, attention skipped at the deepest, two res blocks: upsamplers at output_blocks.k.1 and .k.2
TINY_3LEVEL_UNET = dataclasses.replace(
    TINY.unet, channel_mult=(1, 2, 2), attention_levels=(True, True, False), num_res_blocks=2, transformer_depth=2
)
TINY_4LEVEL_VAE = VAEConfig(ch=16, ch_mult=(1, 2, 4, 4), num_res_blocks=2, norm_groups=8)


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b), (sorted(set(a) - set(b))[:5], sorted(set(b) - set(a))[:5])
    for k in a:
        assert a[k].shape == b[k].shape, k
        if a[k].device.type != "meta":
            assert torch.equal(a[k], b[k]), k


def shapes(sd: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def tiny_unet(cfg: UNetConfig) -> dict:
    torch.manual_seed(0)
    return UNet2DConditionModel(**C.diffusers_unet_config(cfg, sample_size=8)).state_dict()


def tiny_vae(cfg: VAEConfig) -> dict:
    torch.manual_seed(0)
    return AutoencoderKL(**C.diffusers_vae_config(cfg, sample_size=32)).state_dict()


def tiny_text(cfg: TextEncoderConfig) -> tuple[CLIPTextModel, dict]:
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(**C.hf_text_config(cfg)))
    return model, C.normalize_hf_text(model.state_dict())


# ------------------------------------------------------------------ U-Net


@pytest.mark.parametrize("cfg", [TINY.unet, TINY_SD2.unet, TINY_INPAINT_UNET, TINY_3LEVEL_UNET],
                         ids=["sd1", "sd2", "inpaint", "3level"])
def test_unet_matches_diffusers_converter(cfg: UNetConfig) -> None:
    hf = tiny_unet(cfg)
    ldm = C.unet_diffusers_to_ldm(hf, cfg)
    ref = convert_ldm_unet_checkpoint({C.UNET_PREFIX + k: v for k, v in ldm.items()}, C.diffusers_unet_config(cfg))
    assert_same(ref, hf)
    assert_same(C.unet_ldm_to_diffusers(ldm, cfg), hf)
    assert shapes(ldm) == ldm_unet_shapes(cfg)


def ldm_unet_shapes(cfg: UNetConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the original LDM UNetModel, written from openaimodel.py's constructor."""
    mc, emb, out = cfg.model_channels, 4 * cfg.model_channels, {}

    def res(p: str, cin: int, cout: int) -> None:
        out.update({f"{p}.in_layers.0.weight": (cin,), f"{p}.in_layers.0.bias": (cin,),
                    f"{p}.in_layers.2.weight": (cout, cin, 3, 3), f"{p}.in_layers.2.bias": (cout,),
                    f"{p}.emb_layers.1.weight": (cout, emb), f"{p}.emb_layers.1.bias": (cout,),
                    f"{p}.out_layers.0.weight": (cout,), f"{p}.out_layers.0.bias": (cout,),
                    f"{p}.out_layers.3.weight": (cout, cout, 3, 3), f"{p}.out_layers.3.bias": (cout,)})
        if cin != cout:
            out.update({f"{p}.skip_connection.weight": (cout, cin, 1, 1), f"{p}.skip_connection.bias": (cout,)})

    def transformer(p: str, c: int) -> None:
        proj = (c, c) if cfg.use_linear_in_transformer else (c, c, 1, 1)
        out.update({f"{p}.norm.weight": (c,), f"{p}.norm.bias": (c,), f"{p}.proj_in.weight": proj,
                    f"{p}.proj_in.bias": (c,), f"{p}.proj_out.weight": proj, f"{p}.proj_out.bias": (c,)})
        for d in range(cfg.transformer_depth):
            b = f"{p}.transformer_blocks.{d}"
            for attn, kv in (("attn1", c), ("attn2", cfg.context_dim)):
                out.update({f"{b}.{attn}.to_q.weight": (c, c), f"{b}.{attn}.to_k.weight": (c, kv),
                            f"{b}.{attn}.to_v.weight": (c, kv), f"{b}.{attn}.to_out.0.weight": (c, c),
                            f"{b}.{attn}.to_out.0.bias": (c,)})
            for n in ("norm1", "norm2", "norm3"):
                out.update({f"{b}.{n}.weight": (c,), f"{b}.{n}.bias": (c,)})
            out.update({f"{b}.ff.net.0.proj.weight": (8 * c, c), f"{b}.ff.net.0.proj.bias": (8 * c,),
                        f"{b}.ff.net.2.weight": (c, 4 * c), f"{b}.ff.net.2.bias": (c,)})

    def conv(p: str, c: int) -> None:
        out.update({f"{p}.weight": (c, c, 3, 3), f"{p}.bias": (c,)})

    out.update({"time_embed.0.weight": (emb, mc), "time_embed.0.bias": (emb,), "time_embed.2.weight": (emb, emb),
                "time_embed.2.bias": (emb,), "input_blocks.0.0.weight": (mc, cfg.in_channels, 3, 3),
                "input_blocks.0.0.bias": (mc,)})
    chans, ch, k = [mc], mc, 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            res(f"input_blocks.{k}.0", ch, mult * mc)
            ch = mult * mc
            if cfg.attention_levels[level]:
                transformer(f"input_blocks.{k}.1", ch)
            chans.append(ch)
            k += 1
        if level != len(cfg.channel_mult) - 1:
            conv(f"input_blocks.{k}.0.op", ch)
            chans.append(ch)
            k += 1
    res("middle_block.0", ch, ch)
    transformer("middle_block.1", ch)
    res("middle_block.2", ch, ch)
    k = 0
    for level, mult in reversed(list(enumerate(cfg.channel_mult))):
        for i in range(cfg.num_res_blocks + 1):
            res(f"output_blocks.{k}.0", ch + chans.pop(), mult * mc)
            ch, pos = mult * mc, 1
            if cfg.attention_levels[level]:
                transformer(f"output_blocks.{k}.1", ch)
                pos = 2
            if level and i == cfg.num_res_blocks:
                conv(f"output_blocks.{k}.{pos}.conv", ch)
            k += 1
    out.update({"out.0.weight": (mc,), "out.0.bias": (mc,), "out.2.weight": (cfg.out_channels, mc, 3, 3),
                "out.2.bias": (cfg.out_channels,)})
    return out


def meta_unet_ldm(cfg: UNetConfig) -> dict:
    with torch.device("meta"):
        hf = UNet2DConditionModel(**C.diffusers_unet_config(cfg)).state_dict()
    return C.unet_diffusers_to_ldm(hf, cfg)


# Real keys and shapes of the released checkpoints (model.diffusion_model.* in v1-5-pruned-emaonly,
# v2-1_768-ema-pruned, sd-v1-5-inpainting).
REAL_UNET_KEYS = {
    "sd15": {"input_blocks.1.1.proj_in.weight": (320, 320, 1, 1), "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
             "middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
             "input_blocks.0.0.weight": (320, 4, 3, 3), "output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
             "output_blocks.3.0.skip_connection.weight": (1280, 2560, 1, 1), "input_blocks.9.0.op.weight":
             (1280, 1280, 3, 3), "output_blocks.8.2.conv.weight": (640, 640, 3, 3), "time_embed.0.weight": (1280, 320),
             "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320), "out.2.weight": (4, 320, 3, 3)},
    "sd21": {"input_blocks.1.1.proj_in.weight": (320, 320), "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
             "middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 1024),
             "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)},
    "sd15-inpainting": {"input_blocks.0.0.weight": (320, 9, 3, 3)},
}


@pytest.mark.parametrize("mcfg", [SD15, SD21, SD15_INPAINT], ids=lambda c: c.name)
def test_full_unet_key_set_matches_release(mcfg: ModelConfig) -> None:
    ldm = meta_unet_ldm(mcfg.unet)
    assert len(ldm) == 686  # model.diffusion_model.* keys in every SD1.x / SD2.x release
    assert shapes(ldm) == ldm_unet_shapes(mcfg.unet)
    for k, shape in REAL_UNET_KEYS[mcfg.name].items():
        assert tuple(ldm[k].shape) == shape, k


def test_unet_rejects_mismatched_config() -> None:
    ldm = C.unet_diffusers_to_ldm(tiny_unet(TINY.unet), TINY.unet)
    with pytest.raises(ValueError, match="input_blocks.3"):  # weights have 2 levels of 1 block, cfg asks 2 blocks
        C.unet_ldm_to_diffusers(ldm, dataclasses.replace(TINY.unet, num_res_blocks=2))
    with pytest.raises(ValueError, match="do not fit"):
        C.unet_ldm_to_diffusers({**ldm, "input_blocks.1.0.bogus.weight": torch.zeros(1)}, TINY.unet)


# ------------------------------------------------------------------ VAE


@pytest.mark.parametrize("cfg", [TINY.vae, TINY_4LEVEL_VAE], ids=["2level", "4level"])
def test_vae_matches_diffusers_converter(cfg: VAEConfig) -> None:
    hf = tiny_vae(cfg)
    ldm = C.vae_diffusers_to_ldm(hf, cfg)
    c = cfg.ch * cfg.ch_mult[-1]
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (c, c, 1, 1)
    assert ldm["decoder.mid.attn_1.proj_out.weight"].shape == (c, c, 1, 1)
    ref = convert_ldm_vae_checkpoint({C.VAE_PREFIX + k: v for k, v in ldm.items()}, C.diffusers_vae_config(cfg))
    assert_same(ref, hf)
    assert_same(C.vae_ldm_to_diffusers(ldm, cfg), hf)
    # pre-0.15 diffusers attention names are accepted on input
    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for k, v in hf.items():
        for new, old in legacy_names.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        legacy[k] = v
    assert legacy.keys() != hf.keys()
    assert_same(C.vae_diffusers_to_ldm(legacy, cfg), ldm)


def test_full_vae_key_set() -> None:
    with torch.device("meta"):
        hf = AutoencoderKL(**C.diffusers_vae_config(SD15.vae)).state_dict()
    ldm = C.vae_diffusers_to_ldm(hf, SD15.vae)
    assert len(ldm) == 248
    real = {"encoder.mid.attn_1.q.weight": (512, 512, 1, 1), "decoder.up.3.block.0.conv1.weight": (512, 512, 3, 3),
            "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1), "decoder.up.1.upsample.conv.weight":
            (256, 256, 3, 3), "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
            "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1), "quant_conv.weight": (8, 8, 1, 1),
            "post_quant_conv.weight": (4, 4, 1, 1), "encoder.conv_out.weight": (8, 512, 3, 3),
            "decoder.norm_out.weight": (128,)}
    for k, shape in real.items():
        assert tuple(ldm[k].shape) == shape, k
    assert "decoder.up.0.upsample.conv.weight" not in ldm and "encoder.down.3.downsample.conv.weight" not in ldm


# ------------------------------------------------------------------ text encoder


def test_openclip_roundtrip_matches_diffusers_converter() -> None:
    cfg = TINY_SD2.text
    model, hf = tiny_text(cfg)
    extras = {"text_projection": torch.randn(cfg.width, cfg.width), "logit_scale": torch.tensor(4.6052)}
    oc = C.hf_text_to_openclip(hf, cfg, extras)
    assert oc["transformer.resblocks.1.attn.in_proj_weight"].shape == (3 * cfg.width, cfg.width)
    assert oc["positional_embedding"].shape == (cfg.max_positions, cfg.width)
    ref = convert_open_clip_checkpoint(model, {C.OPENCLIP_TEXT_PREFIX + k: v for k, v in oc.items()})
    # diffusers drops the OpenCLIP projection for SD2 too (SD_2_TEXT_ENCODER_KEYS_TO_IGNORE)
    assert "text_projection.weight" not in ref
    assert_same(ref, hf)
    back, back_extras = C.openclip_to_hf_text(oc, cfg)
    assert_same(back, hf)
    assert_same(back_extras, extras)


def test_text_keys_follow_transformers() -> None:
    model, hf = tiny_text(TINY.text)
    assert sorted(hf) == sorted(C.hf_text_keys(TINY.text))
    # transformers >= 5.6 drops "text_model." in memory; old files carry position_ids: both normalised
    raw = dict(model.state_dict())
    assert not any(k.startswith("text_model.") for k in raw)
    assert_same(C.normalize_hf_text({**raw, "text_model.embeddings.position_ids": torch.arange(77)[None]}), hf)
    with pytest.raises(ValueError, match="layers.2"):
        C.hf_text_to_openclip(hf, dataclasses.replace(TINY.text, layers=3))
    oc = C.hf_text_to_openclip(hf, TINY.text)
    with pytest.raises(ValueError, match="unknown keys: transformer.resblocks.0.attn.bogus"):
        C.openclip_to_hf_text({**oc, "transformer.resblocks.0.attn.bogus": torch.zeros(1)}, TINY.text)


# ------------------------------------------------------------------ single files


def tiny_parts(mcfg: ModelConfig) -> tuple[dict, dict, dict]:
    unet = C.unet_diffusers_to_ldm(tiny_unet(mcfg.unet), mcfg.unet)
    vae = C.vae_diffusers_to_ldm(tiny_vae(mcfg.vae), mcfg.vae)
    return unet, vae, tiny_text(mcfg.text)[1]


TRAINING_STATE = {
    "betas": torch.linspace(0.1, 0.2, 10), "alphas_cumprod": torch.ones(10), "posterior_variance": torch.ones(10),
    "log_one_minus_alphas_cumprod": torch.ones(10), "model_ema.decay": torch.tensor(0.9999),
    "model_ema.diffusion_modelinput_blocks00weight": torch.zeros(1),
    "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
}


def test_split_join_sd1_matches_diffusers_clip_converter() -> None:
    unet, vae, text = tiny_parts(TINY)
    sd = C.join_ldm_checkpoint(unet, vae, text, "hf")
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in sd
    assert "model.diffusion_model.input_blocks.0.0.weight" in sd and "first_stage_model.quant_conv.weight" in sd
    assert_same(convert_ldm_clip_checkpoint(sd), text)
    u, v, t, layout = C.split_ldm_checkpoint({**sd, **TRAINING_STATE})
    assert layout == "hf"
    assert_same(u, unet)
    assert_same(v, vae)
    assert_same(t, text)
    assert_same(C.join_ldm_checkpoint(u, v, t, layout), sd)
    # .ckpt nesting, and pre-"text_model." SD1 merges
    old = {k.replace("transformer.text_model.", "transformer."): x for k, x in sd.items()}
    assert_same(C.split_ldm_checkpoint({"state_dict": old, "global_step": 1})[2], text)


def test_split_join_sd2_openclip() -> None:
    unet, vae, text = tiny_parts(TINY_SD2)
    extra = {"cond_stage_model.model.text_projection": torch.randn(32, 32),
             "cond_stage_model.model.logit_scale": torch.tensor(4.6)}
    sd = C.join_ldm_checkpoint(unet, vae, text, "openclip", extra=extra)
    assert "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" in sd
    assert not any(k.startswith(C.HF_TEXT_PREFIX) for k in sd)
    u, v, t, layout = C.split_ldm_checkpoint(sd)
    assert layout == "openclip"
    assert_same(t, text)
    assert_same(C.join_ldm_checkpoint(u, v, t, layout, extra={k: sd[k] for k in extra}), sd)


def test_split_rejects_unknown_and_mixed_keys() -> None:
    unet, vae, text = tiny_parts(TINY)
    sd = C.join_ldm_checkpoint(unet, vae, text, "hf")
    with pytest.raises(ValueError, match="belong to no part: lora_unet_foo"):
        C.split_ldm_checkpoint({**sd, "lora_unet_foo": torch.zeros(1)})
    oc = C.hf_text_to_openclip(text, TINY.text)
    with pytest.raises(ValueError, match="both"):
        C.split_ldm_checkpoint({**sd, **{C.OPENCLIP_TEXT_PREFIX + k: x for k, x in oc.items()}})
    with pytest.raises(ValueError, match="does not look like a Stable Diffusion checkpoint"):
        C.split_ldm_checkpoint({k: x for k, x in sd.items() if not k.startswith(C.UNET_PREFIX)})


# ------------------------------------------------------------------ detection


def without_conventions(cfg: ModelConfig) -> ModelConfig:
    """Blank the fields the weights cannot tell (head split, GroupNorm groups, text heads, prediction)."""
    return cfg.replace(
        prediction="eps",
        unet=dataclasses.replace(cfg.unet, num_heads=1, head_dim=None, norm_groups=1),
        vae=dataclasses.replace(cfg.vae, norm_groups=1),
        text=dataclasses.replace(cfg.text, heads=1),
    )


@pytest.mark.parametrize("mcfg", [TINY, TINY_SD2], ids=lambda c: c.name)
def test_detect_family_tiny(mcfg: ModelConfig) -> None:
    openclip = mcfg.family == "sd2"
    sd = C.join_ldm_checkpoint(*tiny_parts(mcfg), "openclip" if openclip else "hf")
    d = C.detect_family({**sd, **TRAINING_STATE})
    found = ModelConfig(name=mcfg.name, **d)
    assert without_conventions(found) == without_conventions(mcfg)
    assert d["extra"]["text_layout"] == ("openclip" if openclip else "hf")
    assert (found.family, found.clip_skip, found.pad_with_eos, found.text.act) == (
        ("sd2", 2, False, "gelu") if openclip else ("sd1", 1, True, "quick_gelu"))
    assert (found.unet.num_heads, found.unet.head_dim) == ((None, 64) if openclip else (8, None))


def meta_single_file(mcfg: ModelConfig) -> dict:
    with torch.device("meta"):
        vae = AutoencoderKL(**C.diffusers_vae_config(mcfg.vae)).state_dict()
        text = CLIPTextModel(CLIPTextConfig(**C.hf_text_config(mcfg.text))).state_dict()
    layout = "openclip" if mcfg.family == "sd2" else "hf"
    return C.join_ldm_checkpoint(meta_unet_ldm(mcfg.unet), C.vae_diffusers_to_ldm(vae, mcfg.vae),
                                 C.normalize_hf_text(text), layout)


@pytest.mark.parametrize("mcfg", [SD15, SD15_INPAINT, SD21_BASE, SD21, SD2_INPAINT], ids=lambda c: c.name)
def test_detect_family_full_size(mcfg: ModelConfig) -> None:
    sd = meta_single_file(mcfg)
    if mcfg.family == "sd2":
        assert len([k for k in sd if k.startswith(C.OPENCLIP_TEXT_PREFIX)]) == 24 * 12 + 4
    else:
        assert len([k for k in sd if k.startswith(C.HF_TEXT_PREFIX)]) == 196
    # the weights fix everything but the prediction type (SD2-768 v vs SD2-base eps: same shapes)
    assert ModelConfig(name=mcfg.name, **C.detect_family(sd)) == mcfg.replace(prediction="eps")


def test_detect_family_rejects_foreign_files() -> None:
    with pytest.raises(ValueError, match="does not look like a Stable Diffusion checkpoint: no model.diffusion_model"):
        C.detect_family({"encoder.layer.0.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="does not look like a Stable Diffusion checkpoint"):
        C.detect_family(tiny_unet(TINY.unet))  # a diffusers U-Net file


def test_detect_family_reads_scale_factor() -> None:
    sd = C.join_ldm_checkpoint(*tiny_parts(TINY), "hf")
    assert C.detect_family({**sd, "scale_factor": torch.tensor(0.5)})["vae"].scale_factor == 0.5


# ------------------------------------------------------------------ configs


def test_unet_config_matches_diffusers_from_ldm_yaml() -> None:
    """Our config.json dict vs the one diffusers derives from the original v1/v2 inference yaml."""
    for mcfg, unet_params in (
        (SD15, {"num_heads": 8}),
        (SD21, {"num_head_channels": 64, "use_linear_in_transformer": True}),
    ):
        u = mcfg.unet
        original = {"model": {"params": {
            "unet_config": {"params": {
                "in_channels": u.in_channels, "out_channels": u.out_channels, "model_channels": u.model_channels,
                "attention_resolutions": [4, 2, 1], "num_res_blocks": u.num_res_blocks,
                "channel_mult": list(u.channel_mult), "transformer_depth": 1, "context_dim": u.context_dim,
                **unet_params}},
            "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
        ref = create_unet_diffusers_config_from_ldm(original, {}, image_size=None)
        ours = C.diffusers_unet_config(u)
        for key in ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
                    "layers_per_block", "cross_attention_dim", "attention_head_dim", "use_linear_projection",
                    "transformer_layers_per_block", "sample_size"):
            assert ours[key] == ref[key], (mcfg.name, key)
    assert C.diffusers_unet_config(SD21.unet)["attention_head_dim"] == [5, 10, 20, 20]
    assert C.diffusers_unet_config(SD15.unet)["attention_head_dim"] == 8


@pytest.mark.parametrize("mcfg", [SD15, SD21, SD2_INPAINT, TINY, TINY_SD2], ids=lambda c: c.name)
def test_config_dicts_roundtrip(mcfg: ModelConfig) -> None:
    assert C.unet_config_from_diffusers(C.diffusers_unet_config(mcfg.unet)) == mcfg.unet
    assert C.vae_config_from_diffusers(C.diffusers_vae_config(mcfg.vae)) == mcfg.vae
    assert C.text_config_from_hf(C.hf_text_config(mcfg.text)) == mcfg.text
    # and from the full configs the libraries write (every default spelled out)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**C.diffusers_unet_config(mcfg.unet))
        vae = AutoencoderKL(**C.diffusers_vae_config(mcfg.vae))
    assert C.unet_config_from_diffusers(dict(unet.config)) == mcfg.unet
    assert C.vae_config_from_diffusers(dict(vae.config)) == mcfg.vae
    assert C.text_config_from_hf(CLIPTextConfig(**C.hf_text_config(mcfg.text)).to_dict()) == mcfg.text


def test_config_from_diffusers_rejects_other_architectures() -> None:
    d = C.diffusers_unet_config(TINY.unet)
    with pytest.raises(ValueError, match="class_embed_type"):
        C.unet_config_from_diffusers({**d, "class_embed_type": "timestep"})
    with pytest.raises(ValueError, match="layers_per_block"):
        C.unet_config_from_diffusers({**d, "layers_per_block": [1, 2]})
    with pytest.raises(ValueError, match="latents_mean"):
        C.vae_config_from_diffusers({**C.diffusers_vae_config(TINY.vae), "latents_mean": [0.0] * 4})


# ------------------------------------------------------------------ contract with ldmkit.models


@pytest.mark.parametrize("mcfg", [TINY, TINY_SD2, SD15, SD21, SD2_INPAINT], ids=lambda c: c.name)
def test_converted_names_are_ldmkit_module_names(mcfg: ModelConfig) -> None:
    from ldmkit.models.clip import CLIPTextModel as LdmkitCLIP
    from ldmkit.models.unet import UNetModel
    from ldmkit.models.vae import AutoencoderKL as LdmkitVAE

    sd = meta_single_file(mcfg)
    unet, vae, text, _ = C.split_ldm_checkpoint(sd)
    with torch.device("meta"):
        assert shapes(UNetModel(mcfg.unet).state_dict()) == shapes(unet)
        assert shapes(LdmkitVAE(mcfg.vae).state_dict()) == shapes(vae)
        assert shapes(LdmkitCLIP(mcfg.text).state_dict()) == shapes(text)
