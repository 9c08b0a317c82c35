"""Class-balanced sampling (``balanced``) and caption lists (``caption_choice = random``) in the trainers.

What ``ldmkit data emoji --augment-captions --balance`` writes (metadata.jsonl's per-image ``weight`` and
``captions``) is read by ``ldmkit train``. Checked against closed forms: draw frequencies against the
weights within a binomial bound, weight 0 never drawn, a uniform pick among an image's captions; and
against uninterrupted runs: a crash + resume repeats them exactly, the ranks' places are disjoint, and with
both options off a run on such data is the run on the same data without them, step for step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from shapes import write_shapes
from train_runs import assert_same_weights, crash_and_resume, losses, tiny

from ldmkit.data.datasets import ImageCaptionDataset
from ldmkit.models.tokenizer import CLIPTokenizer
from ldmkit.train import TrainError, load_run_config, train
from ldmkit.train.data import ShardedOrder
from ldmkit.train.runner import DistInfo, read_checkpoint
from ldmkit.train.unet import UNetTask, apply_template

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 16
N = 12


def _binomial_ok(count: int, trials: int, p: float, z: float = 5.0) -> bool:
    """|count - trials p| within z standard deviations of Binomial(trials, p) (z = 5: false alarm < 1e-6)."""
    return abs(count - trials * p) <= z * math.sqrt(trials * p * (1 - p)) + 1e-9


def _extras(i: int) -> dict:
    """Image i's weight (0 for 4, 8: never drawn) and caption list (1 to 3 phrasings)."""
    color, shape = ["red", "green", "blue"][i % 3], ("square", "circle")[i // 3 % 2]
    caps = [f"a {color} {shape}", f"{shape} coloured {color}", f"{color} {shape}, shapes"][: 1 + i % 3]
    return {"weight": 0.0 if i in (4, 8) else float(1 + i % 4), "captions": caps}


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("plain"), N, SIZE, transparent=True)


@pytest.fixture(scope="module")
def rich(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same images and captions with ``weight`` and ``captions`` per line, as `ldmkit data emoji` writes."""
    root = write_shapes(tmp_path_factory.mktemp("rich"), N, SIZE, transparent=True)
    lines = [json.loads(ln) for ln in (root / "metadata.jsonl").read_text().splitlines()]
    (root / "metadata.jsonl").write_text("".join(json.dumps({**r, **_extras(i)}) + "\n" for i, r in enumerate(lines)))
    (root / "holdout.json").write_text(json.dumps({"keys": ["011"]}))
    return root


@pytest.fixture(scope="module")
def vae_run(plain: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "vae"
    train(tiny("vae", data=str(plain), total_steps=2), run)
    return run


# ---------------------------------------------------------------- the weighted order


def test_draw_frequencies_converge_to_the_weights_and_weight_zero_is_never_drawn() -> None:
    w = torch.tensor([1.0, 2.0, 0.0, 3.0, 0.5, 4.0, 0.0, 1.5])
    order = ShardedOrder(len(w), seed=7, weights=w)
    epochs = 2000
    drawn = torch.cat([order.epoch_indices(e) for e in range(epochs)])
    assert drawn.numel() == epochs * len(w)  # an epoch is as many draws as there are images
    counts = torch.bincount(drawn, minlength=len(w))
    p = (w / w.sum()).tolist()
    for i, c in enumerate(counts.tolist()):
        if p[i] == 0:
            assert c == 0, i
        else:
            assert _binomial_ok(c, drawn.numel(), p[i]), (i, c, drawn.numel() * p[i])
    # with replacement: epochs repeat the heavy images and differ from one another
    assert not torch.equal(order.epoch_indices(0), order.epoch_indices(1))
    assert len(set(order.epoch_indices(0).tolist())) < len(w)


def test_weighted_order_resumes_mid_epoch_and_ranks_take_disjoint_places() -> None:
    w = torch.arange(10, dtype=torch.float64) % 4
    a = ShardedOrder(10, seed=3, weights=w)
    first = torch.cat([a.take(4) for _ in range(7)])  # 28 draws: into the third epoch
    b = ShardedOrder(10, seed=3, weights=w)
    for _ in range(3):
        b.take(4)  # stopped mid-epoch (12 = epoch 1, index 2)
    assert (b.epoch, b.index) == (1, 2)
    c = ShardedOrder(10, seed=3, weights=w)
    c.load_state_dict(b.state_dict())
    assert torch.equal(torch.cat([c.take(4) for _ in range(4)]), first[12:])
    # two ranks: each takes every second place of the one shared draw, so together they are the draw
    for epoch in range(5):
        shards = [ShardedOrder(10, seed=3, rank=r, world_size=2, weights=w).epoch_indices(epoch) for r in (0, 1)]
        whole = a.epoch_indices(epoch)
        assert torch.equal(shards[0], whole[0::2]) and torch.equal(shards[1], whole[1::2])
    # a checkpoint drawn without weights (or with others) continues with a fresh epoch, said aloud
    plain = ShardedOrder(10, seed=3)
    plain.take(4)
    assert "weights" not in plain.state_dict()  # an unweighted run's checkpoint is what it always was
    with pytest.warns(UserWarning, match="other sampling weights"):
        c.load_state_dict(plain.state_dict())
    assert (c.epoch, c.index) == (1, 0)


@pytest.mark.parametrize(("weights", "message"), [
    (torch.zeros(4), "weight 0"), (torch.tensor([1.0, -1.0, 1.0, 1.0]), ">= 0"),
    (torch.tensor([1.0, float("nan"), 1.0, 1.0]), "finite"), (torch.ones(3), "4 finite")])
def test_bad_weights_are_named(weights: torch.Tensor, message: str) -> None:
    with pytest.raises(TrainError, match=message):
        ShardedOrder(4, seed=0, weights=weights)


# ---------------------------------------------------------------- caption lists


def test_caption_pick_is_uniform_over_each_images_list() -> None:
    task = UNetTask.__new__(UNetTask)  # only the caption bookkeeping tokenize sets up
    task.caption_count = torch.tensor([1, 3, 2, 5])
    task.caption_start = torch.cumsum(task.caption_count, 0) - task.caption_count
    idx = torch.tensor([0, 1, 2, 3] * 500)
    rows = torch.cat([task.caption_rows(idx, torch.Generator().manual_seed(s)) for s in range(10)])
    image = idx.repeat(10)
    for i, (start, count) in enumerate(zip(task.caption_start.tolist(), task.caption_count.tolist(), strict=True)):
        mine = rows[image == i] - start
        assert mine.min() >= 0 and mine.max() < count  # always one of its own captions
        for k in range(count):
            assert _binomial_ok(int((mine == k).sum()), mine.numel(), 1 / count), (i, k)


def test_metadata_weights_and_caption_lists_are_read_and_checked(rich: Path, tmp_path: Path) -> None:
    ds = ImageCaptionDataset(rich, SIZE)
    assert ds.weights == [_extras(i)["weight"] for i in range(N)]
    assert ds.caption_lists == [_extras(i)["captions"] for i in range(N)]
    assert ds.captions[5] == ds.caption_lists[5][0] == "a blue circle"
    (tmp_path / "bad").mkdir()
    bad = write_shapes(tmp_path / "bad", 2, SIZE)
    lines = (bad / "metadata.jsonl").read_text().splitlines()
    (bad / "metadata.jsonl").write_text(lines[0][:-1] + ', "weight": -2}\n' + lines[1] + "\n")
    with pytest.raises(ValueError, match=r'line 1: "weight" must be a finite number >= 0'):
        ImageCaptionDataset(bad, SIZE)
    (bad / "metadata.jsonl").write_text(lines[0][:-1] + ', "weight": 2}\n' + lines[1] + "\n")
    with pytest.raises(ValueError, match='1 images have no "weight"'):
        _ = ImageCaptionDataset(bad, SIZE).weights


# ---------------------------------------------------------------- in the trainers


def unet_cfg(data: Path, vae_run: Path, **kw):
    base = dict(data=str(data), vae=str(vae_run), total_steps=5, checkpoint_every=2, ema_decay=0.9,
                caption_dropout=0.2, vocab="data", caption_templates=["{caption}", "{a} {caption}"])
    return tiny("unet", **{**base, **kw})


def test_balanced_random_caption_run_resumes_exactly(rich: Path, vae_run: Path, tmp_path: Path) -> None:
    cfg = unet_cfg(rich, vae_run, balanced=True, caption_choice="random")
    seen: list[int] = []
    # b stops after step 4, its last checkpoint at step 2 (6 of 11 draws: mid-epoch)
    ca, cb, _ = crash_and_resume(cfg, tmp_path / "a", tmp_path / "b", 4, 2,
                                 on_step=lambda s, info: seen.extend(info["indices"].tolist()))
    assert ca["data"] == cb["data"] and "weights" in ca["data"]
    assert_same_weights(ca, cb, ema=False)

    # the training set is the 11 images outside holdout.json; images 4 and 8 (weight 0) never come
    task = UNetTask(load_run_config(tmp_path / "a"), tmp_path / "a", DistInfo(0, 1, torch.device("cpu")))
    keys = [f"{i:03d}" for i in range(N) if i != 11]
    zero = {keys.index("004"), keys.index("008")}
    assert len(seen) == 15 and not zero & set(seen)
    # the pre-tokenised cache holds every caption of every image, in each template
    flat = [c for i in range(N) if i != 11 for c in _extras(i)["captions"]]
    tok = CLIPTokenizer.default(True, task.model_cfg.text.max_positions)
    assert task.ids.shape[:2] == (2, len(flat)) == (2, 21)
    for t, template in enumerate(cfg.caption_templates):
        assert torch.equal(task.ids[t], tok([apply_template(template, c) for c in flat]))
    assert torch.equal(task.sample_weights, torch.tensor([_extras(int(k))["weight"] for k in keys],
                                                         dtype=torch.float64))


def test_options_off_train_exactly_as_before_on_the_richer_data(plain: Path, rich: Path, vae_run: Path,
                                                                 tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    for f in ("images", "metadata.jsonl"):
        (tmp_path / "p" / f).symlink_to(plain / f)
    (tmp_path / "p" / "holdout.json").write_text(json.dumps({"keys": ["011"]}))
    # the same images and first captions; only weight/captions differ, and both options are off
    train(unet_cfg(tmp_path / "p", vae_run, total_steps=3), tmp_path / "a")
    train(unet_cfg(rich, vae_run, total_steps=3), tmp_path / "b")
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert a == b
    ca, cb = read_checkpoint(tmp_path / "a"), read_checkpoint(tmp_path / "b")
    assert ca["data"] == cb["data"] and "weights" not in ca["data"]
    for k, v in ca["net"].items():
        assert torch.equal(v, cb["net"][k]), k


def test_options_without_the_metadata_are_clear_errors(plain: Path, vae_run: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainError, match=r'balanced = true needs a sampling "weight" per image'):
        train(unet_cfg(plain, vae_run, balanced=True), tmp_path / "a")
    with pytest.raises(TrainError, match=r'caption_choice = random needs a "captions" list'):
        train(unet_cfg(plain, vae_run, caption_choice="random"), tmp_path / "b")
    with pytest.raises(TrainError, match="balanced = true"):
        train(tiny("vae", data=str(plain), balanced=True), tmp_path / "c")


def test_balanced_vae_run_never_draws_weight_zero(rich: Path, tmp_path: Path) -> None:
    seen: list[int] = []
    train(tiny("vae", data=str(rich), balanced=True, total_steps=6, checkpoint_every=6),
          tmp_path / "v", on_step=lambda s, info: seen.extend(info["indices"].tolist()))
    keys = [f"{i:03d}" for i in range(N) if i != 11]
    assert len(seen) == 18 and not {keys.index("004"), keys.index("008")} & set(seen)
