"""What the trainer tests share (with conftest's ``sd1_file``): a tiny model file to start from, a run's losses
per step, and the resume check (a run stopped by an exception between two checkpoints and resumed must equal an
uninterrupted run)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldmkit.checkpoint import save_single_file
from ldmkit.config import TINY
from ldmkit.model import StableDiffusion
from ldmkit.train import TrainConfig, defaults, train
from ldmkit.train.runner import read_checkpoint


class Crash(Exception):
    """A run killed after some step's update (see :func:`crash_and_resume`)."""


def tiny(kind: str, size: int = 16, **kw) -> TrainConfig:
    """A ``kind`` run of the tiny model: images of ``size``, batch 3, 4 steps, checkpoints every 2, on CPU."""
    base = dict(model="tiny", size=size, batch_size=3, total_steps=4, warmup_steps=1, lr=1e-3, log_every=1,
                sample_every=0, checkpoint_every=2, device="cpu")
    return defaults(kind).replace(**{**base, **kw})


def tiny_model_file(path: Path, cfg=TINY, seed: int = 0) -> Path:
    """A random tiny model of ``cfg`` (seeded) as a single ``.safetensors`` file."""
    torch.manual_seed(seed)
    save_single_file(StableDiffusion(cfg), path)
    return path


def losses(run: Path) -> dict[int, float]:
    """{step: loss} from a run's metrics.jsonl."""
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def crash_run(cfg, run: Path, at: int, on_step=None) -> None:
    """Train ``cfg`` into ``run``, killed by an exception right after step ``at``'s update (before its log line
    and checkpoint); ``on_step``, if given, sees every step up to it."""

    def crash(step: int, info: dict) -> None:
        if on_step is not None:
            on_step(step, info)
        if step == at:
            raise Crash

    with pytest.raises(Crash):
        train(cfg, run, on_step=crash)


def assert_same_losses(a: Path, b: Path, steps: int, tol: float = 1e-6) -> dict[int, float]:
    """Runs ``a`` and ``b`` both logged a loss for each step 1..``steps`` (a crashed run's stale lines dropped),
    equal within ``tol``; returns ``a``'s."""
    la, lb = losses(a), losses(b)
    assert list(la) == list(lb) == list(range(1, steps + 1)), (la, lb)
    assert max(abs(la[s] - lb[s]) for s in la) <= tol, (la, lb)
    return la


def crash_and_resume(cfg, a: Path, b: Path, at: int, checkpoint: int,
                     on_step=None) -> tuple[dict, dict, dict[int, float]]:
    """Train ``cfg`` into ``a`` (calling ``on_step``, if given); into ``b`` stopped after step ``at``'s update (its
    last checkpoint: step ``checkpoint``), then resumed. Both runs log every step with losses within 1e-6; returns
    their final checkpoints and ``a``'s losses."""
    train(cfg, a, on_step=on_step)
    crash_run(cfg, b, at)
    assert read_checkpoint(b)["step"] == checkpoint
    train(cfg, b, resume=True)
    la = assert_same_losses(a, b, cfg.total_steps)
    return read_checkpoint(a), read_checkpoint(b), la


def stop_and_resume(argv: list[str], run: Path, stop: int, changed: list[str], says: str, capsys) -> None:
    """``ldmkit train KIND ...`` (``argv``, writing ``run``) stopped by ``--stop-after stop``; its ``--resume``
    with a setting ``changed`` is refused (exit 2, stderr ``says`` which); then resumed to the end."""
    from ldmkit import cli

    assert cli.main([*argv, "--stop-after", str(stop)]) == 0
    assert read_checkpoint(run)["step"] == stop
    capsys.readouterr()
    assert cli.main([*argv[:2], "--resume", str(run), *changed]) == 2
    assert says in capsys.readouterr().err
    assert cli.main([*argv[:2], "--resume", str(run)]) == 0


def assert_same_weights(ca: dict, cb: dict, ema: bool = True) -> None:
    """Two checkpoints hold the same network (and EMA) weights, within 1e-6."""
    assert ca["net"].keys() == cb["net"].keys()
    for k, v in ca["net"].items():
        assert (v.float() - cb["net"][k].float()).abs().max() <= 1e-6, k
    if ema:
        for k, v in ca["ema"]["shadow"].items():
            assert (v - cb["ema"]["shadow"][k]).abs().max() <= 1e-6, k


WORKER = """
import hashlib, json, os, sys
from ldmkit.train import defaults, train

{setup}
seen, final = [], {{}}

def hook(step, info):
    seen.append(info["indices"].tolist())
    sd = info["net"].state_dict()
    final["hash"] = hashlib.sha256(b"".join(sd[k].numpy().tobytes() for k in sorted(sd))).hexdigest()
    final["loss"] = float(info["loss"])

train(cfg, run, on_step=hook)
with open(os.path.join(out, f"rank{{os.environ['RANK']}}.json"), "w") as f:
    json.dump({{"seen": seen, **final}}, f)
"""


def weights_hash(sd: dict) -> str:
    """sha256 of a state dict's tensors in key order (what each rank's worker reports)."""
    return hashlib.sha256(b"".join(sd[k].numpy().tobytes() for k in sorted(sd))).hexdigest()


def two_ranks(tmp_path: Path, setup: str, *args: object, images: int = 12) -> tuple[dict, dict]:
    """Train on two local ranks (torch.distributed.run): ``setup`` is Python that reads ``sys.argv[1:]`` (``args``
    then ``tmp_path``) and sets ``cfg``, ``run`` and ``out``. Both ranks end with the same weights after each saw
    its own half of the ``images`` (one epoch, every image once) with its own noise; returns their reports."""
    (tmp_path / "worker.py").write_text(WORKER.format(setup=setup))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(tmp_path / "worker.py"), *map(str, args), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["hash"] == r1["hash"]
    assert r0["loss"] != r1["loss"]  # each rank saw its own data and noise
    s0, s1 = (sum(r["seen"], []) for r in (r0, r1))
    assert len(s0) == len(s1) == images // 2 and not set(s0) & set(s1)
    assert sorted(s0 + s1) == list(range(images))
    return r0, r1
