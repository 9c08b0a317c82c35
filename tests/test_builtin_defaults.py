"""Defaults for the built-in 64-px models: the Python API draws at the size the model records, and the server
previews emoji-lcm with the teacher's tiny autoencoder (it keeps the teacher's KL autoencoder)."""

import pytest
import torch

from ldmkit import api

pytestmark = pytest.mark.skipif(api.builtin_model_path("emoji-lcm") is None, reason="built-in models not installed")


def test_api_txt2img_defaults_to_the_recorded_size():
    torch.set_num_threads(1)
    pipe = api.load("emoji-lcm")
    assert pipe.model.cfg.native_size == 64
    (image,) = pipe.txt2img("a red apple", seed=1)
    assert image.size == (64, 64)
    (wide,) = pipe.txt2img("a red apple", seed=1, width=128)  # an explicit size still wins
    assert wide.size == (128, 64)


def test_server_previews_emoji_lcm_with_the_teachers_tiny_autoencoder():
    from ldmkit.server.app import _builtin_preview_vae

    assert _builtin_preview_vae(api.load("emoji-lcm").model) == "emoji-taesd"
    assert _builtin_preview_vae(api.load("emoji").model) == "emoji-taesd"
