"""The training loop shared by the VAE and U-Net trainers: data-parallel setup, AdamW with warm-up
and cosine decay, gradient accumulation and clipping, mixed precision, EMA, metrics, and
checkpoints that make ``--resume`` continue exactly.

Exact resumption rests on three things: the sample order is a pure function of (seed, epoch) and
the checkpoint stores the position in it; every random draw of a step (noise, timesteps, flips,
caption dropout) comes from a generator seeded by (seed, rank, step, micro-batch); and model,
optimizer, EMA, LR schedule, grad scaler and the global RNG states are all saved.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ldmkit.atomic import remove_leftovers, replacing
from ldmkit.config import ModelConfig
from ldmkit.train.config import TrainConfig, TrainError, arch_differences, to_toml, validate
from ldmkit.train.data import ShardedOrder, StreamOrder
from ldmkit.train.ema import EMA

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.toml"
METRICS = "metrics.jsonl"
CHECKPOINT_FORMAT = 1


# ---------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def mean(self, x: Tensor) -> Tensor:
        if self.world_size > 1:
            x = x.clone()
            dist.all_reduce(x)
            x /= self.world_size
        return x


def setup_distributed(device: str) -> DistInfo:
    """Join the process group torchrun describes in the environment (gloo on CPU, NCCL on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainError("--device cuda given but no CUDA device is available; use --device cpu")
        dev = torch.device("cuda", local if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, dev)


# ---------------------------------------------------------------- the task interface


class Task(Protocol):
    """What a trainer provides to the loop."""

    model_cfg: ModelConfig  # architecture, checked on --resume
    arch_parts: tuple[str, ...]  # which parts of model_cfg this run trains
    net: nn.Module  # forward(**batch) -> (loss, logs); its trainable parameters are optimised
    train_size: int

    def make_batch(self, idx: Any, gen: torch.Generator, step: int) -> dict[str, Any]: ...

    def evaluate(self, eval_net: nn.Module, step: int) -> dict[str, float]: ...

    def state(self) -> dict[str, Any]: ...


# ---------------------------------------------------------------- randomness


def step_generator(seed: int, rank: int, step: int, micro: int) -> torch.Generator:
    """The CPU generator for one micro-batch: a pure function of where it is in the run."""
    h = hashlib.blake2b(f"{seed}:{rank}:{step}:{micro}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(h, "little") & (2**63 - 1))


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])


@contextlib.contextmanager
def rng_unchanged() -> Any:
    """A block (or, as ``@rng_unchanged()``, a function) that leaves the global RNGs as it found them.

    For work done only sometimes, such as encoding the dataset into the latent cache on a run's first
    start: whatever it draws (a VAE's random init before its weights load, shuffles), the weights
    initialised afterwards and every later draw are the same whether or not it ran in this process
    (issue 15, hardening 11: a restart that found the cache diverged from the uninterrupted run).
    """
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


# ---------------------------------------------------------------- schedule and precision


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at ``total_steps``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """None (fp32) on CPU and for precision=fp32; bf16/fp16 autocast on CUDA."""
    if device.type != "cuda":
        if cfg.precision in ("bf16", "fp16"):
            warnings.warn(f"precision={cfg.precision} applies to CUDA only; training in fp32 on {device}",
                          stacklevel=2)
        return None
    if cfg.precision == "fp32":
        return None
    if cfg.precision == "fp16" or (cfg.precision == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


# ---------------------------------------------------------------- checkpoint files


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Write ``path`` completely under a temporary name, then rename over the old one.

    The rename is atomic, so at every moment ``path`` is either the previous complete checkpoint
    or the new complete one; a crash mid-write leaves only a temporary file, removed here.
    """
    with replacing(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def read_checkpoint(run_dir: Path) -> dict[str, Any]:
    path = run_dir / CHECKPOINT
    if not path.exists():
        raise TrainError(f"{run_dir}: no {CHECKPOINT}; is it a training run folder that has saved a checkpoint?")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        why = " ".join(str(e).split())[:200] or ("an empty file" if path.stat().st_size == 0 else type(e).__name__)
        raise TrainError(f"{path}: cannot read the checkpoint ({why}); it is damaged (a copy cut short?): restore "
                         "it, or start a new run with another --out") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{path}: not an ldmkit training checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


def check_resumable(ckpt: dict[str, Any], cfg: TrainConfig, model_cfg: ModelConfig, parts: tuple[str, ...],
                    run_dir: Path) -> None:
    if ckpt["kind"] != cfg.kind:
        raise TrainError(f"{run_dir} is a {ckpt['kind']} run; resume it with `ldmkit train {ckpt['kind']} "
                         f"--resume {run_dir}`")
    old = ModelConfig.from_json(ckpt["model_config"])
    diffs = arch_differences(old, model_cfg, parts)
    if diffs:
        raise TrainError(f"{run_dir} was trained with a different architecture: " + "; ".join(diffs)
                         + ". Resume without architecture options, or start a new run with another --out.")


def _append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop lines logged after the checkpoint being resumed, so the log reads as one run."""
    path = run_dir / METRICS
    if path.exists():
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        path.write_text("".join(ln + "\n" for ln in keep))


def _tensorboard(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # optional: tensorboard is not a dependency
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


# ---------------------------------------------------------------- the loop


StepHook = Callable[[int, dict[str, Any]], None]


def sample_weights(task: Task, cfg: TrainConfig) -> Tensor | None:
    """The training images' sampling weights when ``cfg.balanced`` (None: each image once per epoch)."""
    if not cfg.balanced:
        return None
    weights = getattr(task, "sample_weights", None)
    if weights is None:
        raise TrainError(f"balanced = true needs a sampling \"weight\" per image in {cfg.data or 'the data'}/"
                         "metadata.jsonl (`ldmkit data emoji --balance` writes them); add them, or drop --balanced")
    return weights


def prepare_run_dir(cfg: TrainConfig, run_dir: Path, resume: bool, d: DistInfo) -> None:
    validate(cfg)
    has_ckpt = (run_dir / CHECKPOINT).exists()
    if resume and not has_ckpt:
        raise TrainError(f"{run_dir}: no {CHECKPOINT} to resume from")
    if not resume and has_ckpt:
        raise TrainError(f"{run_dir} already holds a run; continue it with --resume {run_dir}, "
                         "or choose another --out")
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for p in remove_leftovers(run_dir):  # half-written files of a start that was killed (hardening 10)
            warnings.warn(f"{p}: removed a partial file left by an interrupted write", stacklevel=2)
    d.barrier()


def run(cfg: TrainConfig, run_dir: Path, task_factory: Callable[[TrainConfig, Path, DistInfo], Task],
        resume: bool = False, stop_after: int | None = None, on_step: StepHook | None = None) -> Path:
    """Train ``cfg.total_steps`` optimizer steps (or ``stop_after`` more), checkpointing into ``run_dir``."""
    d = setup_distributed(cfg.device)
    if d.device.type == "cuda":
        # conv backward on CUDA sums in a nondeterministic order; the deterministic kernels are slower
        torch.backends.cudnn.benchmark = not cfg.deterministic
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
    prepare_run_dir(cfg, run_dir, resume, d)
    ckpt = read_checkpoint(run_dir) if resume else None

    torch.manual_seed(cfg.seed)  # initial weights: identical on every rank
    task = task_factory(cfg, run_dir, d)
    if ckpt is not None:
        check_resumable(ckpt, cfg, task.model_cfg, task.arch_parts, run_dir)
    if d.is_main:  # only once the settings are known to work with the run
        from ldmkit.checkpoint import atomic_write_text

        atomic_write_text(run_dir / CONFIG, to_toml(cfg))
    net = task.net.to(d.device)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    amp_dtype = autocast_dtype(cfg, d.device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    ema = EMA(net, cfg.ema_decay) if d.is_main else None
    # a folder's images: indices into the task's training set; tar shards: the samples themselves
    stream = getattr(task, "stream_order", None)
    order = stream(d) if stream is not None else ShardedOrder(task.train_size, cfg.seed, d.rank, d.world_size,
                                                              weights=sample_weights(task, cfg))
    step = 0
    if ckpt is not None:
        net.load_state_dict(ckpt["net"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        order.load_state_dict(ckpt["data"])
        rngs = ckpt["rng"]
        set_rng_state(rngs[d.rank] if len(rngs) == d.world_size else rngs[0])
        step = int(ckpt["step"])
    if d.is_main:
        _truncate_metrics(run_dir, step)  # lines a crashed attempt logged after its last checkpoint
    # the EMA weights are evaluated in a copy, made before DDP attaches its hooks
    eval_net = copy.deepcopy(net).eval() if d.is_main else None
    model = DistributedDataParallel(net, broadcast_buffers=False) if d.world_size > 1 else net

    def save() -> None:
        rngs = d.gather(rng_state())
        # a stream's position differs per rank (each reads its own shards); an index order's does not
        data = d.gather(order.state_dict()) if isinstance(order, StreamOrder) else order.state_dict()
        if d.is_main:
            assert ema is not None
            atomic_torch_save({
                "format": CHECKPOINT_FORMAT, "kind": cfg.kind, "model_config": task.model_cfg.to_json(),
                "config": to_toml(cfg), "step": step, "net": net.state_dict(), "ema": ema.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                "data": data, "rng": rngs, "world_size": d.world_size, "task": task.state(),
            }, run_dir / CHECKPOINT)
        d.barrier()

    def evaluate() -> None:
        if not d.is_main:
            return
        assert ema is not None and eval_net is not None
        ema.copy_to(eval_net)
        with torch.no_grad():
            record = task.evaluate(eval_net, step)
        if record:
            _append_metrics(run_dir, {"step": step, **record})
            if tb is not None:
                for k, v in record.items():
                    tb.add_scalar(f"eval/{k}", v, step)

    from tqdm import tqdm

    end = cfg.total_steps if stop_after is None else min(cfg.total_steps, step + stop_after)
    tb = _tensorboard(run_dir) if d.is_main else None
    bar = tqdm(total=cfg.total_steps, initial=step, desc=f"train {cfg.kind}", unit="step", file=sys.stderr,
               dynamic_ncols=True, disable=not d.is_main)
    autocast = (torch.autocast("cuda", dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext)
    loss_sum, logged_steps, t_log = torch.zeros((), device=d.device), 0, time.perf_counter()
    part_sums: dict[str, Tensor] = {}
    net.train()
    try:
        while step < end:
            micro_losses: list[Tensor] = []
            seen: list[Tensor] = []
            keys: list[str] = []
            for micro in range(cfg.grad_accum):
                idx = order.take(cfg.batch_size)
                if isinstance(idx, Tensor):
                    seen.append(idx)
                else:  # streamed samples
                    keys += [sample["key"] for sample in idx]
                batch = task.make_batch(idx, step_generator(cfg.seed, d.rank, step, micro), step)
                batch = {k: v.to(d.device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}
                last = micro == cfg.grad_accum - 1
                sync = contextlib.nullcontext() if last or d.world_size == 1 else model.no_sync()
                with sync:
                    with autocast():
                        loss, logs = model(**batch)
                    scaler.scale(loss / cfg.grad_accum).backward()
                micro_losses.append(loss.detach().float())
                for k, v in logs.items():  # loss components, averaged like the loss
                    part_sums[k] = part_sums.get(k, 0.0) + v.detach().float() / cfg.grad_accum
            lr = opt.param_groups[0]["lr"]
            scaler.unscale_(opt)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            sched.step()
            if ema is not None:
                ema.update(net)
            step += 1
            step_loss = torch.stack(micro_losses).mean()
            loss_sum += step_loss
            logged_steps += 1
            if on_step is not None:
                on_step(step, {"loss": step_loss, "indices": torch.cat(seen) if seen else None, "keys": keys,
                              "net": net})
            bar.update(1)
            will_save = (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == end
            if step % cfg.log_every == 0 or step == end or will_save:
                mean_loss = float(d.mean(loss_sum / logged_steps))
                if not math.isfinite(mean_loss):  # before a checkpoint could overwrite good weights
                    raise TrainError(f"the loss became {mean_loss} by step {step}; the last checkpoint is kept. "
                                     "Lower --lr, raise --warmup-steps or set --grad-clip, then --resume.")
                now = time.perf_counter()
                images = logged_steps * cfg.batch_size * cfg.grad_accum * d.world_size
                record = {"step": step, "loss": mean_loss, "lr": lr,
                          "grad_norm": float(grad_norm), "epoch": order.epochs,
                          "images_per_s": images / max(now - t_log, 1e-9)}
                if part_sums:
                    names = sorted(part_sums)
                    parts = d.mean(torch.stack([part_sums[k] for k in names]) / logged_steps).tolist()
                    record |= dict(zip(names, parts, strict=True))
                    part_sums.clear()
                if d.is_main:
                    _append_metrics(run_dir, record)
                    if tb is not None:
                        tb.add_scalar("train/loss", mean_loss, step)
                        tb.add_scalar("train/lr", record["lr"], step)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{record['lr']:.2e}")
                loss_sum.zero_()
                logged_steps, t_log = 0, now
            if will_save:
                save()
            if cfg.sample_every and (step % cfg.sample_every == 0 or step == cfg.total_steps):
                evaluate()
    finally:
        order.close()
        bar.close()
        if tb is not None:
            tb.close()
    return run_dir
