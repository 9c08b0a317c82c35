"""Bad input around SDXL, through the CLI: each case exits with status 2 and one line naming the problem.

LoRA files carry the real models' shapes (a few layers of an SD1.5 or SDXL LoRA), the models are tiny.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from ldmkit import checkpoint, checkpoint_sdxl
from ldmkit.cli import main
from ldmkit.config import TINY, TINY_SDXL, TINY_SDXL_REFINER
from ldmkit.model import StableDiffusion
from ldmkit.sdxl import StableDiffusionXL

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(name: str, down: tuple[int, int], up: tuple[int, int], peft: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if peft:
        return {f"{name}.lora_A.weight": torch.randn(down, generator=g), f"{name}.lora_B.weight": torch.randn(up)}
    return {f"{name}.lora_down.weight": torch.randn(down, generator=g), f"{name}.lora_up.weight": torch.randn(up),
            f"{name}.alpha": torch.tensor(4.0)}


# an SDXL kohya LoRA: U-Net (LDM names, 2048-wide context) and both text encoders
SDXL_KOHYA = {**_pair("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", (4, 2048), (640, 4)),
              **_pair("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", (4, 768), (768, 4)),
              **_pair("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", (4, 1280), (1280, 4))}
# an SDXL U-Net-only LoRA in diffusers/PEFT names: only its shapes say SDXL
SDXL_PEFT = _pair("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", (4, 2048), (640, 4), peft=True)
# an SD1.5 kohya LoRA (diffusers-derived names, 768-wide context)
SD15_KOHYA = {**_pair("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", (4, 768), (320, 4)),
              **_pair("lora_te_text_model_encoder_layers_0_self_attn_q_proj", (4, 768), (768, 4))}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    checkpoint.save_single_file(StableDiffusion(TINY).eval(), d / "sd15.safetensors")
    checkpoint_sdxl.save_sdxl_single_file(StableDiffusionXL(TINY_SDXL).eval(), d / "xl.safetensors")
    checkpoint_sdxl.save_sdxl_single_file(StableDiffusionXL(TINY_SDXL_REFINER).eval(), d / "xl-refiner.safetensors")
    return d


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def _generate(model, tmp_path, *extra: str) -> list[str]:
    return ["generate", "an apple", "--model", str(model), "--steps", "1", "--width", "32", "--height", "32",
            "-o", str(tmp_path / "out.png"), *extra]


@pytest.mark.parametrize("lora, says", [(SDXL_KOHYA, "a LoRA for SDXL (lora_te2_"),
                                        (SDXL_PEFT, "LoRA for SDXL (cross-attention width 2048)")],
                         ids=["kohya", "peft-unet-only"])
def test_sdxl_lora_on_sd15(lora, says, models, tmp_path, capsys):
    save_file(lora, tmp_path / "xl-lora.safetensors")
    err = _one_line_error(capsys, _generate(models / "sd15.safetensors", tmp_path, "--lora",
                                            str(tmp_path / "xl-lora.safetensors")))
    assert "xl-lora.safetensors" in err and says in err


def test_sd15_lora_on_sdxl(models, tmp_path, capsys):
    save_file(SD15_KOHYA, tmp_path / "sd15-lora.safetensors")
    err = _one_line_error(capsys, _generate(models / "xl.safetensors", tmp_path, "--lora",
                                            str(tmp_path / "sd15-lora.safetensors")))
    assert "sd15-lora.safetensors" in err and "LoRA for SD1.x (cross-attention width 768)" in err
    assert "this model is sdxl" in err


def test_refiner_as_base(models, tmp_path, capsys):
    err = _one_line_error(capsys, _generate(models / "xl-refiner.safetensors", tmp_path))
    assert "xl-refiner is an SDXL refiner" in err and "img2img" in err
    # and a refiner given where the base is expected by --model-type
    err = _one_line_error(capsys, _generate(models / "xl-refiner.safetensors", tmp_path, "--model-type", "sdxl"))
    assert "--model-type sdxl given but the weights are SDXL refiner" in err


def test_truncated_sdxl_file(models, tmp_path, capsys):
    """A download cut short: the safetensors header promises more bytes than the file has."""
    data = (models / "xl.safetensors").read_bytes()
    cut = tmp_path / "xl-cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    err = _one_line_error(capsys, _generate(cut, tmp_path))
    assert "xl-cut.safetensors" in err and "truncated" in err
    assert "truncated or corrupt" in _one_line_error(capsys, ["info", str(cut)])


def test_cli_refiner(models, tmp_path, capsys):
    """--refiner: the base's image finished by the refiner, A1111's infotext fields; misuse is one line."""
    from PIL import Image

    out = tmp_path / "refined.png"
    argv = _generate(models / "xl.safetensors", tmp_path, "--refiner", str(models / "xl-refiner.safetensors"),
                     "--refiner-switch-at", "0.5", "--steps", "4", "-o", str(out))
    assert main(argv) == 0
    capsys.readouterr()
    info = Image.open(out).info["parameters"]
    assert "Model: xl, Refiner: xl-refiner [" in info and "Refiner switch at: 0.5" in info
    err = _one_line_error(capsys, _generate(models / "sd15.safetensors", tmp_path, "--refiner",
                                            str(models / "xl-refiner.safetensors")))
    assert "--refiner needs an SDXL base model" in err
    err = _one_line_error(capsys, _generate(models / "xl.safetensors", tmp_path, "--refiner",
                                            str(models / "xl-refiner.safetensors"), "--refiner-switch-at", "1.5"))
    assert "refiner switch at 1.5 must be between 0 and 1" in err
