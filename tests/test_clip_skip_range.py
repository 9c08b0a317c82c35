"""Clip skip beyond the text encoder's layers is one clear error from the core, whichever front-end sent it
(also a server request whose override_settings switches to a model with fewer layers)."""

import pytest
import torch

from ldmkit import api, cli
from ldmkit.pipeline import GenerationError

pytestmark = pytest.mark.skipif(api.builtin_model_path("emoji") is None, reason="built-in model not installed")


def test_clip_skip_beyond_the_layers_is_refused_by_the_core():
    torch.set_num_threads(1)
    pipe = api.load("emoji")
    layers = len(pipe.model.text_encoder.text_model.encoder.layers)
    assert layers == 3
    with pytest.raises(GenerationError, match="clip skip 4 .* 3 layers"):
        pipe.txt2img("a red apple", clip_skip=4, steps=1)
    (image,) = pipe.txt2img("a red apple", clip_skip=3, steps=1)  # the first layer's output: still draws
    assert image.size == (64, 64)


def test_cli_clip_skip_out_of_range_is_one_line(tmp_path, capsys):
    code = cli.main(["generate", "a red apple", "--clip-skip", "9", "--steps", "1", "-o", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and "clip skip 9" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
