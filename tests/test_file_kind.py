"""file_kind names a file's kind from its key names alone; the files here are written by diffusers/peft (the
reference layouts) and by ldmkit's own savers, and the kind comes from the header or config.json only."""

import json

import pytest
import torch
from safetensors.torch import save_file

from ldmkit import file_kind as K


def _save(tmp_path, name, sd):
    p = tmp_path / name
    save_file({k: v.detach().clone().contiguous() for k, v in sd.items()}, str(p))
    return p


def _diffusers_modules():
    from diffusers import AutoencoderKL, AutoencoderTiny, ControlNetModel, T2IAdapter

    small = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8)
    return {
        K.CONTROLNET: ControlNetModel(**small, cross_attention_dim=8, attention_head_dim=2,
                                      conditioning_embedding_out_channels=(4, 8),
                                      down_block_types=("CrossAttnDownBlock2D", "DownBlock2D")),
        K.ADAPTER: T2IAdapter(in_channels=3, channels=(8, 16), num_res_blocks=1, downscale_factor=8,
                              adapter_type="full_adapter"),
        K.TAESD: AutoencoderTiny(encoder_block_out_channels=(4, 4), decoder_block_out_channels=(4, 4),
                                 num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1)),
        K.VAE: AutoencoderKL(**small, down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2),
    }


def test_diffusers_files_and_folders(tmp_path):
    for kind, module in _diffusers_modules().items():
        assert K.kind_of(_save(tmp_path, f"{kind}.safetensors", module.state_dict())) == kind
        folder = tmp_path / f"{kind}-folder"
        module.save_pretrained(folder)
        expect = kind if kind in K.FOLDER_CLASSES.values() else None  # a VAE folder is read by the model loaders
        assert K.kind_of(folder) == expect
        assert K.may_be(folder, kind) == (expect is not None)


def test_original_layouts(tmp_path):
    t = torch.zeros(1)
    cases = {
        K.CONTROLNET: {"control_model.input_hint_block.0.weight": t, "control_model.zero_convs.0.0.weight": t},
        K.ADAPTER: {"conv_in.weight": t, "body.0.block1.weight": t},  # TencentARC full
        "light": {"body.0.in_conv.weight": t, "body.0.body.0.block1.weight": t},  # TencentARC light (colour)
        K.UPSCALER: {"conv_first.weight": t, "body.0.rdb1.conv1.weight": t},
        "taesd-original": {"0.conv.weight": t, "1.conv.0.weight": t},
        K.SDXL: {"conditioner.embedders.0.transformer.x": t, "model.diffusion_model.input_blocks.0.0.weight": t},
        K.SD: {"model.diffusion_model.input_blocks.0.0.weight": t, "first_stage_model.encoder.conv_in.weight": t},
        K.LORA: {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": t,
                 "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": t},
        "vae-ldm": {"first_stage_model.decoder.conv_in.weight": t},
        "unknown": {"something.weight": t},
    }
    expect = {"light": K.ADAPTER, "taesd-original": K.TAESD, "vae-ldm": K.VAE, "unknown": None}
    for name, sd in cases.items():
        assert K.kind_of_keys(sd) == expect.get(name, name), name
        assert K.kind_of(_save(tmp_path, f"{name}.safetensors", sd)) == expect.get(name, name), name


def test_peft_lora_keys():
    peft = pytest.importorskip("peft")
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                                cross_attention_dim=8, attention_head_dim=2, sample_size=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    unet.add_adapter(peft.LoraConfig(r=2, target_modules=["to_q", "to_k"]))
    sd = {f"unet.{k}": v for k, v in peft.get_peft_model_state_dict(unet).items()}
    assert K.kind_of_keys(sd) == K.LORA


def test_unreadable_and_pickled(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert K.header_keys(bad) is None and K.kind_of(bad) is None and not K.may_be(bad, K.CONTROLNET)
    pth = tmp_path / "net.pth"
    torch.save({"x": torch.zeros(1)}, pth)
    assert K.kind_of(pth) is None and K.may_be(pth, K.CONTROLNET) and K.may_be(pth, K.ADAPTER)
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps([1, 2]))
    assert K.folder_class(odd) is None and K.kind_of(odd) is None


def test_info_names_lora_and_autoencoder_files(tmp_path, capsys):
    """`ldmkit info` on a file that is no model on its own says what it is and which option takes it, where it
    used to fail loading it as a checkpoint."""
    from ldmkit.cli import main

    modules = _diffusers_modules()
    t = torch.zeros(4, 8)
    files = {
        "style.safetensors": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": t,
                               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": t.T},
                              "LoRA (kohya layout, 2 tensors): merge it with --lora"),
        "xl_style.safetensors": ({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": t,
                                  "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": t.T},
                                 "for SDXL"),
        "vae.safetensors": (modules[K.VAE].state_dict(), "autoencoder (VAE) weights, not a whole model: use them "
                                                         "with --vae"),
        "taesd.safetensors": (modules[K.TAESD].state_dict(), "tiny autoencoder (TAESD), not a whole model"),
    }
    for name, (sd, says) in files.items():
        path = _save(tmp_path, name, sd)
        assert main(["info", str(path)]) == 0
        out = capsys.readouterr().out
        assert says in out and len(out.strip().splitlines()) == 1, out
    modules[K.TAESD].save_pretrained(tmp_path / "taesd-folder")
    assert main(["info", str(tmp_path / "taesd-folder")]) == 0
    assert "--preview-vae" in capsys.readouterr().out


def test_what_a_non_lora_file_holds():
    """A LoRA error names what the file holds from file_kind's rules (one list): files written by diffusers and
    transformers, original layouts, and textual-inversion embeddings."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldmkit.lora_formats import detect_lora_format

    t = torch.zeros(1)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                                cross_attention_dim=8, attention_head_dim=2, sample_size=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    text = CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, vocab_size=50))
    modules = _diffusers_modules()
    cases = [
        (unet.state_dict(), K.UNET, "a diffusers U-Net (full weights), not a LoRA"),
        (text.state_dict(), K.TEXT_ENCODER, "a text encoder (full weights), not a LoRA"),
        ({f"clip_l.transformer.{k}": v for k, v in text.state_dict().items()}, K.TEXT_ENCODER, "a text encoder"),
        (modules[K.CONTROLNET].state_dict(), K.CONTROLNET, "a ControlNet, not a LoRA"),
        (modules[K.VAE].state_dict(), K.VAE, "an autoencoder (VAE) file, not a LoRA: pass it as --vae"),
        ({"model.diffusion_model.input_blocks.0.0.weight": t}, K.SD, "full Stable Diffusion checkpoint"),
        ({"conditioner.embedders.0.x": t, "model.diffusion_model.x": t}, K.SDXL, "full Stable Diffusion checkpoint"),
        ({"emb_params": t}, K.EMBEDDING, "a textual-inversion embedding, not a LoRA"),
        ({"clip_l": t, "clip_g": t}, K.EMBEDDING, "a textual-inversion embedding, not a LoRA"),
        ({"lllite_unet_x.down.0.weight": t}, K.LLLITE, "a ControlNet-LLLite, not a LoRA: pass it as --controlnet"),
        ({"lora_unet_x.oft_blocks": t}, None, "LyCORIS OFT/BOFT"),
    ]
    for sd, kind, says in cases:
        assert K.kind_of_keys(sd) == kind, says
        with pytest.raises(ValueError, match=says.replace("(", r"\(").replace(")", r"\)")):
            detect_lora_format(sd)


def test_header_read_once_at_the_edge(tmp_path, monkeypatch, capsys):
    """`ldmkit info` asks several questions of one file (upscaler? Control-LoRA / Union? LLLite? ControlNet?):
    it reads the header once and passes the Header on; a file rewritten in place is read anew (nothing kept)."""
    import safetensors

    from ldmkit import controlnet_files
    from ldmkit.cli import main

    reads = []
    real = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    cn = _save(tmp_path, "cn.safetensors", _diffusers_modules()[K.CONTROLNET].state_dict())
    assert main(["info", str(cn)]) == 0
    assert capsys.readouterr().out.startswith("ControlNet for ") and len(reads) == 1  # + the weights' own load
    t = torch.zeros(1)
    path = _save(tmp_path, "cl.safetensors", {"input_hint_block.0.weight": t, "lora_controlnet": t})
    h = K.read_header(path)
    assert K.read_header(h) is h and K.kind_of(h) == K.CONTROLNET and controlnet_files.header_kind(h) == "control-lora"
    assert K.may_be(h, K.CONTROLNET) and K.header_keys(h) == ["input_hint_block.0.weight", "lora_controlnet"]
    assert len(reads) == 2
    _save(tmp_path, "cl.safetensors", {"task_embedding": t, "controlnet_cond_embedding.x": t})  # same size, in place
    assert controlnet_files.header_kind(path) == "union" and K.kind_of(path) == K.CONTROLNET and len(reads) == 4
