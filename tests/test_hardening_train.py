"""Hardening items 10 (training files, dataset paths) and 11 (reproducibility) of issue 15, on the tiny preset."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from shapes import write_shapes

# the training tests' tiny dataset, configs and VAE run
from test_train import SIZE, data, vae_run  # noqa: E402, F401
from train_runs import assert_same_losses, assert_same_weights, crash_run, tiny

from ldmkit.data.datasets import ImageCaptionDataset
from ldmkit.train import TrainError, train
from ldmkit.train.data import load_dataset
from ldmkit.train.runner import CHECKPOINT, read_checkpoint
from ldmkit.train.unet import LATENTS_FILE

pytestmark = pytest.mark.usefixtures("one_thread")


def test_restart_after_cache_written_matches_uninterrupted(data: Path, vae_run: Path, tmp_path: Path) -> None:  # noqa: F811
    """Item 11: killed after writing latents.safetensors but before the first checkpoint, then started again
    with the same seed: the second start reuses the cache and must reproduce the uninterrupted run exactly."""
    cfg = tiny("unet", data=str(data), vae=str(vae_run), total_steps=5, checkpoint_every=5, ema_decay=0.9)
    train(cfg, tmp_path / "a")
    crash_run(cfg, tmp_path / "b", 1)
    assert (tmp_path / "b" / LATENTS_FILE).exists() and not (tmp_path / "b" / CHECKPOINT).exists()
    train(cfg, tmp_path / "b")
    assert_same_losses(tmp_path / "a", tmp_path / "b", 5)
    assert_same_weights(read_checkpoint(tmp_path / "a"), read_checkpoint(tmp_path / "b"), ema=False)


def test_partial_checkpoint_temporaries_removed_on_resume(data: Path, tmp_path: Path) -> None:  # noqa: F811
    """Item 10: a kill -9 during a checkpoint write leaves ``.checkpoint.pt.XXXX.tmp``; the next start removes
    such leftovers of ldmkit's atomic writes (and nothing else)."""
    run = tmp_path / "vae"
    cfg = tiny("vae", data=str(data), total_steps=2, checkpoint_every=1)
    train(cfg.replace(total_steps=1), run)
    stale = [run / ".checkpoint.pt.k2j3h4ab.tmp", run / ".latents.safetensors.abc123de.tmp"]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    keep = [run / "notes.tmp", run / ".hidden"]
    for p in keep:
        p.write_text("mine")
    train(cfg, run, resume=True)
    assert read_checkpoint(run)["step"] == 2
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in keep)


@pytest.mark.parametrize("name", ["../outside.png", "/etc/passwd", "images/../../outside.png"])
def test_metadata_paths_outside_the_dataset_are_refused(tmp_path: Path, name: str) -> None:
    """Item 10: metadata.jsonl entries may not point outside the dataset folder (both readers)."""
    root = write_shapes(_mkdir(tmp_path / "ds"), 3, SIZE)
    write_shapes(_mkdir(tmp_path / "other"), 1, SIZE)
    (tmp_path / "outside.png").write_bytes((tmp_path / "other" / "images" / "000.png").read_bytes())
    meta = root / "metadata.jsonl"
    meta.write_text(meta.read_text() + json.dumps({"file_name": name, "text": "x"}) + "\n")
    with pytest.raises(TrainError, match=r"outside the dataset folder"):
        load_dataset(root, SIZE)
    with pytest.raises(ValueError, match=r"line 4: .*outside the dataset folder"):
        ImageCaptionDataset(root, SIZE)


def test_metadata_paths_inside_still_work(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = write_shapes(_mkdir(tmp_path / "ds"), 3, SIZE)
    meta = root / "metadata.jsonl"
    meta.write_text(meta.read_text() + json.dumps({"file_name": "images/sub/../000.png", "text": "x"}) + "\n")
    (root / "images" / "sub").mkdir()
    with caplog.at_level(logging.WARNING):
        assert len(load_dataset(root, SIZE).captions) == 4
        assert len(ImageCaptionDataset(root, SIZE)) == 4


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True)
    return p
