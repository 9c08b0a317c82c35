"""What the trainer tests share (with conftest's ``sd1_file``): a tiny model file to start from, a run's losses
per step, and the resume check (a run stopped by an exception between two checkpoints and resumed must equal an
uninterrupted run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ldmkit.checkpoint import save_single_file
from ldmkit.config import TINY
from ldmkit.model import StableDiffusion
from ldmkit.train import train
from ldmkit.train.runner import read_checkpoint


class Crash(Exception):
    """A run killed after some step's update (see :func:`crash_and_resume`)."""


def tiny_model_file(path: Path, cfg=TINY, seed: int = 0) -> Path:
    """A random tiny model of ``cfg`` (seeded) as a single ``.safetensors`` file."""
    torch.manual_seed(seed)
    save_single_file(StableDiffusion(cfg), path)
    return path


def losses(run: Path) -> dict[int, float]:
    """{step: loss} from a run's metrics.jsonl."""
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def crash_and_resume(cfg, a: Path, b: Path, at: int, checkpoint: int) -> tuple[dict, dict, dict[int, float]]:
    """Train ``cfg`` into ``a``; into ``b`` stopped after step ``at``'s update (its last checkpoint: step
    ``checkpoint``), then resumed. Both runs log every step with losses within 1e-6; returns their final
    checkpoints and ``a``'s losses."""
    train(cfg, a)

    def crash(step: int, info: dict) -> None:
        if step == at:
            raise Crash

    with pytest.raises(Crash):
        train(cfg, b, on_step=crash)
    assert read_checkpoint(b)["step"] == checkpoint
    train(cfg, b, resume=True)
    la, lb = losses(a), losses(b)
    assert list(la) == list(lb) == list(range(1, cfg.total_steps + 1))
    assert max(abs(la[s] - lb[s]) for s in la) <= 1e-6, (la, lb)
    return read_checkpoint(a), read_checkpoint(b), la


def assert_same_weights(ca: dict, cb: dict, ema: bool = True) -> None:
    """Two checkpoints hold the same network (and EMA) weights, within 1e-6."""
    assert ca["net"].keys() == cb["net"].keys()
    for k, v in ca["net"].items():
        assert (v.float() - cb["net"][k].float()).abs().max() <= 1e-6, k
    if ema:
        for k, v in ca["ema"]["shadow"].items():
            assert (v - cb["ema"]["shadow"][k]).abs().max() <= 1e-6, k
