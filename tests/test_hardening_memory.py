"""Hardening item 1 (issue 15): large images in bounded memory.

A 2048x2048 txt2img drove the process past 23 GiB in the VAE decode: the autoencoder's mid-block
attention over all (H/8)*(W/8) latent pixels fell back to PyTorch's math path (its q, k, v were
transposed views), which materialises the whole N x N score matrix (64k tokens: 16 GiB). These tests
pin the pieces of the fix: memory-efficient attention, automatic tiling above a size, a tiled encoder
equal to the untiled one (itself checked against diffusers), and a request that cannot fit refused
before any work.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from reference import diffusers_vae, rel_err

from ldmkit import convert, memory
from ldmkit.config import TINY
from ldmkit.model import StableDiffusion
from ldmkit.vae_tiling import decode, encode, should_tile, tiled_encode

pytestmark = pytest.mark.usefixtures("one_thread")


def _child_peak_growth(code: str) -> float:
    """Run ``code`` in a fresh interpreter; return its peak RSS growth (bytes) over the set-up part."""
    script = textwrap.dedent("""
        import resource, torch
        torch.set_num_threads(1)
        {setup}
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with torch.inference_mode():
            {run}
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    """)
    setup, run = code.split("\n---\n")
    out = subprocess.run([sys.executable, "-c", script.format(setup=setup.strip(), run=run.strip())],
                         capture_output=True, text=True, check=True, timeout=300)
    return int(out.stdout.split()[-1]) * 1024  # ru_maxrss is in KiB on Linux


def test_vae_attention_memory_is_linear_in_tokens():
    """The mid-block attention over 128x128 latent pixels (a 1024^2 image): a materialised score matrix
    is 16384^2 x 4 bytes = 1 GiB; memory-efficient attention needs a few MB beyond its inputs."""
    grown = _child_peak_growth("""
from ldmkit.models.vae import AttnBlock
block = AttnBlock(128, 8).eval()
x = torch.randn(1, 128, 128, 128)
---
block(x)
""")
    assert grown < 400 * 2**20, f"attention grew the process by {grown / 2**20:.0f} MiB"


def test_vae_attention_equals_reference():
    """The contiguous-layout attention computes what diffusers' VAE attention computes."""
    theirs = diffusers_vae(TINY)
    ours = StableDiffusion(TINY).vae.eval()
    ours.load_state_dict(convert.vae_diffusers_to_ldm(theirs.state_dict(), TINY.vae))
    z = torch.randn(1, 4, 12, 10, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert rel_err(ours.decode(z), theirs.decode(z).sample) <= 1e-5


def _tiny_vae() -> torch.nn.Module:
    torch.manual_seed(0)
    vae = StableDiffusion(TINY).vae.eval()
    g = torch.Generator().manual_seed(1)
    for name, p in vae.named_parameters():
        if "norm" in name:
            p.data.add_(0.1 * torch.randn(p.shape, generator=g))
    return vae


def test_tiled_encode_equals_untiled():
    """Whole-image GroupNorm statistics and conv halos (the stride-2 downsampling conv's too, with LDM's
    right/bottom-only padding): the tiled encoder computes the untiled encoder's numbers."""
    vae = _tiny_vae()
    x = torch.randn(2, 3, 40, 56, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = vae.encode(x)
        for tile in (8, 5, 512):
            got = tiled_encode(vae, x, tile=tile)
            assert got[0].shape == want[0].shape
            assert rel_err(got[0], want[0]) <= 1e-5 and rel_err(got[1], want[1]) <= 1e-5
        # odd sizes: 13x7 pixels
        assert rel_err(tiled_encode(vae, x[..., :26, :14], tile=6)[0], vae.encode(x[..., :26, :14])[0]) <= 1e-5


def test_decode_and_encode_tile_automatically_above_the_threshold(monkeypatch):
    vae = _tiny_vae()
    # TINY's decoder has 32 channels at full resolution: 32 x 4 bytes per pixel
    assert not should_tile(vae, 64, 64)
    assert should_tile(vae, 2048, 2048)
    calls = []
    import ldmkit.vae_tiling as T

    monkeypatch.setattr(T, "AUTO_TILE_BYTES", 1)  # everything counts as large
    real_dec, real_enc = T.tiled_decode, T.tiled_encode
    monkeypatch.setattr(T, "tiled_decode", lambda *a, **k: calls.append("dec") or real_dec(*a, **k))
    monkeypatch.setattr(T, "tiled_encode", lambda *a, **k: calls.append("enc") or real_enc(*a, **k))
    z = torch.randn(1, 4, 6, 6)
    x = torch.randn(1, 3, 24, 24)
    with torch.inference_mode():
        assert rel_err(decode(vae, z), vae.decode(z)) <= 1e-5
        assert rel_err(encode(vae, x)[0], vae.encode(x)[0]) <= 1e-5
    assert calls == ["dec", "enc"]


@pytest.mark.slow
def test_emoji_2048_decode_peak_rss_under_4_gib():
    """The issue's case: the built-in model's 2048^2 decode through the pipeline (tiled automatically) stays
    under 4 GiB of peak RSS (it went past 23 GiB). About two minutes on one core."""
    grown = _child_peak_growth("""
from ldmkit import api
from ldmkit import pipeline as P
model = api.load("emoji").model
z = torch.randn(1, 4, 256, 256)
---
P.decode_latents(model, z)
""")
    assert grown < 3.5 * 2**30, f"decode grew the process by {grown / 2**30:.2f} GiB"


def test_generation_memory_estimate_and_refusal():
    """The estimate grows with the pixel count; a budget it exceeds is refused with a message naming the size."""
    model = StableDiffusion(TINY)
    small = memory.estimate_generation_bytes(model, 64, 64, 1)
    big = memory.estimate_generation_bytes(model, 2048, 2048, 1)
    assert 0 < small < big
    memory.check_fits(model, 64, 64, 1, budget=big)
    with pytest.raises(memory.TooLarge, match=r"2048x2048.*GiB"):
        memory.check_fits(model, 2048, 2048, 1, budget=small)
    assert memory.available_bytes() > 0


def test_server_refuses_a_request_that_cannot_fit_before_any_work(monkeypatch, tmp_path):
    """With a memory budget the 2048^2 request exceeds: a 422 naming the size, and the pipeline never runs."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from ldmkit import pipeline as P
    from ldmkit.server.app import Limits, create_app

    torch.manual_seed(0)
    model = StableDiffusion(TINY).eval()
    ran = []
    monkeypatch.setattr(P, "txt2img", lambda *a, **k: ran.append(1))
    small = memory.estimate_generation_bytes(model, 256, 256, 1)
    c = TestClient(create_app(model, limits=Limits(max_memory_bytes=small)))
    r = c.post("/sdapi/v1/txt2img", json={"width": 2048, "height": 2048, "steps": 1})
    assert r.status_code == 422, r.text
    msg = r.json()["detail"][0]["msg"]
    assert "2048x2048" in msg and "GiB" in msg and "smaller size" in msg
    assert ran == []


def test_cli_refuses_a_size_that_cannot_fit(monkeypatch, tmp_path, capsys):
    """The same limit on the command line: exit 2 with the estimate, before the model runs."""
    from ldmkit import checkpoint, cli

    torch.manual_seed(0)
    path = tmp_path / "tiny.safetensors"
    checkpoint.save_single_file(StableDiffusion(TINY), path)
    monkeypatch.setattr(memory, "available_bytes", lambda: 64 << 20)  # a machine with 64 MiB free
    out = tmp_path / "o.png"
    rc = cli.main(["generate", "x", "--model", str(path), "--steps", "1", "--width", "2048", "--height", "2048",
                   "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "2048x2048 needs about" in err and "GiB" in err and not out.exists(), err


def test_decode_tiles_when_memory_is_short(monkeypatch):
    """Below the size threshold, an image whose untiled decode would take over half the available memory is
    still decoded in tiles (same numbers), so the estimate can count on tiled decoding."""
    import ldmkit.vae_tiling as T

    vae = _tiny_vae()
    calls = []
    real = T.tiled_decode
    monkeypatch.setattr(T, "tiled_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    z = torch.randn(1, 4, 6, 6)
    with torch.inference_mode():
        decode(vae, z)
        assert calls == []
        monkeypatch.setattr(memory, "available_bytes", lambda: 1000)
        assert rel_err(decode(vae, z), vae.decode(z)) <= 1e-5
    assert calls == [1]
