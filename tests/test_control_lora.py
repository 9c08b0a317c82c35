"""Stability's Control-LoRA (a ControlNet stored as low-rank deltas over the base U-Net's encoder, marked by a
``lora_controlnet`` key; ComfyUI's ControlLora key layout). No diffusers reference reads these files, so the test
is a closed form: a Control-LoRA made from a known ControlNet by exact (full-rank SVD) factorisation of its weight
differences from a base U-Net, loaded over that base, gives the known ControlNet's residuals (<= 1e-5 against
ldmkit's own load of it; <= 1e-4 against diffusers' ControlNetModel holding it); on the command line the model's
U-Net is the base; another family and a missing base are one-line errors; ``ldmkit info`` names the format.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from reference import rel_err
from safetensors.torch import save_file
from test_controlnet import diffusers_controlnet
from test_controlnet_cli import SETTINGS, _run
from test_controlnet_sdxl import PROMPT, SIZE, _inputs

from ldmkit import checkpoint
from ldmkit.config import TINY, TINY_SDXL
from ldmkit.controlnet import ControlNetError, ControlUnit, control_map, describe_file, load_controlnet, read_controlnet
from ldmkit.controlnet_files import CONTROL_LORA_KEY, control_lora_from
from ldmkit.models.unet import UNetModel, sdxl_vector
from ldmkit.pipeline import GenerationParams, txt2img


def _make(base_sd, known_sd, path, rank=None):
    """Save a Control-LoRA of ``known_sd`` over ``base_sd``; weights equal to the base's are left out."""
    sd = control_lora_from({k: v for k, v in known_sd.items() if k not in base_sd or not torch.equal(v, base_sd[k])},
                           base_sd, rank)
    save_file({k: v.contiguous() for k, v in sd.items()}, path)
    return sd


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("control-lora")
    ref = diffusers_controlnet(TINY_SDXL.unet, hint=(8, 16), seed=6)
    ref.save_pretrained(folder / "known")
    known = read_controlnet(folder / "known")
    torch.manual_seed(1)
    base = {k: v.clone() for k, v in UNetModel(TINY_SDXL.unet).state_dict().items()}
    for k in base:  # the time embedding as the ControlNet's: not stored in the file, taken from the base
        if k.startswith("time_embed.") and k in known:
            base[k] = known[k].clone()
    sd = _make(base, known, folder / "control-lora-tiny.safetensors")
    return folder, ref, known, base, sd


def test_layout(files):
    _, _, known, base, sd = files
    assert CONTROL_LORA_KEY in sd and "time_embed.0.weight" not in sd  # left to the base
    up, down = sd["input_blocks.1.0.in_layers.2.up"], sd["input_blocks.1.0.in_layers.2.down"]
    assert up.ndim == 4 and up.shape[2:] == (1, 1)
    assert down.shape[1:] == known["input_blocks.1.0.in_layers.2.weight"].shape[1:]  # (r, in, 3, 3)
    assert "input_hint_block.0.weight" in sd and "zero_convs.0.0.weight" in sd  # whole
    assert any(k.endswith("transformer_blocks.0.attn2.to_k.down") for k in sd)  # linear deltas: (r, in)


def test_residuals_equal_the_known_controlnet(files):
    folder, ref, _, base, _ = files
    x, hint, t, ctx, pooled, ids = _inputs()
    hint = hint[..., :16, :24]
    y = sdxl_vector(pooled, ids)
    ours = load_controlnet(folder / "control-lora-tiny.safetensors", TINY_SDXL.unet, base_weights=base)
    plain = load_controlnet(folder / "known", TINY_SDXL.unet)
    with torch.no_grad():
        r, k = ours(x, hint, t, ctx, y), plain(x, hint, t, ctx, y)
        down, mid = ref(x, t, encoder_hidden_states=ctx, controlnet_cond=hint,
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}, return_dict=False)
    assert max(rel_err(a, b) for a, b in zip(r.down, k.down, strict=True)) <= 1e-5 and rel_err(r.mid, k.mid) <= 1e-5
    assert max(rel_err(a, b) for a, b in zip(r.down, down, strict=True)) <= 1e-4 and rel_err(r.mid, mid) <= 1e-4
    # a rank-2 truncation is a different network: the deltas really are used
    _make(base, read_controlnet(folder / "known"), folder / "r2.safetensors", rank=2)
    with torch.no_grad():
        r2 = load_controlnet(folder / "r2.safetensors", TINY_SDXL.unet, base_weights=base)(x, hint, t, ctx, y)
    assert rel_err(r2.mid, k.mid) > 1e-3


def test_needs_the_base_and_the_family(files):
    folder = files[0]
    with pytest.raises(ControlNetError, match="is a Control-LoRA .*: load it with the model it is for"):
        load_controlnet(folder / "control-lora-tiny.safetensors", TINY_SDXL.unet)
    sd1_base = UNetModel(TINY.unet).state_dict()
    with pytest.raises(ControlNetError, match="Control-LoRA control-lora-tiny.safetensors is for .* but the model is"
                       ) as e:
        load_controlnet(folder / "control-lora-tiny.safetensors", TINY.unet, base_weights=sd1_base)
    assert "\n" not in str(e.value) and "use a Control-LoRA made for that model" in str(e.value)


def test_cli_builds_it_over_the_model(files, capsys, tmp_path):
    from test_sdxl import _diffusers_sdxl_folder

    folder, _, known, _, _ = files
    _diffusers_sdxl_folder(TINY_SDXL, tmp_path)
    model = checkpoint.load(tmp_path / "model")
    base = {k: v.clone() for k, v in model.unet.state_dict().items()}
    _make(base, known, tmp_path / "cl.safetensors")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (SIZE[1], SIZE[0], 3), dtype=np.uint8)).save(tmp_path / "map.png")
    out = tmp_path / "cli.png"
    rc, cap = _run(capsys, "generate", PROMPT, "--model", str(tmp_path / "model"), *SETTINGS, "--controlnet",
                   str(tmp_path / "cl.safetensors"), "--control-image", str(tmp_path / "map.png"),
                   "--control-weight", "0.8", "-o", str(out))
    assert rc == 0, cap.err
    unit = ControlUnit(load_controlnet(folder / "known", model.cfg.unet),
                       control_map(Image.open(tmp_path / "map.png"), *SIZE), 0.8)
    api = txt2img(model, GenerationParams(PROMPT, steps=4, sampler="Euler", scheduler="uniform", seed=5, width=24,
                                          height=16, cfg_scale=5, controlnets=(unit,)))[0]
    diff = np.abs(np.asarray(Image.open(out).convert("RGB")).astype(int) - np.asarray(api.convert("RGB"))).max()
    assert diff <= 1, diff
    rc, cap = _run(capsys, "info", str(tmp_path / "cl.safetensors"))
    assert rc == 0 and "Control-LoRA for" in cap.out and "low-rank deltas" in cap.out, cap
    # the same file with an SD1.x-like model: one line
    from reference import save_diffusers_pipeline

    save_diffusers_pipeline(TINY, tmp_path / "sd1")
    capsys.readouterr()  # diffusers' progress bar
    rc, cap = _run(capsys, "generate", PROMPT, "--model", str(tmp_path / "sd1"), *SETTINGS, "--controlnet",
                   str(tmp_path / "cl.safetensors"), "--control-image", str(tmp_path / "map.png"), "-o", str(out))
    assert rc != 0 and "use a Control-LoRA made for that model" in cap.err, cap.err
    assert len(cap.err.strip().splitlines()) == 1, cap.err
    assert describe_file(tmp_path / "cl.safetensors").startswith("Control-LoRA for context dim 80")


def test_server_cache_builds_it_over_each_model(files):
    """The server's ControlNet cache: a Control-LoRA loaded for two models of the same shape is built over each one's
    U-Net (not the first one's weights again); a plain ControlNet is shared."""
    from ldmkit.sdxl import StableDiffusionXL
    from ldmkit.server.controlnet_api import ControlNetFolder

    folder = files[0]
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        models.append(StableDiffusionXL(TINY_SDXL).eval())
    cache = ControlNetFolder(folder)
    path = folder / "control-lora-tiny.safetensors"
    a, again, b = cache.load(path, models[0]), cache.load(path, models[0]), cache.load(path, models[1])
    assert a is again and b is not a
    key = "input_blocks.1.0.in_layers.2.weight"  # base + delta: differs with the base
    assert not torch.equal(a.state_dict()[key], b.state_dict()[key])
    delta = a.state_dict()[key] - models[0].unet.state_dict()[key]
    torch.testing.assert_close(b.state_dict()[key] - models[1].unet.state_dict()[key], delta, atol=1e-5, rtol=0)
    assert cache.load(folder / "known", models[0]) is cache.load(folder / "known", models[1])


def test_full_size_sdxl_layout_and_family():
    """At SDXL's real size (meta device): a Control-LoRA with rank-128 deltas on every encoder weight the ControlNet
    shares with the SDXL U-Net and the hint encoder / zero convolutions whole gives every weight of the SDXL
    ControlNet with its shape; the same file over SD1.5 is the one-line family error naming both families."""
    from ldmkit.config import SD15, SDXL_BASE
    from ldmkit.controlnet_files import control_lora_weights
    from ldmkit.models.controlnet import ControlNet, ControlNetConfig

    with torch.device("meta"):
        base = UNetModel(SDXL_BASE.unet).state_dict()
        cn = ControlNet(ControlNetConfig(SDXL_BASE.unet)).state_dict()
        sd1_base = UNetModel(SD15.unet).state_dict()
        sd1_cn = ControlNet(ControlNetConfig(SD15.unet)).state_dict()
        file = {CONTROL_LORA_KEY: torch.empty(0)}
        for k, v in cn.items():
            if k in base and v.ndim >= 2:
                file[k.removesuffix(".weight") + ".up"] = torch.empty(v.shape[0], 128, *[1] * (v.ndim - 2))
                file[k.removesuffix(".weight") + ".down"] = torch.empty(128, *v.shape[1:])
            elif k not in base:
                file[k] = torch.empty(v.shape)
    out = control_lora_weights(file, cn, base, "sai_xl_canny_128lora.safetensors", "SDXL")
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: tuple(v.shape) for k, v in cn.items()}
    with pytest.raises(ControlNetError) as e:
        control_lora_weights(file, sd1_cn, sd1_base, "sai_xl_canny_128lora.safetensors", "SD1.x")
    assert str(e.value).startswith("Control-LoRA sai_xl_canny_128lora.safetensors is for SDXL (text context 2048) "
                                   "but the model is SD1.x")
