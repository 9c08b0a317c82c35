"""Training: ``ldmkit train vae | unet | lora``, ``ldmkit export``.

Python API::

    from ldmkit.train import TrainConfig, defaults, train, export_run
    cfg = defaults("vae").replace(data="data/emoji", total_steps=2000)
    train(cfg, "runs/vae")
    train(defaults("unet").replace(data="data/emoji", vae="runs/vae"), "runs/ldm")
    train(load_run_config("runs/ldm"), "runs/ldm", resume=True)
    export_run("runs/ldm", "model.safetensors")
    train(defaults("unet").replace(data="my_images", init_from="sd15.safetensors", size=512), "runs/ft")
    train(defaults("lora").replace(data="my_images", init_from="sd15.safetensors"), "runs/lora")
    # -> runs/lora/lora.safetensors, for `ldmkit generate --lora runs/lora/lora.safetensors:0.8`
"""

from __future__ import annotations

import os
from pathlib import Path

from ldmkit.train.config import TrainConfig, TrainError, defaults, load_toml

__all__ = ["TrainConfig", "TrainError", "defaults", "export_run", "load_run_config", "train"]


def train(cfg: TrainConfig, run_dir: str | os.PathLike, *, resume: bool = False, stop_after: int | None = None,
          on_step=None) -> Path:
    """Train the VAE, U-Net or LoRA ``cfg.kind`` names into ``run_dir``; see :mod:`ldmkit.train.runner`.

    ``stop_after`` ends this invocation (with a checkpoint) after that many steps, e.g. to fit a
    job's time limit; ``on_step(step, info)`` is called after every optimizer step.
    """
    from ldmkit.train.runner import run

    if cfg.kind not in TASKS:
        raise TrainError(f"unknown training kind {cfg.kind!r}; choose one of {', '.join(TASKS)}")
    out = run(cfg, Path(run_dir), TASKS[cfg.kind](), resume=resume, stop_after=stop_after, on_step=on_step)
    if cfg.kind == "lcm" and cfg.lora_rank and int(os.environ.get("RANK", "0")) == 0:
        from ldmkit.train.lcm import LCM_LORA_FILE, export_lcm

        export_lcm(out, out / LCM_LORA_FILE)  # the EMA weights of the final checkpoint
    if cfg.kind == "lora" and int(os.environ.get("RANK", "0")) == 0:
        from ldmkit.train.lora import LORA_FILE, export_lora

        export_lora(out, out / LORA_FILE)  # the EMA weights of the final checkpoint
    return out


def _vae_task():
    from ldmkit.train.vae import VAETask

    return VAETask


def _unet_task():
    from ldmkit.train.unet import UNetTask

    return UNetTask


def _lora_task():
    from ldmkit.train.lora import LoRATask

    return LoRATask


def _lcm_task():
    from ldmkit.train.lcm import LCMTask

    return LCMTask


def _taesd_task():
    from ldmkit.train.taesd import TAESDTask

    return TAESDTask


def _controlnet_task():
    from ldmkit.train.controlnet import ControlNetTask

    return ControlNetTask


def _embedding_task():
    from ldmkit.train.embedding import EmbeddingTask

    return EmbeddingTask


# kind -> the Task class (imported on use, so `ldmkit --help` stays fast)
TASKS = {"vae": _vae_task, "unet": _unet_task, "lora": _lora_task, "lcm": _lcm_task, "taesd": _taesd_task,
         "embedding": _embedding_task, "controlnet": _controlnet_task}


def load_run_config(run_dir: str | os.PathLike) -> TrainConfig:
    """The settings a run was started (or last resumed) with."""
    path = Path(run_dir) / "config.toml"
    if not path.exists():
        raise TrainError(f"{run_dir}: no config.toml; is it an ldmkit training run folder?")
    return load_toml(path, TrainConfig())


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, half: bool = False, vae: str = "",
               layout: str = "kohya", scale: float = 1.0) -> Path:
    """A U-Net run as a model file, a VAE run as a VAE file, a LoRA run as a LoRA file (EMA weights).

    ``vae``: a decoder fine-tune of a U-Net run's VAE to ship in its place. ``run_dir`` may also be a
    model (file, diffusers folder or built-in name): it is rewritten, with ``vae``'s decoder if given.
    ``layout``: LoRA runs (``train lora``, ``train lcm --lora-rank R``) write the kohya/A1111 layout or
    the diffusers/PEFT one (``peft``). ``scale``: ControlNet runs: residuals multiplied by it (as
    ``--control-weight``), baked into the zero convolutions."""
    if layout not in ("kohya", "peft"):
        raise TrainError(f"--layout must be kohya or peft, got {layout!r}")
    kind = load_run_config(run_dir).kind if (Path(run_dir) / "config.toml").exists() else None
    if scale != 1.0 and kind != "controlnet":
        raise TrainError("--scale applies to ControlNet runs (train controlnet)")
    if layout != "kohya" and kind not in ("lora", "lcm"):
        raise TrainError("--layout applies to LoRA runs (train lora, train lcm --lora-rank R)")
    if kind == "lcm" and layout != "kohya":
        from ldmkit.config import ModelConfig
        from ldmkit.lora import relayout_lora
        from ldmkit.train.lcm import export_lcm
        from ldmkit.train.runner import read_checkpoint

        ckpt = read_checkpoint(Path(run_dir))
        if vae:
            raise TrainError("--vae applies to U-Net runs; a LoRA file holds no autoencoder")
        if not ckpt["task"].get("lora_rank"):
            raise TrainError(f"{run_dir} distils the whole U-Net (no --lora-rank); --layout applies to LCM-LoRA runs")
        path = export_lcm(run_dir, out, half)
        relayout_lora(path, "peft", ModelConfig.from_json(ckpt["model_config"]))
        return path
    if kind is None:
        from ldmkit.train.export import export_model

        return export_model(str(run_dir), out, half, vae)
    if kind == "taesd":
        if vae:
            raise TrainError("--vae applies to U-Net runs; a taesd run exports its tiny autoencoder")
        from ldmkit.train.taesd import export_taesd

        return export_taesd(run_dir, out, half)
    if kind == "controlnet":
        if vae:
            raise TrainError("--vae applies to U-Net runs; a ControlNet file holds no autoencoder")
        from ldmkit.train.controlnet import export_controlnet

        return export_controlnet(run_dir, out, half, scale)
    if kind == "lcm":
        if vae:
            raise TrainError("--vae applies to U-Net runs; an LCM run exports its teacher's autoencoder")
        from ldmkit.train.lcm import export_lcm

        return export_lcm(run_dir, out, half)
    if kind == "lora":
        if vae:
            raise TrainError("--vae applies to U-Net runs; a LoRA file holds no autoencoder")
        from ldmkit.train.lora import export_lora

        return export_lora(run_dir, out, half, layout)  # type: ignore[arg-type]
    from ldmkit.train.export import export_run as _export

    return _export(run_dir, out, half, vae)
