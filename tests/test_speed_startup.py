"""First-image shortcuts (issue 12, speed): each must leave results unchanged.

- The model hash is cached per file (path, size, mtime): read back it must equal hashlib's SHA-256 of the file.
- Models built on the meta device skip nn.init (nothing to initialise there); nn.init is restored after,
  and real tensors are still initialised from the global RNG as before.
- ``ldmkit generate`` parses its line without importing the feature modules; the result is the full parser's.
- With CFG scale 1 the negative prompt is not run through the text encoder; the image is the same.
"""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from torch import nn

from ldmkit import checkpoint, cli, core
from ldmkit import pipeline as P


def test_model_hash_cached_equals_sha256(tmp_path, monkeypatch):
    monkeypatch.setenv("LDMKIT_CACHE_DIR", str(tmp_path / "cache"))
    f = tmp_path / "m.safetensors"
    f.write_bytes(os.urandom(3 << 20))
    want = hashlib.sha256(f.read_bytes()).hexdigest()[:10]
    assert checkpoint.model_hash(f) == want  # hashed, then cached
    cached = list((tmp_path / "cache").glob("sha256-*.txt"))
    assert len(cached) == 1 and cached[0].read_text() == want
    assert checkpoint.model_hash(f) == want  # read back
    cached[0].write_text("not a hash")  # a damaged cache falls back to the file
    assert checkpoint.model_hash(f) == want
    f.write_bytes(os.urandom(1 << 20))  # another file at the same path: another key (size, mtime)
    assert checkpoint.model_hash(f) == hashlib.sha256(f.read_bytes()).hexdigest()[:10]


def test_meta_build_skips_init_and_restores_it():
    originals = {name: getattr(nn.init, name) for name in checkpoint._INIT_FUNCTIONS}
    with checkpoint._on_meta():
        assert nn.init.kaiming_uniform_ is not originals["kaiming_uniform_"]
        layer = nn.Linear(64, 32)
        assert layer.weight.is_meta
        torch.manual_seed(0)
        real = nn.init.normal_(torch.empty(5, device="cpu"))  # off the meta device: initialised as before
    torch.manual_seed(0)
    assert torch.equal(real, torch.empty(5).normal_())
    assert {name: getattr(nn.init, name) for name in checkpoint._INIT_FUNCTIONS} == originals


def test_generate_line_parses_without_feature_modules():
    line = ["generate", "a red apple", "--model", "emoji-lcm", "--steps", "4", "--seed", "3", "-o", "x.png"]
    fast = cli.build_parser("generate")
    assert "train" not in fast._subparsers._group_actions[0].choices  # the feature modules were left out
    assert vars(fast.parse_args(line)) == vars(cli.build_parser().parse_args(line))


@pytest.mark.parametrize("model_name", ["emoji", "emoji-lcm"])
def test_cfg_one_skips_negative_encoding_same_image(model_name):
    from ldmkit import api

    model = api.load(model_name).model
    params = P.GenerationParams(prompt="red heart", negative_prompt="blue", steps=2, cfg_scale=1.0, seed=5,
                                width=64, height=64, sampler="Euler")
    assert core.uncond_unused(model, params)
    calls = []
    enc = model.text_encoder
    hook = enc.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        job = core.prepare(model, params)
    finally:
        hook.remove()
    assert calls == [1]  # one row: the prompt; the negative prompt was not encoded
    full_cond, _ = core.encode_prompt(model, ["red heart"], ["blue"])
    assert torch.equal(job.cond.context, full_cond)
    fast = core.sample(model, job.plan, job.cond, job.uncond, job.noise)
    uncond = core.Conditioning(core.encode_prompt(model, ["red heart"], ["blue"])[1])
    assert torch.equal(fast, core.sample(model, job.plan, job.cond, uncond, job.noise))
    # with guidance the negative prompt is encoded as before
    assert not core.uncond_unused(model, params.replace(cfg_scale=7.0)) or model.cfg.unet.time_cond_proj_dim


def test_cli_sleeps_openmp_threads_unless_told_otherwise():
    """libgomp reads OMP_WAIT_POLICY when torch loads it: the CLI sets PASSIVE before torch is imported, and
    keeps a value the user set."""
    import subprocess
    import sys

    code = ("import os, sys; import ldmkit.cli; "
            "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["PASSIVE", "False"]
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == "ACTIVE"
