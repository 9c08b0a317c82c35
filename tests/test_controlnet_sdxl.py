"""SDXL ControlNet (issue 16, part 1) against diffusers on a random tiny SDXL config: the network against
diffusers.ControlNetModel with addition_embed_type "text_time" (residuals, relative error <= 1e-4), the
original (sgm) layout against its diffusers conversion, whole images against
StableDiffusionXLControlNetPipeline (controlnet_conditioning_scale, control_guidance_start/end; <= 2/255),
the family check both ways, and ``--controlnet`` with an SDXL ``--model`` on the command line.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from PIL import Image
from reference import rel_err
from safetensors.torch import save_file
from test_controlnet import diffusers_controlnet
from test_controlnet_cli import SETTINGS, _run

from ldmkit import checkpoint
from ldmkit.config import SDXL_ID_DIM, TINY, TINY_SDXL
from ldmkit.controlnet import ControlNetError, ControlUnit, control_map, load_controlnet, read_controlnet
from ldmkit.models.unet import sdxl_vector
from ldmkit.pipeline import GenerationParams, txt2img

SIZE = (24, 16)  # the tiny VAE halves: latents 12x8, hint encoder with one stride-2 stage
PROMPT, NEGATIVE, STEPS, CFG, SEED = "a stone house by a lake", "blurry", 8, 6.0, 77


def _inputs(seed=3):
    g = torch.Generator().manual_seed(seed)
    u = TINY_SDXL.unet
    x = torch.randn(2, 4, 8, 12, generator=g)
    hint = torch.rand(2, 3, 64, 96, generator=g)  # diffusers' default hint encoder: 8x
    t = torch.tensor([999.0, 250.5])
    ctx = torch.randn(2, 7, u.context_dim, generator=g)
    pooled = torch.randn(2, u.adm_in_channels - 6 * SDXL_ID_DIM, generator=g)
    ids = torch.tensor([[1024.0, 768.0, 0.0, 16.0, 1024.0, 1024.0], [512.0, 512.0, 8.0, 0.0, 832.0, 1216.0]])
    return x, hint, t, ctx, pooled, ids


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cn-sdxl")
    net = diffusers_controlnet(TINY_SDXL.unet, seed=4)
    assert net.config.addition_embed_type == "text_time"
    net.save_pretrained(folder / "diffusers")
    return folder, net


def test_sdxl_residuals_match_diffusers(saved):
    folder, ref = saved
    x, hint, t, ctx, pooled, ids = _inputs()
    with torch.no_grad():
        down, mid = ref(x, t, encoder_hidden_states=ctx, controlnet_cond=hint, conditioning_scale=1.0,
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}, return_dict=False)
    for path in (folder / "diffusers", folder / "diffusers" / "diffusion_pytorch_model.safetensors"):
        ours = load_controlnet(path, TINY_SDXL.unet)
        assert ours.cfg.unet.transformer_depth == TINY_SDXL.unet.transformer_depth
        with torch.no_grad():
            r = ours(x, hint, t, ctx, sdxl_vector(pooled, ids))
        assert len(r.down) == len(down)
        for a, b in zip(r.down, down, strict=True):
            assert rel_err(a, b) <= 1e-4
        assert rel_err(r.mid, mid) <= 1e-4
    # the original (sgm) single-file layout: control_model.* with label_emb.0.0 / 0.2, fp16
    sgm = {f"control_model.{k}": v.half() for k, v in read_controlnet(folder / "diffusers").items()}
    assert "control_model.label_emb.0.0.weight" in sgm
    save_file(sgm, folder / "sgm.safetensors")
    single = load_controlnet(folder / "sgm.safetensors", TINY_SDXL.unet)
    with torch.no_grad():
        r16 = single(x, hint, t, ctx, sdxl_vector(pooled, ids))
    assert rel_err(r16.mid, mid) <= 5e-3  # fp16 weights


@pytest.mark.parametrize("depths", [[0, 0, 0], [0, 1, 1]], ids=["small", "mid"])
def test_sdxl_small_and_mid_variants(depths, tmp_path):
    """diffusers' -small / -mid SDXL ControlNets: fewer transformer blocks than the U-Net (small: none, so no
    cross-attention and no text width in the weights: the model's)."""
    from diffusers import ControlNetModel
    from reference import _perturb_norms
    from test_controlnet import diffusers_controlnet_config

    torch.manual_seed(1)
    ref = ControlNetModel(**diffusers_controlnet_config(TINY_SDXL.unet) | {"transformer_layers_per_block": depths})
    _perturb_norms(ref.eval())
    for name, p in ref.named_parameters():
        if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
            p.data.normal_(0, 0.2)
    ref.save_pretrained(tmp_path / "cn")
    x, hint, t, ctx, pooled, ids = _inputs()
    with torch.no_grad():
        down, mid = ref(x, t, encoder_hidden_states=ctx, controlnet_cond=hint,
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}, return_dict=False)
        r = load_controlnet(tmp_path / "cn", TINY_SDXL.unet)(x, hint, t, ctx, sdxl_vector(pooled, ids))
    assert max(rel_err(a, b) for a, b in zip(r.down, down, strict=True)) <= 1e-4 and rel_err(r.mid, mid) <= 1e-4


def test_family_check_both_ways(saved, tmp_path):
    folder, _ = saved
    with pytest.raises(ControlNetError, match="is for SDXL"):
        load_controlnet(folder / "diffusers", TINY.unet)
    diffusers_controlnet(TINY.unet, hint=(8, 16)).save_pretrained(tmp_path / "sd1")
    with pytest.raises(ControlNetError, match="use a ControlNet made for that model") as e:
        load_controlnet(tmp_path / "sd1", TINY_SDXL.unet)
    assert "\n" not in str(e.value) and "but the model is SDXL" in str(e.value)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    import diffusers
    from test_sdxl import _diffusers_sdxl_folder

    folder = tmp_path_factory.mktemp("cn-sdxl-pipe")
    p = _diffusers_sdxl_folder(TINY_SDXL, folder)
    p.scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                   timestep_spacing="linspace")
    net = diffusers_controlnet(TINY_SDXL.unet, hint=(8, 16), seed=11)
    net.save_pretrained(folder / "cn")
    rng = np.random.default_rng(0)
    cmap = Image.fromarray(rng.integers(0, 255, (SIZE[1], SIZE[0], 3), dtype=np.uint8))
    cmap.save(folder / "map.png")
    return folder, p, net, cmap


@pytest.mark.parametrize("scale, start, end", [(1.0, 0.0, 1.0), (0.7, 0.25, 0.75)])
def test_sdxl_image_matches_diffusers_pipeline(pipe, scale, start, end):
    from diffusers import StableDiffusionXLControlNetPipeline

    folder, p, net, cmap = pipe
    comps = {k: v for k, v in p.components.items()
             if k in inspect.signature(StableDiffusionXLControlNetPipeline.__init__).parameters}
    ref_pipe = StableDiffusionXLControlNetPipeline(**comps, controlnet=net)
    out = ref_pipe(PROMPT, image=cmap, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG,
                   generator=torch.Generator().manual_seed(SEED), width=SIZE[0], height=SIZE[1],
                   controlnet_conditioning_scale=scale, control_guidance_start=start, control_guidance_end=end,
                   output_type="np")
    ref = (out.images[0] * 255).round().astype(np.int16)
    model = checkpoint.load(folder / "model")
    cn = load_controlnet(folder / "cn", model.cfg.unet)
    unit = ControlUnit(cn, control_map(cmap, *SIZE), scale, start, end)
    assert_matches_reference(model, unit, ref, STEPS)


def assert_matches_reference(model, unit, ref, steps):
    """ldmkit's image with ``unit`` (the reference pipeline's prompt, seed, Euler) is within 2/255 of ``ref``, and
    the unit changed the image."""
    params = dict(prompt=PROMPT, negative_prompt=NEGATIVE, steps=steps, cfg_scale=CFG, sampler="Euler",
                  scheduler="uniform", seed=SEED, width=SIZE[0], height=SIZE[1])
    ours = np.asarray(txt2img(model, GenerationParams(**params, controlnets=(unit,)))[0]).astype(np.int16)
    diff = np.abs(ours - ref).max()
    assert diff <= 2, f"max pixel difference {diff}/255"
    plain = np.asarray(txt2img(model, GenerationParams(**params))[0]).astype(np.int16)
    assert np.abs(plain - ref).max() > 6 and ref.std() > 5  # the ControlNet changed the image


def test_cli_controlnet_with_sdxl_model(pipe, capsys, tmp_path):
    folder, _, _, cmap = pipe
    out = tmp_path / "cli.png"
    rc, cap = _run(capsys, "generate", PROMPT, "--model", str(folder / "model"), *SETTINGS,
                   "--controlnet", str(folder / "cn"), "--control-image", str(folder / "map.png"),
                   "--control-weight", "0.8", "--control-end", "0.5", "-o", str(out))
    assert rc == 0, cap.err
    model = checkpoint.load(folder / "model")
    unit = ControlUnit(load_controlnet(folder / "cn", model.cfg.unet), control_map(cmap, *SIZE), 0.8, 0.0, 0.5)
    api = txt2img(model, GenerationParams(PROMPT, steps=4, sampler="Euler", scheduler="uniform", seed=5, width=24,
                                          height=16, cfg_scale=5, controlnets=(unit,)))[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(api.convert("RGB")))
    # an SD1.x ControlNet with the SDXL model: one line naming both families
    diffusers_controlnet(TINY.unet, hint=(8, 16)).save_pretrained(tmp_path / "sd1")
    rc, cap = _run(capsys, "generate", PROMPT, "--model", str(folder / "model"), *SETTINGS,
                   "--controlnet", str(tmp_path / "sd1"), "--control-image", str(folder / "map.png"),
                   "-o", str(tmp_path / "bad.png"))
    assert rc != 0 and "Traceback" not in cap.err
    assert "but the model is SDXL" in cap.err and len(cap.err.strip().splitlines()) == 1, cap.err


def test_a1111_unit_with_an_sdxl_model(pipe, capsys, tmp_path):
    """An SDXL model on the server: an alwayson_scripts unit naming an SDXL ControlNet gives the CLI's image."""
    pytest.importorskip("fastapi")
    import base64
    import io
    import shutil

    from fastapi.testclient import TestClient

    from ldmkit.server.app import create_app

    folder, _, _, _ = pipe
    (tmp_path / "cn").mkdir()
    shutil.copytree(folder / "cn", tmp_path / "cn" / "controlnet-tiny-sdxl")
    app = create_app(folder / "model", controlnet_dir=tmp_path / "cn", preview_interval=None, device="cpu")
    client = TestClient(app, raise_server_exceptions=False)
    try:
        buf = io.BytesIO()
        Image.open(folder / "map.png").save(buf, format="PNG")
        unit = {"module": "none", "model": "controlnet-tiny-sdxl", "image": base64.b64encode(buf.getvalue()).decode(),
                "weight": 0.8, "guidance_end": 0.5, "resize_mode": "Just Resize"}
        r = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 4, "seed": 5, "width": 24, "height": 16,
                                                   "cfg_scale": 5, "sampler_name": "Euler",
                                                   "alwayson_scripts": {"controlnet": {"args": [unit]}}})
        assert r.status_code == 200, r.text
        got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    finally:
        app.state.worker.stop()
    out = tmp_path / "cli.png"
    rc, cap = _run(capsys, "generate", PROMPT, "--model", str(folder / "model"), "--steps", "4", "--sampler",
                   "Euler", "--seed", "5", "--width", "24", "--height", "16", "--cfg-scale", "5", "--controlnet",
                   str(folder / "cn"), "--control-image", str(folder / "map.png"), "--control-weight", "0.8",
                   "--control-end", "0.5", "-o", str(out))
    assert rc == 0, cap.err
    assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(Image.open(out).convert("RGB")))


def test_refiner_runs_without_the_base_units():
    """--refiner with a ControlNet: the units act in the base's part; the refiner (another U-Net) runs without."""
    from ldmkit.config import TINY_SDXL_REFINER
    from ldmkit.models.controlnet import ControlNet, ControlNetConfig
    from ldmkit.sdxl import StableDiffusionXL, txt2img_refined

    torch.manual_seed(0)
    base, refiner = StableDiffusionXL(TINY_SDXL), StableDiffusionXL(TINY_SDXL_REFINER)
    net = ControlNet(ControlNetConfig(TINY_SDXL.unet, hint_channels=(8, 16))).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    unit = ControlUnit(net, torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(1)))
    params = GenerationParams("a house", steps=4, sampler="Euler", width=24, height=16, seed=1)
    plain = np.asarray(txt2img_refined(base, refiner, params, 0.5)[0]).astype(np.int16)
    with_unit = np.asarray(txt2img_refined(base, refiner, params.replace(controlnets=(unit,)), 0.5)[0])
    assert np.abs(with_unit.astype(np.int16) - plain).max() > 0


def test_explain_with_an_sdxl_controlnet(pipe, tmp_path):
    """The explain page's ControlNet section on SDXL: residual strength per block (9 skips + middle) and step."""
    from ldmkit.explain import explain, write_page

    folder, _, _, cmap = pipe
    model = checkpoint.load(folder / "model")
    unit = ControlUnit(load_controlnet(folder / "cn", model.cfg.unet), control_map(cmap, *SIZE), 1.0, 0.5, 1.0)
    params = GenerationParams(PROMPT, steps=4, sampler="Euler", seed=5, width=24, height=16, cfg_scale=5,
                              controlnets=(unit,))
    ex = explain(model, params)
    rms = ex.control[0].rms
    assert rms.shape == (4, len(unit.model.zero_convs) + 1)
    assert np.isnan(rms[:2]).all() and (rms[2:] > 0).all()  # off before start = 0.5
    assert np.array_equal(np.asarray(ex.image), np.asarray(txt2img(model, params)[0]))
    assert "ControlNet 0" in write_page(ex, tmp_path / "page", model.tokenizer).read_text()
