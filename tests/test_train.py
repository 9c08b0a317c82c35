"""Training: exact resume, data-parallel consistency, train -> export -> generate, and bad input.

Everything runs on the tiny preset with 16-px images and a handful of steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shapes import COLORS, write_shapes
from train_runs import assert_same_losses, assert_same_weights, crash_run, losses, tiny, two_ranks, weights_hash

from ldmkit import cli
from ldmkit.train import TrainConfig, TrainError, defaults, export_run, load_run_config, train
from ldmkit.train.config import load_toml, to_toml
from ldmkit.train.data import ShardedOrder
from ldmkit.train.runner import read_checkpoint
from ldmkit.train.unet import LATENTS_FILE, measure_scale_factor

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 16




@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 transparent-background squares and circles in three colours, with captions."""
    return write_shapes(tmp_path_factory.mktemp("data"), 12, SIZE, transparent=True)


@pytest.fixture(scope="module")
def vae_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "vae"
    train(tiny("vae", data=str(data), disc_start=1), run)
    return run


def unet_cfg(data: Path, vae_run: Path, **kw) -> TrainConfig:
    base = dict(data=str(data), vae=str(vae_run), grad_accum=2, total_steps=6, checkpoint_every=3, ema_decay=0.9,
                caption_dropout=0.3)
    return tiny("unet", **{**base, **kw})


# ---------------------------------------------------------------- resume


def test_resumed_unet_run_matches_uninterrupted(data: Path, vae_run: Path, tmp_path: Path) -> None:
    cfg = unet_cfg(data, vae_run, total_steps=5, checkpoint_every=2)
    train(cfg, tmp_path / "a")
    # killed after step 4's update but before its checkpoint; the last checkpoint is step 2
    crash_run(cfg, tmp_path / "b", 4)
    assert read_checkpoint(tmp_path / "b")["step"] == 2
    assert max(losses(tmp_path / "b")) == 3
    # resumed with gradient checkpointing on: recomputing activations must not change the numbers
    resumed = load_run_config(tmp_path / "b").replace(gradient_checkpointing=True)
    train(resumed, tmp_path / "b", resume=True)

    a = assert_same_losses(tmp_path / "a", tmp_path / "b", 5)  # the crashed run's stale lines were dropped
    assert len(set(a.values())) == 5  # the losses do change: shuffling, noise, updates
    ca, cb = read_checkpoint(tmp_path / "a"), read_checkpoint(tmp_path / "b")
    assert ca["data"] == cb["data"] and ca["data"]["epoch"] >= 1  # several epochs, reshuffled
    assert_same_weights(ca, cb)
    assert not torch.equal(ca["ema"]["shadow"]["unet.out.2.weight"], ca["net"]["unet.out.2.weight"])


def test_sharded_order_resumes_and_partitions() -> None:
    a = ShardedOrder(10, seed=3, rank=0, world_size=2)
    first = [a.take(4) for _ in range(3)]
    b = ShardedOrder(10, seed=3, rank=0, world_size=2)
    b.take(4)
    c = ShardedOrder(10, seed=3, rank=0, world_size=2)
    c.load_state_dict(b.state_dict())
    assert torch.equal(torch.cat([c.take(4), c.take(4)]), torch.cat(first[1:]))
    shards = [ShardedOrder(10, seed=3, rank=r, world_size=2).epoch_indices(4) for r in (0, 1)]
    assert sorted(torch.cat(shards).tolist()) == list(range(10))
    assert not torch.equal(a.epoch_indices(0), a.epoch_indices(1))


def test_config_toml_roundtrip(tmp_path: Path) -> None:
    cfg = defaults("unet").replace(data='d"ir', sample_prompts=["a cat", "ü"], lr=3e-5, flip=False,
                                   arch={"unet": {"channel_mult": (1, 2), "num_heads": None, "head_dim": 8}})
    (tmp_path / "c.toml").write_text(to_toml(cfg))
    assert load_toml(tmp_path / "c.toml", TrainConfig()) == cfg
    (tmp_path / "bad.toml").write_text("batch_sise = 3\n")
    with pytest.raises(TrainError, match="batch_size"):
        load_toml(tmp_path / "bad.toml", TrainConfig())


# ---------------------------------------------------------------- data parallel

SETUP = """
data, vae, run, out = sys.argv[1:5]
cfg = defaults("unet").replace(model="tiny", size=16, data=data, vae=vae, batch_size=2, total_steps=3, holdout=0,
                               warmup_steps=1, lr=1e-3, log_every=1, sample_every=0, checkpoint_every=3,
                               ema_decay=0.9, device="cpu")
"""


def test_two_ranks_keep_identical_weights_on_disjoint_shards(data: Path, vae_run: Path, tmp_path: Path) -> None:
    r0, _ = two_ranks(tmp_path, SETUP, data, vae_run, tmp_path / "run")
    ckpt = read_checkpoint(tmp_path / "run")
    assert weights_hash(ckpt["net"]) == r0["hash"]
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2


# ---------------------------------------------------------------- end to end


def test_train_export_generate(data: Path, vae_run: Path, tmp_path: Path) -> None:
    from ldmkit.checkpoint import load, read_safetensors
    from ldmkit.pipeline import GenerationParams, txt2img
    from ldmkit.train.export import model_from_run

    run = tmp_path / "ldm"
    train(unet_cfg(data, vae_run, total_steps=2, grad_accum=1, sample_every=2, sample_steps=2, objective="v",
                   sample_prompts=["a red circle", "a blue square"]), run)
    assert Image.open(run / "samples" / "step_0000002.png").size == (2 * SIZE, SIZE)
    out = export_run(run, tmp_path / "model.safetensors")
    model = load(out)
    ckpt = read_checkpoint(run)
    vae_ckpt = read_checkpoint(vae_run)

    ema = ckpt["ema"]["shadow"]
    for prefix, part in (("unet.", model.unet), ("text_encoder.", model.text_encoder)):
        sd = part.state_dict()
        assert len(sd) == sum(k.startswith(prefix) for k in ema)
        for k, v in sd.items():
            assert torch.equal(v, ema[prefix + k]), prefix + k
    for k, v in model.vae.state_dict().items():  # the VAE run had no EMA (decay 0): raw = shadow
        assert torch.equal(v, vae_ckpt["ema"]["shadow"]["vae." + k]), k

    cfg = model.cfg
    assert (cfg.family, cfg.prediction, cfg.clip_skip, cfg.pad_with_eos) == ("custom", "v", 1, True)
    assert cfg.extra["image_size"] == SIZE
    cache, _ = read_safetensors(run / LATENTS_FILE)
    assert cfg.vae.scale_factor == pytest.approx(measure_scale_factor(cache, 0), rel=1e-12)
    assert cfg.vae.scale_factor != 0.18215

    params = GenerationParams(prompt="a red circle", steps=2, seed=1, width=SIZE, height=SIZE)
    [img] = txt2img(model, params)
    [ref] = txt2img(model_from_run(run), params)
    assert img.size == (SIZE, SIZE)
    assert np.array_equal(np.asarray(img), np.asarray(ref))
    assert np.asarray(img).std() > 0


def test_frozen_text_encoder_from_a_model_file(data: Path, vae_run: Path, tmp_path: Path) -> None:
    from ldmkit.checkpoint import load, read_safetensors, save_single_file
    from ldmkit.config import TINY_SD2
    from ldmkit.model import StableDiffusion

    torch.manual_seed(1)
    source = StableDiffusion(TINY_SD2)  # clip skip 2, OpenCLIP padding: both must carry over
    save_single_file(source, tmp_path / "source.safetensors")
    run = tmp_path / "ldm"
    train(unet_cfg(data, vae_run, total_steps=1, grad_accum=1, text_encoder=str(tmp_path / "source.safetensors")),
          run)
    ckpt = read_checkpoint(run)
    assert not any(k.startswith("text_encoder.") for k in [*ckpt["net"], *ckpt["ema"]["shadow"]])

    out = export_run(run, tmp_path / "half.safetensors", half=True)
    sd, _ = read_safetensors(out)
    assert {v.dtype for v in sd.values()} == {torch.float16}
    model = load(out)
    assert (model.cfg.clip_skip, model.cfg.pad_with_eos, model.cfg.text) == (2, False, TINY_SD2.text)
    for k, v in model.text_encoder.state_dict().items():
        assert torch.equal(v, source.text_encoder.state_dict()[k].half().float()), k


def test_compact_vocab_and_short_context(data: Path, vae_run: Path, tmp_path: Path) -> None:
    """vocab = data keeps rows only for the captions' tokens; the text encoder written out for diffusers
    (full table) gives transformers' CLIPTextModel the same hidden states; short contexts chunk prompts."""
    from transformers import CLIPTextModel as HFCLIPTextModel

    from ldmkit.checkpoint import load, save_diffusers
    from ldmkit.pipeline import GenerationParams, txt2img
    from ldmkit.prompt import encode_weighted, unknown_words

    run = tmp_path / "ldm"
    train(unet_cfg(data, vae_run, total_steps=2, grad_accum=1, vocab="data", arch={"text": {"max_positions": 8}}),
          run)
    model = load(export_run(run, tmp_path / "model.safetensors"))
    tok = model.tokenizer
    assert tok.context_length == model.cfg.text.max_positions == 8
    caption_ids = {i for c in ("a red circle", "a green square", "a blue circle") for i in tok([c])[0].tolist()}
    used = {i for color in COLORS for shape in ("square", "circle") for i in tok([f"a {color} {shape}"])[0].tolist()}
    assert caption_ids <= used
    emb = model.text_encoder.text_model.embeddings
    assert model.cfg.text.token_rows == len(used) + 1 == emb.token_embedding.weight.shape[0]
    unseen = tok.encode("zebra")[0]
    assert int(emb.token_map[unseen]) == 0 and not emb.token_embedding.weight[0].any()
    assert len(set(emb.token_map[sorted(used)].tolist())) == len(used)  # one row each
    assert unknown_words(model, "a (red:1.2) zebra, circle") == ["zebra"]

    save_diffusers(model, tmp_path / "diffusers")
    ref = HFCLIPTextModel.from_pretrained(tmp_path / "diffusers" / "text_encoder").eval()
    ids = tok(["a red circle", "a zebra square", ""])
    with torch.no_grad():
        want = ref(ids).last_hidden_state
        got = model.text_encoder(ids)
    assert (got - want).abs().max() / want.abs().max() < 1e-5

    # 6 prompt tokens per chunk: 7 words make two chunks, each of the encoder's 8 positions
    z = encode_weighted(model, ["a red circle and a blue square"], clip_skip=1)
    assert z.shape == (1, 16, model.cfg.text.width)
    [img] = txt2img(model, GenerationParams(prompt="a red circle and a blue square", steps=2, seed=1, width=SIZE,
                                            height=SIZE))
    assert img.size == (SIZE, SIZE)


def test_caption_templates_phrase_captions_and_enter_the_vocabulary(data: Path, vae_run: Path,
                                                                     tmp_path: Path) -> None:
    """Each sample's caption goes into one of the templates, drawn uniformly; their words get vocab rows."""
    from ldmkit.checkpoint import load
    from ldmkit.train.runner import DistInfo
    from ldmkit.train.unet import UNetTask, apply_template

    assert apply_template("{a} {caption}", "apple") == "an apple"
    assert apply_template("an emoji of {a} {caption}", "red apple") == "an emoji of a red apple"
    templates = ["{caption}", "{caption} drawn", "an image of {a} {caption}"]
    cfg = unet_cfg(data, vae_run, total_steps=1, grad_accum=1, vocab="data", caption_dropout=0.0,
                   caption_templates=templates)
    run = tmp_path / "ldm"
    train(cfg, run)
    model = load(export_run(run, tmp_path / "model.safetensors"))
    emb, tok = model.text_encoder.text_model.embeddings, model.tokenizer
    for word in ("drawn", "image", "of", "an"):
        assert int(emb.token_map[tok.encode(word)[0]]) != 0, word

    task = UNetTask(cfg, run, DistInfo(0, 1, torch.device("cpu")))
    n = len(task.captions)
    idx = torch.arange(n).repeat(100)
    ids = task.make_batch(idx, torch.Generator().manual_seed(0), 0)["ids"]
    counts = []
    for t in templates:
        want = tok([apply_template(t, c) for c in task.captions]).repeat(100, 1)
        counts.append(int((ids == want).all(1).sum()))
    assert sum(counts) == len(idx)  # every sample is one of the templated captions
    assert all(abs(c / len(idx) - 1 / 3) < 0.05 for c in counts), counts


def test_decoder_fine_tune_keeps_the_encoder_and_ships_with_export(data: Path, vae_run: Path,
                                                                  tmp_path: Path) -> None:
    from ldmkit.checkpoint import load
    from ldmkit.train.export import ema_weights

    dec = tmp_path / "vae-decoder"
    train(tiny("vae", data=str(data), init_from=str(vae_run), freeze_encoder=True, total_steps=2), dec)
    before, after = ema_weights(read_checkpoint(vae_run), "vae."), ema_weights(read_checkpoint(dec), "vae.")
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))

    run = tmp_path / "ldm"
    train(unet_cfg(data, vae_run, total_steps=1, grad_accum=1), run)
    model = load(export_run(run, tmp_path / "model.safetensors", vae=str(dec)))
    for k, v in model.vae.state_dict().items():
        assert torch.equal(v, after[k]), k

    other = tmp_path / "other-vae"  # trained from scratch: another encoder, so its latents would not fit
    train(tiny("vae", data=str(data), seed=5, total_steps=1), other)
    with pytest.raises(TrainError, match="encoder differs"):
        export_run(run, tmp_path / "bad.safetensors", vae=str(other))

    # a model file (its U-Net run gone) rewritten with the decoder: only the decoder changes
    base = export_run(run, tmp_path / "base.safetensors")
    swapped = load(export_run(base, tmp_path / "swapped.safetensors", vae=str(dec)))
    for k, v in swapped.vae.state_dict().items():
        assert torch.equal(v, after[k]), k
    original = load(base)
    for part in ("unet", "text_encoder"):
        sa, sb = getattr(original, part).state_dict(), getattr(swapped, part).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), part
    with pytest.raises(TrainError, match="encoder differs"):
        export_run(base, tmp_path / "bad.safetensors", vae=str(other))
    with pytest.raises(TrainError, match="no such run folder, model file or built-in model"):
        export_run(tmp_path / "missing.safetensors", tmp_path / "bad.safetensors")


@pytest.mark.parametrize(("kw", "message"), [
    ({"kind": "unet", "vocab": "data", "init_from": "sd15.safetensors"}, "vocab = data"),
    ({"kind": "vae", "freeze_encoder": True}, "freeze_encoder keeps a trained encoder"),
    ({"kind": "unet", "caption_templates": ["a photo"]}, "must contain {caption} exactly once"),
    ({"kind": "unet", "caption_templates": ["{caption} of {style}"]}, "only the fields"),
])
def test_contradictory_settings_are_named(kw: dict, message: str) -> None:
    from ldmkit.train.config import validate

    with pytest.raises(TrainError, match=message):
        validate(tiny(kw.pop("kind"), data="d", **kw))


# ---------------------------------------------------------------- bad input


def _cli(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    if "ldmkit.train.cli" not in cli.PLUGIN_MODULES:
        monkeypatch.setattr(cli, "PLUGIN_MODULES", [*cli.PLUGIN_MODULES, "ldmkit.train.cli"])
    return cli.main(argv)


def test_empty_data_folder_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    (tmp_path / "empty").mkdir()
    rc = _cli(["train", "vae", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "run"), "--model", "tiny"],
              monkeypatch)
    assert rc == 2
    err = capsys.readouterr().err
    assert "no training images" in err and "ldmkit data emoji" in err


def test_resume_with_other_architecture_names_fields(data: Path, vae_run: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    run = tmp_path / "ldm"
    train(unet_cfg(data, vae_run, total_steps=1, grad_accum=1), run)
    rc = _cli(["train", "unet", "--resume", str(run), "--total-steps", "2", "--arch", "unet.model_channels=16",
               "--arch", "text.layers=1"], monkeypatch)
    assert rc == 2
    err = capsys.readouterr().err
    assert "unet.model_channels: 32 in the run, 16 now" in err and "text.layers: 2 in the run, 1 now" in err
    assert _cli(["train", "vae", "--resume", str(run)], monkeypatch) == 2
    assert "is a unet run" in capsys.readouterr().err
    assert _cli(["train", "unet", "--resume", str(run), "--total-steps", "2"], monkeypatch) == 0
    assert read_checkpoint(run)["step"] == 2


def test_crash_during_checkpoint_write_keeps_previous(data: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "vae"
    cfg = tiny("vae", data=str(data), total_steps=2, checkpoint_every=1)
    real_save = torch.save
    calls = []

    def failing_save(obj, f, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"half a checkpoint")
            raise OSError("No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space"):
        train(cfg, run)
    monkeypatch.setattr(torch, "save", real_save)
    assert read_checkpoint(run)["step"] == 1
    assert [p.name for p in run.iterdir() if p.name.endswith(".tmp")] == []
    train(cfg, run, resume=True)
    assert read_checkpoint(run)["step"] == 2


def test_cli_help_lists_examples(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    for argv in (["train", "unet", "--help"], ["export", "--help"]):
        with pytest.raises(SystemExit) as e:
            _cli(argv, monkeypatch)
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--text-encoder" in out and "--resume" in out and "ldmkit export runs/ldm model.safetensors" in out
    assert "--disc-start" not in out  # VAE-only options stay off the unet command
