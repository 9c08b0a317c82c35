"""SDXL LoRAs: U-Net, CLIP-L (lora_te1_ / text_encoder.) and bigG (lora_te2_ / text_encoder_2.) parts merge in
ldmkit as diffusers' ``load_lora_weights`` runs them (PEFT layout from diffusers' own writer, and kohya
keys from diffusers' kohya converter); an SDXL LoRA on an SD1 model is refused by name."""

from __future__ import annotations

import pytest
import torch
from reference import rel_err
from test_sdxl import _diffusers_sdxl_folder, _unet_inputs

from ldmkit import checkpoint
from ldmkit.checkpoint import CheckpointError
from ldmkit.config import TINY, TINY_SDXL
from ldmkit.lora import apply_lora
from ldmkit.lora_formats import read_lora_file
from ldmkit.model import StableDiffusion
from ldmkit.models.unet import sdxl_vector

pytest.importorskip("peft")
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]
PROMPT = "a red apple on a wooden table"


def _adapters(pipe):
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    torch.manual_seed(0)
    cfgs = {"unet": LoraConfig(r=4, lora_alpha=2, init_lora_weights=False,
                               target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1"]),
            "text_encoder": LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "fc1"]),
            "text_encoder_2": LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                                         target_modules=["k_proj", "out_proj", "fc2"])}
    sds = {}
    for part, cfg in cfgs.items():
        inject_adapter_in_model(cfg, getattr(pipe, part), adapter_name="default")
        sds[part] = get_peft_model_state_dict(getattr(pipe, part), adapter_name="default")
    return cfgs, sds


def _compare(pipe, model, base):
    x, t, ctx, pooled, ids = _unet_inputs(TINY_SDXL, 16)
    with torch.no_grad():
        ref = pipe.unet(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        y = sdxl_vector(pooled, ids)
        assert rel_err(model.unet(x, t, ctx, y=y), ref) < 1e-4 and rel_err(base.unet(x, t, ctx, y=y), ref) > 1e-2
        ref_ctx, _, ref_pooled, _ = pipe.encode_prompt(PROMPT, prompt_2=PROMPT, do_classifier_free_guidance=False)
    got_ctx, got_pooled = model.encode([PROMPT])
    base_ctx, base_pooled = base.encode([PROMPT])
    assert rel_err(got_ctx, ref_ctx) < 1e-4 and rel_err(got_pooled, ref_pooled) < 1e-4
    width = TINY_SDXL.text.width  # both encoders' LoRAs change the context (CLIP-L first, bigG after)
    assert rel_err(base_ctx[..., :width], ref_ctx[..., :width]) > 1e-2
    assert rel_err(base_ctx[..., width:], ref_ctx[..., width:]) > 1e-2 and rel_err(base_pooled, ref_pooled) > 1e-2


@pytest.mark.parametrize("layout", ["peft", "kohya"])
def test_sdxl_lora_matches_diffusers(tmp_path, layout):
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    _diffusers_sdxl_folder(TINY_SDXL, tmp_path)
    writer = StableDiffusionXLPipeline.from_pretrained(tmp_path / "model")
    cfgs, sds = _adapters(writer)
    out = tmp_path / "lora"
    if layout == "peft":
        StableDiffusionXLPipeline.save_lora_weights(
            out, unet_lora_layers=sds["unet"], text_encoder_lora_layers=sds["text_encoder"],
            text_encoder_2_lora_layers=sds["text_encoder_2"],
            unet_lora_adapter_metadata=cfgs["unet"].to_dict(),
            text_encoder_lora_adapter_metadata=cfgs["text_encoder"].to_dict(),
            text_encoder_2_lora_adapter_metadata=cfgs["text_encoder_2"].to_dict())
        path = out / "pytorch_lora_weights.safetensors"
    else:
        kohya = convert_state_dict_to_kohya({f"{part}.{k}": v for part, sd in sds.items() for k, v in sd.items()})
        alphas = {"lora_unet_": 2.0, "lora_te1_": 8.0, "lora_te2_": 2.0}  # PEFT's: the in-memory reference's
        kohya.update({k: torch.tensor(next(a for p, a in alphas.items() if k.startswith(p)))
                      for k in kohya if k.endswith(".alpha")})
        assert any(k.startswith("lora_te2_") for k in kohya) and any(k.startswith("lora_te1_") for k in kohya)
        out.mkdir()
        path = out / "kohya.safetensors"
        save_file({k: v.contiguous() for k, v in kohya.items()}, path)
    assert read_lora_file(path).layout == layout
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "model")
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    if layout == "kohya":
        # diffusers 0.42 + transformers 5 load no lora_te1_ weights from kohya SDXL files (its converter names
        # them as the old to_q_lora/... processors, "UNEXPECTED" for CLIPTextModel): PEFT's in-memory CLIP-L
        # with the same adapter is the reference there
        pipe.text_encoder = writer.text_encoder
    base = checkpoint.load(tmp_path / "model")
    model = checkpoint.load(tmp_path / "model")
    assert apply_lora(model, path) == sum(len(sd) for sd in sds.values()) // 2
    _compare(pipe, model, base)


def test_sdxl_lora_on_sd1_is_refused(tmp_path):
    from safetensors.torch import save_file

    name = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    save_file({f"{name}.lora_down.weight": torch.zeros(4, 1280), f"{name}.lora_up.weight": torch.zeros(1280, 4)},
              tmp_path / "xl.safetensors")
    with pytest.raises(CheckpointError, match=r"a LoRA for SDXL \(lora_te2_\.\.\. keys\), and this model is sd1"):
        apply_lora(StableDiffusion(TINY), tmp_path / "xl.safetensors")
