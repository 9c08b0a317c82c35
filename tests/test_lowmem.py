"""Low-memory mode (fp16-stored weights, fp32 compute, networks paged out when idle) and tiled VAE decoding.

The reference for low-memory mode is the ordinary fp32 path run on the same weights rounded to
fp16 (an fp16 file loaded normally): the two compute the same float32 arithmetic, so they agree to
float rounding. Tiled decoding is checked against diffusers' untiled ``AutoencoderKL.decode``.
"""

from __future__ import annotations

import copy
import gc
import os

import pytest
import torch
from reference import diffusers_vae, rel_err

from ldmkit import api, checkpoint, cli, convert
from ldmkit import pipeline as P
from ldmkit.config import TINY
from ldmkit.lora import inject_lora, save_lora
from ldmkit.model import StableDiffusion
from ldmkit.pages import file_backed_ranges, is_file_backed
from ldmkit.vae_tiling import tiled_decode

pytestmark = pytest.mark.usefixtures("one_thread")
PARAMS = P.GenerationParams("a red apple", negative_prompt="blurry", steps=3, cfg_scale=5.0, sampler="Euler a",
                            seed=7, width=32, height=24)


def _random_model(seed: int = 0) -> StableDiffusion:
    torch.manual_seed(seed)
    model = StableDiffusion(TINY).eval()
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "norm" in name:  # fresh norms are exactly 1/0: randomise them so a skipped upcast can't hide
            p.data.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lowmem")
    model = _random_model()
    checkpoint.save_single_file(model, d / "fp16.safetensors", dtype=torch.float16)
    checkpoint.save_single_file(model, d / "fp32.safetensors")
    vae = _random_model(seed=3).vae
    checkpoint.atomic_save_safetensors({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()},
                                       d / "vae.safetensors")
    return d


def _latents(model: StableDiffusion, params: P.GenerationParams = PARAMS) -> torch.Tensor:
    """txt2img up to the final latent (the generation core: prepare and sample)."""
    return P.txt2img_latents(model, params)[1]


def _decoded(model: StableDiffusion, latents: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.vae.decode(latents / model.cfg.vae.scale_factor)


def _resident(t: torch.Tensor) -> int:
    """How many of ``t``'s pages are mapped into this process now (/proc/self/pagemap, bit 63 = present)."""
    page = os.sysconf("SC_PAGE_SIZE")
    first, last = t.data_ptr() // page, (t.data_ptr() + t.numel() * t.element_size() - 1) // page
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        data = f.read((last - first + 1) * 8)
    return sum(int.from_bytes(data[i:i + 8], "little") >> 63 for i in range(0, len(data), 8))


@pytest.mark.parametrize("source", ["fp16", "fp32"])
def test_low_memory_equals_fp32_compute_of_fp16_weights(files, source):
    low = api.load(files / f"{source}.safetensors", low_memory=True).model
    ref = api.load(files / "fp16.safetensors").model  # fp16 weights, loaded as fp32: the rounding alone
    assert low.dtype == torch.float32 and low.unet.input_blocks[0][0].weight.dtype == torch.float16
    assert all(p.dtype == torch.float16 for p in low.parameters())
    assert all(p.dtype == torch.float32 for p in ref.parameters())
    z_low, z_ref = _latents(low), _latents(ref)
    assert rel_err(z_low, z_ref) <= 1e-5
    assert rel_err(_decoded(low, z_low), _decoded(ref, z_ref)) <= 1e-5
    a, b = api.Pipeline(low).txt2img(**_kw()), api.Pipeline(ref).txt2img(**_kw())
    assert _max_pixel_diff(a[0], b[0]) <= 1


def _kw() -> dict:
    return {k: getattr(PARAMS, k) for k in ("prompt", "negative_prompt", "steps", "cfg_scale", "sampler", "seed",
                                             "width", "height")}


def _max_pixel_diff(a, b) -> int:
    import numpy as np

    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def test_fp16_file_is_mapped_not_copied(files):
    low = api.load(files / "fp16.safetensors", low_memory=True).model
    ranges = file_backed_ranges()
    assert ranges, "needs Linux /proc/self/maps"
    # every weight of an fp16 safetensors file is a view of the mapped file
    assert all(is_file_backed(p, ranges) for p in low.unet.parameters())
    assert all(is_file_backed(p, ranges) for p in low.vae.parameters())


def test_fp32_file_converted_once_and_text_encoder_pageable(files):
    low = api.load(files / "fp32.safetensors", low_memory=True).model
    ranges = file_backed_ranges()
    assert not any(is_file_backed(p, ranges) for p in low.unet.parameters())  # converted copies
    # the converted text encoder was moved into a temporary file's mapping, so it can be paged out
    assert all(is_file_backed(p, ranges) for p in low.text_encoder.parameters())


@pytest.mark.parametrize("source", ["fp16", "fp32"])
def test_text_encoder_released_after_encoding(files, source):
    # MADV_PAGEOUT skips a page another live mapping of the same file also holds (an earlier test's model the
    # garbage collector has not reached yet): drop those first, and allow what was resident before this test touched it
    gc.collect()
    low = api.load(files / f"{source}.safetensors", low_memory=True).model
    table = low.text_encoder.text_model.embeddings.token_embedding.weight  # (vocab, 32) fp16: ~3 MB
    pages = _resident(table)
    float(table.float().sum())  # touch every page, as a forward over many tokens would
    total = table.numel() * 2 // os.sysconf("SC_PAGE_SIZE")
    assert pages < total // 4  # else the check below could not fail
    assert _resident(table) >= 0.9 * total
    P.encode_prompt(low, ["a red apple"], [""])
    left = _resident(table)
    assert left <= max(2, pages), f"{left} of {total} pages still resident (was {pages} before touching)"
    # paged out, not lost: it encodes the same afterwards
    ref = api.load(files / "fp16.safetensors").model
    c1, _ = P.encode_prompt(low, ["a red apple"], [""])
    c2, _ = P.encode_prompt(ref, ["a red apple"], [""])
    assert rel_err(c1, c2) <= 1e-5


def test_with_a_standalone_kl_vae(files):
    low = api.load(files / "fp16.safetensors", vae=files / "vae.safetensors", low_memory=True).model
    ref = api.load(files / "fp16.safetensors", vae=files / "vae.safetensors").model
    assert all(p.dtype == torch.float16 for p in low.vae.parameters())
    # the reference VAE with its weights rounded to fp16, computed in fp32
    ref.vae.load_state_dict({k: v.half().float() for k, v in ref.vae.state_dict().items()})
    z = torch.randn(1, 4, 12, 16, generator=torch.Generator().manual_seed(0))
    assert rel_err(_decoded(low, z), _decoded(ref, z)) <= 1e-5


def test_lora_merged_in_fp32_then_stored_fp16(files, tmp_path):
    base = _random_model()
    injected = inject_lora(copy.deepcopy(base), rank=4, alpha=2.0)
    g = torch.Generator().manual_seed(1)
    for m in injected.values():
        m.lora_up.weight.data.normal_(0, 0.1, generator=g)
    save_lora(injected, tmp_path / "style.safetensors")
    lora = [(str(tmp_path / "style.safetensors"), 0.8)]
    low = api.load(files / "fp16.safetensors", low_memory=True, loras=lora).model
    ref = api.load(files / "fp16.safetensors", loras=lora).model  # fp32 merge of the same fp16 weights
    changed = 0
    for (name, p), q in zip(low.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q.half()), name  # exactly: the fp32 merge rounded once
        changed += not torch.equal(p, base.state_dict()[name].half())
    assert changed > 10
    assert rel_err(_latents(low), _latents(ref)) <= 1e-3  # ref keeps the merged weights unrounded


def test_works_after_inference_mode_then_no_grad(files):
    low = api.load(files / "fp16.safetensors", low_memory=True, vae_tiling=True).model
    ref = api.load(files / "fp16.safetensors").model
    _latents(low)  # runs under torch.inference_mode
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, TINY.unet.context_dim, generator=g)
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        a, b = low.unet(x, t, ctx), ref.unet(x, t, ctx)
    assert rel_err(a, b) <= 1e-5
    z = torch.randn(1, 4, 12, 16, generator=g)
    with torch.no_grad():
        assert rel_err(tiled_decode(low.vae, z, tile=8), ref.vae.decode(z)) <= 1e-5


def test_tiled_decode_equals_diffusers_untiled():
    """Bound 1e-5 (observed ~1e-6): each tile computes exactly the untiled decoder's numbers (whole-image
    GroupNorm statistics, a one-pixel halo for every 3x3 conv); only float summation order differs."""
    theirs = diffusers_vae(TINY)
    ours = StableDiffusion(TINY).vae.eval()
    ours.load_state_dict(convert.vae_diffusers_to_ldm(theirs.state_dict(), TINY.vae))
    # latent 20x28 with 8-pixel tiles: 3x4 tiles at latent size, 5x7 at the decoder's 2x output
    z = torch.randn(2, 4, 20, 28, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = theirs.decode(z).sample
        got = tiled_decode(ours, z, tile=8)
        whole = ours.decode(z)
    assert got.shape == want.shape == (2, 3, 40, 56)
    assert rel_err(got, want) <= 1e-5
    assert rel_err(got, whole) <= 1e-5
    # odd sizes and tiles larger than the image
    z = z[..., :13, :7]
    with torch.inference_mode():
        assert rel_err(tiled_decode(ours, z, tile=5), ours.decode(z)) <= 1e-5
        assert rel_err(tiled_decode(ours, z, tile=512), ours.decode(z)) <= 1e-5


def test_cli_low_memory_and_vae_tiling(files, tmp_path):
    out = tmp_path / "a.png"
    argv = ["generate", "a red apple", "--model", str(files / "fp16.safetensors"), "--steps", "2", "--seed", "3",
            "--width", "32", "--height", "24", "-o", str(out)]
    assert cli.main([*argv, "--low-memory", "--vae-tiling"]) == 0
    ref = tmp_path / "b.png"
    assert cli.main([*argv[:-1], str(ref)]) == 0
    from PIL import Image

    assert _max_pixel_diff(Image.open(out), Image.open(ref)) <= 1


def test_low_memory_refuses_a_gpu_device(files):
    with pytest.raises(ValueError, match="low-memory mode .* CPU"):
        api.load(files / "fp16.safetensors", low_memory=True, device="cuda")


def test_serve_low_memory(files):
    """``ldmkit serve --low-memory``: the A1111 txt2img endpoint gives the low-memory pipeline's image."""
    pytest.importorskip("fastapi")
    import base64
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from ldmkit.server.app import create_app

    app = create_app(files / "fp16.safetensors", low_memory=True, vae_tiling=True)
    served = app.state.worker.model
    assert served.compute_dtype == torch.float32 and served.vae_tiling
    assert all(p.dtype == torch.float16 for p in served.parameters())
    try:
        c = TestClient(app)
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "a red apple", "steps": 2, "seed": 5, "width": 32,
                                              "height": 24, "sampler_name": "Euler a", "cfg_scale": 5})
        assert r.status_code == 200, r.text
        got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    finally:
        app.state.worker.stop()
    ref = api.load(files / "fp16.safetensors").model
    want = P.txt2img(ref, P.GenerationParams("a red apple", steps=2, seed=5, width=32, height=24,
                                             sampler="Euler a", cfg_scale=5))[0]
    assert _max_pixel_diff(got, want) <= 1
