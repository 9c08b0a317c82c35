"""A file given to the wrong option says what it is and which option takes it, in one line: a ControlNet,
ControlNet-LLLite, T2I-Adapter, upscaler, TAESD, VAE or checkpoint as a LoRA (--lora FILE, <lora:NAME:1> in the
prompt, the A1111 API), and a LoRA (or other file) as --controlnet, --adapter, --vae, --model or ldmkit upscale's
--upscaler. The files are written in their real layouts: diffusers' ControlNetModel / T2IAdapter / AutoencoderTiny /
AutoencoderKL, PEFT's LoRA keys, basicsr's RRDBNet (test_upscale's reference parameters), sd-scripts' LLLite names
(test_controlnet_lllite's writer)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ldmkit.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

GEN = ["--steps", "1", "--width", "16", "--height", "16", "--seed", "1"]

# what a LoRA error says of each file: its kind and the option that takes it
AS_LORA = {
    "controlnet": "a ControlNet, not a LoRA: pass it as --controlnet with a --control-image",
    "lllite": "a ControlNet-LLLite, not a LoRA: pass it as --controlnet with a --control-image and an SDXL --model",
    "adapter": "a T2I-Adapter, not a LoRA: pass it as --adapter with a --control-image",
    "upscaler": "an image upscaler (ESRGAN family), not a LoRA: use it with ldmkit upscale --upscaler or "
                "--hires-upscaler",
    "taesd": "a tiny autoencoder (TAESD), not a LoRA: pass it as --vae or --preview-vae",
    "vae": "an autoencoder (VAE) file, not a LoRA: pass it as --vae",
}


def _save(path: Path, sd: dict) -> Path:
    save_file({k: v.detach().clone().contiguous() for k, v in sd.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    from diffusers import AutoencoderKL, AutoencoderTiny, ControlNetModel, T2IAdapter, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict
    from test_controlnet_lllite import lllite_file
    from test_upscale import basicsr_params

    from ldmkit.config import TINY_SDXL
    from ldmkit.models.unet import UNetModel

    d = tmp_path_factory.mktemp("kinds")
    torch.manual_seed(0)
    small = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8)
    _save(d / "controlnet.safetensors", ControlNetModel(
        **small, cross_attention_dim=8, attention_head_dim=2, conditioning_embedding_out_channels=(4, 8),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D")).state_dict())
    _save(d / "adapter.safetensors", T2IAdapter(in_channels=3, channels=(8, 16), num_res_blocks=1, downscale_factor=8,
                                                adapter_type="full_adapter").state_dict())
    _save(d / "taesd.safetensors", AutoencoderTiny(
        encoder_block_out_channels=(4, 4), decoder_block_out_channels=(4, 4), num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1)).state_dict())
    _save(d / "vae.safetensors", AutoencoderKL(**small, down_block_types=("DownEncoderBlock2D",) * 2,
                                               up_block_types=("UpDecoderBlock2D",) * 2).state_dict())
    _save(d / "upscaler.safetensors", basicsr_params(nf=4, nb=1, gc=2, scale=2, seed=0))
    with torch.device("meta"):
        xl_unet = UNetModel(TINY_SDXL.unet)
    _save(d / "lllite.safetensors", lllite_file(xl_unet, 2))
    unet = UNet2DConditionModel(**small, cross_attention_dim=8, attention_head_dim=2, sample_size=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_k"]))
    _save(d / "lora.safetensors", {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()})
    Image.new("RGB", (16, 16), "white").save(d / "map.png")
    return d


def _error(capsys, *argv: str) -> str:
    """The one stderr line (besides a progress bar) of a command that must fail with exit 2."""
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    lines = [ln for ln in err.splitlines() if "step/s]" not in ln]  # a LoRA tag is read once sampling starts
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("kind", [*AS_LORA, "model"])
def test_lora_option_names_what_the_file_is(files, sd1_file, tmp_path, capsys, kind):
    path = sd1_file if kind == "model" else files / f"{kind}.safetensors"
    says = AS_LORA.get(kind, "a full Stable Diffusion checkpoint (model.diffusion_model.* keys), not a LoRA: "
                             "pass it as --model")
    err = _error(capsys, "generate", "x", "--model", str(sd1_file), "--lora", f"{path}:0.5", *GEN,
                 "-o", str(tmp_path / "x.png"))
    assert err == f"ldmkit: error: {path}: {says}"


def test_prompt_tag_and_api_name_what_the_file_is(files, sd1_file, tmp_path, capsys):
    """<lora:NAME:1> on a file of another kind: a warning naming it, as A1111 goes on without the LoRA (the CLI
    and the A1111 API's infotext); --lora-strict makes it the one-line error. A LoRA as the API's sd_vae: 400."""
    import base64
    import io
    import json

    from fastapi.testclient import TestClient

    from ldmkit import checkpoint
    from ldmkit.server.app import create_app

    loras = tmp_path / "loras"
    loras.mkdir()
    for kind in ("controlnet", "upscaler"):
        (loras / f"{kind}.safetensors").write_bytes((files / f"{kind}.safetensors").read_bytes())
    argv = ["generate", "a house <lora:controlnet:1>", "--model", str(sd1_file), "--lora-dir", str(loras), *GEN,
            "-o", str(tmp_path / "x.png")]
    assert main(argv) == 0
    assert AS_LORA["controlnet"] in capsys.readouterr().err
    assert AS_LORA["controlnet"] in _error(capsys, *argv, "--lora-strict")
    vaes = tmp_path / "vaes"
    vaes.mkdir()
    (vaes / "style.safetensors").write_bytes((files / "lora.safetensors").read_bytes())
    app = create_app(checkpoint.load(sd1_file), lora_dir=loras, vae_dir=vaes, preview_interval=None, device="cpu")
    with TestClient(app) as c:
        req = {"prompt": "a house <lora:upscaler:1>", "steps": 1, "width": 16, "height": 16, "seed": 1}
        r = c.post("/sdapi/v1/txt2img", json=req)
        assert r.status_code == 200, r.text
        assert AS_LORA["upscaler"] in json.loads(r.json()["info"])["infotexts"][0]
        Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))  # generated without the file
        # a LoRA picked as the decoder (A1111's sd_vae): 400 saying what it is
        r = c.post("/sdapi/v1/txt2img", json={**req, "override_settings": {"sd_vae": "style.safetensors"}})
        assert r.status_code == 400 and "a LoRA, not a VAE: merge it with --lora" in r.json()["detail"], r.text


@pytest.mark.parametrize("option,kind,says", [
    ("--controlnet", "lora", "a LoRA, not a ControlNet: merge it with --lora FILE[:WEIGHT], or put it in a "
                             "--lora-dir and write <lora:NAME:1> in the prompt"),
    ("--controlnet", "adapter", "a T2I-Adapter, not a ControlNet: pass it as --adapter with a --control-image"),
    ("--controlnet", "vae", "an autoencoder (VAE) file, not a ControlNet: pass it as --vae"),
    ("--vae", "lora", "a LoRA, not a VAE: merge it with --lora"),
    ("--vae", "controlnet", "a ControlNet, not a VAE: pass it as --controlnet"),
    ("--vae", "upscaler", "an image upscaler (ESRGAN family), not a VAE: use it with ldmkit upscale"),
    ("--model", "lora", "a LoRA, not a Stable Diffusion checkpoint: merge it with --lora"),
    ("--model", "controlnet", "a ControlNet, not a Stable Diffusion checkpoint: pass it as --controlnet"),
    ("--model", "lllite", "a ControlNet-LLLite, not a Stable Diffusion checkpoint: pass it as --controlnet"),
    ("--model", "vae", "an autoencoder (VAE) file, not a Stable Diffusion checkpoint: pass it as --vae"),
    ("--model", "taesd", "a tiny autoencoder (TAESD), not a Stable Diffusion checkpoint: pass it as --vae or "
                         "--preview-vae"),
    ("--adapter", "lora", "a LoRA, not a T2I-Adapter: merge it with --lora"),
    ("--adapter", "upscaler", "an image upscaler (ESRGAN family), not a T2I-Adapter: use it with ldmkit upscale"),
    ("--adapter", "controlnet", "a ControlNet, not a T2I-Adapter: pass it as --controlnet"),
    ("upscale", "lora", "a LoRA, not an upscaler: merge it with --lora"),
    ("upscale", "controlnet", "a ControlNet, not an upscaler: pass it as --controlnet"),
    ("upscale", "taesd", "a tiny autoencoder (TAESD), not an upscaler: pass it as --vae or --preview-vae"),
])
def test_other_options_name_what_the_file_is(files, sd1_file, tmp_path, capsys, option, kind, says):
    path = files / f"{kind}.safetensors"
    argv = ["generate", "x", *GEN, "-o", str(tmp_path / "x.png")]
    if option == "upscale":
        argv = ["upscale", str(files / "map.png"), "--upscaler", str(path), "-o", str(tmp_path / "x.png")]
    elif option == "--model":
        argv += ["--model", str(path)]
    else:
        argv += ["--model", str(sd1_file), option, str(path)]
        if option in ("--controlnet", "--adapter"):
            argv += ["--control-image", str(files / "map.png")]
    err = _error(capsys, *argv)
    assert err.startswith(f"ldmkit: error: {path}") and says in err, err


def test_an_option_own_kind_is_not_misplaced(tmp_path):
    """A damaged file of the option's own kind keeps the loader's own message (never "a ControlNet, not a
    ControlNet"), and a checkpoint missing its U-Net is not called a VAE file."""
    from ldmkit import convert
    from ldmkit.controlnet import ControlNetError, read_controlnet

    t = torch.zeros(1)
    _save(tmp_path / "cn.safetensors", {"controlnet_cond_embedding.blocks.0.weight": t})
    with pytest.raises(ControlNetError, match=r"is not a ControlNet: no control_model\.\*"):
        read_controlnet(tmp_path / "cn.safetensors")
    with pytest.raises(ValueError, match="does not look like a Stable Diffusion checkpoint"):
        convert.split_ldm_checkpoint({"first_stage_model.decoder.conv_in.weight": t,
                                      "cond_stage_model.transformer.text_model.final_layer_norm.weight": t})
    with pytest.raises(ValueError, match="an autoencoder .VAE. file, not a Stable Diffusion checkpoint"):
        convert.split_ldm_checkpoint({"first_stage_model.decoder.conv_in.weight": t})
