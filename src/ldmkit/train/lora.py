"""LoRA training (Hu et al. 2021) on a Stable Diffusion model: ``ldmkit train lora``.

The model named by ``init_from`` (``--model``) is loaded on every start and frozen; LoRA modules
are injected where :func:`ldmkit.lora.inject_lora` puts them (kohya's targets) and only their
matrices are trained. Data, latent cache, caption dropout and sample grids are the U-Net trainer's;
the noise objective, VAE (with its scale factor), text encoder, clip skip and padding are the model's.

The run folder holds ``lora.safetensors`` in the kohya layout (``ldmkit generate --lora``, A1111 and
diffusers load it), rewritten at every checkpoint and at the end of each invocation, and a
``checkpoint.pt`` with only the LoRA weights (plus optimizer, schedule, RNG and data position), so
``--resume`` needs the model file but not the dataset. ``lora_run.json`` records which model and
LoRA shape the run was started with, checked on resume.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldmkit.lora import LoRAModule, inject_lora, save_lora, write_lora_state_dict
from ldmkit.lora_formats import Layout
from ldmkit.model import StableDiffusion
from ldmkit.schedules import sd_alphas_cumprod
from ldmkit.train.config import TrainConfig, TrainError
from ldmkit.train.run_record import check_same_model, fingerprint  # noqa: F401 - train/controlnet.py imports it here
from ldmkit.train.runner import DistInfo, read_checkpoint
from ldmkit.train.sources import load_model
from ldmkit.train.unet import LatentDiffusionNet, UNetTask, copy_sharing_frozen, resolve_objective

LORA_FILE = "lora.safetensors"
RUN_FILE = "lora_run.json"
# what a resumed run must not change: the checkpoint's LoRA weights only fit this model and shape
_RECORDED = ("lora_rank", "lora_alpha", "text_encoder_lora", "conv_lora")


class LoRAWeights(nn.Module):
    """One target's matrices and alpha, shared with its :class:`LoRAModule`, under the file's names."""

    def __init__(self, m: LoRAModule):
        super().__init__()
        self.lora_down, self.lora_up = m.lora_down, m.lora_up
        self.register_buffer("alpha", m.alpha)


class _Frozen:
    """The frozen model and its loss network, kept out of LoRANet's parameters and state dict."""

    def __init__(self, model: StableDiffusion, loss: LatentDiffusionNet):
        self.model, self.loss = model, loss


class LoRANet(nn.Module):
    """The U-Net trainer's denoising loss on a frozen model with LoRA modules injected.

    Only the LoRA matrices are registered here (``lora.<kohya name>.lora_down.weight`` ...), so the
    optimizer, the EMA and the checkpoint hold just them.
    """

    def __init__(self, model: StableDiffusion, injected: dict[str, LoRAModule], objective: str, train_text: bool,
                 size: int = 0):
        super().__init__()
        self.lora = nn.ModuleDict({name: LoRAWeights(m) for name, m in injected.items()})
        c = model.cfg
        ac = sd_alphas_cumprod(c.num_train_timesteps, c.beta_start, c.beta_end)
        # train_text: the text encoder(s) run with gradients, for their LoRA modules
        loss: nn.Module
        if c.is_sdxl:  # both encoders, pooled vector and size ids at the training size (ldmkit.train.lora_sdxl)
            from ldmkit.train.lora_sdxl import SDXLDiffusionNet

            loss = SDXLDiffusionNet(model, train_text, ac, objective, size)
        else:
            loss = LatentDiffusionNet(model.unet, model.text_encoder, train_text, c.clip_skip, ac, objective)
        self.frozen = _Frozen(model, loss.to(model.device))

    def forward(self, latents: Tensor, ids: Tensor, t: Tensor, noise: Tensor) -> tuple[Tensor, dict]:
        return self.frozen.loss(latents, ids, t, noise)

    def train(self, mode: bool = True) -> LoRANet:
        super().train(mode)
        self.frozen.loss.train(mode)  # the U-Net (and trained text encoder), as in the U-Net trainer
        return self

    def __deepcopy__(self, memo: dict) -> LoRANet:
        """A copy with its own LoRA weights that shares the frozen ones (the runner's EMA copy)."""
        return copy_sharing_frozen(self, self.frozen.model, memo)


def _check_record(old: dict[str, Any], new: dict[str, Any], run_dir: Path) -> None:
    check_same_model(old, new, f"the model {run_dir} was started on")
    diffs = [f"{k}: {old[k]!r} in the run, {new[k]!r} now" for k in _RECORDED if old[k] != new[k]]
    if diffs:
        raise TrainError(f"{run_dir} trains LoRA modules of another shape: " + "; ".join(diffs)
                         + ". Resume without these options, or start a new run with another --out.")


class LoRATask(UNetTask):
    """LoRA modules on a frozen model; batches and sample grids as the U-Net trainer's."""

    arch_parts = ("unet", "text", "vae")  # the model's: resuming on another architecture fails early

    def __init__(self, cfg: TrainConfig, run_dir: Path, d: DistInfo):
        self.cfg, self.run_dir, self.device = cfg, run_dir, d.device
        model = load_model(cfg.init_from, "--model")
        if model.cfg.is_inpainting:
            raise TrainError(f"--model {cfg.init_from} is an inpainting model; train LoRAs on its base model")
        if model.cfg.is_sdxl:
            from ldmkit.train import lora_sdxl

            lora_sdxl.check_model(model, cfg.init_from)
        objective = resolve_objective(cfg, model.cfg)
        if objective != model.cfg.prediction:
            raise TrainError(f"--model {cfg.init_from} predicts {model.cfg.prediction}, so its LoRA must too; "
                             f"drop --objective {cfg.objective}")
        self.start_from_model(model, d, RUN_FILE, "lora", {k: getattr(cfg, k) for k in _RECORDED}, _check_record)
        if model.cfg.is_sdxl:  # each caption through both tokenizers, the two rows side by side
            from ldmkit.train import lora_sdxl

            lora_sdxl.tokenize(self, model.tokenizers)
        else:
            self.tokenize(model.tokenizer)
        self.model_cfg = model.cfg.replace(name=run_dir.name, extra={"image_size": cfg.size})

        for name, part in model.parts().items():  # U-Net and text encoder(s)
            if name != "vae":
                part.gradient_checkpointing = cfg.gradient_checkpointing
        self.injected = inject_lora(model, cfg.lora_rank, cfg.lora_alpha, text_encoder=cfg.text_encoder_lora,
                                    conv=cfg.conv_lora)
        self.net = LoRANet(model.to(d.device), self.injected, objective, cfg.text_encoder_lora, cfg.size)
        self.metadata = lora_metadata(cfg, model, self.train_size)

    def viewer(self, eval_net: nn.Module) -> StableDiffusion:
        assert isinstance(eval_net, LoRANet)
        return eval_net.frozen.model  # the EMA copy's model: its LoRA modules hold the EMA weights

    def state(self) -> dict[str, Any]:
        # The runner calls this exactly when it writes a checkpoint, on the main rank only, so the
        # LoRA file is written beside each checkpoint (with the trained weights; the EMA ones are
        # written at the end of each invocation by `train`, as the runner keeps the EMA to itself).
        save_lora(self.injected, self.run_dir / LORA_FILE, self.metadata)
        return {**super().state(), "lora_metadata": self.metadata}


def lora_metadata(cfg: TrainConfig, model: StableDiffusion, num_images: int) -> dict[str, str]:
    """The kohya ``ss_*`` keys other tools read (network shape, base model, resolution)."""
    meta = {
        "ss_network_module": "networks.lora", "ss_network_dim": str(cfg.lora_rank),
        "ss_network_alpha": str(cfg.lora_alpha), "ss_sd_model_name": Path(cfg.init_from).name,
        "ss_v2": str(model.cfg.family == "sd2"),
        "ss_base_model_version": "sdxl_base_v1-0" if model.cfg.is_sdxl else ("sd_v2" if model.cfg.family == "sd2"
                                                                              else "sd_v1"),
        "ss_resolution": f"({cfg.size}, {cfg.size})",
        "ss_num_train_images": str(num_images), "ss_learning_rate": str(cfg.lr), "ss_seed": str(cfg.seed),
        "ss_network_train_unet_only": str(not cfg.text_encoder_lora), "ss_training_comment": "ldmkit train lora",
    }
    if cfg.conv_lora:
        meta["ss_network_args"] = json.dumps({"conv_dim": str(cfg.lora_rank), "conv_alpha": str(cfg.lora_alpha)})
    return meta


def export_lora(run_dir: str | os.PathLike, out: str | os.PathLike, half: bool = False,
                layout: Layout = "kohya") -> Path:
    """A LoRA run's EMA weights (the trained ones when EMA is off) as a LoRA file in the kohya or
    diffusers/PEFT layout."""
    from ldmkit.config import ModelConfig
    from ldmkit.train.export import ema_weights, safetensors_path

    out = safetensors_path(out, "LoRA files are .safetensors")
    ckpt = read_checkpoint(Path(run_dir))
    if ckpt["kind"] != "lora":
        raise TrainError(f"{run_dir} is a {ckpt['kind']} run, not a LoRA run")
    sd = ema_weights(ckpt, "lora.")  # keys are the kohya names already
    write_lora_state_dict(sd, out, layout, ModelConfig.from_json(ckpt["model_config"]), ckpt["task"]["lora_metadata"],
                          torch.float16 if half else None)
    return out
