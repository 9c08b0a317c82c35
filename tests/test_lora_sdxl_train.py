"""`ldmkit train lora` on an SDXL model (tiny random SDXL saved by diffusers, 32-px shapes, a few steps).

The trained file is checked against the reference: diffusers' StableDiffusionXLPipeline.load_lora_weights reads
it (kohya layout with SDXL's sgm block names and lora_te1_/lora_te2_, and the PEFT layout of `ldmkit export
--layout peft`) and draws the same image as ldmkit with the LoRA merged (<= 2/255), while the LoRA visibly
changes the image. Resume is exact, as for the other trainers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from shapes import write_shapes
from test_sdxl import _diffusers_sdxl_folder
from test_sdxl_pipeline import PROMPT, H, W, _diffusers_txt2img, _pixels

from ldmkit import checkpoint
from ldmkit.config import TINY_SDXL, TINY_SDXL_REFINER
from ldmkit.lora import apply_lora, read_lora
from ldmkit.pipeline import GenerationParams, txt2img
from ldmkit.train import TrainError, defaults, export_run, train
from ldmkit.train.lora import LORA_FILE

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 32


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("xl")
    _diffusers_sdxl_folder(TINY_SDXL, folder)
    return folder / "model"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_shapes(tmp_path_factory.mktemp("data"), 6, SIZE)


def _cfg(data, model, **kw):
    base = dict(data=str(data), init_from=str(model), size=SIZE, batch_size=2, total_steps=4, warmup_steps=1,
                lr=3e-2, log_every=1, sample_every=0, checkpoint_every=2, device="cpu", lora_rank=4, lora_alpha=4.0,
                ema_decay=0.0)
    return defaults("lora").replace(**{**base, **kw})


def _ours(folder, lora=None) -> np.ndarray:
    model = checkpoint.load(folder)
    if lora is not None:
        apply_lora(model, lora)
    params = GenerationParams(PROMPT, negative_prompt="blurry", steps=8, cfg_scale=6.0, sampler="Euler",
                              scheduler="uniform", seed=7, width=W, height=H)
    return _pixels(txt2img(model, params)[0])


def _theirs(folder, lora) -> np.ndarray:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.load_lora_weights(str(lora))
    return _diffusers_txt2img(pipe, "euler", "blurry", 8, seed=7)


def test_sdxl_lora_loads_in_diffusers_with_the_same_image(xl, data, tmp_path):
    run = tmp_path / "run"
    train(_cfg(data, xl, sample_every=4, sample_steps=2, sample_prompts=["a red circle"]), run)
    assert (run / "samples" / "step_0000004.png").exists()  # previews drawn by the SDXL pipeline with the LoRA
    groups = read_lora(run / LORA_FILE)
    names = list(groups)
    # kohya's SDXL naming: sgm block names for the U-Net, lora_te1_ (CLIP-L) and lora_te2_ (bigG)
    assert any(n.startswith("lora_unet_input_blocks_") for n in names)
    assert any(n.startswith("lora_unet_output_blocks_") for n in names)
    assert any(n.startswith("lora_unet_middle_block_") for n in names)
    assert not any("down_blocks" in n or "up_blocks" in n for n in names)
    assert any(n.startswith("lora_te1_text_model_encoder_layers_") for n in names)
    assert any(n.startswith("lora_te2_text_model_encoder_layers_") for n in names)
    assert not any(n.startswith("lora_te_") for n in names)
    trained = {n for n, g in groups.items() if g["lora_up.weight"].abs().max() > 0}
    assert {n[:9] for n in trained} == {"lora_unet", "lora_te1_", "lora_te2_"}  # every part learnt something
    _, meta = checkpoint.read_safetensors(run / LORA_FILE)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"

    base = _ours(xl)
    ours = _ours(xl, run / LORA_FILE)
    assert np.abs(ours - base).max() > 6  # the LoRA shows in the image
    for lora in (run / LORA_FILE, export_run(run, tmp_path / "peft.safetensors", layout="peft")):
        diff = np.abs(_theirs(xl, lora) - ours).max()
        assert diff <= 2, f"{lora.name}: max pixel difference {diff}/255"
    assert np.abs(_ours(xl, tmp_path / "peft.safetensors") - ours).max() <= 1  # both layouts read back alike


def test_sdxl_lora_resume_is_exact_and_unet_only(xl, data, tmp_path):
    cfg = _cfg(data, xl, text_encoder_lora=False)
    train(cfg, tmp_path / "straight")
    train(cfg, tmp_path / "resumed", stop_after=2)
    train(cfg, tmp_path / "resumed", resume=True)
    a, b = read_lora(tmp_path / "straight" / LORA_FILE), read_lora(tmp_path / "resumed" / LORA_FILE)
    assert a.keys() == b.keys() and all(k.startswith("lora_unet_") for k in a)  # neither encoder's LoRA
    for k in a:
        for part in a[k]:
            assert torch.equal(a[k][part], b[k][part]), k


def test_sdxl_refiner_is_refused_in_one_line(data, tmp_path):
    from ldmkit.checkpoint_sdxl import save_sdxl_single_file
    from ldmkit.sdxl import StableDiffusionXL

    path = tmp_path / "refiner.safetensors"
    save_sdxl_single_file(StableDiffusionXL(TINY_SDXL_REFINER), path)
    with pytest.raises(TrainError, match="SDXL refiner; train LoRAs on the SDXL base") as e:
        train(_cfg(data, path), tmp_path / "run")
    assert "\n" not in str(e.value)
