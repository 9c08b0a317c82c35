"""The second-generation emoji model's shape (recipes/emoji2/emoji2.toml) through train -> export -> generate:
an f=4 autoencoder (three levels), a decoder fine-tune swapped in at export, a 32-token text context,
per-channel latent normalisation, and
`ldmkit generate` / `ldmkit.api` drawing at the size the model was trained at when no size is given.

The native size comes from the trainer: `train unet` writes ``extra["image_size"] = size`` into the model config,
export stores that config in the file's metadata, and ``ModelConfig.native_size`` reads it back (else the
family's 512/768/1024). The recipe's layout in small: same levels, attention placement and context, fewer channels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shapes import write_shapes
from train_runs import tiny

from ldmkit import cli
from ldmkit.train import train
from ldmkit.train.runner import read_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32  # not 16 (the other trainer tests' size, and the CLI's multiple-of-8 floor) nor 512: a size only the
#            model file can supply
ARCH_VAE = {"vae": {"ch": 16, "ch_mult": (1, 2, 4), "norm_groups": 8}}  # f = 4, as emoji2.toml's 16/32/64
ARCH_UNET = {"unet": {"model_channels": 16, "channel_mult": (1, 2, 2), "attention_levels": (False, True, True),
                      "num_heads": 2, "norm_groups": 8},
             "text": {"max_positions": 32}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("emoji2")
    (root / "data").mkdir()
    data = write_shapes(root / "data", 12, SIZE, transparent=True)
    vae, dec, ldm = root / "vae", root / "vae-decoder", root / "ldm"
    train(tiny("vae", size=SIZE, data=str(data), total_steps=2, arch=ARCH_VAE), vae)
    train(tiny("vae", size=SIZE, data=str(data), init_from=str(vae), freeze_encoder=True, total_steps=2,
               rec_loss="l2", perceptual_weight=0.1, ema_decay=0.9), dec)
    train(tiny("unet", size=SIZE, data=str(data), vae=str(vae), vocab="data", total_steps=2, ema_decay=0.9,
               caption_dropout=0.1, latent_norm="channel", arch=ARCH_UNET), ldm)
    return {"data": data, "vae": vae, "dec": dec, "ldm": ldm}


def _cli(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    if "ldmkit.train.cli" not in cli.PLUGIN_MODULES:
        monkeypatch.setattr(cli, "PLUGIN_MODULES", [*cli.PLUGIN_MODULES, "ldmkit.train.cli"])
    return cli.main(argv)


def test_f4_autoencoder_and_32_token_context_export_and_generate_at_native_size(
        runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ldmkit import api
    from ldmkit.checkpoint import load, read_safetensors
    from ldmkit.pipeline import GenerationParams, txt2img
    from ldmkit.train.export import ema_weights

    out = tmp_path / "emoji2.safetensors"
    assert _cli(["export", str(runs["ldm"]), str(out), "--half", "--vae", str(runs["dec"])], monkeypatch) == 0
    sd, _ = read_safetensors(out)
    assert {v.dtype for v in sd.values() if v.is_floating_point()} == {torch.float16}  # (ints: the vocab's token map)
    model = load(out)
    cfg = model.cfg
    assert (cfg.vae.ch_mult, cfg.vae.downscale) == ((1, 2, 4), 4)
    assert len(cfg.vae.latents_mean) == len(cfg.vae.latents_std) == 4  # the recipe's latent_norm = "channel"
    assert cfg.extra["image_size"] == cfg.native_size == SIZE
    assert cfg.text.max_positions == model.tokenizer.context_length == 32
    pos = model.text_encoder.text_model.embeddings.position_embedding.weight
    assert pos.shape[0] == 32
    # the file carries the fine-tuned decoder and the run's own (frozen) encoder, both as EMA weights in fp16
    dec = ema_weights(read_checkpoint(runs["dec"]), "vae.")
    for k, v in model.vae.state_dict().items():
        assert torch.equal(v, dec[k].half().float()), k
    vae = ema_weights(read_checkpoint(runs["vae"]), "vae.")
    assert all(torch.equal(dec[k], vae[k]) for k in vae if k.startswith(("encoder.", "quant_conv.")))

    # `ldmkit generate` with no --width/--height draws at the file's native size: the same image as the
    # pipeline asked for SIZE x SIZE explicitly (and not the 512 an SD1 file without image_size gets)
    png = tmp_path / "cli.png"
    assert _cli(["generate", "a red circle", "--model", str(out), "--steps", "2", "--seed", "1", "-o", str(png)],
                monkeypatch) == 0
    img = Image.open(png)
    assert img.size == (SIZE, SIZE)
    [ref] = txt2img(model, GenerationParams(prompt="a red circle", steps=2, seed=1, width=SIZE, height=SIZE))
    assert np.array_equal(np.asarray(img.convert("RGB")), np.asarray(ref))
    # the Python API does the same
    [via_api] = api.load(str(out)).txt2img("a red circle", steps=2, seed=1)
    assert np.array_equal(np.asarray(via_api), np.asarray(ref))
    # an explicit size still wins
    png2 = tmp_path / "cli-48.png"
    assert _cli(["generate", "a red circle", "--model", str(out), "--steps", "1", "--seed", "1", "--width", "48",
                 "--height", "48", "-o", str(png2)], monkeypatch) == 0
    assert Image.open(png2).size == (48, 48)
