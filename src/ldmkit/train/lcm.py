"""Latent consistency distillation (Luo et al. 2023, "Latent Consistency Models"): ``ldmkit train lcm``.

A frozen teacher (any model ldmkit loads) with classifier-free guidance defines the probability-flow
ODE; a student f(x_t, t) = c_skip(t) x_t + c_out(t) x0_pred(x_t, t) learns to map every point of a
trajectory to its start. One step, for a training latent x0 and noise eps:

    n ~ U{0, N-1},  t_n+k = ddim_t[n],  t_n = t_n+k - k  (k = T / N: the skipping-step solver)
    x_t_n+k = sqrt(ab) x0 + sqrt(1 - ab) eps
    teacher, guidance w ~ U(w_min, w_max):  x0_w = x0_c + w (x0_c - x0_u), eps_w likewise
    DDIM step of the ODE:  x_t_n = sqrt(ab_t_n) x0_w + sqrt(1 - ab_t_n) eps_w
    loss = pseudo-Huber( f_online(x_t_n+k, t_n+k),  f_target(x_t_n, t_n) )   (c = 0.001)

The teacher's guidance scale in ldmkit's (A1111's) sense is 1 + w. The target network is an EMA of
the online one (decay ``target_decay``) when the whole U-Net is distilled, and the online network
itself (without gradients) for an LCM-LoRA, as in diffusers' ``train_lcm_distill_*_sd_wds.py``.
By default the guidance is baked into the student (choose ``w_min = w_max`` for one scale), which is
then sampled with CFG 1. With ``w_embedding`` the whole-U-Net student gets LCM's guidance embedding
(``time_cond_proj_dim`` 256, zero-initialised so it starts as the teacher) and learns every w in the
range: it is sampled with the CFG scale 1 + w, which only feeds the embedding (one U-Net call a step).

Outputs: ``lora_rank = 0`` distils the whole U-Net (``ldmkit export RUN model.safetensors``: the
model with the EMA U-Net); ``lora_rank = R`` trains LoRA modules on the frozen model and writes
``lcm_lora.safetensors`` in the kohya layout (``ldmkit generate --lora``, A1111 and diffusers load it).
Both record the settings to sample with: the LCM sampler, 4 steps, CFG 1 (1 + mid-range w with
``w_embedding``).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldmkit.config import ModelConfig
from ldmkit.lora import inject_lora, save_lora
from ldmkit.model import StableDiffusion
from ldmkit.models.clip import CLIPTextModel
from ldmkit.models.unet import UNetModel, guidance_embedding
from ldmkit.schedules import lcm_boundary_scalings, sd_alphas_cumprod
from ldmkit.train.config import TrainConfig, TrainError
from ldmkit.train.lora import LoRAWeights
from ldmkit.train.run_record import check_same_model
from ldmkit.train.runner import CHECKPOINT, DistInfo, read_checkpoint
from ldmkit.train.sources import load_model
from ldmkit.train.unet import UNetTask, _Shared, copy_sharing_frozen

LCM_LORA_FILE = "lcm_lora.safetensors"
RUN_FILE = "lcm_run.json"
# the few-step settings an LCM is meant to be sampled with (recorded in every exported file)
RECOMMENDED = {"sampler": "LCM", "steps": 4, "cfg_scale": 1.0}
# diffusers' LCM scripts: the width of the guidance embedding (``unet_time_cond_proj_dim``)
W_EMBEDDING_DIM = 256
# what a resumed run must not change
_RECORDED = ("lora_rank", "lora_alpha", "conv_lora", "num_ddim_timesteps", "w_embedding")


def solver_timesteps(num_train_timesteps: int, num_ddim_timesteps: int) -> Tensor:
    """t_n+k of the skipping-step DDIM solver: k - 1, 2k - 1, ..., T - 1 with k = T // N (diffusers'
    ``DDIMSolver``: ``(arange(1, N + 1) * k).round() - 1``)."""
    k = num_train_timesteps // num_ddim_timesteps
    return torch.arange(1, num_ddim_timesteps + 1) * k - 1


def x0_and_eps(pred: Tensor, x_t: Tensor, a: Tensor, s: Tensor, prediction: str) -> tuple[Tensor, Tensor]:
    """(x0, eps) from a network output at x_t = a x0 + s eps (a = sqrt(ab), s = sqrt(1 - ab))."""
    if prediction == "eps":
        return (x_t - s * pred) / a, pred
    if prediction == "v":  # v = a eps - s x0  (Salimans & Ho 2022)
        return a * x_t - s * pred, s * x_t + a * pred
    raise TrainError(f"cannot distil a model that predicts {prediction!r}; LCM needs eps or v")


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """sqrt((a - b)^2 + c^2) - c, averaged (Song & Dhariwal 2023; LCM's c = 0.001)."""
    return (torch.sqrt((a.float() - b.float()) ** 2 + c * c) - c).mean()


class ConsistencyLoss(nn.Module):
    """The distillation loss as ``forward(**batch)``; subclasses say which networks are online,
    teacher and target. The text encoder is frozen (its outputs are inputs to all three)."""

    def __init__(self, text: CLIPTextModel, empty_ids: Tensor, cfg: TrainConfig, model_cfg: Any):
        super().__init__()
        self.text = _Shared(text.requires_grad_(False).eval())
        self.clip_skip, self.prediction = model_cfg.clip_skip, model_cfg.prediction
        self.num_ddim, self.huber_c = cfg.num_ddim_timesteps, cfg.huber_c
        self.skip = model_cfg.num_train_timesteps // cfg.num_ddim_timesteps
        ac = sd_alphas_cumprod(model_cfg.num_train_timesteps, model_cfg.beta_start, model_cfg.beta_end)
        self.register_buffer("sqrt_ab", ac.sqrt().float(), persistent=False)
        self.register_buffer("sqrt_1mab", (1 - ac).sqrt().float(), persistent=False)
        self.register_buffer("ddim_t", solver_timesteps(model_cfg.num_train_timesteps, cfg.num_ddim_timesteps),
                             persistent=False)
        self.register_buffer("empty_ids", empty_ids.clone(), persistent=False)

    # -- the three networks (raw U-Net outputs); the student's take the guidance w
    def online(self, x: Tensor, t: Tensor, c: Tensor, w: Tensor) -> Tensor:
        raise NotImplementedError

    def teacher(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        raise NotImplementedError

    def target(self, x: Tensor, t: Tensor, c: Tensor, w: Tensor) -> Tensor:
        raise NotImplementedError

    def before_step(self, step: int) -> None:
        """Called with the optimizer step about to be taken (full mode: the target's EMA update)."""

    def _ab(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return self.sqrt_ab[t].view(-1, 1, 1, 1), self.sqrt_1mab[t].view(-1, 1, 1, 1)

    def consistency(self, x: Tensor, t: Tensor, pred: Tensor) -> Tensor:
        """f(x_t, t) = c_skip x_t + c_out x0 (the boundary scalings make f(x, 0) = x)."""
        c_skip, c_out = (c.float().to(x.device).view(-1, 1, 1, 1) for c in lcm_boundary_scalings(t))
        a, s = self._ab(t)
        return c_skip * x + c_out * x0_and_eps(pred.float(), x, a, s, self.prediction)[0]

    @torch.no_grad()
    def solver_step(self, x: Tensor, t_from: Tensor, t_to: Tensor, cond: Tensor, w: Tensor) -> Tensor:
        """One guided DDIM step of the teacher's ODE from t_n+k to t_n."""
        uncond = self.encode(self.empty_ids.expand(len(x), -1))
        out = self.teacher(torch.cat([x, x]), torch.cat([t_from, t_from]), torch.cat([cond, uncond])).float()
        a, s = self._ab(t_from)
        (x0_c, eps_c), (x0_u, eps_u) = (x0_and_eps(o, x, a, s, self.prediction) for o in out.chunk(2))
        w = w.float().view(-1, 1, 1, 1)
        x0, eps = x0_c + w * (x0_c - x0_u), eps_c + w * (eps_c - eps_u)
        a_to, s_to = self._ab(t_to)
        return a_to * x0 + s_to * eps

    @torch.no_grad()
    def encode(self, ids: Tensor) -> Tensor:
        return self.text.module(ids, clip_skip=self.clip_skip)

    def targets(self, latents: Tensor, ids: Tensor, index: Tensor, noise: Tensor, w: Tensor
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(x_t_n+k, t_n+k, cond, consistency target) of a batch: everything but the online network."""
        t_start = self.ddim_t[index]
        t_end = (t_start - self.skip).clamp_min(0)
        a, s = self._ab(t_start)
        x_start = a * latents + s * noise
        cond = self.encode(ids)
        x_end = self.solver_step(x_start, t_start, t_end, cond, w)
        with torch.no_grad():
            target = self.consistency(x_end, t_end, self.target(x_end, t_end, cond, w))
        return x_start, t_start, cond, target

    def forward(self, latents: Tensor, ids: Tensor, index: Tensor, noise: Tensor, w: Tensor,
                step: int) -> tuple[Tensor, dict]:
        self.before_step(step)
        x_start, t_start, cond, target = self.targets(latents, ids, index, noise, w)
        pred = self.consistency(x_start, t_start, self.online(x_start, t_start, cond, w))
        return pseudo_huber(pred, target, self.huber_c), {}


class FullDistiller(ConsistencyLoss):
    """The whole U-Net is trained from the teacher's weights; the target is its EMA (decay
    ``target_decay``), updated once per optimizer step. Checkpointed: ``unet``, ``target_unet`` and
    ``target_step`` (the target is brought up to date lazily, at the next step's forward). With
    ``w_embedding`` the student is the teacher plus a zero-initialised guidance projection."""

    def __init__(self, teacher: UNetModel, text: CLIPTextModel, empty_ids: Tensor, cfg: TrainConfig,
                 model_cfg: Any, init_student: UNetModel | None = None):
        super().__init__(text, empty_ids, cfg, model_cfg)
        self.frozen_teacher = _Shared(teacher.requires_grad_(False).eval())
        self.w_dim = model_cfg.unet.time_cond_proj_dim  # the student's (model_cfg is the student's)
        student = copy.deepcopy(teacher)
        if init_student is not None:  # a distilled U-Net to go on from (LCMTask checked its architecture)
            student = copy.deepcopy(init_student).to(next(teacher.parameters()).device)
        elif self.w_dim and not teacher.cfg.time_cond_proj_dim:
            student = UNetModel(model_cfg.unet).to(next(teacher.parameters()).device)
            missing = student.load_state_dict(teacher.state_dict(), strict=False).missing_keys
            assert missing == ["time_embedding.cond_proj.weight"], missing
            nn.init.zeros_(student.time_embedding.cond_proj.weight)
        self.unet = student.requires_grad_(True).train()
        self.target_unet = copy.deepcopy(student).requires_grad_(False).eval()
        self.register_buffer("target_step", torch.zeros((), dtype=torch.long))
        self.target_decay = cfg.target_decay

    def _w(self, w: Tensor) -> Tensor | None:
        return guidance_embedding(w, self.w_dim) if self.w_dim else None

    def online(self, x: Tensor, t: Tensor, c: Tensor, w: Tensor) -> Tensor:
        return self.unet(x, t, c, self._w(w))

    def teacher(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        return self.frozen_teacher.module(x, t, c)

    def target(self, x: Tensor, t: Tensor, c: Tensor, w: Tensor) -> Tensor:
        return self.target_unet(x, t, c, self._w(w))

    @torch.no_grad()
    def before_step(self, step: int) -> None:
        # the EMA update that follows optimizer step (step - 1); done here, where the net is in hand
        if step > int(self.target_step):
            target, online = list(self.target_unet.parameters()), [p.detach() for p in self.unet.parameters()]
            torch._foreach_lerp_(target, online, 1.0 - self.target_decay)
            self.target_step.fill_(step)

    def train(self, mode: bool = True) -> FullDistiller:
        super().train(mode)
        self.target_unet.eval()
        return self

    def __deepcopy__(self, memo: dict) -> FullDistiller:
        """The runner's evaluation copy needs only the online U-Net: it shares the target's weights."""
        memo[id(self.target_unet)] = self.target_unet
        new = FullDistiller.__new__(FullDistiller)
        memo[id(self)] = new
        new.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items()})
        return new


class LoRADistiller(ConsistencyLoss):
    """LoRA modules on the frozen model (an LCM-LoRA): the teacher is the model with the modules
    switched off, the target the model with them on, without gradients. Only the LoRA matrices are
    registered (``lora.<kohya name>.lora_down.weight`` ...): optimizer, EMA and checkpoint hold just them."""

    def __init__(self, model: StableDiffusion, injected: dict, empty_ids: Tensor, cfg: TrainConfig):
        super().__init__(model.text_encoder, empty_ids, cfg, model.cfg)
        self.lora = nn.ModuleDict({name: LoRAWeights(m) for name, m in injected.items()})
        self.frozen = _Shared(model)
        self.modules_ = _Shared(list(injected.values()))  # type: ignore[arg-type]

    def online(self, x: Tensor, t: Tensor, c: Tensor, w: Tensor) -> Tensor:
        return self.frozen.module.unet(x, t, c)

    target = online  # without gradients: called under no_grad

    def teacher(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        mods = self.modules_.module
        for m in mods:
            m.multiplier = 0.0
        try:
            return self.frozen.module.unet(x, t, c)
        finally:
            for m in mods:
                m.multiplier = 1.0

    def train(self, mode: bool = True) -> LoRADistiller:
        super().train(mode)
        self.frozen.module.unet.train(mode)
        return self

    def __deepcopy__(self, memo: dict) -> LoRADistiller:
        """A copy with its own LoRA weights that shares the frozen model's (for the runner's EMA copy)."""
        return copy_sharing_frozen(self, self.frozen.module, memo)


# ---------------------------------------------------------------- the task


def _check_record(old: dict[str, Any], new: dict[str, Any], run_dir: Path) -> None:
    check_same_model(old, new, f"the teacher {run_dir} was started with")
    base = TrainConfig()  # a setting added since the run started has its default there
    diffs = [f"{k}: {old.get(k, getattr(base, k))!r} in the run, {new[k]!r} now" for k in _RECORDED
             if old.get(k, getattr(base, k)) != new[k]]
    if diffs:
        raise TrainError(f"{run_dir} was started with other distillation settings: " + "; ".join(diffs)
                         + ". Resume without these options, or start a new run with another --out.")


class LCMTask(UNetTask):
    """Consistency distillation of the model ``init_from`` names; data, latent cache, caption
    templates and sample grids are the U-Net trainer's."""

    arch_parts = ("unet", "text", "vae")  # the teacher's: resuming on another model fails early

    def __init__(self, cfg: TrainConfig, run_dir: Path, d: DistInfo):
        self.cfg, self.run_dir, self.device = cfg, run_dir, d.device
        model = load_model(cfg.init_from, "--model")
        if model.cfg.is_inpainting:
            raise TrainError(f"--model {cfg.init_from} is an inpainting model; distil its base model")
        if model.cfg.prediction not in ("eps", "v"):
            raise TrainError(f"--model {cfg.init_from} predicts {model.cfg.prediction!r}; LCM needs eps or v")
        if model.cfg.num_train_timesteps % cfg.num_ddim_timesteps:
            raise TrainError(f"num_ddim_timesteps {cfg.num_ddim_timesteps} must divide the model's "
                             f"{model.cfg.num_train_timesteps} training timesteps, e.g. 50")
        self.start_from_model(model, d, RUN_FILE, "lcm", {k: getattr(cfg, k) for k in _RECORDED}, _check_record)
        self.tokenize(model.tokenizer)
        self.model_cfg = model.cfg.replace(name=run_dir.name, extra={"image_size": cfg.size})
        if cfg.w_embedding and not model.cfg.unet.time_cond_proj_dim:
            self.model_cfg = self.model_cfg.replace(
                unet=dataclasses.replace(model.cfg.unet, time_cond_proj_dim=W_EMBEDDING_DIM))
        self.model = model.to(d.device).requires_grad_(False)
        self.injected: dict = {}
        if cfg.lora_rank:
            self.injected = inject_lora(model, cfg.lora_rank, cfg.lora_alpha, text_encoder=False, conv=cfg.conv_lora)
            self.net: ConsistencyLoss = LoRADistiller(model, self.injected, self.empty_ids, cfg)
        else:
            self.net = FullDistiller(model.unet, model.text_encoder, self.empty_ids, cfg, self.model_cfg,
                                     self._init_student())
        self.net.to(d.device)
        model.unet.gradient_checkpointing = cfg.gradient_checkpointing
        if isinstance(self.net, FullDistiller):
            self.net.unet.gradient_checkpointing = cfg.gradient_checkpointing

    def _init_student(self) -> UNetModel | None:
        """The U-Net of ``init_student`` (None without it, or when resuming: the checkpoint has the student);
        its architecture must be the student's."""
        if not self.cfg.init_student or (self.run_dir / CHECKPOINT).exists():
            return None
        unet = load_model(self.cfg.init_student, "--init-student").unet
        if unet.cfg != self.model_cfg.unet:
            diff = [f"{f.name} {getattr(unet.cfg, f.name)!r} there, {getattr(self.model_cfg.unet, f.name)!r} here"
                    for f in dataclasses.fields(unet.cfg)
                    if getattr(unet.cfg, f.name) != getattr(self.model_cfg.unet, f.name)]
            raise TrainError(f"--init-student {self.cfg.init_student}: its U-Net is not the student's ("
                             + "; ".join(diff) + "); pass a model distilled from this teacher"
                             + (" (and --w-embedding for one with a guidance embedding)" if not self.cfg.w_embedding
                                else ""))
        return unet

    def make_batch(self, idx: Tensor, gen: torch.Generator, step: int) -> dict[str, Any]:
        latents = self.sample_latents(idx, gen)
        b = len(idx)
        index = torch.randint(0, self.cfg.num_ddim_timesteps, (b,), generator=gen)
        noise = torch.randn(latents.shape, generator=gen)
        w = self.cfg.w_min + (self.cfg.w_max - self.cfg.w_min) * torch.rand(b, generator=gen)
        ids = self.caption_ids(idx, gen, torch.zeros(b, dtype=torch.bool))
        return {"latents": latents, "ids": ids, "index": index, "noise": noise, "w": w, "step": step}

    def viewer(self, eval_net: nn.Module) -> StableDiffusion:
        """The teacher's model with the evaluated (EMA) student in place of its U-Net."""
        if isinstance(eval_net, LoRADistiller):
            return eval_net.frozen.module  # its LoRA modules hold the EMA weights
        assert isinstance(eval_net, FullDistiller)
        with torch.device("meta"):
            sd = StableDiffusion(self.model_cfg, tokenizer=self.model.tokenizer)
        sd.unet, sd.vae, sd.text_encoder = eval_net.unet, self.model.vae, self.model.text_encoder
        return sd

    def evaluate(self, eval_net: nn.Module, step: int) -> dict[str, float]:
        """A grid of the sample prompts, sampled as an LCM is (the LCM sampler, 4 steps, CFG 1) when
        ldmkit has that sampler, else with the configured sampler steps."""
        from ldmkit.pipeline import GenerationParams, txt2img
        from ldmkit.samplers import SAMPLERS
        from ldmkit.train.data import save_grid

        lcm = RECOMMENDED["sampler"] in SAMPLERS
        rec = recommended(self.cfg)
        model = self.viewer(eval_net)
        was_training = eval_net.training
        images = []
        for i, prompt in enumerate(self.sample_prompts):
            params = GenerationParams(
                prompt=prompt, seed=self.cfg.seed + i, width=self.cfg.size, height=self.cfg.size,
                steps=RECOMMENDED["steps"] if lcm else self.cfg.sample_steps,
                cfg_scale=rec["cfg_scale"] if lcm else self.cfg.sample_cfg_scale,
                sampler=RECOMMENDED["sampler"] if lcm else "Euler")
            images += txt2img(model, params)
        eval_net.train(was_training)
        save_grid(images, min(4, len(images)), self.run_dir / "samples" / f"step_{step:07d}.png")
        return {}

    def state(self) -> dict[str, Any]:
        if self.injected:  # beside each checkpoint, as `train lora` does (the trained weights)
            save_lora(self.injected, self.run_dir / LCM_LORA_FILE, lcm_lora_metadata(self.cfg))
        return {"init_from": self.cfg.init_from, "lora_rank": self.cfg.lora_rank,
                "recommended": recommended(self.cfg)}


# ---------------------------------------------------------------- export


def recommended(cfg: TrainConfig) -> dict[str, Any]:
    """LCM sampler, 4 steps, CFG 1; with a guidance embedding the CFG scale 1 + w picks w (mid-range)."""
    if cfg.w_embedding:
        return {**RECOMMENDED, "cfg_scale": 1.0 + (cfg.w_min + cfg.w_max) / 2}
    return dict(RECOMMENDED)


def recommended_metadata(rec: dict[str, Any]) -> dict[str, str]:
    """The sampler settings recorded in an exported file (``ldmkit.recommended``; loaders apply them)."""
    from ldmkit.recommended import recommended_metadata as write

    return write(rec["sampler"], rec["steps"], rec["cfg_scale"])


def lcm_lora_metadata(cfg: TrainConfig) -> dict[str, str]:
    return {"ss_network_module": "networks.lora", "ss_network_dim": str(cfg.lora_rank),
            "ss_network_alpha": str(cfg.lora_alpha), "ss_sd_model_name": Path(cfg.init_from).name,
            "ss_network_train_unet_only": "True", "ss_training_comment": "ldmkit train lcm (LCM-LoRA)",
            **recommended_metadata(recommended(cfg))}


def export_lcm(run_dir: str | os.PathLike, out: str | os.PathLike, half: bool = False) -> Path:
    """An LCM run's EMA weights: the teacher model with the distilled U-Net (full mode; the teacher
    file must be where ``init_from`` says), or a kohya-layout LCM-LoRA (LoRA mode)."""
    from ldmkit.checkpoint import atomic_save_safetensors, save_single_file
    from ldmkit.train.export import ema_weights, safetensors_path

    out = safetensors_path(out)
    ckpt = read_checkpoint(Path(run_dir))
    if ckpt["kind"] != "lcm":
        raise TrainError(f"{run_dir} is a {ckpt['kind']} run, not an LCM run")
    dtype = torch.float16 if half else None
    init_from, rank = ckpt["task"]["init_from"], ckpt["task"]["lora_rank"]
    if rank:
        sd = ema_weights(ckpt, "lora.")
        if dtype is not None:
            sd = {k: v.to(dtype) for k, v in sd.items()}
        atomic_save_safetensors(sd, out, lcm_lora_metadata(_run_config(run_dir)))
        return out
    model = load_model(init_from, "the run's teacher (init_from)")
    student = ModelConfig.from_json(ckpt["model_config"]).unet
    if student != model.cfg.unet:  # the guidance embedding added
        model.unet = UNetModel(student)
        model.cfg = model.cfg.replace(unet=student)
    model.unet.load_state_dict(ema_weights(ckpt, "unet."))  # strict
    rec = ckpt["task"].get("recommended", RECOMMENDED)
    save_single_file(model, out, dtype=dtype, metadata=recommended_metadata(rec))
    return out


def _run_config(run_dir: str | os.PathLike) -> TrainConfig:
    from ldmkit.train import load_run_config

    return load_run_config(run_dir)
