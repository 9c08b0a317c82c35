"""Depth-conditioned SD2 (issue 16, part 3) against diffusers' StableDiffusionDepth2ImgPipeline: the same image
(<= 2/255) given the same depth map, and given the same (tiny, random) DPT depth estimator; family detection of
depth checkpoints; the command line and its one-line errors."""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from reference import encode_to_posterior_mean, img2img_noise_as_diffusers, save_diffusers_pipeline
from safetensors.torch import load_file, save_file
from test_controlnet_cli import _run

import ldmkit
from ldmkit import checkpoint
from ldmkit.config import TINY, TINY_SD2
from ldmkit.depth import depth_condition
from ldmkit.pipeline import GenerationError, GenerationParams, img2img

SIZE = (24, 16)
PROMPT, NEGATIVE, STEPS, CFG, SEED, STRENGTH = "a marble statue", "blurry", 10, 6.0, 11, 0.8
# 512-depth-ema: SD2 (OpenCLIP text, 64-wide heads: here 8-wide), eps-prediction, a 5-channel U-Net
TINY_DEPTH = TINY_SD2.replace(name="tiny-depth", prediction="eps",
                              unet=dataclasses.replace(TINY_SD2.unet, in_channels=5))


def _tiny_dpt(folder):
    """A random DPT depth estimator and its image processor, saved by transformers (a depth2img folder's
    depth_estimator/ and feature_extractor/)."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    torch.manual_seed(3)
    net = DPTForDepthEstimation(DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37, image_size=32, patch_size=8,
        backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
        reassemble_factors=[4, 2, 1, 0.5], is_hybrid=False, head_in_index=-1)).eval()
    proc = DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False)
    net.save_pretrained(folder / "depth_estimator")
    proc.save_pretrained(folder / "feature_extractor")
    return net, proc


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import diffusers

    folder = tmp_path_factory.mktemp("depth")
    pipe = save_diffusers_pipeline(TINY_DEPTH, folder / "sd")
    pipe.scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                                      beta_schedule="scaled_linear", timestep_spacing="linspace")
    net, proc = _tiny_dpt(folder / "sd")  # the folder now has depth_estimator/ as a depth2img folder does
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (SIZE[1], SIZE[0], 3), dtype=np.uint8))
    yy, xx = np.mgrid[0:20, 0:30]  # another size than the image: resized to the latent size
    depth = torch.from_numpy((np.sin(xx / 5.0) + yy / 10.0 + rng.random((20, 30)) * 0.3).astype(np.float32))[None]
    return folder, pipe, net, proc, init, depth


def _reference(setup, monkeypatch, depth_map, estimator=None):
    from diffusers import StableDiffusionDepth2ImgPipeline

    folder, pipe, net, proc, init, _ = setup
    comps = {k: v for k, v in pipe.components.items() if k in ("vae", "text_encoder", "tokenizer", "unet",
                                                                 "scheduler")}
    d2i = StableDiffusionDepth2ImgPipeline(**comps, depth_estimator=estimator, feature_extractor=proc)
    encode_to_posterior_mean(d2i, monkeypatch)
    img2img_noise_as_diffusers(monkeypatch)
    out = d2i(PROMPT, image=init, depth_map=depth_map, negative_prompt=NEGATIVE, strength=STRENGTH,
              num_inference_steps=STEPS, guidance_scale=CFG, generator=torch.Generator().manual_seed(SEED),
              output_type="np")
    return (out.images[0] * 255).round().astype(np.int16)


def _params(**kw):
    return GenerationParams(PROMPT, negative_prompt=NEGATIVE, steps=STEPS, cfg_scale=CFG, sampler="Euler",
                            scheduler="uniform", seed=SEED, width=SIZE[0], height=SIZE[1], strength=STRENGTH, **kw)


def test_depth_condition_as_diffusers(setup):
    """The fifth channel: bicubic to the latent size, then 2 (d - min) / (max - min) - 1 (closed form)."""
    depth = setup[-1]
    got = depth_condition(depth, (8, 12))
    d = torch.nn.functional.interpolate(depth[:, None], size=(8, 12), mode="bicubic", align_corners=False)
    assert torch.allclose(got, 2 * (d - d.min()) / (d.max() - d.min()) - 1)
    assert got.min() == -1 and got.max() == 1


def test_matches_diffusers_depth2img(setup, monkeypatch):
    folder, *_, depth = setup
    ref = _reference(setup, monkeypatch, depth)
    model = checkpoint.load(folder / "sd")
    assert model.cfg.unet.in_channels == 5
    ours = np.asarray(img2img(model, _params(depth_map=depth), setup[4])[0]).astype(np.int16)
    diff = np.abs(ours - ref).max()
    assert diff <= 2, f"max pixel difference {diff}/255"
    flat = np.asarray(img2img(model, _params(depth_map=depth.flip(-1)), setup[4])[0]).astype(np.int16)
    assert np.abs(flat - ref).max() > 6 and ref.std() > 5  # the depth map changed the image


def test_estimated_depth_matches_diffusers(setup, monkeypatch, capsys, tmp_path):
    """No depth map: the depth2img folder's own DPT (depth_estimator/, loaded by transformers from disk) estimates
    it, as diffusers' pipeline does with the same estimator; the CLI gives the same image."""
    folder, pipe, net, *_ = setup
    ref = _reference(setup, monkeypatch, None, estimator=net)
    setup[4].save(tmp_path / "init.png")
    out = tmp_path / "out.png"
    rc, cap = _run(capsys, "img2img", PROMPT, "--model", str(folder / "sd"), "--init-image", str(tmp_path / "init.png"),
                   "--negative-prompt", NEGATIVE, "--steps", str(STEPS), "--cfg-scale", str(CFG), "--sampler",
                   "Euler", "--scheduler", "uniform", "--seed", str(SEED), "--width", str(SIZE[0]), "--height",
                   str(SIZE[1]), "--strength", str(STRENGTH), "-o", str(out))
    assert rc == 0, cap.err
    assert "depth estimated from" in cap.err
    diff = np.abs(np.asarray(Image.open(out).convert("RGB")).astype(np.int16) - ref).max()
    assert diff <= 2, f"max pixel difference {diff}/255"


def test_cli_depth_map_equals_python_api(setup, capsys, tmp_path):
    folder, *_, init, depth = setup
    init.save(tmp_path / "init.png")
    d16 = (depth[0].numpy() / depth.max().item() * 65535).astype(np.uint16)
    Image.fromarray(d16).save(tmp_path / "depth.png")  # a 16-bit greyscale PNG, 30x20: resized
    out = tmp_path / "cli.png"
    rc, cap = _run(capsys, "img2img", PROMPT, "--model", str(folder / "sd"), "--init-image", str(tmp_path / "init.png"),
                   "--depth-map", str(tmp_path / "depth.png"), "--negative-prompt", NEGATIVE, "--steps", str(STEPS),
                   "--sampler", "Euler", "--scheduler", "uniform", "--seed", str(SEED), "--cfg-scale", str(CFG),
                   "--width", str(SIZE[0]), "--height", str(SIZE[1]), "--strength", str(STRENGTH), "-o", str(out))
    assert rc == 0, cap.err
    assert "depth map 30x20 differs from the output size 24x16: resized" in cap.err
    pipe = ldmkit.load(str(folder / "sd"))
    api = pipe.img2img(PROMPT, init, depth_map=Image.open(tmp_path / "depth.png"), negative_prompt=NEGATIVE,
                       steps=STEPS, sampler="Euler", scheduler="uniform", seed=SEED, cfg_scale=CFG, width=SIZE[0],
                       height=SIZE[1], strength=STRENGTH)[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(api.convert("RGB")))


def test_single_file_with_midas_weights_is_detected(setup, tmp_path):
    """The released 512-depth-ema.ckpt keeps its MiDaS estimator under depth_model.*: the file loads as an SD2
    depth model (5-channel U-Net), the estimator's weights skipped."""
    folder = setup[0]
    checkpoint.save_single_file(checkpoint.load(folder / "sd"), tmp_path / "a.safetensors", text_layout="openclip")
    sd = load_file(tmp_path / "a.safetensors")
    sd["depth_model.model.pretrained.model.cls_token"] = torch.zeros(1, 1, 8)
    from ldmkit import convert

    found = convert.detect_family(sd)  # as a file without ldmkit's metadata is read (full-size head widths)
    assert found["family"] == "sd2" and found["unet"].in_channels == 5
    unet, _vae, _text, _layout = convert.split_ldm_checkpoint(sd)  # depth_model.* skipped, not refused
    assert unet["input_blocks.0.0.weight"].shape[1] == 5
    metadata = checkpoint.read_safetensors(tmp_path / "a.safetensors")[1]
    save_file(sd, tmp_path / "512-depth-ema.safetensors", metadata=metadata)
    model = checkpoint.load(tmp_path / "512-depth-ema.safetensors")  # ldmkit's metadata: the tiny config
    assert model.cfg.unet.in_channels == 5 and not model.cfg.is_inpainting


def test_depth_model_without_a_map_is_one_line(setup, capsys, tmp_path):
    folder, *_, init, _ = setup
    init.save(tmp_path / "init.png")
    checkpoint.save_single_file(checkpoint.load(folder / "sd"), tmp_path / "depth.safetensors")  # no estimator
    rc, cap = _run(capsys, "img2img", "x", "--model", str(tmp_path / "depth.safetensors"), "--init-image",
                   str(tmp_path / "init.png"), "--steps", "2")
    assert rc == 2 and "Traceback" not in cap.err
    assert "is a depth model: give --depth-map" in cap.err.strip().splitlines()[-1]
    with pytest.raises(GenerationError, match="is a depth model"):
        img2img(checkpoint.load(folder / "sd"), _params(), init)


def test_depth_map_on_other_model_is_one_line(tmp_path, capsys):
    save_diffusers_pipeline(TINY, tmp_path / "sd")
    Image.new("RGB", SIZE).save(tmp_path / "init.png")
    Image.new("L", SIZE).save(tmp_path / "depth.png")
    rc, cap = _run(capsys, "img2img", "x", "--model", str(tmp_path / "sd"), "--init-image",
                   str(tmp_path / "init.png"), "--depth-map", str(tmp_path / "depth.png"), "--steps", "2")
    assert rc == 2 and "Traceback" not in cap.err
    assert "is not a depth model" in cap.err.strip().splitlines()[-1]


@pytest.mark.parametrize("case", ["not-a-folder", "no-transformers"])
def test_depth_model_folder_errors_are_one_line(setup, capsys, tmp_path, monkeypatch, case):
    folder, *_, init, _ = setup
    init.save(tmp_path / "init.png")
    dpt = tmp_path / "nothing" if case == "not-a-folder" else folder / "sd" / "depth_estimator"
    if case == "no-transformers":
        monkeypatch.setitem(sys.modules, "transformers", None)  # import fails as if not installed
    rc, cap = _run(capsys, "img2img", "x", "--model", str(folder / "sd"), "--init-image", str(tmp_path / "init.png"),
                   "--depth-model", str(dpt), "--steps", "2", "--width", str(SIZE[0]), "--height", str(SIZE[1]))
    assert rc == 2 and "Traceback" not in cap.err
    line = cap.err.strip().splitlines()[-1]
    assert ("not a local DPT model folder" if case == "not-a-folder" else "needs the transformers package") in line
