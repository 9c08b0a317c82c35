"""channels_last as the inference default (ldmkit.channels_last): only the layout changes, never a value.

References: diffusers' pipeline on the same random tiny weights (the image), the NCHW model's own bytes
(saving, LoRA merge and restore must give identical tensors and files), and the opt-outs.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from reference import rel_err, save_diffusers_pipeline

from ldmkit import api, channels_last, checkpoint
from ldmkit.config import TINY
from ldmkit.lora import apply_lora, inject_lora, save_lora
from ldmkit.model import StableDiffusion
from ldmkit.pipeline import GenerationParams, txt2img

CL = torch.channels_last
PARAMS = GenerationParams("a red apple", steps=3, cfg_scale=5.0, sampler="Euler", seed=7, width=16, height=16)


def _is_cl(module: torch.nn.Module) -> bool:
    ws = [p for p in module.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    return bool(ws) and all(p.is_contiguous(memory_format=CL) for p in ws)


def _tiny(flag: bool | None) -> StableDiffusion:
    torch.manual_seed(0)
    model = StableDiffusion(TINY).eval().requires_grad_(False)
    if flag is not None:
        model.channels_last = flag
    return model


def test_default_on_for_loaded_models_and_opt_outs(monkeypatch):
    monkeypatch.delenv(channels_last.ENV, raising=False)
    pipe = api.load("emoji-lcm", vae="emoji-taesd")
    assert pipe.model.channels_last and not _is_cl(pipe.model.unet)  # converted on first use, not at load
    pipe.txt2img("red heart", seed=1)
    assert _is_cl(pipe.model.unet) and _is_cl(pipe.model.vae)
    assert not _is_cl(pipe.model.text_encoder)  # no 4-D weights there: untouched
    assert not api.load("emoji", channels_last=False).model.channels_last
    monkeypatch.setenv(channels_last.ENV, "0")
    off = api.load("emoji-lcm")
    off.txt2img("red heart", seed=1)
    assert not off.model.channels_last and not _is_cl(off.model.unet)
    assert api.load("emoji", channels_last=True).model.channels_last  # the argument wins over the environment


def test_cli_flag_opts_out(monkeypatch):
    from ldmkit.cli import build_parser, load_pipeline

    monkeypatch.delenv(channels_last.ENV, raising=False)
    parser = build_parser("generate")
    assert "--no-channels-last" in parser.format_help() or "--no-channels-last" in str(
        parser._subparsers._group_actions[0].choices["generate"].format_help())
    args = parser.parse_args(["generate", "x", "--model", "emoji", "--no-channels-last"])
    assert load_pipeline(args).model.channels_last is False
    args = parser.parse_args(["generate", "x", "--model", "emoji"])
    assert load_pipeline(args).model.channels_last is True


def test_checkpoint_load_on_trainers_off(monkeypatch, tmp_path):
    from ldmkit.train.sources import load_model

    monkeypatch.delenv(channels_last.ENV, raising=False)
    checkpoint.save_single_file(_tiny(None), tmp_path / "m.safetensors")
    assert checkpoint.load(tmp_path / "m.safetensors").channels_last is True
    assert load_model(str(tmp_path / "m.safetensors"), "--model").channels_last is False  # exact resumes
    monkeypatch.setenv(channels_last.ENV, "off")
    assert checkpoint.load(tmp_path / "m.safetensors").channels_last is False


def test_not_for_low_memory_trained_or_unflagged_models(monkeypatch):
    monkeypatch.delenv(channels_last.ENV, raising=False)
    low = api.load("emoji", low_memory=True, channels_last=True)
    assert not channels_last.wanted(low.model)  # fp16 weights stay memory-mapped
    low.txt2img("red heart", seed=1, steps=2)
    assert not _is_cl(low.model.unet)
    plain = _tiny(None)  # built directly, without a loader
    txt2img(plain, PARAMS)
    assert not _is_cl(plain.unet)
    training = _tiny(True)
    training.unet.requires_grad_(True)  # a network being trained keeps its layout (optimizer state)
    channels_last.prepare(training, "unet")
    assert not _is_cl(training.unet)
    monkeypatch.setenv(channels_last.ENV, "all")  # the switch that runs the parity suite in channels_last
    assert channels_last.wanted(_tiny(None)) and not channels_last.wanted(_tiny(False))


@pytest.mark.slow  # diffusers' import and pipeline: ~40 s on a loaded 2-core machine
def test_same_image_as_diffusers(tmp_path):
    """The tiny pipeline in channels_last against diffusers (NCHW, its defaults), as test_e2e_parity does."""
    import diffusers

    pipe = save_diffusers_pipeline(TINY, tmp_path)
    pipe.scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                                      beta_schedule="scaled_linear", timestep_spacing="linspace")
    model = checkpoint.load(tmp_path)
    model.channels_last = True
    prompt, negative, size, seed = "a red apple on a wooden table", "blurry", (24, 16), 1234
    out = pipe(prompt, negative_prompt=negative, num_inference_steps=10, guidance_scale=7.0,
               generator=torch.Generator().manual_seed(seed), height=size[1], width=size[0], output_type="np")
    ref = (out.images[0] * 255).round().astype(np.int16)
    ours = txt2img(model, GenerationParams(prompt, negative_prompt=negative, steps=10, cfg_scale=7.0, sampler="Euler",
                                           scheduler="uniform", seed=seed, width=size[0], height=size[1]))[0]
    assert _is_cl(model.unet) and _is_cl(model.vae)
    assert np.abs(np.asarray(ours).astype(np.int16) - ref).max() <= 2
    assert ref.std() > 5


def test_same_latents_as_nchw():
    from ldmkit.pipeline import txt2img_latents

    a, b = _tiny(False), _tiny(True)
    la, lb = txt2img_latents(a, PARAMS)[1], txt2img_latents(b, PARAMS)[1]
    assert _is_cl(b.unet) and not _is_cl(a.unet)
    assert rel_err(lb, la) <= 1e-4  # 3 steps at CFG 5 from a 1e-6 per-call difference


def test_saving_after_use_gives_the_same_contiguous_files(tmp_path):
    from safetensors import safe_open

    a, b = _tiny(False), _tiny(True)
    txt2img(b, PARAMS)
    assert _is_cl(b.unet) and _is_cl(b.vae)
    checkpoint.save_single_file(a, tmp_path / "a.safetensors")
    checkpoint.save_single_file(b, tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    checkpoint.save_diffusers(a, tmp_path / "da")
    checkpoint.save_diffusers(b, tmp_path / "db")
    for sub in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        assert (tmp_path / "da" / sub).read_bytes() == (tmp_path / "db" / sub).read_bytes()
    with safe_open(tmp_path / "b.safetensors", "pt") as f:  # and they load back as plain contiguous tensors
        assert all(f.get_tensor(k).is_contiguous() for k in f.keys())
    again = checkpoint.load(tmp_path / "b.safetensors")
    for (k, p), q in zip(a.unet.state_dict().items(), again.unet.state_dict().values(), strict=True):
        assert torch.equal(p, q), k


@pytest.fixture()
def conv_lora(tmp_path):
    torch.manual_seed(0)
    model = StableDiffusion(TINY).eval()
    injected = inject_lora(model, rank=4, alpha=2.0, conv=True)  # 3x3 convolutions too (LoCon)
    g = torch.Generator().manual_seed(1)
    for m in injected.values():
        m.lora_up.weight.data.normal_(0, 0.1, generator=g)
    path = tmp_path / "locon.safetensors"
    save_lora(injected, path)
    assert any(m.org.weight.dim() == 4 and m.org.weight.shape[-1] == 3 for m in injected.values())
    return path


def test_lora_merge_and_restore_equal_nchw(conv_lora, tmp_path):
    from ldmkit import networks
    from ldmkit.networks import NetworkFolder
    from ldmkit.prompt import NetworkTag

    a, b = _tiny(False), _tiny(True)
    txt2img(b, PARAMS)  # converted first, as in a server that has generated before a LoRA arrives
    original = copy.deepcopy(b.unet.state_dict())
    assert apply_lora(a, conv_lora, 0.8) == apply_lora(b, conv_lora, 0.8)
    for (k, p), q in zip(a.unet.state_dict().items(), b.unet.state_dict().values(), strict=True):
        assert torch.equal(p, q), k
    assert _is_cl(b.unet)  # merged in place, layout kept

    # the server's per-request <lora:...>: backups of the changed weights, restored bit for bit
    c = _tiny(True)
    txt2img(c, PARAMS)
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "locon.safetensors").write_bytes(conv_lora.read_bytes())
    networks.apply_networks(c, [NetworkTag("locon", 0.8)], NetworkFolder(tmp_path / "loras"), strict=True)
    for (k, p), q in zip(b.unet.state_dict().items(), c.unet.state_dict().values(), strict=True):
        assert torch.equal(p, q), k
    networks.apply_networks(c, [], None)
    for k, p in c.unet.state_dict().items():
        assert torch.equal(p, original[k]), k
    assert _is_cl(c.unet)
