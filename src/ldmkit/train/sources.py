"""Where a training run's starting weights come from: a run folder or a model file / built-in name.

Shared by the VAE, U-Net and LoRA trainers and by export (which swaps in a fine-tuned decoder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from ldmkit.config import ModelConfig, VAEConfig
from ldmkit.train.config import TrainConfig, TrainError
from ldmkit.train.runner import CHECKPOINT, read_checkpoint


def _vae_from_run(run: Path) -> tuple[VAEConfig, dict[str, Tensor]]:
    ckpt = read_checkpoint(run)
    if ckpt["kind"] != "vae":
        raise TrainError(f"--vae {run}: a {ckpt['kind']} run, not a VAE run")
    cfg = ModelConfig.from_json(ckpt["model_config"]).vae
    sd = {k.removeprefix("vae."): v for k, v in ckpt["net"].items() if k.startswith("vae.")}
    for k, v in ckpt["ema"]["shadow"].items():  # the EMA weights where there are any
        if k.startswith("vae."):
            sd[k.removeprefix("vae.")] = v.to(sd[k.removeprefix("vae.")].dtype)
    return cfg, sd


def load_vae_source(source: str) -> tuple[VAEConfig, dict[str, Tensor], bool]:
    """(config, weights, fresh) of the VAE named by --vae: a VAE run folder (fresh: its latent scale
    factor is still to be measured) or a model file / built-in name (its scale factor is kept)."""
    if not source:
        raise TrainError("no VAE given: pass --vae RUN_DIR (a `ldmkit train vae` run) or a model file")
    p = Path(source)
    if p.is_dir() and (p / CHECKPOINT).exists():
        return (*_vae_from_run(p), True)
    model = load_model(source, "--vae")
    return model.cfg.vae, model.vae.state_dict(), False


def load_model(source: str, flag: str) -> Any:
    from ldmkit.api import resolve_model_path
    from ldmkit.checkpoint import load

    path = resolve_model_path(source)
    if not path.exists():
        raise TrainError(f"{flag} {source}: no such run folder, model file or built-in model")
    model = load(path)
    model.channels_last = False  # trained networks and their frozen parts keep one layout (exact resumes)
    return model


def load_init_model(cfg: TrainConfig, run_dir: Path) -> Any:
    """The ``init_from`` model on a run's first start; None when there is none or the run resumes
    (its weights are then in the checkpoint)."""
    if not cfg.init_from or (run_dir / CHECKPOINT).exists():
        return None
    return load_model(cfg.init_from, "--init-from")
