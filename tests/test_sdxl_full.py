"""Full-size SDXL networks against the references (slow tier; run under ``flock /tmp/ldmkit-big.lock``).

The full U-Nets (base 2.6 B parameters, 10 GB in fp32; refiner 2.3 B) and their diffusers twins do not fit
beside each other here, so each model runs its *whole* forward with one top-level block in memory at a time:
a hook fills a block with weights just before it runs and sends it back to the meta device after. Every
weight is drawn from a generator seeded by its diffusers name, so our block and diffusers' get identical
values, ours through the key table from diffusers names to the single file's ``model.diffusion_model.*``
names -- which is checked, key for key, against diffusers' own single-file converter at full size.
Peak memory is one block (base ``up_blocks.0``: 1.1 B parameters, ~4.5 GB); the whole file with the full VAE
test took 4 min 13 s at peak RSS 7.75 GiB on 2 busy cores (OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import gc
import zlib

import pytest
import torch
from reference import rel_err
from test_sdxl import _hf_encoder
from torch import nn

from ldmkit import checkpoint, convert, convert_sdxl
from ldmkit.config import BIGG_TEXT, SD1_TEXT, SDXL_BASE, SDXL_REFINER, ModelConfig
from ldmkit.models.clip import CLIPTextModel
from ldmkit.models.unet import UNetModel, sdxl_vector

TOL = 1e-4
LDM = "model.diffusion_model."


def _weight(name: str, shape: torch.Size) -> torch.Tensor:
    """A reproducible random weight for diffusers parameter ``name``: norms near 1/0, matrices ~1/sqrt(fan-in)."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    r = torch.randn(shape, generator=g)
    if "norm" in name:
        return (1 + 0.1 * r) if name.endswith("weight") else 0.1 * r
    return r / max(1, r[0].numel()) ** 0.5 if r.ndim > 1 else 0.1 * r


def _stream_weights(model: nn.Module, names: dict[str, str], blocks: list[str]) -> None:
    """Fill each of ``blocks`` (top-level children of ``model``) with weights right before it runs and empty
    it right after; ``names`` maps the model's state-dict keys to the diffusers names the weights are drawn by."""
    def fill(module: nn.Module, _args, prefix: str) -> None:
        sd = {k: _weight(names[f"{prefix}.{k}"], v.shape) for k, v in module.state_dict().items()}
        module.load_state_dict(sd, strict=True, assign=True)

    def empty(module: nn.Module, _args, _out) -> None:
        module.to("meta")
        gc.collect()

    for b in blocks:
        m = model.get_submodule(b)
        m.register_forward_pre_hook(lambda mod, args, p=b: fill(mod, args, p))
        m.register_forward_hook(empty)


def _blocks(model: nn.Module) -> list[str]:
    out = []
    for name, child in model.named_children():
        if not any(True for _ in child.parameters()):
            continue
        out += [f"{name}.{i}" for i in range(len(child))] if isinstance(child, nn.ModuleList) else [name]
    return out


def _inputs(cfg: ModelConfig, size: int = 16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.unet.in_channels, size, size, generator=g)
    ctx = torch.randn(2, 77, cfg.unet.context_dim, generator=g)
    pooled = torch.randn(2, 1280, generator=g)
    if cfg.family == "sdxl-refiner":  # original size, crop top-left, aesthetic score
        ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 6.0], [1024.0, 1024.0, 0.0, 0.0, 2.5]])
    else:  # original size, crop top-left, target size
        ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [768.0, 512.0, 0.0, 16.0, 832.0, 1216.0]])
    return x, torch.tensor([981.0, 24.5]), ctx, pooled, ids


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [SDXL_BASE, SDXL_REFINER], ids=lambda c: c.name)
def test_full_unet_whole_forward_streamed(cfg: ModelConfig):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    dcfg = convert.diffusers_unet_config(cfg.unet)
    with torch.device("meta"):
        ref = UNet2DConditionModel(**dcfg).eval()
        ours = UNetModel(cfg.unet).eval()
    # the single-file layout as diffusers reads it, at full size (names and shapes; meta tensors, no memory)
    ref_sd, ours_sd = ref.state_dict(), ours.state_dict()
    ldm = {LDM + k: v for k, v in ours_sd.items()}
    by_id = {id(v): k.removeprefix(LDM) for k, v in ldm.items()}
    theirs = {dk: by_id[id(v)] for dk, v in convert_ldm_unet_checkpoint(ldm, dcfg).items()}
    assert theirs.keys() == ref_sd.keys()
    assert all(ref_sd[dk].shape == ours_sd[lk].shape for dk, lk in theirs.items())
    # and our diffusers -> LDM table (what `ldmkit convert` and the folder loader use) is the same map
    ids = {id(v): k for k, v in ref_sd.items()}
    mine = {ids[id(v)]: lk for lk, v in convert.unet_diffusers_to_ldm(ref_sd, cfg.unet).items()}
    assert mine == theirs
    to_diffusers = {lk: dk for dk, lk in mine.items()}

    _stream_weights(ref, {k: k for k in ref_sd}, _blocks(ref))
    _stream_weights(ours, to_diffusers, _blocks(ours))
    stages: dict[str, torch.Tensor] = {}
    ref.mid_block.register_forward_hook(lambda m, a, out: stages.__setitem__("ref", out))
    ours.middle_block.register_forward_hook(lambda m, a, out: stages.__setitem__("ours", out))
    x, t, ctx, pooled, time_ids = _inputs(cfg)
    with torch.no_grad():
        expected = ref(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        got = ours(x, t, ctx, y=sdxl_vector(pooled, time_ids))
    assert rel_err(stages["ours"], stages["ref"]) <= TOL  # the middle of the chain
    assert rel_err(got, expected) <= TOL
    assert expected.std() > 0.1  # random weights that keep the signal alive end to end


# ------------------------------------------------------------------------- text encoders


def _ids(pad_with_eos: bool) -> torch.Tensor:
    from ldmkit.models.tokenizer import CLIPTokenizer

    return CLIPTokenizer.default(pad_with_eos)(["a photograph of an astronaut riding a horse", "x"])


def test_full_text_configs_are_published():
    """BIGG_TEXT / SD1_TEXT in transformers' terms equal text_encoder_2/ and text_encoder/config.json of
    stabilityai/stable-diffusion-xl-base-1.0 (the refiner's text_encoder_2 is the same bigG)."""
    bigg = {"hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 20, "intermediate_size": 5120,
            "hidden_act": "gelu", "max_position_embeddings": 77, "vocab_size": 49408}
    clip_l = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
              "hidden_act": "quick_gelu", "max_position_embeddings": 77, "vocab_size": 49408}
    for tcfg, published in ((BIGG_TEXT, bigg), (SD1_TEXT, clip_l)):
        hf = convert.hf_text_config(tcfg)
        assert {k: hf[k] for k in published} == published
    assert BIGG_TEXT.projection_dim == 1280 and SDXL_BASE.text2 == BIGG_TEXT and SDXL_REFINER.text == BIGG_TEXT
    assert SDXL_BASE.text == SD1_TEXT and SDXL_BASE.clip_skip == SDXL_REFINER.clip_skip == 2


@pytest.mark.slow
def test_full_base_text_encoders():
    """CLIP ViT-L and OpenCLIP ViT-bigG/14 at full size vs transformers (CLIPTextModel,
    CLIPTextModelWithProjection): penultimate hidden states, last hidden state and bigG's projected pooled
    output, the weights moved through the base single file's layout (embedder 0 in transformers names,
    embedder 1 in OpenCLIP's with fused q/k/v and x @ P) and back."""
    refs = [_hf_encoder(SD1_TEXT, 5, projection=False), _hf_encoder(BIGG_TEXT, 7, projection=True)]
    ids = [_ids(True), _ids(False)]  # CLIP-L pads with the end token, bigG with 0
    with torch.no_grad():
        outs = [r(i, output_hidden_states=True) for r, i in zip(refs, ids, strict=True)]
    sds = [convert.normalize_hf_text(r.state_dict()) for r in refs]
    del refs
    single = convert_sdxl.join_sdxl_checkpoint({}, {}, sds, ["hf", "openclip"])
    del sds
    assert "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight" in single
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight" in single
    _, _, texts, layouts = convert_sdxl.split_sdxl_checkpoint({**single, LDM + "x": torch.zeros(1)})
    del single
    assert layouts == ["hf", "openclip"]
    for tcfg, sd, i, out in zip([SD1_TEXT, BIGG_TEXT], texts, ids, outs, strict=True):
        with torch.device("meta"):
            ours = CLIPTextModel(tcfg)
        checkpoint.load_strict(ours, sd, f"text encoder {tcfg.width}")
        with torch.no_grad():
            hidden, pooled = ours.hidden_and_pooled(i, skip=2)
            last = ours(i, clip_skip=1)
        assert rel_err(hidden, out.hidden_states[-2]) <= TOL
        assert rel_err(last, out.last_hidden_state) <= TOL
        if tcfg.projection_dim:
            assert rel_err(pooled, out.text_embeds) <= TOL
        del ours, sd
        gc.collect()
