"""The tiny autoencoder (TAESD) against diffusers' ``AutoencoderTiny``, in both file layouts, as the
decoder of a txt2img pipeline, and its distillation trainer (exact resume, export, ``--vae``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import rel_err, save_diffusers_pipeline
from safetensors.torch import save_file
from shapes import write_shapes

from ldmkit import cli
from ldmkit.checkpoint import CheckpointError, load, save_single_file
from ldmkit.config import TINY
from ldmkit.model import StableDiffusion
from ldmkit.models import taesd
from ldmkit.pipeline import GenerationParams, img2img, txt2img

pytestmark = pytest.mark.usefixtures("one_thread")

# TINY's VAE downscales 2x: a two-level TAESD fits it
TWO_LEVELS = dict(encoder_block_out_channels=(16, 16), num_encoder_blocks=(1, 2), decoder_block_out_channels=(16, 16),
                  num_decoder_blocks=(2, 1))


def reference_taesd(seed: int = 0, **kw):
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    ae = AutoencoderTiny(**kw).eval()
    with torch.no_grad():  # default init gives near-constant images; spread the weights out a little
        for p in ae.parameters():
            p.mul_(1.5)
    return ae


def write_original_files(ref, folder: Path, ext: str = ".pth") -> Path:
    """``taesd_encoder`` / ``taesd_decoder`` as madebyollin/taesd publishes them: the state dicts of the
    encoder and decoder ``nn.Sequential``s, whose decoder starts with the parameter-free Clamp at index 0
    (diffusers' ``decoder.layers.N`` is index N + 1 there)."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = ref.state_dict()
    enc = {k.removeprefix("encoder.layers."): v for k, v in sd.items() if k.startswith("encoder.layers.")}
    dec = {}
    for k, v in sd.items():
        if k.startswith("decoder.layers."):
            idx, rest = k.removeprefix("decoder.layers.").split(".", 1)
            dec[f"{int(idx) + 1}.{rest}"] = v
    assert len(enc) + len(dec) == len(sd)
    for name, part in (("taesd_encoder", enc), ("taesd_decoder", dec)):
        if ext == ".pth":
            torch.save(part, folder / f"{name}{ext}")
        else:
            save_file({k: v.contiguous() for k, v in part.items()}, folder / f"{name}{ext}")
    return folder


@pytest.fixture(scope="module")
def sd_ref(tmp_path_factory):
    """A random SD-sized (4 levels, width 64, 4 latent channels) AutoencoderTiny saved by diffusers."""
    ref = reference_taesd()
    folder = tmp_path_factory.mktemp("taesd")
    ref.save_pretrained(folder / "diffusers")
    write_original_files(ref, folder / "original")
    return ref, folder


def _check_parity(ours: taesd.TinyAutoencoder, ref, size: int = 64) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, size, size, generator=g) * 2 - 1
    f = 2 ** (len(ref.config.encoder_block_out_channels) - 1)
    z = torch.randn(2, ref.config.latent_channels, size // f, size // f, generator=g)
    with torch.no_grad():
        assert rel_err(ours.encode(x), ref.encode(x).latents) <= 1e-4
        want = ref.decode(z).sample
        assert rel_err(ours.decode(z), want) <= 1e-4
    assert want.std() > 0.05  # not a flat image


@pytest.mark.parametrize("layout", ["diffusers", "original folder", "original decoder file", "ldmkit file"])
def test_encode_decode_match_diffusers(sd_ref, layout, tmp_path):
    ref, folder = sd_ref
    path = {"diffusers": folder / "diffusers", "original folder": folder / "original",
            "original decoder file": folder / "original" / "taesd_decoder.pth"}.get(layout)
    if layout == "ldmkit file":
        path = taesd.save_taesd(taesd.load_taesd(folder / "diffusers"), tmp_path / "taesd.safetensors")
    assert taesd.is_taesd(path)
    ours = taesd.load_taesd(path)
    assert ours.cfg == taesd.TAESDConfig()  # read from config.json, or from the keys and shapes
    assert 1.1e6 < sum(p.numel() for p in ours.decoder.parameters()) < 1.3e6
    _check_parity(ours, ref)


def test_layouts_of_other_shapes_and_halves(tmp_path):
    """Config read from keys (2 levels, 16 channels, 8 latent channels); one half alone; safetensors halves."""
    kw = dict(TWO_LEVELS, latent_channels=8)
    ref = reference_taesd(3, **kw)
    write_original_files(ref, tmp_path / "o", ".safetensors")
    ae = taesd.load_taesd(tmp_path / "o")
    assert (ae.cfg.latent_channels, ae.cfg.encoder_widths, ae.cfg.encoder_blocks, ae.cfg.decoder_blocks) == (
        8, (16, 16), (1, 2), (2, 1))
    _check_parity(ae, ref, 16)
    (tmp_path / "o" / "taesd_encoder.safetensors").unlink()
    dec = taesd.load_taesd(tmp_path / "o" / "taesd_decoder.safetensors")
    assert dec.cfg.has_decoder and not dec.cfg.has_encoder
    with pytest.raises(ValueError, match="no encoder"):
        dec.encode(torch.zeros(1, 3, 16, 16))
    # ComfyUI's combined layout: taesd_encoder.N / taesd_decoder.N
    sd = {f"taesd_{k}": v for k, v in ae.state_dict().items()}
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "comfy.safetensors")
    assert taesd.load_taesd(tmp_path / "comfy.safetensors").cfg == ae.cfg


def test_strict_loading_names_the_problem(sd_ref, tmp_path):
    ref, folder = sd_ref
    sd = torch.load(folder / "original" / "taesd_decoder.pth", weights_only=True)
    sd.pop("4.conv.2.bias")
    torch.save(sd, tmp_path / "taesd_decoder.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \(e\.g\. decoder\.4\.conv\.2\.bias\)"):
        taesd.load_taesd(tmp_path / "taesd_decoder.pth")
    save_file({"decoder.up.0.block.0.conv1.weight": torch.zeros(1)}, tmp_path / "kl.safetensors")
    assert not taesd.is_taesd(tmp_path / "kl.safetensors")  # a KL VAE's keys


# ---------------------------------------------------------------- in the pipeline


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    """A random tiny StableDiffusionPipeline with a two-level AutoencoderTiny as its VAE, saved by diffusers."""
    folder = tmp_path_factory.mktemp("pipe")
    pipe = save_diffusers_pipeline(TINY, folder / "model")
    tiny = reference_taesd(5, **TWO_LEVELS)
    tiny.save_pretrained(folder / "taesd")
    pipe.vae = tiny
    return folder, pipe


def test_txt2img_with_tiny_decoder_matches_diffusers(tiny_pipeline):
    from diffusers import EulerDiscreteScheduler

    folder, pipe = tiny_pipeline
    pipe.scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            timestep_spacing="linspace")
    size, seed, prompt = (24, 16), 7, "a red apple on a wooden table"
    out = pipe(prompt, negative_prompt="blurry", num_inference_steps=8, guidance_scale=7.0, height=size[1],
               width=size[0], generator=torch.Generator().manual_seed(seed), output_type="np")
    ref = (out.images[0] * 255).round().astype(np.int16)
    model = load(folder / "model", vae=folder / "taesd")
    assert isinstance(model.vae, taesd.TinyAutoencoder)
    [ours] = txt2img(model, GenerationParams(prompt, negative_prompt="blurry", steps=8, cfg_scale=7.0,
                                             sampler="Euler", scheduler="uniform", seed=seed, width=size[0],
                                             height=size[1]))
    diff = np.abs(np.asarray(ours).astype(np.int16) - ref).max()
    assert diff <= 2, f"max pixel difference {diff}/255"
    assert ref.std() > 5


def test_img2img_with_tiny_autoencoder_matches_diffusers(tiny_pipeline):
    """diffusers' img2img with AutoencoderTiny: init latent = encoder(image) * scaling_factor (1.0), no
    posterior sample, so the generator's first draw is the noise, as ldmkit's seed gives it."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline
    from PIL import Image

    from ldmkit.pipeline import encode_pixels

    folder, pipe = tiny_pipeline
    i2i = StableDiffusionImg2ImgPipeline(**pipe.components)
    i2i.scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           timestep_spacing="linspace")
    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 24, 3), dtype=np.uint8))
    steps, strength, seed = 10, 0.6, 3
    ref = i2i("a pear", image=init, strength=strength, num_inference_steps=steps, guidance_scale=5.0,
              generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
    ref = (ref * 255).round().astype(np.int16)
    model = load(folder / "model", vae=folder / "taesd")
    x = torch.from_numpy(np.asarray(init, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        assert rel_err(encode_pixels(model, x), pipe.vae.encode(x).latents) <= 1e-4
    ours = img2img(model, GenerationParams("a pear", steps=steps, cfg_scale=5.0, sampler="Euler", scheduler="uniform",
                                           seed=seed, width=24, height=16, strength=strength), init)[0]
    diff = np.abs(np.asarray(ours).astype(np.int16) - ref).max()
    assert diff <= 2, f"max pixel difference {diff}/255"


def test_wrong_latent_channels_is_one_line_error(tiny_pipeline, tmp_path, capsys):
    folder, _ = tiny_pipeline
    reference_taesd(1, **TWO_LEVELS, latent_channels=16).save_pretrained(tmp_path / "taef1")
    rc = cli.main(["generate", "x", "--model", str(folder / "model"), "--vae", str(tmp_path / "taef1"),
                   "--steps", "1", "-o", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("ldmkit: error: --vae") and "16 latent channels" in err[-1] and "uses 4" in err[-1]
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------- distillation


SIZE = 16


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A random TINY model file (the teacher's KL VAE) and a shapes dataset."""
    root = tmp_path_factory.mktemp("distil")
    torch.manual_seed(0)
    model = StableDiffusion(TINY)
    save_single_file(model, root / "tiny.safetensors")
    (root / "data").mkdir()
    data = write_shapes(root / "data", 12, SIZE, transparent=True)
    return root / "tiny.safetensors", data


def taesd_cfg(teacher, **kw):
    from ldmkit.train import defaults

    model, data = teacher
    base = dict(init_from=str(model), data=str(data), size=SIZE, batch_size=3, total_steps=5, warmup_steps=1,
                lr=1e-3, log_every=1, sample_every=0, checkpoint_every=2, device="cpu", taesd_width=8,
                ema_decay=0.9, holdout=2)
    return defaults("taesd").replace(**{**base, **kw})


@pytest.mark.parametrize("cached", [True, False], ids=["teacher-cache", "teacher-each-step"])
def test_resumed_taesd_run_matches_uninterrupted(teacher, tmp_path, cached, monkeypatch):
    from train_runs import assert_same_weights, crash_and_resume

    from ldmkit.train import taesd as T

    if not cached:
        monkeypatch.setattr(T, "CACHE_BYTES", 0)
    ca, cb, a = crash_and_resume(taesd_cfg(teacher), tmp_path / "a", tmp_path / "b", 4, 2)
    assert len(set(a.values())) == 5 and list(a) == [1, 2, 3, 4, 5]
    assert_same_weights(ca, cb, ema=False)
    assert not any(k.startswith("teacher") for k in ca["net"])  # the frozen teacher is not saved


def test_a_wider_resume_is_refused(teacher, tmp_path):
    from ldmkit.train import TrainError, train

    train(taesd_cfg(teacher, total_steps=2), tmp_path / "r")
    with pytest.raises(TrainError, match="another tiny autoencoder"):
        train(taesd_cfg(teacher, total_steps=4, taesd_width=16), tmp_path / "r", resume=True)


@pytest.mark.parametrize("parts", ["encoder,decoder", "decoder"])
def test_train_export_and_use_as_vae(teacher, tmp_path, parts):
    from ldmkit.train import export_run
    from ldmkit.train.runner import read_checkpoint

    model_path, data = teacher
    run = tmp_path / "run"
    rc = cli.main(["train", "taesd", "--model", str(model_path), "--data", str(data), "--out", str(run),
                   "--size", str(SIZE), "--batch-size", "4", "--total-steps", "30", "--lr", "3e-3",
                   "--warmup-steps", "1", "--width", "8", "--taesd-parts", parts, "--sample-every", "30",
                   "--checkpoint-every", "30", "--holdout", "2", "--device", "cpu"])
    assert rc == 0
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "psnr_vs_kl" in r]
    assert evals and evals[-1]["step"] == 30
    assert ("latent_mse" in evals[-1]) == (parts == "encoder,decoder")
    first, last = records[0], [r for r in records if "pixel_mse" in r][-1]
    assert last["pixel_mse"] < first["pixel_mse"]  # the decoder approaches the teacher's decodes

    out = export_run(run, tmp_path / "tiny.safetensors", half=True)
    ae = taesd.load_taesd(out)
    assert ae.cfg.decoder_widths == (8, 8) and ae.cfg.has_encoder == (parts != "decoder")
    ema = read_checkpoint(run)["ema"]["shadow"]
    for k, v in ae.state_dict().items():
        assert torch.equal(v, ema["ae." + k].half().float()), k

    png = tmp_path / "x.png"
    rc = cli.main(["generate", "a red circle", "--model", str(model_path), "--vae", str(out), "--steps", "2",
                   "--width", str(SIZE), "--height", str(SIZE), "--seed", "1", "-o", str(png)])
    assert rc == 0 and png.exists()
    model = load(model_path, vae=out)
    [img] = txt2img(model, GenerationParams("a red circle", steps=2, seed=1, width=SIZE, height=SIZE))
    assert isinstance(model.vae, (taesd.TinyAutoencoder, taesd.DecoderOnly))
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(img))


# ---------------------------------------------------------------- the shipped emoji tiny decoder


def test_builtin_emoji_taesd_decodes_like_the_full_decoder():
    """``--vae emoji-taesd``: the shipped decoder-only TAESD of the built-in model stays close to its KL
    decoder on latents the model generates. bench/eval_taesd.py measured 25.5 dB on the 128 held-out
    images' latents (the issue's target, 25) and 24.6 dB on 32 generated ones; these four 8-step
    generations measure 23.1 dB, so the guard here is 22 dB."""
    from ldmkit import api
    from ldmkit.train.losses import psnr

    if api.builtin_vae_path("emoji-taesd") is None or api.builtin_model_path("emoji") is None:
        pytest.skip("the built-in emoji model or its tiny decoder is not installed")
    kl = api.load("emoji", device="cpu").model
    tiny = api.load("emoji", vae="emoji-taesd", device="cpu").model
    assert isinstance(tiny.vae, taesd.DecoderOnly) and tiny.vae.tiny.cfg.decoder_widths == (32,) * 4
    last: list[torch.Tensor] = []
    for i, prompt in enumerate(["a red apple", "grinning face", "thumbs up", "a green heart"]):
        seen: list[torch.Tensor] = []
        txt2img(kl, GenerationParams(prompt, steps=8, seed=i, width=64, height=64),
                callback=lambda d, seen=seen: seen.append(d["denoised"]))
        last.append(seen[-1])  # the final denoised estimate: the latent that gets decoded
    latents = torch.cat(last)
    with torch.no_grad():
        want = kl.vae.decode(latents / kl.cfg.vae.scale_factor).clamp(-1, 1)
        got = tiny.vae.decode(latents).clamp(-1, 1)
    assert float(psnr(got, want).mean()) >= 22.0
