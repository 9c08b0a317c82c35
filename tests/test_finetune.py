"""Fine-tuning a saved model: LoRA training (only LoRA weights change, the file merges exactly, resume is
exact) and full fine-tuning with --init-from (starts from the model's weights, exports a normal file).

Tiny models, 16-px images, a few steps.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from reference import rel_err
from shapes import assert_merge_delta, write_shapes
from train_runs import assert_same_losses, losses, stop_and_resume

from ldmkit import cli
from ldmkit.checkpoint import load, read_safetensors
from ldmkit.config import TINY, TINY_SD2
from ldmkit.lora import apply_lora, lora_names, read_lora
from ldmkit.train import defaults, export_run, train
from ldmkit.train.lora import LORA_FILE
from ldmkit.train.runner import DistInfo, read_checkpoint
from ldmkit.train.unet import UNetTask

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 coloured squares and circles with captions."""
    return write_shapes(tmp_path_factory.mktemp("data"), 8, SIZE)


def lora_cfg(data: Path, model: Path, **kw):
    base = dict(data=str(data), init_from=str(model), size=SIZE, batch_size=3, total_steps=3, warmup_steps=1, lr=1e-2,
                log_every=1, sample_every=0, checkpoint_every=2, device="cpu", lora_rank=4, lora_alpha=2.0)
    return defaults("lora").replace(**{**base, **kw})


# ---------------------------------------------------------------- LoRA


def test_lora_trains_only_lora_weights_and_its_file_merges_exactly(data: Path, sd1_file: Path,
                                                                    tmp_path: Path) -> None:
    run = tmp_path / "lora"
    seen: dict[str, Any] = {}

    def keep_last(step: int, info: dict) -> None:
        seen["net"] = copy.deepcopy(info["net"])  # as the runner copies it for the EMA weights
        live, copied = (dict(n.frozen.model.named_parameters()) for n in (info["net"], seen["net"]))
        seen["shares_frozen"] = all((copied[k] is v) == (".lora_" not in k) for k, v in live.items())

    train(lora_cfg(data, sd1_file, sample_every=3, sample_steps=2, sample_prompts=["a red circle"]), run,
          on_step=keep_last)
    assert list(losses(run)) == [1, 2, 3] and all(math.isfinite(x) for x in losses(run).values())
    assert Image.open(run / "samples" / "step_0000003.png").size == (SIZE, SIZE)  # sampled with the LoRA

    base = load(sd1_file)
    trained = seen["net"]
    model = trained.frozen.model
    # only the LoRA matrices are trainable, registered and checkpointed
    ckpt = read_checkpoint(run)
    names = {n for n, _ in trained.named_parameters()}
    assert names == {n for n in ckpt["net"] if not n.endswith(".alpha")}
    assert all(n.startswith("lora.") and n.endswith(("lora_down.weight", "lora_up.weight")) for n in names)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n in (n for n, _ in model.named_parameters()) if ".lora_" in n}
    assert seen["shares_frozen"]  # the copy has its own LoRA weights but not a second base model
    # the base weights are bit-identical after training
    base_sd = {f"{part}.{k}": v for part, m in base.parts().items() for k, v in m.state_dict().items()}
    frozen = {n.replace(".org.", "."): p for n, p in model.named_parameters() if ".lora_" not in n}
    assert frozen.keys() == {n for n, _ in base.named_parameters()}
    for k, v in frozen.items():
        assert torch.equal(v, base_sd[k]), k

    # the file: kohya names, the trained weights, and apply_lora merges exactly their delta
    groups = read_lora(run / LORA_FILE)
    assert len(groups) == len(trained.lora) and any(k.startswith("lora_te_") for k in groups)
    for name, g in groups.items():
        assert torch.equal(g["lora_up.weight"], ckpt["net"][f"lora.{name}.lora_up.weight"]), name
        assert g["alpha"].item() == 2.0
    assert any(g["lora_up.weight"].abs().max() > 0 for g in groups.values())  # up starts at zero: it trained
    _, meta = read_safetensors(run / LORA_FILE)
    assert (meta["ss_network_module"], meta["ss_network_dim"], meta["ss_network_alpha"]) == ("networks.lora", "4",
                                                                                             "2.0")

    merged = copy.deepcopy(base)
    assert apply_lora(merged, run / LORA_FILE, 0.8) == len(groups)
    pairs = {where + ".weight": (groups[name]["lora_down.weight"], groups[name]["lora_up.weight"])
             for name, (_, where) in lora_names(base).items() if name in groups}
    assert_merge_delta(base, merged, pairs, 0.8 * 2.0 / 4)

    # at multiplier 1 the merged U-Net computes what the trained (unmerged) LoRA modules compute
    apply_lora(merged := copy.deepcopy(base), run / LORA_FILE, 1.0)
    model.eval()
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, TINY.unet.context_dim, generator=g)
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        out_merged, out_lora, out_base = merged.unet(x, t, ctx), model.unet(x, t, ctx), base.unet(x, t, ctx)
    assert rel_err(out_merged, out_lora) < 1e-5
    assert rel_err(out_merged, out_base) > 1e-3

    # `ldmkit export RUN OUT --layout peft`: the same weights under diffusers/PEFT keys merge identically
    # (tests/test_lora_formats.py checks that diffusers' load_lora_weights reads this layout)
    assert cli.main(["export", str(run), str(tmp_path / "peft.safetensors"), "--layout", "peft"]) == 0
    _, meta = read_safetensors(tmp_path / "peft.safetensors")
    assert json.loads(meta["lora_adapter_metadata"])["unet.lora_alpha"] == 2.0
    apply_lora(peft_merged := copy.deepcopy(base), tmp_path / "peft.safetensors", 0.8)
    kohya_merged = copy.deepcopy(base)
    export_run(run, tmp_path / "kohya.safetensors")
    apply_lora(kohya_merged, tmp_path / "kohya.safetensors", 0.8)
    assert all(torch.equal(a, b) for a, b in zip(peft_merged.state_dict().values(),
                                                 kohya_merged.state_dict().values(), strict=True))


def test_resumed_lora_run_matches_uninterrupted(data: Path, sd1_file: Path, tmp_path: Path, capsys) -> None:
    cfg = lora_cfg(data, sd1_file, total_steps=4, ema_decay=0.5, text_encoder_lora=False, conv_lora=True)
    train(cfg, tmp_path / "a")
    # the same run from the command line, stopped after 2 steps and resumed
    b = str(tmp_path / "b")
    argv = ["train", "lora", "--model", str(sd1_file), "--data", str(data), "--out", b, "--size", str(SIZE),
            "--batch-size", "3", "--total-steps", "4", "--warmup-steps", "1", "--lr", "1e-2", "--log-every", "1",
            "--sample-every", "0", "--checkpoint-every", "2", "--device", "cpu", "--rank", "4", "--alpha", "2",
            "--ema-decay", "0.5", "--no-text-encoder-lora", "--conv-lora"]
    stop_and_resume(argv, Path(b), 2, ["--rank", "8"], "lora_rank: 4 in the run, 8 now", capsys)

    fa, _ = read_safetensors(tmp_path / "a" / LORA_FILE)
    fb, _ = read_safetensors(Path(b) / LORA_FILE)
    assert fa.keys() == fb.keys() and not any(k.startswith("lora_te_") for k in fa)
    assert any("resnets" in k for k in fa)  # LoCon: the 3x3 convolutions of the res blocks too
    for k, v in fa.items():
        assert (v - fb[k]).abs().max() <= 1e-6, k
    # at the end the file holds the EMA weights, which differ from the trained ones
    ckpt = read_checkpoint(tmp_path / "a")
    key = next(k for k in fa if k.endswith("lora_up.weight"))
    assert torch.equal(fa[key], ckpt["ema"]["shadow"]["lora." + key])
    assert not torch.equal(fa[key], ckpt["net"]["lora." + key])
    assert_same_losses(tmp_path / "a", Path(b), 4)
    half, _ = read_safetensors(export_run(tmp_path / "a", tmp_path / "half.safetensors", half=True))
    assert half.keys() == fa.keys() and torch.equal(half[key], fa[key].half())


# ---------------------------------------------------------------- full fine-tuning


def test_finetune_starts_from_the_model_and_exports_a_model(data: Path, sd2_file: Path, tmp_path: Path) -> None:
    source = load(sd2_file)
    cfg = defaults("unet").replace(data=str(data), init_from=str(sd2_file), size=SIZE, batch_size=3, total_steps=2,
                                   warmup_steps=1, lr=1e-3, log_every=1, sample_every=0, checkpoint_every=2,
                                   ema_decay=0.0, device="cpu")
    # the task as the runner builds it, before any step: the model's weights and settings
    probe = tmp_path / "probe"
    probe.mkdir()
    task = UNetTask(cfg, probe, DistInfo(0, 1, torch.device("cpu")))
    for part, module in (("unet", task.net.unet), ("text_encoder", task.net.text)):
        ref = getattr(source, part).state_dict()
        assert module.state_dict().keys() == ref.keys()
        for k, v in module.state_dict().items():
            assert torch.equal(v, ref[k]), f"{part}.{k}"
    c = task.model_cfg
    assert (c.family, c.prediction, c.clip_skip, c.pad_with_eos, c.unet) == ("sd2", "v", 2, False, TINY_SD2.unet)
    assert task.net.objective == "v" and hasattr(task.net, "text_encoder")  # text encoder trained jointly
    # --text-encoder naming the same model: its text encoder stays frozen
    (tmp_path / "probe2").mkdir()
    frozen = UNetTask(cfg.replace(text_encoder=str(sd2_file)), tmp_path / "probe2", DistInfo(0, 1, torch.device("cpu")))
    assert not hasattr(frozen.net, "text_encoder") and frozen.model_cfg.clip_skip == 2
    assert all(torch.equal(v, source.text_encoder.state_dict()[k]) for k, v in frozen.net.text.state_dict().items())

    run = tmp_path / "ft"
    train(cfg, run)
    out = export_run(run, tmp_path / "ft.safetensors")
    model = load(out)
    ckpt = read_checkpoint(run)
    assert (model.cfg.family, model.cfg.prediction, model.cfg.clip_skip) == ("sd2", "v", 2)
    changed = False
    for part in ("unet", "text_encoder"):
        for k, v in getattr(model, part).state_dict().items():
            assert torch.equal(v, ckpt["net"][f"{part}.{k}"]), f"{part}.{k}"
            changed |= not torch.equal(v, getattr(source, part).state_dict()[k])
    assert changed
    for k, v in model.vae.state_dict().items():  # the model's own VAE
        assert torch.equal(v, source.vae.state_dict()[k]), k
